"""Hidden-state distillation for sequence models, on top of token-level KD.

Chosen student layers are matched to chosen teacher layers position by position, as
DistilBERT (Sanh et al., 2019: cosine between hidden states) and TinyBERT (Jiao et al.,
2020: MSE through a learned projection when the widths differ) do. A layer map such as
"every k-th teacher layer" is written as the two tap lists, e.g. a 2-block student of a
4-block teacher: ``kd.student_layers=[blocks.0,blocks.1] kd.teacher_layers=[blocks.1,blocks.3]``.

``loss = token KD terms (see token_kd) + gamma · mean over pairs and valid positions of d(P h_s, h_t)``

with ``d`` = ``1 − cos`` (``distance=cosine``) or the squared error averaged over the
hidden size (``distance=mse``), and ``P`` a linear projection (the identity when the
sizes agree), trained with the student. Positions whose target is ``UNLABELLED``
(padding, prompts) take no part: the cosine term is DistilBERT's ``CosineEmbeddingLoss`` over
the selected positions; the MSE term averages over valid positions only (TinyBERT's code
averages over every position, padding included). Hidden states in 16-bit floats are
compared in float32; float32 and float64 keep their precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdexp.core.errors import require
from kdexp.objectives.base import UNLABELLED, ModelOutputs, at_least_float32
from kdexp.objectives.taps import layer_lists, tapped_pairs
from kdexp.objectives.token_kd import TokenKD

DISTANCES = ("cosine", "mse")


def hidden_distance(student: Tensor, teacher: Tensor, valid: Tensor, distance: str) -> Tensor:
    """Mean over valid positions of the distance between hidden states (..., D)."""
    student, teacher = at_least_float32(student), at_least_float32(teacher)
    if distance == "cosine":
        per_position = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    else:
        per_position = (student - teacher).pow(2).mean(-1)
    weights = valid.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp(min=1.0)


class HiddenStateKD(TokenKD):
    """Token-level KD plus matching of tapped hidden states (DistilBERT / TinyBERT style)."""

    knobs = ("temperature", "alpha", "gamma")

    def __init__(self, student_layers: Sequence[str] | str = ("pre_logits",),
                 teacher_layers: Sequence[str] | str | None = None, gamma: float = 1.0, distance: str = "cosine",
                 temperature: float = 2.0, alpha: float = 0.5, divergence: str = "forward_kl",
                 beta: float = 0.5) -> None:
        super().__init__(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta)
        require(gamma >= 0, f"kd.gamma (the hidden-state term's weight) must be >= 0, got {gamma}.")
        require(distance in DISTANCES, f"kd.distance must be one of {', '.join(DISTANCES)}, got {distance!r}.")
        self.student_features, self.teacher_features = map(tuple, layer_lists(student_layers, teacher_layers))
        self.gamma, self.distance = float(gamma), distance
        self.projections = nn.ModuleList()

    def bind(self, student: ModelOutputs, teacher: ModelOutputs | None) -> None:
        """One projection per tap pair: student width → teacher width (identity when equal)."""
        if len(self.projections):
            return  # bound before (e.g. a resumed run): keep the trained projections
        for _, _, s, t in tapped_pairs(self, student, teacher):
            s_dim, t_dim = s.shape[-1], t.shape[-1]
            # In the probe's precision when it is float32/float64 (a float64 run stays float64), else float32.
            dtype = s.dtype if s.dtype in (torch.float32, torch.float64) else torch.float32
            self.projections.append(nn.Identity() if s_dim == t_dim
                                    else nn.Linear(s_dim, t_dim, bias=False, device=s.device, dtype=dtype))

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        terms = super().forward(student, teacher, targets)
        valid = targets != UNLABELLED
        pairs = tapped_pairs(self, student, teacher)
        # bind makes a 16-bit tap's projection in float32: the tap is upcast to meet it.
        hidden = sum(hidden_distance(project(at_least_float32(s)), t, valid, self.distance)
                     for project, (_, _, s, t) in zip(self.projections, pairs))
        return {**terms, "loss_hidden": self.gamma * hidden / len(pairs)}

    @property
    def name(self) -> str:
        return "hidden_kd"
