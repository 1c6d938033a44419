"""A linear classifier on the flattened input: with a hinge loss (``kd=svm_none`` or
``kd=svm``) and weight decay, a multiclass linear SVM.

It has no hidden layer and so no ``width``: ``student.width`` sweeps do not apply.
Its one stage, ``pre_logits``, is the flattened input ``(B, prod(in_shape))``, so a
feature tap on it means the same thing as on the zoo models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from kdexp.core.errors import require


class Linear(nn.Module):
    """``head(flatten(x))``: one ``nn.Linear`` with ``prod(in_shape) · C + C`` parameters."""

    def __init__(self, in_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        shape = tuple(int(d) for d in in_shape)
        require(num_classes >= 2, f"Linear: num_classes must be >= 2, got {num_classes} (data.num_classes).")
        require(
            len(shape) >= 1 and all(d > 0 for d in shape),
            f"Linear: in_shape must be a non-empty list of positive sizes, got {list(shape)} (data.input_shape).",
        )
        self.pre_logits = nn.Flatten()
        self.head = nn.Linear(math.prod(shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pre_logits(x))  # (B, C)
