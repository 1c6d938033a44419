"""User-side objectives plugged in by ``kd._target_`` in the tests (like a researcher's own package)."""

from __future__ import annotations

from torch import Tensor

from kdexp.objectives import HintonKD, ModelOutputs


class ExplodingKD(HintonKD):
    """Hinton KD whose KD term turns NaN after ``explode_after`` training steps: a plug-in gone wrong."""

    def __init__(self, explode_after: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.explode_after = explode_after
        self.calls = 0

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor) -> dict[str, Tensor]:
        terms = super().forward(student, teacher, targets)
        self.calls += 1
        if self.calls > self.explode_after:
            terms["loss_kd"] = terms["loss_kd"] * float("nan")
        return terms
