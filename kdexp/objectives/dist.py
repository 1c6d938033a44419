"""Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST), NeurIPS 2022, arXiv:2205.10536.

KL asks the student to match the teacher's probabilities exactly, which gets harder
as the teacher gets stronger. DIST only asks that the *relations* be preserved,
measured by Pearson correlation, which ignores any positive scale and shift:

- inter-class relation: per sample, correlate the student's and the teacher's
  probability vectors over the classes (rows of ``(B, C)``);
- intra-class relation: per class, correlate the probabilities the two models give
  that class across the batch (columns of ``(B, C)``).

``loss = ce_weight · CE + beta · τ² · (1 − mean ρ_rows) + gamma · τ² · (1 − mean ρ_cols)``

with probabilities ``softmax(z / τ)``. Each relation term lies in [0, 2].

Defaults give the objective the official code trains with: ``ce_weight = 1``,
``beta = gamma = 2``, ``τ = 1``. The official code builds ``DIST(beta=1, gamma=1)``
(``lib/models/losses/dist_kd.py`` of hunto/image_classification_sota, DIST_KD's training
code) and weights it by 2 against CE (``ori_loss · 1 + kd_loss · 2``: its ImageNet config
``resnet_dist.yaml`` and CIFAR-100 config ``dist_cifar.yaml``; torchdistill's
``configs/sample/ilsvrc2012/dist/resnet18_from_resnet34.yaml`` has the same ``weight: 2.0``
on ``DISTLoss(beta=1, gamma=1, tau=1)``), i.e. ``2 · inter + 2 · intra``. For CIFAR-100
the official runs use τ = 4; set ``kd.temperature=4`` there.

Conventions: the τ² factor is that of the code's tempered version; the code adds
``eps = 1e-8`` to the correlation's denominator, kdexp floors the denominator at 1e-8
instead (identical rows then give exactly ρ = 1; the two differ by ~1e-8 relative on
ordinary inputs). The intra-class term needs a batch of at least 2 samples; on a
single-sample batch it is the constant ``gamma · τ²`` with zero gradient.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdexp.core.errors import require
from kdexp.objectives.base import DistillationObjective, ModelOutputs


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: ``(N, D) -> (N,)``."""
    a = a - a.mean(dim=1, keepdim=True)  # (N, D)
    b = b - b.mean(dim=1, keepdim=True)  # (N, D)
    # A floor on the denominator, not an added eps, so identical rows give exactly 1;
    # a constant row (no variation to correlate) gives 0 instead of 0/0.
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)


def relation_losses(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``(τ² · inter, τ² · intra)``, each ``1 − mean Pearson ρ``, unweighted by beta and gamma."""
    p_s = F.softmax(student_logits / temperature, dim=1)  # (B, C)
    p_t = F.softmax(teacher_logits / temperature, dim=1)  # (B, C)
    inter = 1.0 - pearson_rows(p_s, p_t).mean()  # over classes, per sample
    intra = 1.0 - pearson_rows(p_s.T, p_t.T).mean()  # over the batch, per class
    return inter * temperature**2, intra * temperature**2


class DIST(DistillationObjective):
    """Relation-based KD with Pearson correlation, inter- and intra-class (Huang et al., 2022).

    Terms: ``loss_ce``, ``loss_inter`` and ``loss_intra``.
    """

    knobs = ("beta", "gamma", "temperature")

    def __init__(self, ce_weight: float = 1.0, beta: float = 2.0, gamma: float = 2.0,
                 temperature: float = 1.0) -> None:
        super().__init__()
        require(ce_weight >= 0, f"kd.ce_weight must be >= 0, got {ce_weight}. The official code uses kd.ce_weight=1.0.")
        require(
            beta >= 0,
            f"kd.beta must be >= 0, got {beta}. It weights the inter-class relation; the official code: kd.beta=2.",
        )
        require(
            gamma >= 0,
            f"kd.gamma must be >= 0, got {gamma}. It weights the intra-class relation; the official code: kd.gamma=2.",
        )
        require(
            temperature > 0,
            f"kd.temperature must be > 0, got {temperature}. The official runs use 1 on ImageNet, 4 on CIFAR-100.",
        )
        self.ce_weight = float(ce_weight)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = float(temperature)

    def forward(
        self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor
    ) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("DIST needs the teacher's outputs")
        # The teacher is a fixed target: no gradient may reach it even if its logits carry one.
        inter, intra = relation_losses(student.logits, teacher.logits.detach(), self.temperature)
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(student.logits, targets),
            "loss_inter": self.beta * inter,
            "loss_intra": self.gamma * intra,
        }

    @property
    def name(self) -> str:
        return "dist"
