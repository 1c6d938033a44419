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

This module is the training engine; records, checkpoints and W&B runs per student are
written by the sweep layer on top of it (issue 12, in progress).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
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
            pack.fail(i, f"training loss became {float(loss[i].detach())} at epoch {epoch}, batch {start // batch_size}; "
                         "lower optimizer.lr, check the inputs, or set trainer.gradient_clip_val", optimizer)
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
    """Per-student accuracy of (N, samples, C) logits: (N,)."""
    return (logits.argmax(-1) == targets).float().mean(-1)


def member_metrics(logits: Tensor, targets: Tensor, teacher_logits: Tensor, num_classes: int) -> dict[str, float]:
    """One member's evaluation metrics, computed by the very class single runs log them with."""
    from kdexp.modules import EvalMetrics

    metrics = EvalMetrics(num_classes)
    metrics.update(logits, targets, teacher_logits)
    return {name: float(value) for name, value in metrics.compute().items()}


def fit_pack(cfgs: Sequence) -> list[dict[str, Any]]:
    """Train the students of ``cfgs`` (grid points differing only in seed, T and α) together; each
    student's best-validation and last weights are tested as a single run tests them.

    Returns per student ``status: finished`` with the metric keys a single run's record holds
    (``val/*`` of the last epoch, ``val/acc_best``, ``val/acc_init``, ``test/*`` at the best-val
    weights and ``test/*_last`` at the last, ``train/*`` of the last epoch, ``teacher/test_acc``);
    or ``status: failed`` with the error of a member whose loss went non-finite (the others
    train on, unaffected).
    """
    import pytorch_lightning as pl

    from kdexp.config import instantiate, objective_node
    from kdexp.pipeline import apply_num_threads, get_teacher
    from kdexp.teacher_source import get_teacher_outputs

    base = cfgs[0]
    apply_num_threads(base.get("num_threads"))
    datamodule = instantiate(base.data)
    datamodule.setup()
    teacher = get_teacher(base, datamodule)
    num_classes = int(base.data.num_classes)
    students, objectives = [], []
    for cfg in cfgs:  # seeded and built in the order run_experiment builds them
        pl.seed_everything(int(cfg.seed), verbose=False)
        objectives.append(instantiate(objective_node(cfg), what="kd"))
        students.append(instantiate(cfg.student))
    distils = [o.needs_teacher for o in objectives]
    temperature = torch.tensor([float(getattr(o, "temperature", 1.0)) for o in objectives])
    alpha = torch.tensor([float(o.alpha) if d else 0.0 for o, d in zip(objectives, distils)])  # α = 0: CE only
    store, _ = get_teacher_outputs(base, datamodule, teacher, 0, objectives[0])
    pack = StudentPack(students)
    optimizer = instantiate(base.optimizer)(pack.parameters())
    train = datamodule.splits["train"]
    seeds = [int(cfg.data.shuffle_seed) for cfg in cfgs]
    teacher_logits = {split: store.splits[split].logits for split in ("val", "test")}
    val_init = accuracy(*evaluate(pack, datamodule.eval_batches("val")))
    best_acc = torch.full((pack.size,), -1.0)
    best_state: list[dict[str, Tensor] | None] = [None] * pack.size
    epoch_means: dict[str, Tensor] = {}
    val_logits, val_targets = None, None
    for epoch in range(int(base.trainer.max_epochs)):
        steps = train_epoch(pack, optimizer, train.x, train.y, store.splits["train"].logits, seeds, epoch,
                            datamodule.batch_size, temperature, alpha, datamodule.batch_transform)
        epoch_means = {"loss": torch.stack([s.loss for s in steps]).mean(0),
                       **{name: torch.stack([s.terms[name] for s in steps]).mean(0) for name in steps[0].terms}}
        val_logits, val_targets = evaluate(pack, datamodule.eval_batches("val"))
        acc = accuracy(val_logits, val_targets)
        for i in torch.nonzero((acc > best_acc) & pack.active).flatten().tolist():  # strictly better, as ModelCheckpoint
            best_acc[i], best_state[i] = acc[i], pack.state_dict(i)
    test_last, test_targets = evaluate(pack, datamodule.eval_batches("test"))
    results = []
    for i, student in enumerate(students):
        if i in pack.failures or best_state[i] is None:
            results.append({"status": "failed", "error": pack.failures.get(i, "no finite validation epoch")})
            continue
        student.load_state_dict(best_state[i])
        test_best, _ = evaluate(StudentPack([student]), datamodule.eval_batches("test"))
        metrics = {f"val/{k}": v for k, v in member_metrics(val_logits[i], val_targets, teacher_logits["val"],
                                                             num_classes).items()}
        metrics.update({f"test/{k}": v for k, v in member_metrics(test_best[0], test_targets, teacher_logits["test"],
                                                                   num_classes).items()})
        metrics.update({f"test/{k}_last": v for k, v in member_metrics(test_last[i], test_targets,
                                                                        teacher_logits["test"], num_classes).items()})
        terms = ("loss", "loss_ce", "loss_kd") if distils[i] else ("loss", "loss_ce")
        metrics.update({f"train/{name}": float(epoch_means[name][i]) for name in terms})
        if distils[i]:
            metrics.update({"train/temperature": float(temperature[i]), "train/alpha": float(alpha[i])})
        metrics.update({"val/acc_best": float(best_acc[i]), "best_val_score": float(best_acc[i]),
                        "val/acc_init": float(val_init[i]), "teacher/test_acc": teacher.test_acc})
        results.append({"status": "finished", **metrics})
    return results


# -- which grid points can share a pack ----------------------------------------------------
PACKABLE_STUDENTS = ("kdexp.models.MLP", "kdexp.models.zoo.MLP")
PACKABLE_OBJECTIVES = ("kdexp.objectives.HintonKD", "kdexp.objectives.hinton.HintonKD",
                       "kdexp.objectives.CrossEntropyOnly", "kdexp.objectives.cross_entropy.CrossEntropyOnly")
# What may differ between the members of one pack: everything else must be equal. Without
# these, Hinton's kd node and CE-only's are the same (the run-level cache settings); CE-only's
# label smoothing is always 0 in a pack (why_not_packable), since the packed loss has none.
PER_MEMBER_KEYS = ("seed", "data.shuffle_seed", "kd.temperature", "kd.alpha", "kd._target_", "kd.label_smoothing")


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
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    if cfg.get("scheduler") or cfg.trainer.get("gradient_clip_val") or accumulate != 1:
        return "lr schedulers, gradient clipping and accumulation run alone (clipping would mix members)"
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


def pack_groups(cfgs: Sequence[Any], size: int) -> tuple[list[list[int]], dict[int, str]]:
    """Grid points (by position) grouped into packs of at most ``size`` that share a packing key,
    in grid order; and the points that run alone, with why."""
    alone: dict[int, str] = {}
    by_key: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        reason = why_not_packable(cfg)
        if reason:
            alone[i] = reason
        else:
            by_key.setdefault(packing_key(cfg), []).append(i)
    packs = [members[j:j + size] for members in by_key.values() for j in range(0, len(members), size)]
    return packs, alone
