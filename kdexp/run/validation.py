"""Check a composed config before anything is trained, written or downloaded.

Every numeric setting with a valid range is checked for type and range, the
teacher and student are built once against the data's shape (so ``data=digits``
with a 1-D teacher fails in a second, naming the teacher group, instead of after
the teacher trained), and the objective's feature taps are looked up in the
models. Each message names the config key, the bad value and what is valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kdexp.core.config import instantiate, objective_node
from kdexp.core.errors import ConfigError, KdexpError
from kdexp.core.tasks import task_of
from kdexp.data.base import available_memory_bytes, gigabytes
from kdexp.data.tokenizer import load_tokenizer, model_dir_tokenizer_fingerprint
from kdexp.models.features import tap_points
from kdexp.teachers.chain import assistant_config, chain_of, parse_entry

_UNSET = object()


@dataclass(frozen=True)
class Range:
    """A numeric config key: its type and bounds (``None``: unbounded)."""

    key: str
    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    nullable: bool = False
    example: str = ""
    why: str = ""  # why the bounds are where they are, when that is not obvious

    def describe(self) -> str:
        kind = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            span = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            span = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            span = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            span = ""
        text = f"{kind} {span}".strip() + (" or null" if self.nullable else "")
        return text + (f" (e.g. {self.example})" if self.example else "") + (f"; {self.why}" if self.why else "")

    def check(self, value: Any) -> str | None:
        """None when ``value`` is valid, else what is wrong with it."""
        if value is None:
            return None if self.nullable else "is null"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"is a {type(value).__name__}, not a number"
        if self.kind is int and isinstance(value, float):
            return "is not a whole number"
        if isinstance(value, float) and not math.isfinite(value):
            return "is not finite"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return "is out of range"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return "is out of range"
        return None


MAX_SEED = 2**32 - 1  # what numpy and Lightning's seed_everything accept
# The soft-target temperature T. With the T² convention the KD gradient on the student's logits is
# T · (softmax(s/T) − softmax(t/T)): below T = 0.05 the term carries under 5 % of its T = 1 weight, and
# a teacher logit gap of 0.5 already leaves the runner-up e^-10 of the top class's probability, so
# softmax(t/T) is the teacher's one-hot argmax and KD silently stops being KD (T = 1e-30 scales it to
# exactly 0). Above T = 100, softmax(z/T) ≈ (1 + z/T)/C for logits of ordinary size (|z| ≲ 10):
# Hinton's high-T limit (matching mean-centred logits) is reached, and a larger T only pushes the
# differences the loss is built from towards float32 rounding. Published settings lie in [1, 20]
# (Hinton et al. 2015; CRD and DKD use 4; MNIST-1D here 8); CTKD's learnt temperatures stay in [1, 21].
TEMPERATURE_RANGE = (0.05, 100.0)

RANGES: tuple[Range, ...] = (
    Range("seed", int, 0, MAX_SEED, example="seed=1"),
    Range("num_threads", int, 1, nullable=True, example="num_threads=1"),
    Range("trainer.max_epochs", int, 1, example="trainer.max_epochs=100"),
    Range("trainer.gradient_clip_val", float, 0, nullable=True),
    Range("data.batch_size", int, 1, example="data.batch_size=100"),
    Range("data.eval_batch_size", int, 1),
    Range("data.val_fraction", float, 0, 1, low_open=True, high_open=True, example="data.val_fraction=0.1"),
    Range("data.test_fraction", float, 0, 1, low_open=True, high_open=True),
    Range("data.split_seed", int, 0, MAX_SEED),
    Range("data.generator_seed", int, 0, MAX_SEED),
    Range("data.transfer_size", int, 0, example="data.transfer_size=20000"),
    Range("data.transfer_seed", int, 0, MAX_SEED),
    Range("student.width", int, 1, example="student.width=128"),
    Range("student.depth", int, 1, example="student.depth=2"),
    Range("teacher.model.width", int, 1),
    Range("teacher.model.depth", int, 1),
    Range("teacher.max_epochs", int, 0, example="teacher.max_epochs=160"),
    Range("teacher.seed", int, 0, MAX_SEED),
    Range("teacher.optimizer.lr", float, 0, low_open=True),
    Range("kd.temperature", float, *TEMPERATURE_RANGE, example="kd.temperature=4",
          why="below 0.05 the soft targets are the teacher's one-hot argmax and the T²-scaled KD term "
              "vanishes; above 100 KD is already its high-T limit (logit matching) and only loses float32 "
              "precision; published settings lie in [1, 20]"),
    Range("kd.alpha", float, 0, 1, example="kd.alpha=0.9"),
    Range("kd.label_smoothing", float, 0, 1, high_open=True),
    Range("kd.cache_topk", int, 1, nullable=True, example="kd.cache_topk=8"),
    Range("optimizer.lr", float, 0, low_open=True, example="optimizer.lr=0.003"),
    Range("optimizer.weight_decay", float, 0),
    Range("optimizer.momentum", float, 0, 1),
    Range("scheduler.T_max", int, 1),
)

RANGE_BY_KEY = {rule.key: rule for rule in RANGES}

CHOICES: dict[str, tuple[Any, ...]] = {
    "if_finished": ("error", "skip", "rerun"),
    "resume": (True, False),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "kd.cache_teacher": ("auto", True, False),
    "data.transfer_set": (None, "generated"),
    "teacher.dtype": (None, "float32", "bfloat16", "float16"),
}


def _get(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key`` or ``_UNSET``; an interpolation that cannot resolve is a config error."""
    try:
        return OmegaConf.select(cfg, key, default=_UNSET, throw_on_missing=True)
    except Exception as err:  # omegaconf's errors for missing values and broken interpolations
        raise ConfigError(f"{key} cannot be resolved: {err}") from None


def _width_rule(cfg: DictConfig, rule: Range) -> Range:
    """A model whose width is a channel multiplier (``fractional_width``, the CIFAR zoo) takes any
    positive number there; the others need a whole number of units."""
    if rule.key not in ("student.width", "teacher.model.width"):
        return rule
    target = _get(cfg, rule.key.rsplit(".", 1)[0] + "._target_")
    try:
        from hydra.utils import get_object

        fractional = bool(getattr(get_object(str(target)), "fractional_width", False))
    except Exception:  # an unimportable target is reported, with its cause, when the model is built
        return rule
    if not fractional:
        return rule
    return Range(rule.key, float, 0, low_open=True, example=f"{rule.key}=0.5 (a channel multiplier)")


def check_values(cfg: DictConfig) -> list[str]:
    """Every out-of-range or mistyped value, as one message line each."""
    problems = []
    for rule in RANGES:
        rule = _width_rule(cfg, rule)
        value = _get(cfg, rule.key)
        if value is _UNSET:
            continue
        why = rule.check(value)
        if why:
            problems.append(f"{rule.key}={value!r} {why}: it must be {rule.describe()}.")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value is not _UNSET and value not in allowed:
            shown = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
            problems.append(f"{key}={value!r} is not an option: it must be one of {shown}.")
    return problems


def _choice(cfg: DictConfig, group: str) -> str:
    return str((cfg.get("choices") or {}).get(group, group))


def _build(cfg: DictConfig, node: DictConfig, group: str, label: str) -> Any:
    """Instantiate ``node``; a model that does not fit the data names its own group."""
    try:
        return instantiate(node, what=label)
    except ConfigError as err:
        data = _choice(cfg, "data")
        raise ConfigError(f"{group}={_choice(cfg, group)} does not fit data={data}: {err} "
                          f"(the problem is in the {group} group: pick another {group}=... or fix {label}.*)") from None


def _check_taps(model: torch.nn.Module, paths: tuple[str, ...], group: str, cfg: DictConfig) -> None:
    names = tap_points(model)
    for path in paths:
        if path not in names:
            raise ConfigError(
                f"the objective kd={_choice(cfg, 'kd')} taps '{path}' in the {group} ({group}={_choice(cfg, group)}), "
                f"which has no such submodule; valid paths: {', '.join(sorted(names)) or '(none)'}."
            )


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` on the first kind of problem found, listing every instance of it."""
    problems = check_values(cfg)
    if problems:
        raise ConfigError("invalid config value" + ("s" if len(problems) > 1 else "") + ":\n  "
                          + "\n  ".join(problems))
    # Build each part once, on the CPU, to prove the parts fit together. These throwaway
    # instances use the global RNG; the run reseeds before building the real ones.
    _check_teacher_source(cfg)
    with torch.random.fork_rng(devices=[]):
        # Not built when it is never loaded (teacher.load=false): it may not fit in memory.
        teacher = _build(cfg, cfg.teacher.model, "teacher", "teacher.model") if cfg.teacher.get("load", True) else None
        student = _build(cfg, cfg.student, "student", "student")
        objective = instantiate(objective_node(cfg), what="kd")  # its own errors name its keys; it does not "fit" data
    _check_task(cfg, objective)
    _check_schedules(cfg, objective)
    _check_taps(student, tuple(getattr(objective, "student_features", ()) or ()), "student", cfg)
    if teacher is not None:
        _check_taps(teacher, tuple(getattr(objective, "teacher_features", ()) or ()), "teacher", cfg)
        _check_forward(cfg, teacher, "teacher")
    _check_tokenizers(cfg)
    _check_forward(cfg, student, "student")
    _check_extra_teachers(cfg, objective)
    _check_chain(cfg, objective)
    _check_transfer_set(cfg, objective)


def _check_teacher_source(cfg: DictConfig) -> None:
    """``teacher.max_epochs=0`` uses a pretrained model as it is; ``teacher.load=false`` reads only predictions."""
    tcfg = cfg.teacher
    if int(tcfg.get("max_epochs", 1)) == 0 and not (tcfg.model.get("pretrained") or tcfg.get("checkpoint")):
        raise ConfigError("teacher.max_epochs=0 means \"use the teacher as it is\", which needs a pretrained model "
                          "(teacher.model.pretrained=...) or teacher.checkpoint=...; a model built from scratch "
                          "is random. Set teacher.max_epochs >= 1 to train it.")
    if not tcfg.get("load", True) and not tcfg.get("predictions"):
        raise ConfigError("teacher.load=false runs without the teacher, so its outputs must come from a file: set "
                          "teacher.predictions=<file from `kdexp predict`>, or teacher.load=true.")


def _check_tokenizers(cfg: DictConfig) -> None:
    """Token-level KD compares distributions over one vocabulary: the data, the teacher and the
    student must share a tokenizer. Mapping one vocabulary onto another (ULD, Boizard et al. 2024)
    is out of scope, so a mismatch is refused before anything is trained."""
    if not task_of(cfg).token_inputs:
        return
    nodes = {"teacher": cfg.teacher.model if cfg.teacher.get("load", True) else None, "student": cfg.student}
    saved = {group: str(node.get("pretrained")) for group, node in nodes.items()
             if node is not None and node.get("pretrained") and Path(str(node.get("pretrained"))).expanduser().is_dir()}
    if not saved:  # models built here have no tokenizer of their own: they take the data's
        return

    data_spec = cfg.data.get("tokenizer") or "bytes"
    data_print = load_tokenizer(data_spec).fingerprint()
    for group, pretrained in saved.items():
        model_print = model_dir_tokenizer_fingerprint(Path(str(pretrained)).expanduser())
        if model_print is not None and model_print != data_print:
            raise ConfigError(
                f"tokenizer mismatch: the {group} ({pretrained}) was saved with another tokenizer than the data's "
                f"(data.tokenizer={data_spec}). Teacher and student logits must range over one vocabulary: "
                f"tokenize the data with the {group}'s tokenizer (data.tokenizer={pretrained}) and give teacher "
                "and student that same tokenizer. Mapping between vocabularies (e.g. ULD) is not supported.")


def _check_transfer_set(cfg: DictConfig, objective: Any) -> None:
    """Transfer-set inputs have no label: only an objective that learns them from the teacher alone may use them."""
    if not cfg.data.get("transfer_set"):
        return
    if int(cfg.data.get("transfer_size") or 0) < 1:
        raise ConfigError(f"data.transfer_set={cfg.data.transfer_set} needs data.transfer_size >= 1 (e.g. 20000).")
    _check_transfer_memory(cfg)
    if not getattr(objective, "needs_teacher", True):
        raise ConfigError("data.transfer_set adds unlabelled inputs, whose only signal is the teacher; kd="
                          f"{_choice(cfg, 'kd')} uses no teacher. Drop the transfer set for the CE-only baseline.")
    if not getattr(objective, "handles_unlabelled", False):
        raise ConfigError(f"kd={_choice(cfg, 'kd')} ({type(objective).__name__}) does not declare how it treats "
                          "unlabelled transfer inputs (handles_unlabelled); use kd=hinton with data.transfer_set.")


def _check_transfer_memory(cfg: DictConfig) -> None:
    """A transfer set is generated in memory, in one piece: one that cannot fit is refused before
    anything runs, rather than failing (or swapping) after hours of generation."""
    from hydra.utils import get_object


    try:
        data_class = get_object(str(cfg.data._target_))
    except Exception:  # an unimportable data target is reported, with its cause, when the data is built
        return
    size, shape = int(cfg.data.transfer_size), [int(d) for d in cfg.data.input_shape]
    needed = getattr(data_class, "transfer_set_bytes", lambda *_: None)(size, shape)
    available = available_memory_bytes()
    if needed is None or available is None or needed <= available:
        return
    per_input = needed / size
    raise ConfigError(
        f"data.transfer_size={size} would need about {gigabytes(needed)} of memory to generate "
        f"({per_input / 1e3:.1f} KB per input of shape {shape}, measured), and {gigabytes(available)} is available "
        f"here. Choose data.transfer_size={int(available // per_input // 1000 * 1000)} or less, or run on a "
        "machine with more memory.")


def _check_chain(cfg: DictConfig, objective: Any) -> None:
    """Each assistant of a ``chain`` parses, is built, fits the data, and can teach the next stage."""

    chain = chain_of(cfg)
    if not chain:
        return
    if not getattr(objective, "needs_teacher", True):
        raise ConfigError(f"chain={list(chain)} trains assistants to distil through, but kd={_choice(cfg, 'kd')} "
                          "uses no teacher: drop the chain (chain=[]) for the CE-only baseline.")
    if cfg.get("teachers"):
        raise ConfigError("a chain and extra teachers cannot be combined: each stage has one teacher.")
    if cfg.teacher.get("predictions"):
        raise ConfigError("teacher.predictions holds the root teacher's outputs; with a chain the student's "
                          "teacher is the last assistant. Drop one of the two.")
    for position, entry in enumerate(chain):
        parse_entry(entry, position)
    stage = cfg
    while chain_of(stage):
        stage = assistant_config(stage)
        label = f"chain[{len(chain_of(stage))}]"
        with torch.random.fork_rng(devices=[]):
            model = _build(stage, stage.student, "student", label)
        _check_taps(model, tuple(getattr(objective, "teacher_features", ()) or ()), "student", stage)
        _check_forward(stage, model, label)


def _check_extra_teachers(cfg: DictConfig, objective: Any) -> None:
    """Each entry of ``teachers`` is a teacher node that fits the data; only objectives that read
    every teacher (``ModelOutputs.members``) may have them, and none may tap teacher features."""
    extra = list(cfg.get("teachers") or [])
    if not extra:
        return
    if not getattr(objective, "uses_teacher_members", False):
        raise ConfigError(f"teachers lists {len(extra)} extra teacher(s), but the objective kd={_choice(cfg, 'kd')} "
                          "reads one teacher; use kd=multi_teacher, or set teachers=[].")
    if getattr(objective, "teacher_features", ()):
        raise ConfigError("feature taps on several teachers are not supported: an ensemble has no single "
                          "layer to tap. Use logit objectives with teachers, or one teacher.")
    for i, node in enumerate(extra):
        if not isinstance(node, DictConfig) or "model" not in node:
            raise ConfigError(f"teachers[{i}] must be a teacher node with a 'model' (like conf/teacher/*.yaml), "
                              f"got {node!r}.")
        for key in ("max_epochs", "seed"):
            rule = RANGE_BY_KEY[f"teacher.{key}"]
            value = node.get(key)
            if value is not None and rule.check(value):
                raise ConfigError(f"teachers[{i}].{key}={value!r} {rule.check(value)}: it must be {rule.describe()}.")
        with torch.random.fork_rng(devices=[]):
            model = _build(cfg, node.model, "teacher", f"teachers[{i}].model")
        _check_forward(cfg, model, f"teachers[{i}]")


def _check_schedules(cfg: DictConfig, objective: Any) -> None:
    """Each scheduled setting exists on the objective and stays in its valid range at every epoch."""
    max_epochs = int(_get(cfg, "trainer.max_epochs"))
    for name, node in (cfg.get("schedule") or {}).items():
        if not node:
            continue
        if not hasattr(objective, str(name)):
            knobs = ", ".join(getattr(objective, "knobs", ())) or "none declared"
            raise ConfigError(f"schedule.{name}: the objective ({type(objective).__name__}, kd={_choice(cfg, 'kd')}) "
                              f"has no setting '{name}' to schedule; its knobs: {knobs}.")
        schedule = instantiate(node, what=f"schedule.{name}")
        rule = RANGE_BY_KEY.get(f"kd.{name}")
        if rule is None:
            continue
        for key in ("start", "end", "value"):  # named first: an end the run never reaches is still a typo
            value = node.get(key)
            if isinstance(value, (int, float)) and rule.check(value):
                raise ConfigError(f"schedule.{name}.{key}={value!r} {rule.check(value)}: like kd.{name}, it must "
                                  f"be {rule.describe()}.")
        for epoch, value in enumerate(schedule.values(max_epochs)):
            if rule.check(value):
                raise ConfigError(f"schedule.{name} gives {value:g} at epoch {epoch}, but kd.{name} must be "
                                  f"{rule.describe()}.")


def _check_forward(cfg: DictConfig, model: torch.nn.Module, group: str) -> None:
    """One forward pass on a dummy batch of the data's shape: the logits must have one column per class."""
    shape = [int(d) for d in cfg.data.input_shape]
    num_classes = int(cfg.data.num_classes)
    dtype = getattr(torch, str(cfg.data.get("input_dtype") or "float32"))
    expected = task_of(cfg).logits_shape(2, shape, num_classes)
    try:
        with torch.no_grad():
            logits = model.eval()(torch.zeros(2, *shape, dtype=dtype))
    except KdexpError:
        raise
    except Exception as err:
        raise ConfigError(f"{group}={_choice(cfg, group)} cannot take data={_choice(cfg, 'data')} inputs of shape "
                          f"{shape}: {type(err).__name__}: {err}") from None
    if tuple(logits.shape) != expected:
        what = (f"next-token logits of shape {list(expected[1:])}" if len(expected) > 2 else f"{num_classes} classes")
        raise ConfigError(f"{group}={_choice(cfg, group)} gives outputs of shape {list(logits.shape[1:])} for "
                          f"data={_choice(cfg, 'data')}, which needs {what}.")


def _check_task(cfg: DictConfig, objective: Any) -> None:
    """A language-model task needs an objective that reads (B, L, V) logits with a target per position."""
    if task_of(cfg).per_position and not getattr(objective, "handles_sequences", False):
        raise ConfigError(f"data={_choice(cfg, 'data')} is a language-model task (logits per position), and "
                          f"kd={_choice(cfg, 'kd')} ({type(objective).__name__}) works on class logits. Use "
                          "kd=token_kd (token-level KD) or kd=none.")
