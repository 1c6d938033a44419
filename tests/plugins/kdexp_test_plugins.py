"""User-side objectives plugged in by ``kd._target_`` in the tests (like a researcher's own package)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl
from torch import Tensor

from kdexp.objectives import DistillationObjective, HintonKD, ModelOutputs


class ExplodingKD(HintonKD):
    """Hinton KD whose KD term turns NaN after ``explode_after`` training steps: a plug-in gone wrong."""

    def __init__(self, explode_after: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.explode_after = explode_after
        self.calls = 0

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        terms = super().forward(student, teacher, targets)
        self.calls += 1
        if self.calls > self.explode_after:
            terms["loss_kd"] = terms["loss_kd"] * float("nan")
        return terms


class MSELogits(DistillationObjective):
    """Logit matching (Ba & Caruana, 2014): the README's example of a plug-in objective."""

    knobs = ("weight",)

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        import torch.nn.functional as F

        return {"loss_ce": F.cross_entropy(student.logits, targets),
                "loss_kd": self.weight * F.mse_loss(student.logits, teacher.logits)}



class StopAt(pl.Callback):
    """Sends a signal to its own process at (epoch, batch) when ``KDEXP_TEST_STOP_AT=epoch:batch:SIGNAL``
    is set: the first run of a resume test dies there, and the same command run again (without the
    variable, which is not part of the config) continues."""

    def __init__(self) -> None:
        spec = os.environ.get("KDEXP_TEST_STOP_AT")
        self.at = None
        if spec:
            epoch, batch, name = spec.split(":")
            self.at = (int(epoch), int(batch), getattr(signal, name))
            if self.at[2] == signal.SIGINT:
                # As at a terminal: a process started in the background (CI scripts, `cmd &`) inherits
                # SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.at and (trainer.current_epoch, batch_idx) == self.at[:2]:
            os.kill(os.getpid(), self.at[2])


class BrokenInit(DistillationObjective):
    """A user objective whose constructor has a bug."""

    def __init__(self) -> None:
        super().__init__()
        raise ValueError("my objective is not ready yet")


class TapsAMissingLayer(HintonKD):
    """Hinton KD that asks for a student feature the model does not have."""

    student_features = ("no_such_layer",)


class ParametricKD(HintonKD):
    """Hinton KD with a learnable part (like a FitNets regressor): its initialisation must be seeded."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        import torch

        self.scale = torch.nn.Parameter(torch.rand(1) + 0.5)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        terms = super().forward(ModelOutputs(student.logits * self.scale, student.features), teacher, targets)
        return terms


class SlowDown(pl.Callback):
    """Sleeps after every training batch: keeps a run alive long enough for a concurrency test.

    With ``pause_file``, the run also pauses after its first training batch: it creates that file
    and waits (at most ``max_pause_s``) until the test deletes it. The test then knows the run is
    training, holding its folder, however long a second process takes to start on a busy machine."""

    def __init__(self, seconds_per_batch: float = 0.05, pause_file: str | None = None,
                 max_pause_s: float = 600.0) -> None:
        self.seconds_per_batch = seconds_per_batch
        self.pause_file = pause_file
        self.max_pause_s = max_pause_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time
        from pathlib import Path

        time.sleep(self.seconds_per_batch)
        if self.pause_file:
            pause, self.pause_file = Path(self.pause_file), None  # once
            pause.touch()
            deadline = time.time() + self.max_pause_s
            while pause.exists() and time.time() < deadline:
                time.sleep(0.1)


class ProjectedFeatureKD(HintonKD):
    """Hinton KD plus an MSE between a learned projection of a student tap and a teacher tap:
    the projection is sized in ``bind`` from the probe batch's features (a FitNets-like plug-in)."""

    knobs = ("temperature", "alpha", "beta")

    def __init__(self, beta: float = 1.0, student_layers=("pre_logits",), teacher_layers=("pre_logits",),
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.student_features, self.teacher_features = tuple(student_layers), tuple(teacher_layers)
        self.beta = beta
        self.projection = None

    def bind(self, student: ModelOutputs, teacher: ModelOutputs | None) -> None:
        import torch

        s = student.features[self.student_features[0]].flatten(1)
        t = teacher.features[self.teacher_features[0]].flatten(1)
        self.projection = torch.nn.Linear(s.shape[1], t.shape[1])

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        import torch.nn.functional as F

        terms = super().forward(student, teacher, targets)
        s = self.projection(student.features[self.student_features[0]].flatten(1))
        terms["loss_feat"] = self.beta * F.mse_loss(s, teacher.features[self.teacher_features[0]].flatten(1))
        return terms

    @property
    def name(self) -> str:
        return "projected"


class HintonKDBrokenInRankOne(HintonKD):
    """Hinton KD that cannot be built in DDP rank 1 (a rank-specific failure before that rank joins
    the run): rank 0 validates, trains its teacher and starts fitting as usual."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if os.environ.get("LOCAL_RANK") == "1":
            raise RuntimeError("this objective is broken in rank 1")
