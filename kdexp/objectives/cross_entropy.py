"""``kd=none``: cross-entropy only, the student baseline that never sees the teacher."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdexp.objectives.base import DistillationObjective, ModelOutputs


class CrossEntropyOnly(DistillationObjective):
    """Plain supervised loss; used for teachers and for the ``kd=none`` baseline."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor
    ) -> dict[str, Tensor]:
        ce = F.cross_entropy(student.logits, targets, label_smoothing=self.label_smoothing)
        return {"loss_ce": ce}

    @property
    def name(self) -> str:
        return "ce"
