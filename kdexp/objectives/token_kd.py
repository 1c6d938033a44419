"""Token-level distillation for sequence models: forward KL, reverse KL, generalized JSD.

Every position of a ``(B, L, V)`` logit tensor is a distribution over the vocabulary;
positions whose target is ``UNLABELLED`` (padding, prompt tokens) take no part in any
term, and a batch with no valid position gives 0, not NaN. ``(B, C)`` logits are one
position per sample, so on classification ``divergence=forward_kl`` is exactly
Hinton et al. (2015) KD.

The divergences, at temperature T (``p = softmax(teacher / T)``, ``q = softmax(student / T)``):

- ``forward_kl``: KL(p ‖ q), mass-covering (Hinton et al., 2015; Sanh et al., 2019);
- ``reverse_kl``: KL(q ‖ p), mode-seeking (Gu et al., 2024, MiniLLM);
- ``jsd``: the generalized Jensen–Shannon divergence of GKD (Agarwal et al., 2024,
  "On-Policy Distillation of Language Models"), with ``m = beta * p + (1 - beta) * q``:
  ``beta * KL(p ‖ m) + (1 - beta) * KL(q ‖ m)`` for ``0 < beta < 1``, and by definition
  forward KL at ``beta = 0`` and reverse KL at ``beta = 1``. This is TRL's
  ``GKDTrainer.generalized_jsd_loss`` from TRL 0.16.0 on (PR #3043, which put ``beta`` on the
  teacher in the mixture and added the two end cases); TRL 0.15 and earlier mix
  ``beta * q + (1 - beta) * p`` and give a different value for every ``beta ≠ 0.5``.

Near the ends the mixture formula does not approach the end cases: as ``beta → 0``,
``m → q`` and the divergence shrinks to about ``beta · KL(p ‖ q)`` (and to about
``(1 - beta) · KL(q ‖ p)`` as ``beta → 1``), so ``beta = 0.001`` gives a loss roughly a
thousand times smaller than ``beta = 0`` (forward KL), not a slightly different one. TRL's
PR #3043 says the same: the mixture formula is 0 at both ends, which is why the ends are
special cases. Near the ends ``beta`` therefore acts as a loss scale; pick
``divergence=forward_kl`` / ``reverse_kl`` (or ``beta`` 0 / 1) for the pure KLs.

``loss = (1 - alpha) * CE(student, targets) + alpha * T² * divergence``, the divergence
averaged over valid positions (as TRL's ``batchmean`` with labels, and DistilBERT's
``KLDivLoss(reduction="batchmean")`` over the selected positions times T²). Inputs in 16-bit
floats are computed in float32; float32 and float64 inputs keep their precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdexp.core.errors import require
from kdexp.objectives.base import (
    UNLABELLED,
    DistillationObjective,
    ModelOutputs,
    at_least_float32,
    labelled_cross_entropy,
)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per position, from log-probabilities.  # (..., V) -> (...)"""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, valid: Tensor, temperature: float,
                     divergence: str = "forward_kl", beta: float = 0.5) -> Tensor:
    """Mean over valid positions of the chosen divergence at ``temperature`` (no T² factor).

    ``student_logits``/``teacher_logits``: (B, L, V) or (B, V); ``valid``: (B, L) or (B,) booleans.
    """
    log_q = F.log_softmax(at_least_float32(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(at_least_float32(teacher_logits) / temperature, dim=-1)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        per_position = _kl(log_p, log_q)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        per_position = _kl(log_q, log_p)
    elif divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
        per_position = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; one of {DIVERGENCES}")
    weights = valid.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp(min=1.0)


class TokenKD(DistillationObjective):
    """Token-level KD: the task's cross-entropy mixed with a divergence to the teacher at every valid position."""

    knobs = ("temperature", "alpha")  # the divergence is in the name (token_kd, token_rkl, token_jsd)
    handles_unlabelled = True  # positions marked UNLABELLED are left out of both terms
    handles_sequences = True

    def __init__(self, temperature: float = 2.0, alpha: float = 0.5, divergence: str = "forward_kl",
                 beta: float = 0.5) -> None:
        super().__init__()
        require(temperature > 0, f"kd.temperature must be > 0, got {temperature} (e.g. kd.temperature=2).")
        require(0.0 <= alpha <= 1.0, f"kd.alpha must lie in [0, 1], got {alpha} (e.g. kd.alpha=0.5).")
        require(divergence in DIVERGENCES, f"kd.divergence must be one of {', '.join(DIVERGENCES)}, got "
                                           f"{divergence!r}.")
        require(0.0 <= beta <= 1.0, f"kd.beta must lie in [0, 1] (the JSD's teacher weight), got {beta}.")
        self.temperature, self.alpha, self.divergence, self.beta = float(temperature), float(alpha), divergence, float(beta)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("TokenKD needs the teacher's outputs")
        valid = targets != UNLABELLED  # (B, L) or (B,)
        logits = at_least_float32(student.logits)  # (B, L, V) or (B, C); 16-bit logits: CE in float32 too
        # Mean over labelled positions, 0 (not NaN) when there are none.
        ce = labelled_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        kd = token_divergence(logits, teacher.logits, valid, self.temperature, self.divergence, self.beta)
        return {"loss_ce": (1.0 - self.alpha) * ce, "loss_kd": self.alpha * self.temperature**2 * kd}

    @property
    def name(self) -> str:
        return {"forward_kl": "token_kd", "reverse_kl": "token_rkl", "jsd": "token_jsd"}[self.divergence]
