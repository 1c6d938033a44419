"""Per-epoch schedules for any objective setting (α, T, a loss weight).

One mechanism for every objective: the ``schedule`` config group maps an attribute
of the objective to a schedule, and at the start of every training epoch the module
sets ``objective.<name> = schedule.value(epoch, max_epochs)`` and logs the values in
force as ``train/<name>``. Progressive distillation (α rising over training, as in
the LLM-distillation recipes) is ``schedule=alpha_warmup``.

    schedule:
      alpha: {_target_: kdexp.schedules.Linear, start: 0.0, end: 0.9, epochs: 20}

Epochs count from 0; ``epochs: null`` means "over the whole run" (``max_epochs``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kdexp.core.errors import require


class Schedule:
    """A value per epoch. Subclasses implement :meth:`value` and :meth:`describe`."""

    def value(self, epoch: int, max_epochs: int) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        """A short form for run names, e.g. ``lin0-0.9e20``."""
        raise NotImplementedError

    def values(self, max_epochs: int) -> list[float]:
        """The value at every epoch of a run of ``max_epochs`` (for checks and plots)."""
        return [self.value(epoch, max_epochs) for epoch in range(max_epochs)]


def _span(epochs: int | None, max_epochs: int) -> int:
    return max(int(epochs if epochs is not None else max_epochs), 1)


class Constant(Schedule):
    """The same value at every epoch."""

    def __init__(self, value: float) -> None:
        self.constant = float(value)

    def value(self, epoch: int, max_epochs: int) -> float:
        return self.constant

    def describe(self) -> str:
        return f"{self.constant:g}"


class Linear(Schedule):
    """From ``start`` to ``end`` linearly over ``epochs`` epochs after ``delay``, then ``end``.

    Epoch ``delay`` gives ``start``; epoch ``delay + epochs`` and later give ``end``
    (a warm-up when start < end).
    """

    def __init__(self, start: float, end: float, epochs: int | None = None, delay: int = 0) -> None:
        require(epochs is None or int(epochs) >= 1, f"a Linear schedule needs epochs >= 1 or null, got {epochs}.")
        require(int(delay) >= 0, f"a Linear schedule needs delay >= 0, got {delay}.")
        self.start, self.end, self.epochs, self.delay = float(start), float(end), epochs, int(delay)

    def value(self, epoch: int, max_epochs: int) -> float:
        progress = min(max(epoch - self.delay, 0) / _span(self.epochs, max_epochs), 1.0)
        return self.start + (self.end - self.start) * progress

    def describe(self) -> str:
        return f"lin{self.start:g}-{self.end:g}" + (f"e{self.epochs}" if self.epochs is not None else "")


class Cosine(Schedule):
    """Half a cosine from ``start`` to ``end`` over ``epochs`` epochs (the whole run if null), then ``end``."""

    def __init__(self, start: float, end: float, epochs: int | None = None) -> None:
        require(epochs is None or int(epochs) >= 1, f"a Cosine schedule needs epochs >= 1 or null, got {epochs}.")
        self.start, self.end, self.epochs = float(start), float(end), epochs

    def value(self, epoch: int, max_epochs: int) -> float:
        progress = min(epoch / _span(self.epochs, max_epochs), 1.0)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self) -> str:
        return f"cos{self.start:g}-{self.end:g}" + (f"e{self.epochs}" if self.epochs is not None else "")


class Step(Schedule):
    """``values[0]`` before ``milestones[0]``, ``values[k]`` from ``milestones[k-1]`` on."""

    def __init__(self, values: Sequence[float], milestones: Sequence[int]) -> None:
        values, milestones = [float(v) for v in values], [int(m) for m in milestones]
        require(len(values) == len(milestones) + 1,
                f"a Step schedule needs one more value than milestones, got {len(values)} values and "
                f"{len(milestones)} milestones.")
        require(milestones == sorted(milestones) and all(m >= 0 for m in milestones),
                f"a Step schedule needs increasing milestones >= 0, got {milestones}.")
        self.steps, self.milestones = values, milestones

    def value(self, epoch: int, max_epochs: int) -> float:
        return self.steps[sum(epoch >= m for m in self.milestones)]

    def describe(self) -> str:
        return "step" + "-".join(f"{v:g}" for v in self.steps)
