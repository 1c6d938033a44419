"""Multiclass hinge loss (a linear "SVM" student), alone and with a teacher's labels.

Crammer & Singer, "On the Algorithmic Implementation of Multiclass Kernel-based
Vector Machines", JMLR 2 (2001) 265–292. For scores ``s`` and label ``y``:

``hinge(s, y) = max(0, 1 + max_{j≠y} s_j − s_y)``, averaged over the batch.

Why this form: it penalises only the strongest competitor of the true class, so a
sample costs nothing once its score beats every other class by a margin of 1, and
for two classes it is exactly the binary SVM hinge on the score difference. (The
Weston–Watkins form, ``torch.nn.MultiMarginLoss``, sums a hinge over every
competitor instead.) The SVM's other half, ``λ/2 · ‖w‖²``, is not here: it is the
optimiser's ``weight_decay``, exact under SGD (the bias is decayed too, unlike a
textbook SVM).

KD for a hinge loss has no probabilities to match, so the teacher speaks through
its hard predictions: ``loss = (1 − alpha) · hinge(s, y_true) + alpha · hinge(s, argmax t)``.
Where the teacher agrees with the label the two terms coincide; where it does not,
the student is pulled towards the teacher's (smoother, realisable) decision.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdexp.errors import require
from kdexp.objectives.base import DistillationObjective, ModelOutputs


def crammer_singer_hinge(scores: Tensor, targets: Tensor, margin: float = 1.0) -> Tensor:
    """``mean_i max(0, margin + max_{j≠y_i} s_ij − s_iy_i)`` for scores ``(B, C)`` and labels ``(B,)``."""
    not_target = 1.0 - F.one_hot(targets, scores.shape[-1]).to(scores.dtype)  # (B, C)
    true_score = scores.gather(1, targets[:, None]).squeeze(1)  # (B,)
    # max_j (margin·[j≠y] + s_j) − s_y: the j = y entry contributes exactly 0, which is
    # the clip at zero, so no separate max(0, ·) (and no -inf masking) is needed.
    return ((scores + margin * not_target).amax(dim=1) - true_score).mean()


class MulticlassHinge(DistillationObjective):
    """Crammer–Singer hinge on the true labels: the linear-SVM baseline without a teacher."""

    needs_teacher = False

    def forward(
        self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor
    ) -> dict[str, Tensor]:
        return {"loss_hinge": crammer_singer_hinge(student.logits, targets)}

    @property
    def name(self) -> str:
        return "hinge"


class HingeKD(DistillationObjective):
    """Crammer–Singer hinge on true labels mixed with the teacher's argmax labels.

    Terms: ``loss_hinge`` (true labels, weight ``1 − alpha``) and ``loss_kd`` (teacher
    labels, weight ``alpha``).
    """

    knobs = ("alpha",)

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__()
        require(
            0.0 <= alpha <= 1.0,
            f"kd.alpha must lie in [0, 1], got {alpha}. It weights the teacher-label hinge "
            "(0: SVM on true labels only, 1: teacher labels only).",
        )
        self.alpha = float(alpha)

    def forward(
        self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor
    ) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("HingeKD needs the teacher's outputs")
        teacher_labels = teacher.logits.detach().argmax(dim=1)  # (B,)
        return {
            "loss_hinge": (1.0 - self.alpha) * crammer_singer_hinge(student.logits, targets),
            "loss_kd": self.alpha * crammer_singer_hinge(student.logits, teacher_labels),
        }

    @property
    def name(self) -> str:
        return "hinge_kd"
