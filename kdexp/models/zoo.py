"""Width-parameterised classifiers.

Every model takes ``in_shape`` and ``num_classes`` from the data config (the YAML
files interpolate ``${data.input_shape}`` and ``${data.num_classes}``), so a model
cannot be paired with data of another shape or class count without an error.
``width`` is the knob swept in ablations: hidden units for the MLP, channels for
the CNNs.

Every model names its stages, so a feature tap means the same layer at every input
size: ``stage1``, ``stage2``, … (one per hidden layer or conv block, outputs after the
nonlinearity and any pooling of that block) and ``pre_logits`` (the flat vector the
linear head reads). Objectives tap them by name, e.g. ``kd.student_layers=[stage2]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from kdexp.core.errors import require


def _check_common(name: str, in_shape: Sequence[int], num_classes: int, width: int) -> tuple[int, ...]:
    shape = tuple(int(d) for d in in_shape)
    require(width > 0, f"{name}: width must be a positive integer, got {width} (e.g. student.width=128).")
    require(num_classes >= 2, f"{name}: num_classes must be >= 2, got {num_classes}.")
    require(all(d > 0 for d in shape), f"{name}: in_shape must be positive, got {list(shape)}.")
    return shape


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units with ReLU; flattens any input shape.

    Stages: ``stage1`` … ``stage{depth}`` (B, width); ``pre_logits`` (B, width).
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, width: int = 128, depth: int = 2) -> None:
        super().__init__()
        shape = _check_common("MLP", in_shape, num_classes, width)
        require(depth >= 1, f"MLP: depth must be >= 1, got {depth}.")
        self.flatten = nn.Flatten()
        fan_in = math.prod(shape)
        for i in range(1, depth + 1):
            self.add_module(f"stage{i}", nn.Sequential(nn.Linear(fan_in, width), nn.ReLU()))
            fan_in = width
        self.depth = depth
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(fan_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.head(self.pre_logits(x))


class CNN1D(nn.Module):
    """The convolutional baseline of the MNIST-1D paper (Greydanus, 2020, arXiv:2011.14439).

    Three stride-2 convolutions of ``width`` channels (25 in the paper, 5,210
    parameters for 40-sample inputs) and a linear head.
    Stages: ``stage1``–``stage3`` (B, width, L_k); ``pre_logits`` (B, width · L_3).
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, width: int = 25) -> None:
        super().__init__()
        shape = _check_common("CNN1D", in_shape, num_classes, width)
        require(
            len(shape) in (1, 2),
            f"CNN1D expects 1-D signals (data.input_shape [L] or [C, L]), got {list(shape)}. "
            "Pick the cnn2d or mlp option for images.",
        )
        channels, length = (1, shape[0]) if len(shape) == 1 else shape
        self.in_channels = channels
        self.stage1 = nn.Sequential(nn.Conv1d(channels, width, kernel_size=5, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1), nn.ReLU())
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        require(length >= 1, f"CNN1D: input length {shape[-1]} is too short for three stride-2 convolutions.")
        self.pre_logits = nn.Flatten()
        self.head = nn.Linear(width * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(x.shape[0], self.in_channels, -1)  # (B, C, L)
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.head(self.pre_logits(x))


class CNN2D(nn.Module):
    """A small VGG-style image CNN for 8×8, 28×28 and 32×32 inputs.

    Three conv-BN-ReLU blocks with ``width``, ``2·width`` and ``4·width`` channels,
    max-pooling at the end of the first two while the map is larger than 4×4, and
    global average pooling, so one definition serves digits, MNIST and CIFAR.
    Stages: ``stage1``–``stage3`` (B, C_k, H_k, W_k), the same blocks at every input
    size (only whether a block pools depends on it); ``pre_logits`` (B, 4·width).
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, width: int = 16) -> None:
        super().__init__()
        shape = _check_common("CNN2D", in_shape, num_classes, width)
        require(
            len(shape) == 3,
            f"CNN2D expects images (data.input_shape [C, H, W]), got {list(shape)}. "
            "Pick the cnn1d or mlp option for 1-D signals.",
        )
        channels, height, _ = shape
        size = height
        for i, out in enumerate((width, 2 * width, 4 * width), start=1):
            block: list[nn.Module] = [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if i < 3 and size > 4:
                block.append(nn.MaxPool2d(2))
                size //= 2
            self.add_module(f"stage{i}", nn.Sequential(*block))
            channels = out
        self.pre_logits = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.head(self.pre_logits(x))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
