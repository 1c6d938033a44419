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
its labels: ``loss = (1 − alpha) · hinge(s, y_true) + alpha · KD`` with either

- hard teacher labels (``temperature: null``): ``KD = hinge(s, argmax t)``. Where the
  teacher agrees with the label the two terms coincide, so a teacher that fits the
  training set exactly (the MNIST-1D CNN does: 100 % train accuracy) adds nothing;
- soft teacher labels (``temperature: T``, the default): the expected hinge under the
  teacher's softened distribution, ``KD = Σ_j softmax(t/T)_j · hinge(s, j)``, the hinge
  analogue of soft-target cross-entropy: every class the teacher finds plausible asks
  for its own margin, in proportion to the teacher's belief ("dark knowledge").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.core.errors import require
from kdexp.objectives.base import DistillationObjective, ModelOutputs


def crammer_singer_hinge(scores: Tensor, targets: Tensor, margin: float = 1.0) -> Tensor:
    """``mean_i max(0, margin + max_{j≠y_i} s_ij − s_iy_i)`` for scores ``(B, C)`` and labels ``(B,)``."""
    not_target = 1.0 - F.one_hot(targets, scores.shape[-1]).to(scores.dtype)  # (B, C)
    true_score = scores.gather(1, targets[:, None]).squeeze(1)  # (B,)
    # max_j (margin·[j≠y] + s_j) − s_y: the j = y entry contributes exactly 0, which is
    # the clip at zero, so no separate max(0, ·) (and no -inf masking) is needed.
    return ((scores + margin * not_target).amax(dim=1) - true_score).mean()


def hinge_for_every_label(scores: Tensor, margin: float = 1.0) -> Tensor:
    """``h[i, j] = max(0, margin + max_{k≠j} s_ik − s_ij)``: the hinge if the label were ``j``.  # (B, C)"""
    num_classes = scores.shape[-1]
    eye = torch.eye(num_classes, dtype=scores.dtype, device=scores.device)  # (C, C)
    # For label j: max_k (s_k + margin·[k≠j]) − s_j, as in crammer_singer_hinge, for all j at once.
    shifted = scores[:, None, :] + margin * (1.0 - eye)[None]  # (B, C_label, C_k)
    return shifted.amax(dim=-1) - scores  # (B, C)


def expected_hinge(scores: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``mean_i Σ_j softmax(t_i/T)_j · hinge(s_i, j)``: the hinge under the teacher's soft labels."""
    weights = F.softmax(teacher_logits / temperature, dim=-1)  # (B, C)
    return (weights * hinge_for_every_label(scores)).sum(dim=-1).mean()


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
    """Crammer–Singer hinge on true labels mixed with the teacher's soft (or argmax) labels.

    Terms: ``loss_hinge`` (true labels, weight ``1 − alpha``) and ``loss_kd`` (teacher
    labels, weight ``alpha``).
    """

    knobs = ("alpha", "temperature")

    def __init__(self, alpha: float = 0.5, temperature: float | None = 4.0) -> None:
        super().__init__()
        require(
            0.0 <= alpha <= 1.0,
            f"kd.alpha must lie in [0, 1], got {alpha}. It weights the teacher-label hinge "
            "(0: SVM on true labels only, 1: teacher labels only).",
        )
        require(temperature is None or temperature > 0,
                f"kd.temperature must be > 0 (soft teacher labels) or null (hard), got {temperature}.")
        self.alpha = float(alpha)
        self.temperature = None if temperature is None else float(temperature)

    def forward(
        self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor
    ) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("HingeKD needs the teacher's outputs")
        t = teacher.logits.detach()
        kd = (crammer_singer_hinge(student.logits, t.argmax(dim=1)) if self.temperature is None
              else expected_hinge(student.logits, t, self.temperature))
        return {
            "loss_hinge": (1.0 - self.alpha) * crammer_singer_hinge(student.logits, targets),
            "loss_kd": self.alpha * kd,
        }

    def describe(self) -> str:
        return f"{self.name}-a{self.alpha:g}-" + ("hard" if self.temperature is None else f"T{self.temperature:g}")

    @property
    def name(self) -> str:
        return "hinge_kd"
