"""Many students of one architecture trained in one loop, each as if it had run alone.

An ablation grid trains students that differ only in seed, T and α. On small students
the per-step framework cost, not the math, dominates, so training N of them in one
step amortises it: their weights are stacked along a leading student axis
(``torch.func.stack_module_state``) and one batched forward runs all of them.

What each student keeps of its own, exactly as in a single run:

- its initialisation: it is built after seeding with its own seed, as ``run_experiment`` does;
- its data order: epoch ``e`` draws the permutation of ``shuffle_seed + e``, as
  :class:`kdexp.data.batches.IndexBatches` does; the teacher's cached outputs are looked
  up by each student's own sample indices;
- its T and α: the Hinton loss is computed per student with its own values;
- its optimiser state: Adam and AdamW are elementwise, so one optimiser over the stacked
  tensors equals N optimisers over the slices (the student axis never mixes);
- its gradients: the summed loss's gradient with respect to student i's slice is the
  gradient of student i's own loss, since no other term depends on that slice.

This module is the training engine; :mod:`kdexp.packed_runs` writes each member's run
folder, record, checkpoints and W&B run, and ``kdexp sweep --pack N`` uses both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import stack_module_state


class StudentPack:
    """N MLP students of one shape with their parameters stacked along dimension 0."""

    def __init__(self, students: Sequence[nn.Module]) -> None:
        from kdexp.models.zoo import MLP

        if not students:
            raise ValueError("a pack needs at least one student")
        if not all(isinstance(s, MLP) for s in students):
            raise ValueError("packed students are MLPs (kdexp.models.MLP); other students train alone")
        shapes = {tuple((k, tuple(v.shape)) for k, v in s.state_dict().items()) for s in students}
        if len(shapes) != 1:
            raise ValueError("packed students must share one architecture (same parameter names and shapes)")
        self.size = len(students)
        self.depth = students[0].depth
        params, buffers = stack_module_state(list(students))
        self.params = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        self.buffers = buffers
        self.active = torch.ones(self.size, dtype=torch.bool)  # False: the member failed and is frozen
        self.failures: dict[int, str] = {}

    def fail(self, i: int, reason: str, optimizer: torch.optim.Optimizer) -> None:
        """Stop training member ``i`` because its loss went non-finite (see :meth:`stop`)."""
        self.failures[i] = reason
        self.stop(i, optimizer)

    def stop(self, i: int, optimizer: torch.optim.Optimizer) -> None:
        """Stop training member ``i`` (failed, or stopped early) without touching the others: its
        optimiser moments are zeroed, and :meth:`freeze_failed` zeroes its gradients every step,
        so its slice no longer learns (weight decay may still shrink it: its outcome keeps a
        snapshot taken when it stopped)."""
        self.active[i] = False
        for p in self.parameters():
            for moment in optimizer.state.get(p, {}).values():
                if torch.is_tensor(moment) and moment.dim() > 0 and moment.shape[0] == self.size:
                    moment[i] = 0

    def freeze_failed(self) -> None:
        if bool(self.active.all()):
            return
        for p in self.parameters():
            if p.grad is not None:
                p.grad[~self.active] = 0

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (N, B, ...) — each student's own batch → logits (N, B, C).

        Each operation is chosen so that a student's logits and gradients equal its single
        run's bit for bit (checked over 200 Adam steps at widths 16, 128 and 512): the hidden
        layers are one batched ``baddbmm`` (per slice the same product a ``Linear`` computes),
        while the narrow head runs per student, because a batched product's weight gradient
        there sums in another order than ``Linear``'s.
        """
        h = x.reshape(x.shape[0], x.shape[1], -1)
        for i in range(1, self.depth + 1):
            weight, bias = self.params[f"stage{i}.0.weight"], self.params[f"stage{i}.0.bias"]
            h = torch.relu(torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)))
        weight, bias = self.params["head.weight"], self.params["head.bias"]
        return torch.stack([F.linear(h[i], weight[i], bias[i]) for i in range(self.size)])

    def forward_shared(self, x: Tensor) -> Tensor:
        """``x``: (B, ...) — one batch every student sees (evaluation) → logits (N, B, C)."""
        return self.forward(x.unsqueeze(0).expand(self.size, *x.shape))

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def state_dict(self, i: int) -> dict[str, Tensor]:
        """Student ``i``'s own weights, as its module's ``state_dict`` would hold them."""
        return {name: t[i].detach().clone() for name, t in {**self.params, **self.buffers}.items()}


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The permutation a single run's training loader draws in ``epoch`` (see IndexBatches)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


@dataclass
class EpochSums:
    """Each member's loss terms summed over an epoch's steps, as a single run sums them (float32,
    step by step) before logging their means."""

    sums: list[dict[str, Tensor]]
    steps: int = 0

    def add(self, i: int, loss: Tensor, terms: dict[str, Tensor]) -> None:
        for name, value in {"loss": loss, **terms}.items():
            value = value.detach()
            mine = self.sums[i]
            mine[name] = mine[name] + value if name in mine else value.clone()

    def means(self, i: int) -> dict[str, float]:
        return {f"train/{name}": float(total / self.steps) for name, total in self.sums[i].items()}


def train_epoch(pack: StudentPack, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, teacher_logits: Tensor,
                seeds: Sequence[int], epoch: int, batch_size: int, objectives: Sequence[Any],
                transform=None) -> EpochSums:
    """One epoch of every student, each on its own permutation of the training split and with its
    own objective (the very module a single run calls: Hinton KD, or CE only without a teacher)."""
    from kdexp.objectives.base import ModelOutputs, total_loss

    n = len(x)
    orders = torch.stack([epoch_order(n, seed, epoch) for seed in seeds])  # (N, n)
    batches = -(-n // batch_size)
    sums = EpochSums([{} for _ in range(pack.size)])
    for objective in objectives:
        objective.epoch = epoch
    for start in range(0, n, batch_size):
        index = orders[:, start:start + batch_size]  # (N, B): each student's own samples
        xb = x[index]
        if transform is not None:
            xb = transform(xb)
        logits = pack.forward(xb)
        terms, losses = [], []
        for i, objective in enumerate(objectives):
            teacher = ModelOutputs(teacher_logits[index[i]]) if objective.needs_teacher else None
            terms.append(objective(ModelOutputs(logits[i]), teacher, y[index[i]]))
            losses.append(total_loss(terms[-1]))
        values = torch.stack([loss.detach() for loss in losses])
        broken = ~torch.isfinite(values) & pack.active  # one host sync per step, as a single run's check
        for i in torch.nonzero(broken).flatten().tolist():
            batch = start // batch_size
            detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms[i].items())
            pack.fail(i, f"training loss became {float(values[i])} at global step {epoch * batches + batch} "
                         f"(epoch {epoch}, batch {batch}); terms: {detail}. Lower optimizer.lr, check the inputs, "
                         "or set trainer.gradient_clip_val.", optimizer)
        active = pack.active.tolist()
        optimizer.zero_grad(set_to_none=True)
        live = [loss for loss, on in zip(losses, active) if on]
        if live:
            sum(live).backward()  # student i's slice gets the gradient of student i's loss alone
            pack.freeze_failed()  # a stopped member's slice never moves
            optimizer.step()
        for i, on in enumerate(active):
            if on:
                sums.add(i, losses[i], terms[i])
        sums.steps += 1
    return sums


Evaluated = list[tuple[Tensor, Tensor, Tensor]]  # per batch: logits (N, b, C), targets, sample indices


@torch.no_grad()
def evaluate(pack: StudentPack, batches) -> Evaluated:
    """Per-student logits on a split every student shares, batch by batch, as a single run's loop sees it."""
    return [(pack.forward_shared(x), y, index) for x, y, index in batches]


def accuracy(outputs: Evaluated) -> Tensor:
    """Per-student accuracy over :func:`evaluate`'s batches: (N,), counted as a single run counts it."""
    correct = sum((logits.argmax(-1) == y).sum(-1).double() for logits, y, _ in outputs)
    return correct / sum(len(y) for _, y, _ in outputs)


def member_metrics(outputs: Evaluated, i: int, teacher_logits: Tensor, num_classes: int,
                   metrics: Any = None) -> dict[str, float]:
    """Member ``i``'s evaluation metrics, updated batch by batch by the class single runs log them with
    (``metrics``: an :class:`~kdexp.modules.EvalMetrics` to reuse, reset after, as a run resets its own)."""
    from kdexp.modules import EvalMetrics

    metrics = metrics if metrics is not None else EvalMetrics(num_classes)
    for logits, targets, index in outputs:
        metrics.update(logits[i], targets, teacher_logits[index])
    values = {name: float(value) for name, value in metrics.compute().items()}
    metrics.reset()
    return values


@dataclass
class Snapshot:
    """One member's weights at the end of an epoch, with that epoch's logged values (a checkpoint's contents)."""

    epoch: int
    weights: dict[str, Tensor]
    metrics: dict[str, float]


@dataclass
class MemberOutcome:
    """What one member's training produced: its per-epoch history (what a single run logs each
    epoch), best-val and last snapshots, its own slice of the optimiser state, and the metrics
    of its record; or the error that stopped it (``error`` is None when it finished)."""

    history: list[dict[str, Any]] = field(default_factory=list)  # {"epoch", "val": {...}, "train": {...}}
    best: Snapshot | None = None
    last: Snapshot | None = None
    optimizer_state: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    epochs: int = 0  # epochs trained: max_epochs, or fewer when early stopping stopped it


@dataclass
class EarlyStopping:
    """Lightning's ``EarlyStopping`` on ``val/acc`` (mode max), per member: stop once ``patience``
    validations in a row fail to beat the best by more than ``min_delta``."""

    patience: int = 3
    min_delta: float = 0.0

    def start(self) -> dict[str, Any]:
        return {"best": torch.tensor(float("-inf")), "wait": 0}

    def should_stop(self, state: dict[str, Any], value: float) -> bool:
        current = torch.tensor(value)  # float32 arithmetic, as the callback compares tensors
        if not torch.isfinite(current):
            return True
        if bool(current - self.min_delta > state["best"]):
            state["best"], state["wait"] = current, 0
            return False
        state["wait"] += 1
        return state["wait"] >= self.patience


@dataclass
class PackFit:
    """A trained pack: each member's outcome, and what the test pass needs."""

    outcomes: list[MemberOutcome]
    steps_per_epoch: int
    val_init: Tensor  # (N,) accuracy of the untrained students, a single run's val/acc_init


def member_optimizer_state(optimizer: torch.optim.Optimizer, pack: StudentPack, i: int) -> dict[str, Any]:
    """Student ``i``'s slice of the stacked optimiser, laid out as its own optimiser's ``state_dict``."""
    state = {}
    for j, p in enumerate(pack.parameters()):
        state[j] = {k: (v[i].clone() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == pack.size
                        else v.clone() if torch.is_tensor(v) else v)
                    for k, v in optimizer.state.get(p, {}).items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(pack.parameters())))}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def train_pack(students: Sequence[nn.Module], *, shuffle_seeds: Sequence[int], objectives: Sequence[Any],
               datamodule: Any, teacher_logits: dict[str, Tensor], optimizer_factory: Any, max_epochs: int,
               num_classes: int, early_stopping: EarlyStopping | None = None, progress: bool = False) -> PackFit:
    """Train ``students`` together, each as :func:`kdexp.pipeline.run_experiment` would train it alone:
    its own data order, objective (its T and α) and optimiser slice, its best-val weights kept as
    ModelCheckpoint keeps them.

    ``teacher_logits``: the cached teacher logits of every split, looked up by sample index.
    ``early_stopping``: each member stops on its own, its last snapshot taken at its last epoch.
    """
    from kdexp.modules import EvalMetrics, settings_in_force

    pack = StudentPack(students)
    val_metrics = [EvalMetrics(num_classes) for _ in students]
    optimizer = optimizer_factory(pack.parameters())
    train = datamodule.splits["train"]
    val_init = accuracy(evaluate(pack, datamodule.eval_batches("val")))
    outcomes = [MemberOutcome() for _ in students]
    best_acc = [-1.0] * pack.size
    stopping = [early_stopping.start() for _ in students] if early_stopping is not None else None
    steps_per_epoch = 0
    epochs = range(max_epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=f"{pack.size} packed students", unit="epoch", leave=False)
    for epoch in epochs:
        sums = train_epoch(pack, optimizer, train.x, train.y, teacher_logits["train"], shuffle_seeds, epoch,
                           datamodule.batch_size, objectives, datamodule.batch_transform)
        steps_per_epoch = sums.steps
        val_outputs = evaluate(pack, datamodule.eval_batches("val"))
        for i, outcome in enumerate(outcomes):
            if not bool(pack.active[i]):
                if i in pack.failures:
                    outcome.error = pack.failures[i]
                continue
            val = {f"val/{k}": v for k, v in member_metrics(val_outputs, i, teacher_logits["val"], num_classes,
                                                            val_metrics[i]).items()}
            improved = val["val/acc"] > best_acc[i]  # strictly better, as ModelCheckpoint decides
            best_acc[i] = max(best_acc[i], val["val/acc"])
            val["val/acc_best"] = best_acc[i]
            # Lightning logs a float as a float32 tensor: α = 0.9 is recorded as 0.8999999761581421
            settings = {k: float(torch.tensor(v, dtype=torch.float32)) for k, v in settings_in_force(objectives[i]).items()}
            logged = {**settings, **sums.means(i)}
            outcome.history.append({"epoch": epoch, "val": val, "train": logged})
            outcome.epochs = epoch + 1
            if improved:
                outcome.best = Snapshot(epoch, pack.state_dict(i), {**logged, **val})
            if stopping is not None and early_stopping.should_stop(stopping[i], val["val/acc"]):
                finish_member(outcome, pack, optimizer, i)
                pack.stop(i, optimizer)
        if not bool(pack.active.any()):
            break
    for i, outcome in enumerate(outcomes):
        if outcome.error is None and bool(pack.active[i]):
            finish_member(outcome, pack, optimizer, i)
        if outcome.error is None and outcome.best is None:
            outcome.error = "no finite validation epoch"
    return PackFit(outcomes, steps_per_epoch, val_init)


def finish_member(outcome: MemberOutcome, pack: StudentPack, optimizer: torch.optim.Optimizer, i: int) -> None:
    """Take member ``i``'s last snapshot and optimiser slice: at the end, or when it stops early."""
    if not outcome.history:
        return
    last = outcome.history[-1]
    outcome.last = Snapshot(last["epoch"], pack.state_dict(i), {**last["train"], **last["val"]})
    outcome.optimizer_state = member_optimizer_state(optimizer, pack, i)


def test_pack(fit: PackFit, students: Sequence[nn.Module], datamodule: Any, teacher_logits: dict[str, Tensor],
              num_classes: int, teacher_test_acc: float) -> None:
    """Each finished member's record metrics: the last epoch's ``val/*`` and ``train/*``, ``test/*``
    at its best-val weights and ``test/*_last`` at its last, as :func:`kdexp.pipeline.fit_and_test`."""
    finished = [i for i, o in enumerate(fit.outcomes) if o.error is None]
    if not finished:
        return

    def tested(snapshot: str) -> Evaluated:
        for i in finished:
            students[i].load_state_dict(getattr(fit.outcomes[i], snapshot).weights)
        return evaluate(StudentPack([students[i] for i in finished]), datamodule.eval_batches("test"))

    at_last, at_best = tested("last"), tested("best")  # a member stopped early is tested where it stopped
    for row, i in enumerate(finished):
        outcome = fit.outcomes[i]
        test = member_metrics(at_best, row, teacher_logits["test"], num_classes)
        test_at_last = member_metrics(at_last, row, teacher_logits["test"], num_classes)
        outcome.metrics = {"val/acc_init": float(fit.val_init[i]), **outcome.last.metrics,
                           **{f"test/{k}_last": v for k, v in test_at_last.items()},
                           **{f"test/{k}": v for k, v in test.items()},
                           "best_val_score": outcome.last.metrics["val/acc_best"], "teacher/test_acc": teacher_test_acc}


# -- which grid points can share a pack ----------------------------------------------------
PACKABLE_STUDENTS = ("kdexp.models.MLP", "kdexp.models.zoo.MLP")
PACKABLE_OBJECTIVES = ("kdexp.objectives.HintonKD", "kdexp.objectives.hinton.HintonKD",
                       "kdexp.objectives.CrossEntropyOnly", "kdexp.objectives.cross_entropy.CrossEntropyOnly")
# What may differ between the members of one pack: everything else must be equal. Without
# these, Hinton's kd node and CE-only's are the same (the run-level cache settings); CE-only's
# label smoothing is always 0 in a pack (why_not_packable), since the packed loss has none.
PER_MEMBER_KEYS = ("seed", "data.shuffle_seed", "kd.temperature", "kd.alpha", "kd._target_", "kd.label_smoothing")


# Optimisers whose update of each element depends on that element's gradient and state alone:
# one over the stacked tensors equals one per student (weight decay and momentum included).
PACKABLE_OPTIMIZERS = ("torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD")
# Trainer settings a pack reproduces; any other one set (limit_train_batches, max_steps,
# val_check_interval, ...) changes the loop, and that run trains alone.
PACKABLE_TRAINER = {"_target_": None, "accelerator": ("cpu",), "devices": (1, "1", "auto"), "max_epochs": None,
                    "precision": ("32-true", "32", 32), "deterministic": None, "num_sanity_val_steps": None,
                    "log_every_n_steps": None, "enable_progress_bar": None, "enable_model_summary": None,
                    "gradient_clip_val": (None, 0, 0.0), "accumulate_grad_batches": (None, 1)}
DEFAULT_CALLBACKS = {"best_checkpoint", "last_checkpoint"}


def why_not_packable(cfg: Any) -> str | None:
    """None when ``cfg``'s run can train in a pack; otherwise the reason it runs alone."""
    if str(cfg.student.get("_target_")) not in PACKABLE_STUDENTS:
        return f"student {cfg.student.get('_target_')}: only MLP students pack so far"
    if str(cfg.kd.get("_target_")) not in PACKABLE_OBJECTIVES:
        return f"kd {cfg.kd.get('_target_')}: only Hinton KD and CE-only pack so far"
    if cfg.kd.get("label_smoothing"):
        return "label smoothing runs alone (the packed loss has none)"
    if cfg.get("chain") or cfg.get("teachers") or cfg.get("init_from") or cfg.teacher.get("predictions"):
        return "chains, extra teachers, init_from and predictions files run alone"
    if cfg.data.get("transfer_set") or any(node for node in (cfg.get("schedule") or {}).values()):
        return "transfer sets and schedules run alone"
    if cfg.data.get("augment") or str(cfg.kd.get("cache_teacher")).lower() == "false" or cfg.kd.get("cache_topk"):
        return "packs read the full cached teacher outputs: augmented data, kd.cache_teacher=false and " \
               "kd.cache_topk run alone"
    if cfg.get("scheduler"):
        return "lr schedulers run alone"
    if str(cfg.optimizer.get("_target_")) not in PACKABLE_OPTIMIZERS:
        return f"optimizer {cfg.optimizer.get('_target_')}: only Adam, AdamW and SGD (elementwise) pack"
    for key, value in cfg.trainer.items():
        if key not in PACKABLE_TRAINER:
            if value is not None:
                return f"trainer.{key} runs alone (a pack reproduces the default training loop only)"
        elif PACKABLE_TRAINER[key] is not None and value not in PACKABLE_TRAINER[key]:
            return f"trainer.{key}={value} runs alone (gradient clipping would mix members; packs train on the CPU)"
    for name, node in (cfg.get("callbacks") or {}).items():
        if name in DEFAULT_CALLBACKS or not node:
            continue
        if str(node.get("_target_")) not in EARLY_STOPPING_TARGETS:
            return f"callbacks.{name} ({node.get('_target_')}) runs alone: a pack reproduces the checkpoints and " \
                   "early stopping on val/acc only"
        settings = {k: v for k, v in node.items() if k != "_target_"}
        if settings.get("monitor") != "val/acc" or settings.get("mode") != "max" or \
                set(settings) - EARLY_STOPPING_SETTINGS or settings.get("check_finite", True) is not True:
            return f"callbacks.{name}: early stopping packs on monitor=val/acc, mode=max with patience and " \
                   "min_delta; other settings run alone"
    return None


EARLY_STOPPING_TARGETS = ("pytorch_lightning.callbacks.EarlyStopping",
                          "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
                          "lightning.pytorch.callbacks.EarlyStopping")
EARLY_STOPPING_SETTINGS = {"monitor", "mode", "patience", "min_delta", "verbose", "strict", "check_finite",
                           "log_rank_zero_only"}


def early_stopping_of(cfg: Any) -> EarlyStopping | None:
    """The run's early stopping on val/acc (see :func:`why_not_packable`), or None."""
    for name, node in (cfg.get("callbacks") or {}).items():
        if node and name not in DEFAULT_CALLBACKS and str(node.get("_target_")) in EARLY_STOPPING_TARGETS:
            return EarlyStopping(patience=int(node.get("patience", 3)), min_delta=float(node.get("min_delta", 0.0)))
    return None


def packing_key(cfg: Any) -> str:
    """Equal keys, packable together: the resolved config without :data:`PER_MEMBER_KEYS`."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    for dotted in PER_MEMBER_KEYS:
        *parents, leaf = dotted.split(".")
        node = plain
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    for key in ("choices", "overrides", "paths", "hydra"):
        plain.pop(key, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pack_groups(cfgs: Sequence[Any], size: int, workers: int = 1) -> tuple[list[list[int]], dict[int, str]]:
    """Grid points (by position) grouped into packs of at most ``size`` that share a packing key, in
    grid order; and the points that run alone, with why.

    A group is split evenly (9 points at ``size`` 8 are packs of 4 and 5, not 8 and a lone 1), and
    into at least ``workers`` packs where it has two points per worker: a pack never leaves a
    worker idle while another trains twice its share.
    """
    alone: dict[int, str] = {}
    by_key: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        reason = why_not_packable(cfg)
        if reason:
            alone[i] = reason
        else:
            by_key.setdefault(packing_key(cfg), []).append(i)
    packs = []
    for members in by_key.values():
        count = max(-(-len(members) // size), min(workers, len(members) // 2))
        bounds = [round(k * len(members) / count) for k in range(count + 1)]
        packs += [members[a:b] for a, b in zip(bounds, bounds[1:])]
    return packs, alone
