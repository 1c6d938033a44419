"""The contract every KD objective follows.

An objective is an ``nn.Module`` chosen by ``_target_`` in ``conf/kd/*.yaml``. It
receives the student's and the teacher's outputs (logits plus any named
intermediate features) and the targets, and returns a dict of named loss terms,
each already weighted. The LightningModule sums the terms and logs each one as
``train/<name>``. Trainable parts of an objective (a FitNets regressor, say) are
submodules, so they reach the optimiser with the student.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class ModelOutputs:
    """What a network produced for one batch: logits and hooked features."""

    logits: Tensor  # (B, C)
    features: dict[str, Tensor] = field(default_factory=dict)


class DistillationObjective(nn.Module):
    """Base class for KD objectives.

    Subclasses set ``needs_teacher`` (False for the CE-only baseline, so the
    teacher is never run in the training step) and may list the module paths of
    the intermediate features they need in ``student_features`` /
    ``teacher_features`` (e.g. ``["layers.2"]``); those are captured with
    forward hooks and passed in ``ModelOutputs.features``.
    """

    needs_teacher: bool = True
    student_features: tuple[str, ...] = ()
    teacher_features: tuple[str, ...] = ()

    def forward(
        self,
        student: ModelOutputs,
        teacher: ModelOutputs | None,
        targets: Tensor,
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def describe(self) -> str:
        """A short label for run names, e.g. ``hinton-T4-a0.9``."""
        return type(self).__name__.lower()


def total_loss(terms: dict[str, Tensor]) -> Tensor:
    """Sum of the (already weighted) loss terms."""
    return torch.stack(list(terms.values())).sum()
