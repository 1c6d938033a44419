"""``kd=none``: cross-entropy only, the student baseline that never sees the teacher."""

from __future__ import annotations

from torch import Tensor

from kdexp.objectives.base import DistillationObjective, ModelOutputs, labelled_cross_entropy


class CrossEntropyOnly(DistillationObjective):
    """Plain supervised loss; used for teachers and for the ``kd=none`` baseline."""

    needs_teacher = False
    handles_sequences = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor
    ) -> dict[str, Tensor]:
        # Sequence logits (B, L, V) with a target per position are flattened to tokens; targets equal
        # to UNLABELLED (padding, prompts, transfer inputs) are skipped by cross_entropy's ignore_index.
        logits = student.logits.reshape(-1, student.logits.shape[-1])
        ce = labelled_cross_entropy(logits, targets.reshape(-1), label_smoothing=self.label_smoothing)
        return {"loss_ce": ce}

    @property
    def name(self) -> str:
        return "ce"
