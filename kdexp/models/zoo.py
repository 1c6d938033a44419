"""Width-parameterised classifiers.

Every model takes ``in_shape`` and ``num_classes`` from the data config (the YAML
files interpolate ``${data.input_shape}`` and ``${data.num_classes}``), so a model
cannot be paired with data of another shape or class count without an error.
``width`` is the knob swept in ablations: hidden units for the MLP, channels for
the CNNs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from kdexp.errors import require


def _check_common(name: str, in_shape: Sequence[int], num_classes: int, width: int) -> tuple[int, ...]:
    shape = tuple(int(d) for d in in_shape)
    require(width > 0, f"{name}: width must be a positive integer, got {width} (e.g. student.width=128).")
    require(num_classes >= 2, f"{name}: num_classes must be >= 2, got {num_classes}.")
    require(all(d > 0 for d in shape), f"{name}: in_shape must be positive, got {list(shape)}.")
    return shape


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units with ReLU; flattens any input shape."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, width: int = 128, depth: int = 2) -> None:
        super().__init__()
        shape = _check_common("MLP", in_shape, num_classes, width)
        require(depth >= 1, f"MLP: depth must be >= 1, got {depth}.")
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(shape)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(fan_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class CNN1D(nn.Module):
    """The convolutional baseline of the MNIST-1D paper (Greydanus, 2020, arXiv:2011.14439).

    Three stride-2 convolutions of ``width`` channels (25 in the paper, 5,210
    parameters for 40-sample inputs) and a linear head.
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
        self.features = nn.Sequential(
            nn.Conv1d(channels, width, kernel_size=5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1), nn.ReLU(),
        )
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        require(length >= 1, f"CNN1D: input length {shape[-1]} is too short for three stride-2 convolutions.")
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * length, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(x.shape[0], self.in_channels, -1)  # (B, C, L)
        return self.head(self.features(x))


class CNN2D(nn.Module):
    """A small VGG-style image CNN for 8×8, 28×28 and 32×32 inputs.

    Three conv-BN-ReLU blocks with ``width``, ``2·width`` and ``4·width`` channels,
    max-pooling after the first two while the map is larger than 4×4, and global
    average pooling, so one definition serves digits, MNIST and CIFAR.
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
        blocks: list[nn.Module] = []
        size = height
        for i, out in enumerate((width, 2 * width, 4 * width)):
            blocks += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if i < 2 and size > 4:
                blocks.append(nn.MaxPool2d(2))
                size //= 2
            channels = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
