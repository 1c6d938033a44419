"""Several frozen teachers behind one module (multi-teacher distillation).

The ensemble's own prediction is the average of the members' probabilities; it is
returned as log-probabilities, which are valid logits (softmax gives back the
average), so agreement, calibration and accuracy metrics treat the ensemble as one
teacher. Objectives that use each member's view read ``member_logits``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def average_probability_logits(member_logits: Sequence[Tensor]) -> Tensor:
    """``log mean_k softmax(z_k)``: logits of the members' averaged distribution.  # (B, C)"""
    log_probs = torch.stack([z.log_softmax(-1) for z in member_logits])  # (K, B, C)
    return torch.logsumexp(log_probs, dim=0) - math.log(len(member_logits))


class TeacherEnsemble(nn.Module):
    """Members called on the same input; ``forward`` gives the averaged-probability logits."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a teacher ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def member_logits(self, x: Tensor) -> list[Tensor]:
        return [member(x) for member in self.members]  # K × (B, C)

    def forward(self, x: Tensor) -> Tensor:
        return average_probability_logits(self.member_logits(x))
