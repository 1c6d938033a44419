"""Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer" (ICLR 2017), arXiv:1612.03928.

A feature map ``A`` of shape (B, C, *S) gives a spatial attention map
``Q = vec(F(A))`` with ``F(A) = Σ_c |A_c|^p`` (p = 2 in the paper); the student learns to
match the teacher's L2-normalised maps at each tap pair j::

    loss = CE(s, y) + beta · Σ_j mean_{b,k} (Q_s^j/‖Q_s^j‖₂ − Q_t^j/‖Q_t^j‖₂)²_{b,k}

with beta = 1000. This is the weighting of the code the published numbers come from: the
authors' ``cifar.py`` (szagoruyko/attention-transfer) adds ``beta · Σ_j at_loss_j`` with
``at_loss = (at(x) − at(y)).pow(2).mean()`` over batch and positions and ``--beta 1e+3``;
RepDistiller (``-b 1000``) and mdistiller (``FEAT_WEIGHT 1000``) do the same. The paper's
eq. 2 writes ``beta/2`` in front of a norm of the difference; kdexp follows the code, so
kd.beta=1000 gives exactly the term those three codes train with.
The channel mean is used for F instead of the sum (as in all three codes): it differs by
the factor C, which the normalisation removes, and keeps |A|^p in range.

The maps need spatial taps (CNN stages; an MLP has none). Taps of different spatial
size are compared after average-pooling the larger *attention map* to the smaller one
(the authors' code pairs maps of equal size only; RepDistiller and mdistiller pool the
larger *feature map* before squaring, which gives slightly different values then).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdexp.core.errors import ConfigError, require
from kdexp.objectives.base import DistillationObjective, ModelOutputs
from kdexp.objectives.taps import layer_lists, tapped_pairs

_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Un-normalised spatial attention ``mean_c |A_c|^p``: (B, C, *S) -> (B, *S)."""
    return feature.abs().pow(p).mean(dim=1)


def attention_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0) -> Tensor:
    """``mean_{b,k} (q_s − q_t)²`` of the L2-normalised attention maps, pooled to a common size."""
    q_s, q_t = attention_map(student_feature, p), attention_map(teacher_feature, p)  # (B, *S_s), (B, *S_t)
    size = tuple(min(a, b) for a, b in zip(q_s.shape[1:], q_t.shape[1:]))
    pool = _POOL[len(size)]
    if tuple(q_s.shape[1:]) != size:
        q_s = pool(q_s.unsqueeze(1), size).squeeze(1)  # pooling wants a channel axis
    if tuple(q_t.shape[1:]) != size:
        q_t = pool(q_t.unsqueeze(1), size).squeeze(1)
    q_s = F.normalize(q_s.flatten(1), dim=1)  # (B, K)
    q_t = F.normalize(q_t.flatten(1), dim=1)  # (B, K)
    return (q_s - q_t).pow(2).mean()


class AttentionTransfer(DistillationObjective):
    """Activation-based attention transfer (Zagoruyko & Komodakis, 2017)."""

    knobs = ("beta",)

    def __init__(self, beta: float = 1000.0, p: float = 2.0,
                 student_layers: Sequence[str] | str = ("stage1", "stage2", "stage3"),
                 teacher_layers: Sequence[str] | str | None = None) -> None:
        require(beta >= 0, f"kd.beta must be >= 0, got {beta}. It weights the attention loss: kd.beta=1000 "
                           "in the paper.")
        require(p >= 1, f"kd.p must be >= 1, got {p}. It is the power of |A| in the attention map: kd.p=2 in "
                        "the paper (which also tries 1 and 4).")
        student_layers, teacher_layers = layer_lists(student_layers, teacher_layers)
        super().__init__(student_layers=student_layers, teacher_layers=teacher_layers)
        self.beta = float(beta)
        self.p = float(p)

    def check_shapes(self, student: ModelOutputs, teacher: ModelOutputs) -> None:
        """Raise :class:`ConfigError` for taps without spatial maps, or maps of different rank."""
        for s_path, t_path, s_feat, t_feat in tapped_pairs(self, student, teacher):
            for side, path, feat in (("student", s_path, s_feat), ("teacher", t_path, t_feat)):
                if feat.dim() not in (3, 4, 5):
                    raise ConfigError(
                        f"kd=attention needs spatial feature maps (B, C, L) or (B, C, H, W), but {side} tap "
                        f"'{path}' gives shape {list(feat.shape)}. Tap convolutional stages "
                        f"(kd.{side}_layers=[stage1,stage2,stage3] on a cnn1d/cnn2d model); an MLP has no "
                        "spatial maps, use kd=similarity, kd=pkt or kd=rkd there."
                    )
            if s_feat.dim() != t_feat.dim():
                raise ConfigError(
                    f"kd=attention pairs student tap '{s_path}' {list(s_feat.shape)} with teacher tap '{t_path}' "
                    f"{list(t_feat.shape)}: the maps must have the same number of spatial dimensions."
                )

    def bind(self, student: ModelOutputs, teacher: ModelOutputs | None) -> None:
        # Nothing to size, but a wrong tap is reported before training starts.
        if teacher is not None:
            self.check_shapes(student, teacher)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("AttentionTransfer needs the teacher's outputs")
        self.check_shapes(student, teacher)
        ce = F.cross_entropy(student.logits, targets)
        pairs = tapped_pairs(self, student, teacher)
        at = sum(attention_loss(s_feat, t_feat, self.p) for _, _, s_feat, t_feat in pairs)
        return {"loss_ce": ce, "loss_kd": self.beta * at}

    @property
    def name(self) -> str:
        return "at"
