"""The contract every KD objective follows.

An objective is an ``nn.Module`` chosen by ``_target_`` in ``conf/kd/*.yaml``. It
receives the student's and the teacher's outputs (logits plus any named
intermediate features) and the targets, and returns a dict of named loss terms,
each already weighted. The LightningModule sums the terms and logs each one as
``train/<name>``.

Life cycle of an objective in a run:

1. built from config (``kd.*`` are its constructor's keyword arguments), after the
   run is seeded;
2. :meth:`DistillationObjective.bind` is called once the student and teacher exist,
   with their outputs on one probe batch (the tapped features included), before
   the optimiser is built: trainable parts sized by the features (a FitNets
   regressor, a projection head) are created there, so they are seeded, reach the
   optimiser, and are in every checkpoint from the first step;
3. called on every training batch.

Feature taps are module paths given per instance (``kd.student_layers=[stage2]``);
the zoo models name their stages (``stage1``…, ``pre_logits``) so a tap means the
same layer at every input size. Knobs (:attr:`knobs`) are the constructor
arguments a sweep varies; the run record stores them, and reports default to them
as table axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdexp.core.tasks import UNLABELLED  # noqa: F401 - objectives and their users take it from here too


@dataclass
class ModelOutputs:
    """What a network produced for one batch: logits and hooked features."""

    logits: Tensor  # (B, C)
    features: dict[str, Tensor] = field(default_factory=dict)
    members: list[Tensor] | None = None  # K × (B, C): each teacher's logits, for a teacher ensemble


class DistillationObjective(nn.Module):
    """Base class for KD objectives.

    Subclasses set ``needs_teacher`` (False for the CE-only baseline, so the teacher
    is never run in the training step) and ``knobs`` (the names of constructor
    arguments a sweep varies, e.g. ``("temperature", "alpha")``). Intermediate
    features are requested with the ``student_layers`` / ``teacher_layers``
    constructor arguments (module paths), or, for a fixed need, with the
    ``student_features`` / ``teacher_features`` class attributes; they are captured
    with forward hooks and passed in ``ModelOutputs.features`` keyed by path.
    """

    needs_teacher: bool = True
    knobs: tuple[str, ...] = ()
    student_features: tuple[str, ...] = ()
    teacher_features: tuple[str, ...] = ()
    epoch: int = 0  # the training epoch in progress, set by the module at the start of every epoch
    uses_teacher_members: bool = False  # reads each teacher of an ensemble (ModelOutputs.members)
    # Trains on transfer-set inputs (target UNLABELLED): the teacher's outputs are their only signal,
    # and the hard-label terms skip them (see labelled_cross_entropy).
    handles_unlabelled: bool = False
    # Reads sequence logits (B, L, V) with a target per position (task=causal_lm).
    handles_sequences: bool = False

    def __init__(self, student_layers: Sequence[str] | None = None,
                 teacher_layers: Sequence[str] | None = None) -> None:
        super().__init__()
        if student_layers:
            self.student_features = tuple(str(path) for path in student_layers)
        if teacher_layers:
            self.teacher_features = tuple(str(path) for path in teacher_layers)

    def bind(self, student: ModelOutputs, teacher: ModelOutputs | None) -> None:
        """Size trainable parts from one probe batch's outputs; called once, before the optimiser exists.

        The default has nothing to size. Outputs are detached and computed without
        gradients; only shapes (and, rarely, statistics) should be read from them.
        """

    def forward(
        self,
        student: ModelOutputs,
        teacher: ModelOutputs | None,
        targets: Tensor,
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    # -- how the objective names itself in run names, records, W&B and reports --------
    @property
    def name(self) -> str:
        """Short method name (``hinton``, ``fitnets``); the class name by default."""
        return type(self).__name__.lower()

    def knob_values(self) -> dict[str, Any]:
        """The current value of each knob, keyed by its config path (``kd.temperature``)."""
        return {f"kd.{knob}": _plain(getattr(self, knob)) for knob in self.knobs}

    def describe(self) -> str:
        """A short label for run names, e.g. ``hinton-T4-a0.9``: the name and each knob's value."""
        parts = [self.name]
        for knob in self.knobs:
            parts.append(f"{_KNOB_ABBREVIATIONS.get(knob, knob)}{_short(getattr(self, knob))}")
        return "-".join(parts)

    def identity(self) -> dict[str, Any]:
        """What the run record and W&B config say about the objective actually used.

        ``knobs`` lists config paths in declaration order (their values are in the
        run's config); reports make them the table's default axes.
        """
        cls = type(self)
        return {"name": self.name, "label": self.describe(), "target": f"{cls.__module__}.{cls.__qualname__}",
                "knobs": [f"kd.{knob}" for knob in self.knobs]}


# Short forms of common knobs in run names (hinton-T4-a0.9); others appear in full (beta8).
_KNOB_ABBREVIATIONS = {"temperature": "T", "alpha": "a", "distance_weight": "dist", "angle_weight": "angle"}


def _short(value: Any) -> str:
    value = _plain(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    return value




def labelled_cross_entropy(logits: Tensor, targets: Tensor, **kwargs: Any) -> Tensor:
    """Cross-entropy averaged over the labelled samples of the batch; 0 when it has none.

    Transfer-set inputs carry :data:`UNLABELLED` targets. ``F.cross_entropy`` already
    skips them, but returns NaN for a batch without any labelled sample.
    """
    if not bool((targets != UNLABELLED).any()):
        return logits.sum() * 0.0  # keeps the graph (and the dtype) without a NaN
    # ignore_index rather than logits[labelled]: no copy of a (tokens, vocabulary) tensor, and the
    # label-smoothing term is averaged over the labelled samples alike.
    return F.cross_entropy(logits, targets, ignore_index=UNLABELLED, **kwargs)


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 if it is a lower-precision float (bfloat16, float16), else unchanged.

    Softmaxes and divergences over a large vocabulary lose too much in 16 bits, so those
    inputs are computed in float32; a float64 run stays in float64 (``.float()`` would
    silently halve its precision).
    """
    if tensor.is_floating_point() and torch.finfo(tensor.dtype).bits < 32:
        return tensor.float()
    return tensor


def total_loss(terms: dict[str, Tensor]) -> Tensor:
    """Sum of the (already weighted) loss terms."""
    return torch.stack(list(terms.values())).sum()
