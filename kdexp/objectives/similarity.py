"""Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019), arXiv:1907.09682.

Inputs that the teacher maps to similar activations should be mapped to similar
activations by the student. For a tap with activations reshaped to ``Q`` (b, n), the
batch similarity ``G = Q Qᵀ`` (b, b) is L2-normalised row by row, and::

    loss = CE(s, y) + gamma · Σ_j 1/b² · ‖G_s^j − G_t^j‖_F²

with gamma = 3000 in the paper's CIFAR-10 experiments (and in RepDistiller). Only
b × b matrices are compared, so student and teacher widths and shapes may differ. The
paper taps the last convolutional group; ``pre_logits`` is the default here because
every model has it (on cnn2d it is that group after global pooling; tap
``stage3`` for the paper's choice).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdexp.core.errors import require
from kdexp.objectives.base import DistillationObjective, ModelOutputs
from kdexp.objectives.taps import layer_lists, tapped_pairs


def similarity_matrix(feature: Tensor) -> Tensor:
    """Row-normalised batch similarity ``normalize_rows(Q Qᵀ)``: (B, ...) -> (B, B)."""
    q = feature.flatten(1)  # (B, N)
    return F.normalize(q @ q.T, dim=1)  # (B, B)


def similarity_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """``1/b² · ‖G_s − G_t‖_F²``."""
    b = student_feature.shape[0]
    return (similarity_matrix(student_feature) - similarity_matrix(teacher_feature)).pow(2).sum() / b**2


class SimilarityPreserving(DistillationObjective):
    """Similarity-preserving KD (Tung & Mori, 2019)."""

    knobs = ("gamma",)

    def __init__(self, gamma: float = 3000.0, student_layers: Sequence[str] | str = ("pre_logits",),
                 teacher_layers: Sequence[str] | str | None = None) -> None:
        require(gamma >= 0, f"kd.gamma must be >= 0, got {gamma}. It weights the similarity loss: kd.gamma=3000 "
                            "in the paper.")
        student_layers, teacher_layers = layer_lists(student_layers, teacher_layers)
        super().__init__(student_layers=student_layers, teacher_layers=teacher_layers)
        self.gamma = float(gamma)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("SimilarityPreserving needs the teacher's outputs")
        ce = F.cross_entropy(student.logits, targets)
        sp = sum(similarity_loss(s_feat, t_feat) for _, _, s_feat, t_feat in tapped_pairs(self, student, teacher))
        return {"loss_ce": ce, "loss_kd": self.gamma * sp}

    @property
    def name(self) -> str:
        return "sp"
