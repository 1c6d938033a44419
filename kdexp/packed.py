"""Many students of one architecture trained in one loop, each as if it had run alone.

An ablation grid trains students that differ only in seed, T and α. On small students
the per-step framework cost, not the math, dominates, so training N of them in one
step amortises it: their weights are stacked along a leading student axis
(``torch.func.stack_module_state``) and one ``vmap``-ed forward runs all of them.

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

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap


class StudentPack:
    """N students of one architecture with their parameters stacked along dimension 0."""

    def __init__(self, students: Sequence[nn.Module]) -> None:
        if not students:
            raise ValueError("a pack needs at least one student")
        shapes = {tuple((k, tuple(v.shape)) for k, v in s.state_dict().items()) for s in students}
        if len(shapes) != 1:
            raise ValueError("packed students must share one architecture (same parameter names and shapes)")
        self.size = len(students)
        # The template holds no data: functional_call swaps the stacked slices in under vmap.
        self.template = copy.deepcopy(students[0]).to("meta")
        params, buffers = stack_module_state(list(students))
        self.params = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        self.buffers = buffers
        self.active = torch.ones(self.size, dtype=torch.bool)  # False: the member failed and is frozen
        self.failures: dict[int, str] = {}

    def fail(self, i: int, reason: str, optimizer: torch.optim.Optimizer) -> None:
        """Stop training member ``i`` (its loss went non-finite) without touching the others: its
        optimiser moments are zeroed, and :meth:`freeze_failed` zeroes its gradients every step,
        so Adam's update for its slice is 0 from now on."""
        self.active[i] = False
        self.failures[i] = reason
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

    def _one(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (N, B, ...) — each student's own batch → logits (N, B, C)."""
        return vmap(self._one)(self.params, self.buffers, x)

    def forward_shared(self, x: Tensor) -> Tensor:
        """``x``: (B, ...) — one batch every student sees (evaluation) → logits (N, B, C)."""
        return vmap(self._one, in_dims=(0, 0, None))(self.params, self.buffers, x)

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> None:
        self.template.train(mode)

    def state_dict(self, i: int) -> dict[str, Tensor]:
        """Student ``i``'s own weights, as its module's ``state_dict`` would hold them."""
        return {name: t[i].detach().clone() for name, t in {**self.params, **self.buffers}.items()}


def packed_hinton_terms(logits: Tensor, targets: Tensor, teacher_logits: Tensor, temperature: Tensor,
                        alpha: Tensor) -> dict[str, Tensor]:
    """Hinton KD (:class:`kdexp.objectives.hinton.HintonKD`) for every student at once.

    ``logits``/``teacher_logits``: (N, B, C); ``targets``: (N, B); ``temperature``/``alpha``: (N,).
    Returns per-student (N,) terms ``loss_ce`` = (1 − α)·CE and ``loss_kd`` = α·T²·KL(t ‖ s) at T,
    the batch-mean reductions of the single-student objective. α = 0 is the CE-only baseline.
    """
    n, b, c = logits.shape
    ce = F.cross_entropy(logits.reshape(n * b, c), targets.reshape(n * b), reduction="none").view(n, b).mean(1)
    t = temperature.view(n, 1, 1)
    log_p_student = F.log_softmax(logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1).mean(1)
    return {"loss_ce": (1.0 - alpha) * ce, "loss_kd": alpha * kl * temperature**2}


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The permutation a single run's training loader draws in ``epoch`` (see IndexBatches)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


@dataclass
class PackStep:
    """One optimiser step's per-student loss terms (detached), for per-epoch means."""

    loss: Tensor  # (N,)
    terms: dict[str, Tensor]


def train_epoch(pack: StudentPack, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, teacher_logits: Tensor,
                seeds: Sequence[int], epoch: int, batch_size: int, temperature: Tensor, alpha: Tensor,
                transform=None) -> list[PackStep]:
    """One epoch of every student, each on its own permutation of the training split."""
    n = len(x)
    orders = torch.stack([epoch_order(n, seed, epoch) for seed in seeds])  # (N, n)
    batches = -(-n // batch_size)
    steps = []
    pack.train(True)
    for start in range(0, n, batch_size):
        index = orders[:, start:start + batch_size]  # (N, B): each student's own samples
        xb = x[index]
        if transform is not None:
            xb = transform(xb)
        logits = pack.forward(xb)
        terms = packed_hinton_terms(logits, y[index], teacher_logits[index], temperature, alpha)
        loss = terms["loss_ce"] + terms["loss_kd"]
        broken = ~torch.isfinite(loss.detach()) & pack.active  # one host sync per step, as a single run's check
        for i in torch.nonzero(broken).flatten().tolist():
            batch = start // batch_size
            detail = ", ".join(f"{k}={float(v[i].detach()):.4g}" for k, v in terms.items())
            pack.fail(i, f"training loss became {float(loss[i].detach())} at global step {epoch * batches + batch} "
                         f"(epoch {epoch}, batch {batch}); terms: {detail}. Lower optimizer.lr, check the inputs, "
                         "or set trainer.gradient_clip_val.", optimizer)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # student i's slice gets the gradient of student i's loss alone
        pack.freeze_failed()  # a failed member's NaN gradients never reach its (or anyone's) weights
        optimizer.step()
        steps.append(PackStep(loss.detach(), {k: v.detach() for k, v in terms.items()}))
    return steps


@torch.no_grad()
def evaluate(pack: StudentPack, batches) -> tuple[Tensor, Tensor]:
    """Per-student logits on a split every student shares: (N, samples, C), and the targets."""
    pack.train(False)
    outputs, targets = [], []
    for x, y, _ in batches:
        outputs.append(pack.forward_shared(x))
        targets.append(y)
    return torch.cat(outputs, dim=1), torch.cat(targets)


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-student accuracy of (N, samples, C) logits: (N,), counted in float64 as a single run counts it."""
    return (logits.argmax(-1) == targets).double().mean(-1)


def member_metrics(logits: Tensor, targets: Tensor, teacher_logits: Tensor, num_classes: int) -> dict[str, float]:
    """One member's evaluation metrics, computed by the very class single runs log them with."""
    from kdexp.modules import EvalMetrics

    metrics = EvalMetrics(num_classes)
    metrics.update(logits, targets, teacher_logits)
    return {name: float(value) for name, value in metrics.compute().items()}


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


@dataclass
class PackFit:
    """A trained pack: each member's outcome, and what the test pass needs."""

    outcomes: list[MemberOutcome]
    steps_per_epoch: int
    epochs: int
    pack: StudentPack
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


def train_pack(students: Sequence[nn.Module], *, shuffle_seeds: Sequence[int], temperature: Tensor, alpha: Tensor,
               distils: Sequence[bool], datamodule: Any, teacher_logits: dict[str, Tensor],
               optimizer_factory: Any, max_epochs: int, num_classes: int, teacher_test_acc: float,
               progress: bool = False) -> PackFit:
    """Train ``students`` together, each as :func:`kdexp.pipeline.run_experiment` would train it alone:
    its own data order, T, α and optimiser slice, its best-val weights kept as ModelCheckpoint keeps them.

    ``teacher_logits``: the cached teacher logits of every split, looked up by sample index.
    ``distils[i]`` False: a CE-only member (its α is 0 and it logs no KD terms).
    """
    pack = StudentPack(students)
    optimizer = optimizer_factory(pack.parameters())
    train = datamodule.splits["train"]
    val_init = accuracy(*evaluate(pack, datamodule.eval_batches("val")))
    outcomes = [MemberOutcome() for _ in students]
    best_acc = [-1.0] * pack.size
    steps_per_epoch = 0
    epochs = range(max_epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=f"{pack.size} packed students", unit="epoch", leave=False)
    for epoch in epochs:
        steps = train_epoch(pack, optimizer, train.x, train.y, teacher_logits["train"], shuffle_seeds, epoch,
                            datamodule.batch_size, temperature, alpha, datamodule.batch_transform)
        steps_per_epoch = len(steps)
        means = {"loss": torch.stack([s.loss for s in steps]).mean(0),
                 **{name: torch.stack([s.terms[name] for s in steps]).mean(0) for name in steps[0].terms}}
        val_logits, val_targets = evaluate(pack, datamodule.eval_batches("val"))
        for i, outcome in enumerate(outcomes):
            if not bool(pack.active[i]):
                outcome.error = outcome.error or pack.failures[i]
                continue
            val = {f"val/{k}": v for k, v in member_metrics(val_logits[i], val_targets, teacher_logits["val"],
                                                            num_classes).items()}
            improved = val["val/acc"] > best_acc[i]  # strictly better, as ModelCheckpoint decides
            best_acc[i] = max(best_acc[i], val["val/acc"])
            val["val/acc_best"] = best_acc[i]
            names = ("loss", "loss_ce", "loss_kd") if distils[i] else ("loss", "loss_ce")
            logged = {f"train/{name}": float(means[name][i]) for name in names}
            if distils[i]:
                logged.update({"train/temperature": float(temperature[i]), "train/alpha": float(alpha[i])})
            outcome.history.append({"epoch": epoch, "val": val, "train": logged})
            if improved:
                outcome.best = Snapshot(epoch, pack.state_dict(i), {**logged, **val})
    for i, outcome in enumerate(outcomes):
        if outcome.error is None and outcome.history:
            last = outcome.history[-1]
            outcome.last = Snapshot(last["epoch"], pack.state_dict(i), {**last["train"], **last["val"]})
            outcome.optimizer_state = member_optimizer_state(optimizer, pack, i)
        elif outcome.error is None:
            outcome.error = "no finite validation epoch"
    return PackFit(outcomes, steps_per_epoch, max_epochs, pack, val_init)


def test_pack(fit: PackFit, students: Sequence[nn.Module], datamodule: Any, teacher_logits: dict[str, Tensor],
              num_classes: int, teacher_test_acc: float) -> None:
    """Each finished member's record metrics: the last epoch's ``val/*`` and ``train/*``, ``test/*``
    at its best-val weights and ``test/*_last`` at its last, as :func:`kdexp.pipeline.fit_and_test`."""
    finished = [i for i, o in enumerate(fit.outcomes) if o.error is None]
    if not finished:
        return
    test_last, test_targets = evaluate(fit.pack, datamodule.eval_batches("test"))
    for i in finished:
        students[i].load_state_dict(fit.outcomes[i].best.weights)
    test_best, _ = evaluate(StudentPack([students[i] for i in finished]), datamodule.eval_batches("test"))
    for row, i in enumerate(finished):
        outcome = fit.outcomes[i]
        test = member_metrics(test_best[row], test_targets, teacher_logits["test"], num_classes)
        test_at_last = member_metrics(test_last[i], test_targets, teacher_logits["test"], num_classes)
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
    if set((cfg.get("callbacks") or {}).keys()) - DEFAULT_CALLBACKS:
        return "extra callbacks (early stopping, ...) run alone: a pack keeps best.ckpt and last.ckpt only"
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
