"""LightningModules: supervised training (teachers, the CE baseline) and distillation.

The step is kept lean because on small students the per-step overhead, not the
math, is the cost: losses and metrics accumulate on the device and are logged
once per epoch, never with a ``self.log`` call per step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric

from kdexp.core.errors import NonFiniteLossError
from kdexp.core.vocabulary import VAL_ACC
from kdexp.models.ensemble import TeacherEnsemble, average_probability_logits
from kdexp.models.features import FeatureHooks
from kdexp.objectives.base import DistillationObjective, ModelOutputs, at_least_float32, total_loss
from kdexp.objectives.cross_entropy import CrossEntropyOnly
from kdexp.run.metrics import EvalMetrics, settings_in_force
from kdexp.schedules import Schedule
from kdexp.teachers.outputs import TeacherOutputStore, as_teacher_input

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
Batch = tuple[Tensor, Tensor, Tensor]  # x, y, index into the split

# The frozen teacher is in eval mode at the start of training by design, and losses are
# logged per epoch on purpose (no per-step logging cost), so these warnings are noise.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
# best.ckpt and last.ckpt come from two ModelCheckpoint callbacks on purpose (conf/callbacks/default.yaml);
# the first, best.ckpt's, is the one ckpt_path="best" should use.
warnings.filterwarnings("ignore", message=r".*configured with multiple `ModelCheckpoint` callbacks.*")


# Attributes set on the module many times per training step: Lightning sets
# `_current_fx_name` around each of the ~25 hook calls of a step, and the step counts
# `_loss_steps`. nn.Module.__setattr__ checks every value against parameters, buffers and
# submodules (a quarter of a millisecond per step in all, a tenth of a width-128 MLP's
# step); these only ever hold plain values, so they are set directly.
_PLAIN_ATTRIBUTES = frozenset({"_current_fx_name", "_loss_steps"})


class SupervisedModule(pl.LightningModule):
    """Trains ``model`` with ``objective`` (cross-entropy by default) on ``(x, y, index)`` batches.

    Used for teachers and for the ``kd=none`` student baseline. Logs
    ``train/<term>`` per epoch, ``val/acc``, ``val/acc_best``, ``val/ece`` and
    ``test/acc`` (``test/acc_last`` when ``test_suffix="_last"``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        num_classes: int,
        objective: DistillationObjective | None = None,
        scheduler: SchedulerFactory | None = None,
        check_finite_every_n_steps: int = 1,
        schedules: Mapping[str, Schedule] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective if objective is not None else CrossEntropyOnly()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.schedules = dict(schedules or {})  # objective attribute → per-epoch schedule
        self.check_finite_every_n_steps = check_finite_every_n_steps
        self.val_metrics = EvalMetrics(num_classes)
        self.test_metrics = EvalMetrics(num_classes)
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in checkpoints, so a resumed run remembers its best epoch
        self.test_suffix = ""
        self.restored_metrics: dict[str, float] = {}  # the last epoch's metrics, read from a resumed checkpoint
        self._loss_sums: dict[str, Tensor] = {}
        self._loss_steps = 0
        self._student_hooks = (
            FeatureHooks(model, self.objective.student_features) if self.objective.student_features else None
        )

    def __setattr__(self, name: str, value) -> None:
        if name in _PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- forward ----------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def student_outputs(self, x: Tensor) -> ModelOutputs:
        logits = self.model(x)
        features = self._student_hooks.pop() if self._student_hooks else {}
        return ModelOutputs(logits, features)

    def teacher_outputs(self, x: Tensor, index: Tensor, split: str = "train") -> ModelOutputs | None:
        """No teacher here; :class:`DistillationModule` overrides this."""
        return None

    # -- training -------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y, index = batch
        student = self.student_outputs(x)
        teacher = self.teacher_outputs(x, index, "train") if self.objective.needs_teacher else None
        terms = self.objective(student, teacher, y)
        loss = total_loss(terms)
        if self.check_finite_every_n_steps and self.global_step % self.check_finite_every_n_steps == 0:
            self._check_finite(loss, terms, batch_idx)
        self._accumulate(loss, terms)
        return loss

    def _check_finite(self, loss: Tensor, terms: dict[str, Tensor], batch_idx: int) -> None:
        # One host read of the scalar (a sync on a GPU either way): cheaper than torch.isfinite + bool().
        if not math.isfinite(loss.detach().item()):
            detail = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); "
                f"terms: {detail}. Lower optimizer.lr, check the inputs, or set trainer.gradient_clip_val."
            )

    def _accumulate(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        # Summed on the device without a host sync; logged once per epoch.
        for name, value in {"loss": loss, **terms}.items():
            value = value.detach()
            self._loss_sums[name] = self._loss_sums[name] + value if name in self._loss_sums else value.clone()
        self._loss_steps += 1

    def on_train_epoch_start(self) -> None:
        # The objective sees the epoch (DKD's warm-up reads it) and any scheduled settings.
        self.objective.epoch = self.current_epoch
        for name, schedule in self.schedules.items():
            setattr(self.objective, name, schedule.value(self.current_epoch, int(self.trainer.max_epochs or 1)))

    def settings_in_force(self) -> dict[str, float]:
        """The objective's knobs and scheduled settings this epoch, as ``train/<name>``."""
        return settings_in_force(self.objective, self.schedules)

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.settings_in_force(), sync_dist=True)
        if self._loss_steps:
            means = {f"train/{k}": v / self._loss_steps for k, v in self._loss_sums.items()}
            self.log("train/loss", means.pop("train/loss"), prog_bar=True, sync_dist=True)
            self.log_dict(means, sync_dist=True)
        self._loss_sums, self._loss_steps = {}, 0

    # -- evaluation -------------------------------------------------------------
    def _eval_step(self, batch: Batch, metrics: EvalMetrics, split: str) -> None:
        x, y, index = batch
        logits = self.model(x)
        if self._student_hooks:
            self._student_hooks.pop()
        teacher = self.teacher_outputs(x, index, split)
        metrics.update(logits, y, teacher.logits if teacher is not None else None)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(values["acc"])
            values["acc_best"] = self.val_acc_best.compute()
        acc = values.pop("acc")
        self.log(VAL_ACC, acc, prog_bar=True, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in values.items()}, sync_dist=True)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.test_metrics.reset()
        self.log_dict({f"test/{k}{self.test_suffix}": v for k, v in values.items()}, sync_dist=True)

    # -- checkpoints ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain tensors and floats only, so the file loads with weights_only=True.
        checkpoint["kdexp"] = {
            "torch_rng": torch.get_rng_state(),
            "metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items()
                        if k.startswith(("train/", "val/"))},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        weights = checkpoint.get("state_dict") or {}
        for key in [k for k in weights if k.startswith("teacher.")]:  # written before the teacher left checkpoints
            del weights[key]
        state = checkpoint.get("kdexp") or {}
        if "torch_rng" in state:  # dropout and other in-step randomness continue where they stopped
            torch.set_rng_state(state["torch_rng"])
        self.restored_metrics = dict(state.get("metrics") or {})

    # -- optimisation -----------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and objective parameters; never the teacher's."""
        params = list(self.model.parameters()) + list(self.objective.parameters())
        return [p for p in params if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}


class DistillationModule(SupervisedModule):
    """A trainable student distilled from a frozen teacher through a pluggable objective.

    The teacher's parameters never require grad and never reach the optimiser, and
    the teacher stays in eval mode even when Lightning puts the module in train mode,
    so its BatchNorm statistics and dropout never change. With a CE-only objective
    (``kd=none``) the teacher is only used to report agreement, never in the loss.

    With ``teacher_store`` (precomputed outputs, :mod:`kdexp.teachers.outputs`) the
    teacher's outputs are looked up by split and sample index instead of computed;
    ``teacher`` may then be None (a saved-predictions run).
    """

    def __init__(self, model: nn.Module, teacher: nn.Module | None, optimizer: OptimizerFactory,
                 num_classes: int, objective: DistillationObjective,
                 teacher_store: TeacherOutputStore | None = None, **kwargs) -> None:
        super().__init__(model=model, optimizer=optimizer, num_classes=num_classes, objective=objective, **kwargs)
        if teacher is None and teacher_store is None:
            raise ValueError("a DistillationModule needs a teacher model or a store of its outputs")
        # Held outside the module's registered children (a tuple is not a submodule): the teacher
        # is never written into the student's checkpoints (harmless at 5k parameters, wrong at 7B),
        # never reaches the optimiser, and Lightning's train()/eval() never change its mode.
        self._frozen_teacher = (teacher.eval().requires_grad_(False),) if teacher is not None else ()
        self.teacher_store = teacher_store
        self._teacher_hooks = (
            FeatureHooks(teacher, objective.teacher_features)
            if objective.teacher_features and teacher is not None and teacher_store is None else None
        )

    @property
    def teacher(self) -> nn.Module | None:
        return self._frozen_teacher[0] if self._frozen_teacher else None

    def _teacher_to_device(self) -> None:
        # Not a submodule, so Lightning does not move it with the student: done here, once per stage.
        teacher = self.teacher
        if teacher is not None and any(p.device != self.device for p in teacher.parameters()):
            teacher.to(self.device)

    def on_fit_start(self) -> None:
        self._teacher_to_device()

    def on_validation_start(self) -> None:
        self._teacher_to_device()

    def on_test_start(self) -> None:
        self._teacher_to_device()

    @torch.no_grad()
    def bind_objective(self, example_x: Tensor, example_index: Tensor | None = None) -> None:
        """Probe forward pass on one training batch (``example_index``: its samples' indices in
        the train split; by default the first ``len(example_x)``), then ``objective.bind``: sizes the objective's trainable parts before the optimiser is
        built (see :mod:`kdexp.objectives.base`)."""
        was_training = self.model.training
        self.model.eval()
        try:
            student = self.student_outputs(example_x)
            index = example_index if example_index is not None else torch.arange(len(example_x))
            teacher = self.teacher_outputs(example_x, index, "train")
        finally:
            self.model.train(was_training)
        self.objective.bind(student, teacher if self.objective.needs_teacher else None)

    @torch.no_grad()  # not inference_mode: the teacher's outputs are saved for the student's backward pass
    def teacher_outputs(self, x: Tensor, index: Tensor, split: str = "train") -> ModelOutputs:
        # The single place teacher outputs come from: looked up by (split, sample index)
        # when precomputed, else a forward pass of the frozen teacher.
        if self.teacher_store is not None:
            return self.teacher_store.outputs(split, index)
        x = as_teacher_input(self.teacher, x)  # a teacher loaded in bf16 (teacher.dtype) reads bf16
        if isinstance(self.teacher, TeacherEnsemble):  # several teachers: each one's view, and their average
            members = [at_least_float32(m) for m in self.teacher.member_logits(x)]
            return ModelOutputs(average_probability_logits(members), {}, members)
        logits = at_least_float32(self.teacher(x))  # a bf16/fp16 teacher's outputs reach the objectives in float32
        features = {k: at_least_float32(v) for k, v in (self._teacher_hooks.pop() if self._teacher_hooks else {}).items()}
        return ModelOutputs(logits, features)
