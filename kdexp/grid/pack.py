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
- its optimiser state: Adam, AdamW and SGD are elementwise, so one optimiser over all the
  stacked parameters (laid end to end in one flat tensor) equals N optimisers over the slices;
- its gradients: student i's slice gets the gradient of student i's own loss alone.

Not only equal in exact arithmetic: each member's weights equal its single run's bit for
bit, over any number of epochs. Float noise of 1e-9 grows to points of accuracy over 100
epochs of Adam, so every operation here is chosen to compute what a single run computes
in the same order (see :class:`StudentPack` and :class:`FusedHinton`; the tests compare
weights with ``torch.equal``).

This module is the training engine; :mod:`kdexp.grid.members` writes each member's run
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

from kdexp.models.zoo import MLP
from kdexp.objectives.base import UNLABELLED, ModelOutputs, total_loss
from kdexp.objectives.cross_entropy import CrossEntropyOnly
from kdexp.objectives.hinton import HintonKD
from kdexp.run.metrics import EvalMetrics, settings_in_force


class StudentPack:
    """N MLP students of one shape with their parameters stacked along dimension 0."""

    def __init__(self, students: Sequence[nn.Module]) -> None:
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
        # All stacked parameters lie end to end in one flat tensor, and so do their gradients; each
        # parameter is a view into it. The optimiser updates the flat tensor: a handful of calls
        # per step instead of a handful per parameter, with the same result, since Adam, AdamW
        # and SGD are elementwise.
        self.flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
        self.flat.grad = torch.zeros_like(self.flat)
        self.segments: dict[str, tuple[int, torch.Size]] = {}
        offset = 0
        for name, p in params.items():
            self.segments[name] = (offset, p.shape)
            offset += p.numel()
        self.params = {name: self.segment(self.flat, name).requires_grad_(True) for name in self.segments}
        for name, p in self.params.items():
            p.grad = self.segment(self.flat.grad, name)  # autograd accumulates into it in place
        self.buffers = buffers
        self.active = torch.ones(self.size, dtype=torch.bool)  # False: the member failed and is frozen
        self.failures: dict[int, str] = {}
        self.fused: bool | None = None  # FusedHinton proven bit-identical here (None: not yet tried)

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
        for moment in optimizer.state.get(self.flat, {}).values():
            if torch.is_tensor(moment) and moment.shape == self.flat.shape:
                for name in self.segments:
                    self.segment(moment, name)[i] = 0

    def segment(self, flat: Tensor, name: str) -> Tensor:
        """Parameter ``name``'s part (N, ...) of a tensor laid out as :attr:`flat`: its weights, its
        gradient or its optimiser state; a view."""
        offset, shape = self.segments[name]
        return flat[offset:offset + shape.numel()].view(shape)

    def optimizer_parameters(self) -> list[Tensor]:
        """What the pack's optimiser updates: the one flat tensor. Clear gradients with
        :meth:`zero_grad`: an optimiser's own ``zero_grad`` would unlink them from the parameters."""
        return [self.flat]

    def zero_grad(self) -> None:
        self.flat.grad.zero_()

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
        h = self.hidden(x)
        weight, bias = self.params["head.weight"], self.params["head.bias"]
        return torch.stack([F.linear(h[i], weight[i], bias[i]) for i in range(self.size)])

    def hidden(self, x: Tensor) -> Tensor:
        """The hidden layers' output (N, B, width): one batched ``baddbmm`` per layer."""
        h = x.reshape(x.shape[0], x.shape[1], -1)
        for i in range(1, self.depth + 1):
            weight, bias = self.params[f"stage{i}.0.weight"], self.params[f"stage{i}.0.bias"]
            h = torch.relu(torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)))
        return h

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


class EpochSums:
    """Each member's loss terms summed over an epoch's steps, as a single run sums them (float32,
    step by step) before logging their means; ``names[i]``: member ``i``'s logged terms."""

    def __init__(self) -> None:
        self.names: list[tuple[str, ...]] = []
        self.totals: dict[str, Tensor] = {}
        self.steps = 0

    def add(self, step: Step, active: Tensor) -> None:
        """Add ``step``'s loss and terms; members not ``active`` keep their sums."""
        self.names = self.names or [("loss", *names) for names in step.names]  # the same every step
        for name, value in {"loss": step.values, **step.terms}.items():
            value = torch.where(active, value.detach(), 0.0)  # x + 0 == x: a stopped member's sum stays
            self.totals[name] = self.totals[name] + value if name in self.totals else value

    def means(self, i: int) -> dict[str, float]:
        return {f"train/{name}": float(self.totals[name][i] / self.steps) for name in self.names[i]}


@dataclass
class Step:
    """One training step's forward pass for every member: its loss (N,), its terms (name → (N,), 0 for a
    member without that term), each member's term names, and ``backward(active)``, which writes the
    gradients of the ``active`` members' losses."""

    values: Tensor
    terms: dict[str, Tensor]
    names: list[tuple[str, ...]]
    backward: Any


def autograd_step(pack: StudentPack, xb: Tensor, teacher: Tensor, yb: Tensor, objectives: Sequence[Any]) -> Step:
    """Each member's own objective module on its logits, differentiated by autograd: exact for any
    objective, at a dozen small autograd nodes per member and step."""

    logits = pack.forward(xb)
    losses, terms = [], []
    for i, objective in enumerate(objectives):
        terms.append(objective(ModelOutputs(logits[i]), ModelOutputs(teacher[i]) if objective.needs_teacher else None,
                               yb[i]))
        losses.append(total_loss(terms[-1]))
    names = dict.fromkeys(name for member in terms for name in member)
    stacked = {name: torch.stack([member[name].detach() if name in member else torch.zeros(()) for member in terms])
               for name in names}

    def backward(active: Tensor) -> None:
        live = [loss for loss, on in zip(losses, active.tolist()) if on]
        sum(live).backward()  # student i's slice gets the gradient of student i's loss alone

    return Step(torch.stack([loss.detach() for loss in losses]), stacked, [tuple(member) for member in terms],
                backward)


class FusedHinton:
    """Hinton KD (Hinton et al., 2015, arXiv:1503.02531) and CE-only for every member in one batched
    pass, with the head's and the loss's gradient written out as autograd computes them for one
    student: the same operations in the same order, so each member's gradient equals its single
    run's bit for bit. :func:`train_epoch` checks that on its first step and falls back to
    :func:`autograd_step` where it does not hold (another torch or BLAS).

    Batched where a batched op equals the per-student one (log_softmax and its backward, elementwise
    arithmetic, the head's forward and input gradient, the KL sum); per member where it does not
    (``nll_loss``'s reduction, the head's weight gradient).
    """

    def __init__(self, objectives: Sequence[Any]) -> None:
        kd = [bool(o.needs_teacher) for o in objectives]
        alpha = [float(o.alpha) if k else 0.0 for o, k in zip(objectives, kd)]
        temperature = [float(o.temperature) if k else 1.0 for o, k in zip(objectives, kd)]
        self.kd = torch.tensor(kd)
        self.any_kd = any(kd)
        self.names = [("loss_ce", "loss_kd") if k else ("loss_ce",) for k in kd]
        # Python floats meet float32 tensors as autograd's scalar multiplications meet them: cast once
        self.alpha = torch.tensor(alpha, dtype=torch.float32)
        self.ce_weight = torch.tensor([1.0 - a if k else 1.0 for a, k in zip(alpha, kd)], dtype=torch.float32)
        self.temperature = torch.tensor(temperature, dtype=torch.float32).view(-1, 1, 1)
        self.t_squared = torch.tensor([t * t for t in temperature], dtype=torch.float32)

    @staticmethod
    def handles(objectives: Sequence[Any]) -> bool:
        return all(type(o) is HintonKD or (type(o) is CrossEntropyOnly and not o.label_smoothing)
                   for o in objectives)

    def __call__(self, pack: StudentPack, xb: Tensor, teacher: Tensor, yb: Tensor) -> Step:
        hidden = pack.hidden(xb)  # (N, B, H), autograd records the hidden layers only
        weight, bias = pack.params["head.weight"], pack.params["head.bias"]
        with torch.no_grad():
            h = hidden.detach()
            logits = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            values, terms, grad = self.loss_and_grad(logits, teacher, yb)

        def backward(active: Tensor) -> None:
            g = torch.where(active.view(-1, 1, 1), grad, 0.0)
            # Linear's backward (addmm): input grad g @ W, weight grad g.t() @ h (per student: a
            # batched product sums in another order there), bias grad summed over the batch
            torch.stack([torch.mm(g[i].t(), h[i]) for i in range(len(g))], out=weight.grad)
            torch.sum(g, 1, out=bias.grad)
            hidden.backward(torch.bmm(g, weight.detach()))

        return Step(values, terms, self.names, backward)

    def loss_and_grad(self, s: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Loss values, terms and d(loss)/d(logits) of every member: ``s``, ``t`` (N, B, C), ``y`` (N, B)."""
        n, b, _ = s.shape
        log_p = torch.log_softmax(s, -1)
        ce = torch.stack([F.nll_loss(log_p[i], y[i]) for i in range(n)])  # batched, it sums in another order
        loss_ce = self.ce_weight * ce
        # cross_entropy's backward: nll_loss puts -(w / B) at each target, then log_softmax's backward
        g_nll = torch.zeros_like(s).scatter_(-1, y.unsqueeze(-1), (-(self.ce_weight / b)).view(n, 1, 1).expand(n, b, 1))
        grad = torch._log_softmax_backward_data(g_nll, log_p, -1, s.dtype)
        terms = {"loss_ce": loss_ce}
        if not self.any_kd:
            return loss_ce, terms, grad
        log_q = torch.log_softmax(s / self.temperature, -1)
        log_t = torch.log_softmax(t / self.temperature, -1)
        p_t = torch.exp(log_t)
        kl_sum = (p_t * (log_t - log_q)).view(n, -1).sum(1)  # kl_div(log_target=True, "sum")
        loss_kd = self.alpha * ((kl_sum / b) * self.t_squared)  # batchmean, × T², × α
        # its backward: α·T²/B spread over the batch, through kl_div, log_softmax and the division by T
        g_log_q = -((self.alpha * self.t_squared / b).view(n, 1, 1) * p_t)
        g_kd = torch._log_softmax_backward_data(g_log_q, log_q, -1, s.dtype) / self.temperature
        kd = self.kd.view(n, 1, 1)
        grad = torch.where(kd, grad + g_kd, grad)
        terms["loss_kd"] = torch.where(self.kd, loss_kd, 0.0)
        return torch.where(self.kd, loss_ce + loss_kd, loss_ce), terms, grad


def same_gradients(pack: StudentPack, first: Step, second: Step, active: Tensor) -> bool:
    """Run both steps' backward passes; True when their losses, terms and gradients are bit-identical
    for the ``active`` members (the second step's gradients are left in place)."""
    finite = active & torch.isfinite(first.values)
    if not torch.equal(first.values[finite], second.values[finite]):
        return False
    if first.names != second.names or any(not torch.equal(first.terms[k][finite], second.terms[k][finite])
                                          for k in first.terms):
        return False
    first.backward(finite)
    reference = [p.grad.clone() for p in pack.parameters()]
    pack.zero_grad()
    second.backward(finite)
    return all(torch.equal(r[finite], p.grad[finite]) for r, p in zip(reference, pack.parameters()))


def gather(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for an (N, B) index (twice as fast as advanced indexing)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


def train_epoch(pack: StudentPack, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, teacher_logits: Tensor,
                seeds: Sequence[int], epoch: int, batch_size: int, objectives: Sequence[Any],
                transform=None) -> EpochSums:
    """One epoch of every student, each on its own permutation of the training split and with its
    own objective (Hinton KD, or CE only without a teacher), as its single run trains it.

    Hinton and CE-only packs take :class:`FusedHinton`'s step once its first step has shown it
    bit-identical to :func:`autograd_step` (``pack.fused``); other objectives take autograd's.
    """

    n = len(x)
    orders = torch.stack([epoch_order(n, seed, epoch) for seed in seeds])  # (N, n)
    batches = -(-n // batch_size)
    fused = FusedHinton(objectives) if FusedHinton.handles(objectives) and bool((y != UNLABELLED).all()) else None
    sums = EpochSums()
    for objective in objectives:
        objective.epoch = epoch
    for start in range(0, n, batch_size):
        index = orders[:, start:start + batch_size]  # (N, B): each student's own samples
        xb, teacher, yb = (gather(t, index) for t in (x, teacher_logits, y))
        if transform is not None:
            xb = transform(xb)
        if fused is not None and pack.fused is not False:
            step = fused(pack, xb, teacher, yb)
        else:
            step = autograd_step(pack, xb, teacher, yb, objectives)
        broken = ~torch.isfinite(step.values) & pack.active
        for i in torch.nonzero(broken).flatten().tolist() if bool(broken.any()) else ():
            batch = start // batch_size
            detail = ", ".join(f"{k}={float(v[i]):.4g}" for k, v in step.terms.items() if k in step.names[i])
            pack.fail(i, f"training loss became {float(step.values[i])} at global step {epoch * batches + batch} "
                         f"(epoch {epoch}, batch {batch}); terms: {detail}. Lower optimizer.lr, check the inputs, "
                         "or set trainer.gradient_clip_val.", optimizer)
        pack.zero_grad()
        if bool(pack.active.any()):
            if fused is not None and pack.fused is None:  # the first fused step: prove it on this machine
                pack.fused = same_gradients(pack, autograd_step(pack, xb, teacher, yb, objectives), step, pack.active)
                if not pack.fused:
                    pack.zero_grad()
                    autograd_step(pack, xb, teacher, yb, objectives).backward(pack.active)
            else:
                step.backward(pack.active)
            pack.freeze_failed()  # a stopped member's slice never moves
            optimizer.step()
        sums.add(step, pack.active)
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
    (``metrics``: an :class:`~kdexp.run.metrics.EvalMetrics` to reuse, reset after, as a run resets its own)."""

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
    flat = optimizer.state.get(pack.flat, {})
    state = {j: {k: (pack.segment(v, name)[i].clone() if torch.is_tensor(v) and v.shape == pack.flat.shape
                     else v.clone() if torch.is_tensor(v) else v) for k, v in flat.items()}
             for j, name in enumerate(pack.segments)}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(pack.segments)))}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def train_pack(students: Sequence[nn.Module], *, shuffle_seeds: Sequence[int], objectives: Sequence[Any],
               datamodule: Any, teacher_logits: dict[str, Tensor], optimizer_factory: Any, max_epochs: int,
               num_classes: int, early_stopping: EarlyStopping | None = None, progress: bool = False) -> PackFit:
    """Train ``students`` together, each as :func:`kdexp.run.engine.run_experiment` would train it alone:
    its own data order, objective (its T and α) and optimiser slice, its best-val weights kept as
    ModelCheckpoint keeps them.

    ``teacher_logits``: the cached teacher logits of every split, looked up by sample index.
    ``early_stopping``: each member stops on its own, its last snapshot taken at its last epoch.
    """

    pack = StudentPack(students)
    val_metrics = [EvalMetrics(num_classes) for _ in students]
    optimizer = optimizer_factory(pack.optimizer_parameters())
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
    at its best-val weights and ``test/*_last`` at its last, as :func:`kdexp.run.fit.fit_and_test`."""
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
