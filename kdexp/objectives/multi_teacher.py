"""Multi-teacher KD: the student matches the teachers' averaged soft targets.

Following the averaged-soft-target form of multi-teacher distillation (Hinton et al.
2015, section on ensembles; You et al., "Learning from Multiple Teacher Networks",
KDD 2017, use the same average of softened outputs):

``p̄ = (1/K) Σ_k softmax(t_k / T)``
``loss = (1 − α) · CE(s, y) + α · T² · KL(p̄ ‖ softmax(s / T))``

Teachers are listed in config (``teacher`` plus every entry of ``teachers``), each
provisioned and cached like a single teacher. With one teacher this is exactly
Hinton KD.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.objectives.base import ModelOutputs, labelled_cross_entropy
from kdexp.objectives.hinton import HintonKD


def averaged_soft_target_kl(student_logits: Tensor, member_logits: list[Tensor], temperature: float) -> Tensor:
    """``T² · KL(p̄ ‖ softmax(s/T))`` with ``p̄`` the members' mean softened distribution, batch-averaged."""
    log_members = torch.stack([F.log_softmax(t / temperature, dim=-1) for t in member_logits])  # (K, B, C)
    log_p_bar = torch.logsumexp(log_members, dim=0) - math.log(len(member_logits))  # (B, C)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    return F.kl_div(log_p_student, log_p_bar, reduction="batchmean", log_target=True) * temperature**2


class MultiTeacherKD(HintonKD):
    """Hinton KD towards the average of several teachers' soft targets (knobs: T, α)."""

    uses_teacher_members = True
    handles_unlabelled = True  # as HintonKD: UNLABELLED inputs (a transfer set) get the soft-target term only

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("MultiTeacherKD needs the teachers' outputs")
        members = teacher.members or [teacher.logits]
        ce = labelled_cross_entropy(student.logits, targets)  # transfer-set inputs: soft targets only, as HintonKD
        kd = averaged_soft_target_kl(student.logits, [m.detach() for m in members], self.temperature)
        return {"loss_ce": (1.0 - self.alpha) * ce, "loss_kd": self.alpha * kd}

    @property
    def name(self) -> str:
        return "multi_teacher"
