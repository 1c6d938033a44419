"""Ba & Caruana, "Do Deep Nets Really Need to be Deep?" (NeurIPS 2014), arXiv:1312.6184.

The student regresses the teacher's logits (the values before the softmax) with the
L2 loss of section 2.2 of the paper, ``1/(2B) · Σ_b ‖s_b − t_b‖²`` (half the squared
error summed over classes, averaged over the batch), mixed with the hard labels like
Hinton KD so the two are swept on the same axis::

    loss = (1 − alpha) · CE(s, y) + alpha · 1/(2B) · Σ_b ‖s_b − t_b‖²

Matching logits rather than softened probabilities keeps the information the
softmax squashes (the relative scale of the logits); it is Hinton KD's high-
temperature limit (Hinton et al., 2015, section 2.1). The paper trains on the logits
alone, hence ``alpha = 1`` by default; ``alpha < 1`` adds the labels back.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdexp.core.errors import require
from kdexp.objectives.base import DistillationObjective, ModelOutputs


def logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``1/(2B) · Σ_b ‖s_b − t_b‖²``: half the squared error summed over classes, batch mean."""
    return 0.5 * (student_logits - teacher_logits).pow(2).sum(dim=-1).mean()  # (B, C) -> ()


class MSELogitsKD(DistillationObjective):
    """Logit regression by mean squared error (Ba & Caruana, 2014)."""

    knobs = ("alpha",)

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        require(
            0.0 <= alpha <= 1.0,
            f"kd.alpha must lie in [0, 1], got {alpha}. It weights the logit MSE against CE: kd.alpha=1 "
            "(logits only) is the paper's setting.",
        )
        self.alpha = float(alpha)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("MSELogitsKD needs the teacher's outputs")
        ce = F.cross_entropy(student.logits, targets)
        mse = logit_mse(student.logits, teacher.logits.detach())
        return {"loss_ce": (1.0 - self.alpha) * ce, "loss_kd": self.alpha * mse}

    @property
    def name(self) -> str:
        return "mse_logits"
