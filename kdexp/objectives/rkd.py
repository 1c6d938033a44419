"""Park et al., "Relational Knowledge Distillation" (CVPR 2019), arXiv:1904.05068.

The student matches the geometry of the teacher's embeddings over a batch rather
than the embeddings themselves, through two relational potentials:

- distance-wise: ``ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ``, with μ the mean distance over the
  batch's pairs, so the two embedding spaces may have different scales;
- angle-wise: ``ψ_A(t_i, t_j, t_k) = ⟨e_ij, e_kj⟩``, the cosine of the angle at t_j,
  with ``e_ij = (t_i − t_j) / ‖t_i − t_j‖₂``.

Each is compared with the Huber loss l_δ (δ = 1, PyTorch's smooth-L1)::

    loss = CE(s, y) + distance_weight · L_D + angle_weight · L_A

with the paper's weights λ_D = 25 and λ_A = 50 (also RepDistiller's). Only relations
are compared, so the two feature sizes may differ; features are flattened.

Conventions, those of the authors' code, with which 25 and 50 were set: μ is the
mean over pairs at non-zero distance; L_D averages the Huber loss over all B² ordered
pairs and L_A over all B³ triplets, the degenerate ones (i = j, or k = j, whose
potential is defined as 0 for both networks) included, so they add 0 to the sum
but count in the mean. Squared distances are clamped at 1e-12 before the square root
so coincident samples have finite gradients, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.core.errors import require
from kdexp.objectives.base import DistillationObjective, ModelOutputs
from kdexp.objectives.taps import layer_lists, tapped_pairs

_MIN_SQUARED_DISTANCE = 1e-12


def _centred_gram(feature: Tensor) -> tuple[Tensor, Tensor]:
    """Gram matrix of the batch-centred features and the off-diagonal mask, both (B, B).

    Distances and angles do not change under a shift, and centring shrinks the norms
    that cancel in ``‖a‖² + ‖b‖² − 2⟨a, b⟩``, which matters in float32 for features
    far from the origin (post-ReLU activations).
    """
    x = feature.flatten(1)
    x = x - x.mean(dim=0, keepdim=True)  # (B, N)
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return x @ x.T, off_diagonal


def _distances(gram: Tensor, off_diagonal: Tensor) -> Tensor:
    """Pairwise Euclidean distances from a Gram matrix, exactly 0 on the diagonal: (B, B)."""
    squared_norms = gram.diagonal()  # (B,)
    squared = squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
    distances = squared.clamp_min(_MIN_SQUARED_DISTANCE).sqrt()
    return torch.where(off_diagonal, distances, torch.zeros_like(distances))


def distance_potentials(feature: Tensor) -> Tensor:
    """``ψ_D``: pairwise distances divided by their mean over non-zero pairs, (B, ...) -> (B, B)."""
    gram, off_diagonal = _centred_gram(feature)
    distances = _distances(gram, off_diagonal)
    positive = (distances > 0).sum().clamp_min(1)  # no pairs (B = 1): 0 / 1, not 0 / 0
    mean = (distances.sum() / positive).clamp_min(torch.finfo(distances.dtype).tiny)
    return distances / mean


def angle_potentials(feature: Tensor) -> Tensor:
    """``ψ_A[j, i, k] = cos ∠(t_i, t_j, t_k)``, the angle at t_j; 0 where i = j or k = j: (B, ...) -> (B, B, B).

    Inner products of differences come from the Gram matrix,
    ``⟨t_i − t_j, t_k − t_j⟩ = G_ik − G_ji − G_jk + G_jj``, so memory is O(B³), not O(B² · N).
    """
    gram, off_diagonal = _centred_gram(feature)
    distances = _distances(gram, off_diagonal)  # (B, B)
    inner = gram[None, :, :] - gram[:, :, None] - gram[:, None, :] + gram.diagonal()[:, None, None]  # (B, B, B)
    valid = off_diagonal[:, :, None] & off_diagonal[:, None, :]  # i ≠ j and k ≠ j
    # Divide by 1 where invalid so no inf / NaN reaches the backward pass of torch.where.
    safe = torch.where(off_diagonal, distances, torch.ones_like(distances))
    cosines = inner / (safe[:, :, None] * safe[:, None, :])
    return torch.where(valid, cosines, torch.zeros_like(cosines))


def rkd_distance_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """``L_D``: Huber loss between the distance potentials, mean over the B² ordered pairs."""
    return F.smooth_l1_loss(distance_potentials(student_feature), distance_potentials(teacher_feature))


def rkd_angle_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """``L_A``: Huber loss between the angle potentials, mean over the B³ triplets."""
    return F.smooth_l1_loss(angle_potentials(student_feature), angle_potentials(teacher_feature))


class RKD(DistillationObjective):
    """Relational KD, distance-wise and angle-wise (Park et al., 2019)."""

    knobs = ("distance_weight", "angle_weight")

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 student_layers: Sequence[str] | str = ("pre_logits",),
                 teacher_layers: Sequence[str] | str | None = None) -> None:
        require(distance_weight >= 0, f"kd.distance_weight must be >= 0, got {distance_weight}. It weights the "
                                      "distance-wise loss: kd.distance_weight=25 in the paper (0 turns it off).")
        require(angle_weight >= 0, f"kd.angle_weight must be >= 0, got {angle_weight}. It weights the angle-wise "
                                   "loss: kd.angle_weight=50 in the paper (0 turns it off).")
        student_layers, teacher_layers = layer_lists(student_layers, teacher_layers)
        super().__init__(student_layers=student_layers, teacher_layers=teacher_layers)
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("RKD needs the teacher's outputs")
        ce = F.cross_entropy(student.logits, targets)
        pairs = tapped_pairs(self, student, teacher)
        zero = ce.new_zeros(())
        # A weight of 0 skips its term (the angle term is O(B³)) but keeps the key, so logs stay aligned.
        distance = sum((rkd_distance_loss(s, t) for _, _, s, t in pairs), zero) if self.distance_weight else zero
        angle = sum((rkd_angle_loss(s, t) for _, _, s, t in pairs), zero) if self.angle_weight else zero
        return {"loss_ce": ce, "loss_kd_distance": self.distance_weight * distance,
                "loss_kd_angle": self.angle_weight * angle}

    @property
    def name(self) -> str:
        return "rkd"
