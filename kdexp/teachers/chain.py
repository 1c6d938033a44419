"""Distillation chains: the teacher distilled into assistants, each the next one's teacher.

``chain=[64,32]`` trains, before the run's own student, an assistant of width 64
distilled from the teacher, then one of width 32 distilled from that assistant; the
run's student is then distilled from the width-32 assistant (the "teacher assistant"
route of Mirzadeh et al., 2020, "Improved Knowledge Distillation via Teacher
Assistant", AAAI). An entry is a width of the student's own architecture (``64``) or
``<student option>@<width>`` (``cnn1d@16``).

Each assistant is an ordinary run (own folder, record, W&B run with a ``stage``) kept
under ``<cache>/stages/<key>``. Its key covers its whole recipe and its teacher's key,
so a chain reruns exactly the stages whose inputs changed, and two runs that share a
prefix of the chain (the same seed, objective and widths) share those assistants.

Every run records its teacher's **lineage**: one entry per stage from the root
teacher down (architecture, width, objective, weights hash, test accuracy), so a
report can tell "16 distilled directly" from "16 via 64 and 32".
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdexp.core.config import CONF_DIR as _CONF_DIR
from kdexp.core.config import objective_node, to_plain
from kdexp.core.distributed import one_process_trainer, runs_several_processes
from kdexp.core.errors import ConfigError
from kdexp.core.vocabulary import canonical_json

CONF_DIR = Path(_CONF_DIR)
# Settings that do not change what a stage learns (kept out of its key).
_NOT_IN_STAGE_KEY = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps", "default_root_dir")
_DATA_NOT_IN_KEY = ("cache_dir", "data_dir", "download", "eval_batch_size")


def chain_of(cfg: DictConfig) -> list[Any]:
    """The run's ``chain`` (assistant stages between the teacher and the student), as a list."""
    chain = cfg.get("chain")
    if chain is None:
        return []
    if isinstance(chain, (str, int)) or not OmegaConf.is_list(chain) and not isinstance(chain, list):
        raise ConfigError(f"chain must be a list of assistant widths or <student option>@<width> entries, e.g. "
                          f"chain=[64,32]; got {chain!r}.")
    return list(chain)


def parse_entry(entry: Any, position: int) -> tuple[str | None, int]:
    """``64`` → (None, 64): the student's architecture; ``"cnn1d@16"`` → ("cnn1d", 16)."""
    where = f"chain[{position}]"
    if isinstance(entry, bool):
        raise ConfigError(f"{where}={entry!r}: expected a width (e.g. 64) or <student option>@<width> (mlp@64).")
    if isinstance(entry, int):
        arch, width = None, entry
    elif isinstance(entry, str) and "@" in entry:
        arch, _, text = entry.partition("@")
        try:
            width = int(text)
        except ValueError:
            raise ConfigError(f"{where}={entry!r}: the part after @ must be a whole width, e.g. mlp@64.") from None
        if not (CONF_DIR / "student" / f"{arch}.yaml").is_file():
            options = ", ".join(sorted(p.stem for p in (CONF_DIR / "student").glob("*.yaml")))
            raise ConfigError(f"{where}={entry!r}: no student option '{arch}' (conf/student/: {options}).")
    else:
        raise ConfigError(f"{where}={entry!r}: expected a width (e.g. 64) or <student option>@<width> (mlp@64).")
    if width < 1:
        raise ConfigError(f"{where}={entry!r}: an assistant's width must be >= 1.")
    return arch, width


def assistant_config(cfg: DictConfig) -> DictConfig:
    """The config of the stage that trains ``cfg``'s teacher: the last chain entry as its student,
    the rest of the chain before it, everything else (objective, optimiser, budget, seed) shared."""
    chain = chain_of(cfg)
    if not chain:
        raise ValueError("assistant_config needs a non-empty chain")
    arch, width = parse_entry(chain[-1], len(chain) - 1)
    stage = cfg.copy()
    OmegaConf.set_struct(stage, False)
    if arch is None:
        node = cfg.student.copy()
    else:
        node = OmegaConf.load(CONF_DIR / "student" / f"{arch}.yaml")
        stage.choices = {**dict(cfg.get("choices") or {}), "student": arch}
    node.width = width
    stage.student = node
    stage.chain = chain[:-1]
    stage.overrides = []  # the stage's own config says everything; the user's overrides were the final run's
    # One process: a DDP run's rank 0 trains its stages before the other ranks exist (kdexp.core.distributed).
    if runs_several_processes(cfg.trainer):
        stage.trainer = one_process_trainer(to_plain(cfg.trainer))
    return stage


def stage_key(cfg: DictConfig, teacher_key: str) -> str:
    """The key of the stage that trains ``cfg``'s student from a teacher keyed ``teacher_key``."""
    plain = to_plain(cfg)
    payload = {
        "student": plain["student"],
        "kd": to_plain(objective_node(cfg)),
        "schedule": plain.get("schedule"),
        "optimizer": plain.get("optimizer"),
        "scheduler": plain.get("scheduler"),
        "trainer": {k: v for k, v in plain["trainer"].items() if k not in _NOT_IN_STAGE_KEY},
        "data": {k: v for k, v in plain["data"].items() if k not in _DATA_NOT_IN_KEY},
        "seed": plain.get("seed"),
        "num_threads": plain.get("num_threads"),
        "callbacks": plain.get("callbacks"),
        "teacher_key": teacher_key,
    }
    # Canonical: kd.temperature=4 from a sweep file is the default 4.0, so the two share one stage.
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def lineage_entry(stage: int, arch: str, width: Any, objective: str, weights_hash: str, test_acc: float,
                  path: str | None = None) -> dict[str, Any]:
    """One step of a lineage: who this teacher was and how it was made."""
    return {"stage": stage, "arch": arch, "width": width, "objective": objective, "hash": weights_hash,
            "test_acc": test_acc, "path": path}


def route_of(lineage: list[dict[str, Any]] | None) -> str:
    """``direct`` when the teacher is the root; ``via 64→32`` through assistants of those widths."""
    steps = list(lineage or [])[1:]
    return "via " + "→".join(str(step.get("width")) for step in steps) if steps else "direct"


def route_tag(cfg: DictConfig) -> str:
    """The route in a run name: ``""`` for a direct run, ``via48-32`` through ``chain=[48,32]``
    (``viacnn1d@16`` names an assistant of another architecture), so a chain run and the direct
    run of the same student are told apart in W&B."""
    chain = chain_of(cfg)
    return "via" + "-".join(str(entry) for entry in chain) if chain else ""


def stage_file(record: dict[str, Any], folder: Path, name: str) -> Path | None:
    """The stage's ``checkpoints[name]`` file, found in ``folder``, where the stage is now.

    A record states absolute paths, written where the cache was when the stage ran; the
    file's place inside the stage folder is what still holds once the cache is moved or
    copied (a copy then reads its own files, never the original's).
    """
    stated = (record.get("checkpoints") or {}).get(name)
    if not stated:
        return None
    if not Path(stated).is_absolute():
        return folder / stated
    return rebased(Path(stated), Path(str(record.get("output_dir") or folder)), folder)


def stage_lineage(record: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """The stage record's lineage, its files named where the cache holding ``folder`` is now
    (``<cache>/stages/<key>``: the cache is two levels up)."""
    then = Path(str(record.get("output_dir") or folder)).parent.parent
    return [{**entry, "path": str(rebased(Path(entry["path"]), then, folder.parent.parent))}
            if entry.get("path") else dict(entry) for entry in record.get("lineage") or []]


def rebased(path: Path, old_root: Path, new_root: Path) -> Path:
    """``path`` under ``old_root`` at the same place under ``new_root``; any other path (a user's
    teacher.checkpoint, a pretrained model's name) as it is."""
    try:
        return new_root / path.relative_to(old_root)
    except ValueError:
        return path
