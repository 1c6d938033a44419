"""Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.

Hinton's KL at temperature T splits exactly into two parts (eq. 1–3 of the paper):

``KD = TCKD + (1 − p_t^T) · NCKD``

- TCKD, target-class KD: KL between the teacher's and the student's *binary*
  distributions ``[p_t, 1 − p_t]`` (target class vs. all the others);
- NCKD, non-target-class KD: KL between the distributions over the non-target
  classes only, renormalised among themselves;
- ``p_t^T`` is the teacher's target probability. In plain KD the weight ``1 − p_t^T``
  shrinks NCKD exactly where the teacher is confident, i.e. where its "dark knowledge"
  is most reliable; DKD weights the two parts freely instead:

``loss = ce_weight · CE + warmup(epoch) · T² · (alpha · TCKD + beta · NCKD)``

with ``warmup(epoch) = min(epoch / warmup_epochs, 1)``: the KD part is ramped in
linearly so that a large beta does not dominate the first, noisy epochs (paper:
20 epochs on CIFAR-100).

Published settings: CIFAR-100 ``ce_weight=1, alpha=1, beta=8, T=4, warmup=20``
(beta is tuned per teacher–student pair, 8 is the most common); ImageNet uses a
much smaller beta (0.5) at T=1.

The epoch hook: the objective does not see the trainer, so whoever drives training
sets :attr:`DKD.epoch` at the start of every training epoch,
``objective.epoch = trainer.current_epoch``. Lightning counts epochs from 0, so the
first epoch is then CE-only and the KD part reaches full weight at epoch
``warmup_epochs``; mdistiller counts from 1 (``current_epoch + 1`` reproduces it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.core.errors import require
from kdexp.objectives.base import DistillationObjective, ModelOutputs

# How far below the row's smallest logit the target logit is pushed for NCKD. The
# paper subtracts 1000 from the target logit itself; measuring from the row minimum
# instead makes exp() underflow to exactly 0 at any logit scale (a target logit more
# than 1000 above the others would survive the paper's offset), and any gap > ~750
# underflows float32 and float64 alike.
_MASK_GAP = 1000.0


def _binary_log_probs(log_p: Tensor, targets: Tensor) -> Tensor:
    """``log [p_t, 1 − p_t]`` per row, from log-probabilities over all classes."""
    gt = F.one_hot(targets, log_p.shape[-1]).bool()  # (B, C)
    log_p_target = log_p.gather(1, targets[:, None]).squeeze(1)  # (B,)
    # log(1 - p_t) as a log-sum over the other classes: no cancellation when p_t ≈ 1.
    log_p_rest = torch.logsumexp(log_p.masked_fill(gt, float("-inf")), dim=1)  # (B,)
    return torch.stack([log_p_target, log_p_rest], dim=1)  # (B, 2)


def _mask_target(logits: Tensor, targets: Tensor) -> Tensor:
    """Logits with the target pushed so low that a softmax gives it probability 0."""
    gt = F.one_hot(targets, logits.shape[-1]).bool()  # (B, C)
    floor = logits.detach().amin(dim=1, keepdim=True) - _MASK_GAP  # (B, 1)
    return torch.where(gt, floor, logits)  # (B, C)


def _kl(log_q_student: Tensor, log_q_teacher: Tensor) -> Tensor:
    """``KL(teacher ‖ student)`` from log-probabilities, averaged over the batch."""
    return F.kl_div(log_q_student, log_q_teacher, reduction="batchmean", log_target=True)


def decoupled_kl(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                 temperature: float) -> tuple[Tensor, Tensor]:
    """``(T² · TCKD, T² · NCKD)``, each averaged over the batch (unweighted by alpha, beta)."""
    s = student_logits / temperature  # (B, C)
    t = teacher_logits / temperature  # (B, C)
    tckd = _kl(_binary_log_probs(F.log_softmax(s, dim=1), targets),
               _binary_log_probs(F.log_softmax(t, dim=1), targets))
    # Masking the target before the softmax renormalises over the non-target classes,
    # as in the paper's pseudo-code; the masked entry contributes 0 · (finite) = 0.
    nckd = _kl(F.log_softmax(_mask_target(s, targets), dim=1),
               F.log_softmax(_mask_target(t, targets), dim=1))
    return tckd * temperature**2, nckd * temperature**2


def warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """``min(epoch / warmup_epochs, 1)``, clipped at 0; 1 when there is no warm-up."""
    if warmup_epochs <= 0:
        return 1.0
    return min(max(float(epoch), 0.0) / warmup_epochs, 1.0)


class DKD(DistillationObjective):
    """Decoupled KD: target-class and non-target-class KL weighted separately (Zhao et al., 2022).

    Terms: ``loss_ce``, ``loss_tckd`` and ``loss_nckd`` (the last two include the
    warm-up factor). Note that ``kd.alpha`` here weights TCKD, as in the paper; it is
    not Hinton's CE/KD mixing weight.
    """

    knobs = ("beta", "temperature")

    def __init__(self, ce_weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0, warmup_epochs: float = 20) -> None:
        super().__init__()
        require(ce_weight >= 0, f"kd.ce_weight must be >= 0, got {ce_weight}. The paper uses kd.ce_weight=1.0.")
        require(alpha >= 0, f"kd.alpha must be >= 0, got {alpha}. It weights TCKD; the paper uses kd.alpha=1.0.")
        require(
            beta >= 0,
            f"kd.beta must be >= 0, got {beta}. It weights NCKD: kd.beta=8 on CIFAR-100, 0.5 on ImageNet.",
        )
        require(
            temperature > 0,
            f"kd.temperature must be > 0, got {temperature}. The paper uses kd.temperature=4 on CIFAR-100.",
        )
        require(
            warmup_epochs >= 0,
            f"kd.warmup_epochs must be >= 0 (0: no warm-up), got {warmup_epochs}. The paper uses 20 on CIFAR-100.",
        )
        self.ce_weight = float(ce_weight)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.warmup_epochs = warmup_epochs
        # Set by the training loop at the start of every epoch (see the module docstring);
        # a plain attribute, not state: the loop sets it again after a resume.
        self.epoch: int = 0

    def forward(
        self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor
    ) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("DKD needs the teacher's outputs")
        # The teacher is a fixed target: no gradient may reach it even if its logits carry one.
        tckd, nckd = decoupled_kl(student.logits, teacher.logits.detach(), targets, self.temperature)
        ramp = warmup_factor(self.epoch, self.warmup_epochs)
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(student.logits, targets),
            "loss_tckd": ramp * self.alpha * tckd,
            "loss_nckd": ramp * self.beta * nckd,
        }

    @property
    def name(self) -> str:
        return "dkd"
