"""Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), arXiv:1412.6550.

A teacher's *hint* layer ``u_h`` guides a student's *guided* layer ``v_g`` through a
learned regressor ``r`` that maps the student's features to the teacher's shape
(the paper's hint loss): ``L_HT = 1/2 · ‖u_h(x) − r(v_g(x))‖²``.

The paper trains in two stages (hints first, then Hinton KD on the whole student).
Like CRD / RepDistiller (Tian et al., 2020, arXiv:1910.10699), whose numbers most KD
papers compare against, this is the one-stage form used there::

    loss = CE(s, y) + beta · mean((r(v_g) − u_h)²)

with the mean over batch and elements (``F.mse_loss``) and ``beta = 100``, their
CIFAR-100 setting; the paper itself has no such weight. With several tap pairs the
hint terms are summed.

The regressor is linear: a 1×1 convolution when both taps are feature maps of the
same rank (``(B, C, L)`` or ``(B, C, H, W)``), a linear map of the flattened features
otherwise. The paper's convolutional regressor ends in the teacher's nonlinearity and
RepDistiller's adds BatchNorm and ReLU; a linear map keeps the hint term a plain
least-squares fit, and it can be the identity, so a student that already matches
its teacher pays nothing. When the student's map is larger than the teacher's it is
average-pooled to the teacher's size first (pooling and a 1×1 convolution commute);
a smaller one is a configuration error.

Layer pairing (``student_layers[i]`` ↔ ``teacher_layers[i]``) is shared with the other
feature objectives (:mod:`kdexp.objectives.taps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdexp.core.errors import ConfigError, require
from kdexp.objectives.base import DistillationObjective, ModelOutputs
from kdexp.objectives.taps import layer_lists, tapped_pairs

_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# -- the math ---------------------------------------------------------------------------
def hint_loss(regressed: Tensor, hint: Tensor) -> Tensor:
    """Mean squared error between the regressed student features and the teacher's hint."""
    return F.mse_loss(regressed.flatten(1), hint.flatten(1))


def make_regressor(student_shape: Sequence[int], teacher_shape: Sequence[int],
                   student_path: str = "?", teacher_path: str = "?") -> nn.Module:
    """A linear map from a student feature of ``student_shape`` to ``teacher_shape`` (batch first)."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    spatial_rank = len(s) - 2
    if len(s) == len(t) and spatial_rank in _CONV:
        s_size, t_size = s[2:], t[2:]
        if any(a < b for a, b in zip(s_size, t_size)):
            raise ConfigError(
                f"kd=fitnets: student tap '{student_path}' has spatial size {list(s_size)}, smaller than teacher "
                f"tap '{teacher_path}' {list(t_size)}; the regressor only pools the student map down to the "
                "teacher's size. Tap an earlier student layer or a later teacher layer (kd.student_layers / "
                "kd.teacher_layers)."
            )
        # Average pooling then a 1x1 conv: both linear, so the order does not matter, and pooling first is cheaper.
        pool: nn.Module = nn.Identity() if s_size == t_size else _POOL[spatial_rank](t_size)
        return nn.Sequential(pool, _CONV[spatial_rank](s[1], t[1], kernel_size=1))
    # Flat taps, or maps of different rank: regress the flattened features.
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(s[1:]), math.prod(t[1:])))


class FitNets(DistillationObjective):
    """Hint-based training (Romero et al., 2015), one-stage with CE as in RepDistiller."""

    knobs = ("beta",)

    def __init__(self, beta: float = 100.0, student_layers: Sequence[str] | str = ("stage2",),
                 teacher_layers: Sequence[str] | str | None = None) -> None:
        require(beta >= 0, f"kd.beta must be >= 0, got {beta}. It weights the hint loss: kd.beta=100 as in "
                           "RepDistiller.")
        student_layers, teacher_layers = layer_lists(student_layers, teacher_layers)
        super().__init__(student_layers=student_layers, teacher_layers=teacher_layers)
        self.beta = float(beta)
        self.regressors = nn.ModuleList()  # one per tap pair, built in bind()
        self._bound_shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def bind(self, student: ModelOutputs, teacher: ModelOutputs | None) -> None:
        if teacher is None:
            raise ValueError("FitNets needs the teacher's outputs to size its regressors")
        pairs = tapped_pairs(self, student, teacher)
        shapes = [(tuple(s.shape), tuple(t.shape)) for _, _, s, t in pairs]
        if shapes == self._bound_shapes:
            return  # bound before (e.g. a resumed run): keep the trained regressors
        regressors = []
        for s_path, t_path, s_feat, t_feat in pairs:
            # Float32 unless the probe ran in float64: half-precision parameters would not train well.
            dtype = s_feat.dtype if s_feat.dtype in (torch.float32, torch.float64) else torch.float32
            regressor = make_regressor(s_feat.shape, t_feat.shape, s_path, t_path)
            regressors.append(regressor.to(device=s_feat.device, dtype=dtype))
        self.regressors = nn.ModuleList(regressors)
        self._bound_shapes = shapes

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("FitNets needs the teacher's outputs")
        if not self._bound_shapes:
            raise RuntimeError("FitNets.bind() must run on a probe batch before the first forward (the training "
                               "module does this before building the optimiser)")
        ce = F.cross_entropy(student.logits, targets)
        hint = sum(hint_loss(regressor(s_feat), t_feat)
                   for regressor, (_, _, s_feat, t_feat) in zip(self.regressors, tapped_pairs(self, student, teacher)))
        return {"loss_ce": ce, "loss_kd": self.beta * hint}

    @property
    def name(self) -> str:
        return "fitnets"
