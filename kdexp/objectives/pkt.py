"""Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer"
(ECCV 2018), arXiv:1803.10837.

Instead of the features themselves the student matches how the teacher's features
place the samples of a batch relative to each other. With the cosine kernel shifted
to [0, 1], ``K(a, b) = (cos(a, b) + 1) / 2``, each sample i defines a conditional
distribution over the other samples of the batch,
``p_{j|i} = K(t_i, t_j) / Σ_{k≠i} K(t_i, t_k)`` for the teacher and ``q_{j|i}`` likewise
for the student, and the loss is the paper's KL divergence summed over all ordered
pairs::

    loss = CE(s, y) + beta · Σ_i Σ_{j≠i} p_{j|i} · log(p_{j|i} / q_{j|i})

Only B × B kernels are compared, so the two feature sizes may differ.

Conventions. The sum over pairs is the paper's; it grows with the batch size B. The
authors' code (used by RepDistiller) instead keeps the i = j terms and averages
over all B² entries with an epsilon inside the log; its beta = 3·10⁴ (CRD /
RepDistiller) corresponds to roughly 3·10⁴ / B² here (7.3 at their B = 64, 3 at
B = 100). The paper states the loss without a weight against CE; the default
beta = 1 is that unweighted loss. A pair whose student kernel is exactly 0 (opposite
features) is kept finite by clamping q, not by an epsilon, so the value is the
formula's wherever the formula is finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.core.errors import require
from kdexp.objectives.base import DistillationObjective, ModelOutputs
from kdexp.objectives.taps import layer_lists, tapped_pairs


def conditional_probabilities(feature: Tensor) -> Tensor:
    """``P[i, j] = p_{j|i}`` under the shifted cosine kernel, zero on the diagonal: (B, ...) -> (B, B)."""
    x = F.normalize(feature.flatten(1), dim=1)  # (B, N), unit rows
    kernel = (x @ x.T + 1.0) / 2.0  # (B, B), in [0, 1]
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    kernel = kernel * off_diagonal  # a sample is not its own neighbour
    # The clamp only matters for a batch of one, whose single row has no other sample.
    return kernel / kernel.sum(dim=1, keepdim=True).clamp_min(torch.finfo(kernel.dtype).tiny)


def pkt_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """``Σ_i Σ_{j≠i} p_{j|i} log(p_{j|i} / q_{j|i})``, teacher p, student q."""
    p = conditional_probabilities(teacher_feature)  # (B, B)
    q = conditional_probabilities(student_feature)  # (B, B)
    # xlogy makes the diagonal's 0·log 0 exactly 0; the clamp keeps q = 0 (opposite features) finite.
    q = q.clamp_min(torch.finfo(q.dtype).tiny)
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum()


class PKT(DistillationObjective):
    """Probabilistic knowledge transfer (Passalis & Tefas, 2018) with the cosine kernel."""

    knobs = ("beta",)

    def __init__(self, beta: float = 1.0, student_layers: Sequence[str] | str = ("pre_logits",),
                 teacher_layers: Sequence[str] | str | None = None) -> None:
        require(beta >= 0, f"kd.beta must be >= 0, got {beta}. It weights the PKT divergence (summed over pairs): "
                           "kd.beta=1 is the unweighted loss.")
        student_layers, teacher_layers = layer_lists(student_layers, teacher_layers)
        super().__init__(student_layers=student_layers, teacher_layers=teacher_layers)
        self.beta = float(beta)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("PKT needs the teacher's outputs")
        ce = F.cross_entropy(student.logits, targets)
        kd = sum(pkt_loss(s_feat, t_feat) for _, _, s_feat, t_feat in tapped_pairs(self, student, teacher))
        return {"loss_ce": ce, "loss_kd": self.beta * kd}

    @property
    def name(self) -> str:
        return "pkt"
