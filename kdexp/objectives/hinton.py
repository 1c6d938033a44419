"""Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), arXiv:1503.02531.

``loss = (1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``

The T² factor keeps the soft-target gradients on the same scale as the hard-target
ones when T changes (section 2 of the paper); RepDistiller and mdistiller use the
same convention, so numbers are comparable with theirs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdexp.core.errors import require
from kdexp.objectives.base import DistillationObjective, ModelOutputs, labelled_cross_entropy


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)  # (B, C)
    # log_target=True avoids log(0) when the teacher is very confident.
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class HintonKD(DistillationObjective):
    """Soft targets from the teacher mixed with hard labels (Hinton et al., 2015)."""

    knobs = ("temperature", "alpha")
    handles_unlabelled = True  # transfer-set inputs get the soft-target term only

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        require(
            temperature > 0,
            f"kd.temperature must be > 0, got {temperature}. Typical values are 1-20, e.g. kd.temperature=4.",
        )
        require(
            0.0 <= alpha <= 1.0,
            f"kd.alpha must lie in [0, 1], got {alpha}. It weights the KD term: kd.alpha=0.9 is common.",
        )
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def forward(
        self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor
    ) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("HintonKD needs the teacher's outputs")
        ce = labelled_cross_entropy(student.logits, targets)
        kd = soft_target_kl(student.logits, teacher.logits, self.temperature)
        return {"loss_ce": (1.0 - self.alpha) * ce, "loss_kd": self.alpha * kd}

    @property
    def name(self) -> str:
        return "hinton"
