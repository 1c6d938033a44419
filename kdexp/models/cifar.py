"""The CIFAR model zoo of the distillation benchmarks: ResNets, wide ResNets and VGGs.

The architectures and parameter counts are those of the CRD benchmark (Tian et al.,
"Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699), which DKD
(Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679) and most
later CIFAR-100 KD tables reuse, so a number from those tables is comparable with a
run here. Built from the papers' descriptions:

- CIFAR ResNets (He et al. 2016, arXiv:1512.03385, sec. 4.2): a 3×3 stem and three
  stages of ``n = (depth − 2) / 6`` basic blocks, stride 2 at stages 2 and 3. As in CRD,
  shortcuts that change shape are 1×1 conv + BN (option B), and the ``x4`` nets are 4×
  wider (32-64-128-256), which also puts a shortcut conv in the first block.
- Wide ResNets (Zagoruyko & Komodakis 2016, arXiv:1605.07146): WRN-d-k has a 16-channel
  stem and three stages of ``(d − 4) / 6`` pre-activation blocks with 16k, 32k, 64k channels.
- VGG (Simonyan & Zisserman 2015, arXiv:1409.1556) with BN, CIFAR variant as in CRD:
  five conv blocks (64, 128, 256, 512, 512), max-pooling between them down to 4×4,
  global average pooling and one linear layer on 512 features.

Every constructor takes ``in_shape`` (3, H, W), ``num_classes`` and ``width``: a
multiplier of every channel count (1 = the published net), so ``student.width=0.5``
keeps the architecture and quarters the parameters. Stages follow the real structure
(three for the ResNets, five blocks for VGG); ``stageK`` is the output of stage K as
CRD's ``is_feat`` taps it and ``pre_logits`` the pooled (B, D) vector the head reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from kdexp.core.errors import require

__all__ = [
    "CifarResNet", "CifarVGG", "WideResNet",
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg13",
]


def _check(name: str, in_shape: Sequence[int], num_classes: int, width: float) -> tuple[int, int, int]:
    """Validate the arguments every CIFAR net shares; returns (C, H, W)."""
    require(
        isinstance(width, (int, float)) and not isinstance(width, bool) and math.isfinite(width) and width > 0,
        f"{name}: width is a channel multiplier and must be a positive number (1 = the published net), got {width!r}.",
    )
    require(num_classes >= 2, f"{name}: num_classes must be >= 2, got {num_classes}.")
    shape = tuple(int(d) for d in in_shape)
    require(
        len(shape) == 3 and shape[0] == 3 and shape[1] > 0 and shape[2] > 0,
        f"{name} expects RGB images (data.input_shape [3, H, W], e.g. data=cifar100), got {list(shape)}. "
        "Pick cnn2d or mlp for grey images and cnn1d for 1-D signals.",
    )
    return shape  # type: ignore[return-value]


def _scale(channels: int, width: float) -> int:
    """``channels · width`` rounded half up, at least 1 (Python's round would send 2.5 to 2)."""
    return max(1, int(channels * width + 0.5))


def _init_weights(model: nn.Module) -> None:
    # He init (fan_out) for convs and unit BN, as the CRD reference nets do; linear layers keep PyTorch's default.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _pool_flat() -> nn.Sequential:
    # Global average pooling instead of CRD's AvgPool2d(8): identical at 32×32, and other sizes still work.
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


# --- ResNets (He et al. 2016) ---------------------------------------------------------


class _BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus shortcut, then ReLU (the post-activation block)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-``depth`` with stem and stage channels ``channels`` = (c0, c1, c2, c3).

    Stages: ``stem`` (B, c0, H, W); ``stage1`` (B, c1, H, W), ``stage2`` (B, c2, H/2, W/2),
    ``stage3`` (B, c3, H/4, W/4), each after its last block's ReLU; ``pre_logits`` (B, c3).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        depth: int,
        channels: Sequence[int] = (16, 16, 32, 64),
        width: float = 1,
        name: str = "CifarResNet",
    ) -> None:
        super().__init__()
        shape = _check(name, in_shape, num_classes, width)
        require(depth >= 8 and (depth - 2) % 6 == 0,
                f"{name}: depth must be 6n + 2 with n >= 1 (8, 14, 20, …), got {depth}.")
        require(len(channels) == 4, f"{name}: channels must list stem and three stages, got {list(channels)}.")
        blocks = (depth - 2) // 6
        c0, *stage_channels = (_scale(c, width) for c in channels)
        self.stem = nn.Sequential(_conv3x3(shape[0], c0), nn.BatchNorm2d(c0), nn.ReLU())
        cin = c0
        for i, cout in enumerate(stage_channels, start=1):
            stride = 1 if i == 1 else 2
            layers = [_BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1) for b in range(blocks)]
            self.add_module(f"stage{i}", nn.Sequential(*layers))
            cin = cout
        self.pre_logits = _pool_flat()
        self.head = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(self.pre_logits(x))


def _resnet(depth: int, channels: Sequence[int], name: str):
    def build(in_shape: Sequence[int], num_classes: int, width: float = 1) -> CifarResNet:
        return CifarResNet(in_shape, num_classes, depth=depth, channels=channels, width=width, name=name)

    build.__name__ = build.__qualname__ = name
    wide = " 4× wider (32-64-128-256 channels, as in CRD)" if channels[0] == 32 else " (16-16-32-64 channels)"
    build.__doc__ = f"CIFAR ResNet-{depth}{wide}; ``width`` multiplies every channel count."
    return build


_BASE, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)
resnet8 = _resnet(8, _BASE, "resnet8")
resnet14 = _resnet(14, _BASE, "resnet14")
resnet20 = _resnet(20, _BASE, "resnet20")
resnet32 = _resnet(32, _BASE, "resnet32")
resnet44 = _resnet(44, _BASE, "resnet44")
resnet56 = _resnet(56, _BASE, "resnet56")
resnet110 = _resnet(110, _BASE, "resnet110")
resnet8x4 = _resnet(8, _X4, "resnet8x4")
resnet32x4 = _resnet(32, _X4, "resnet32x4")


# --- Wide ResNets (Zagoruyko & Komodakis 2016) -----------------------------------------


class _WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3-BN-ReLU-conv3×3 plus shortcut.

    When the shape changes, the shortcut is a 1×1 conv of the *activated* input, as in
    the WRN paper's code, so the first BN-ReLU is shared by both branches.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-``depth``-``k`` (no dropout, as in CRD's students and teachers).

    Stages: ``stem`` (B, 16, H, W); ``stage1`` (B, 16k, H, W), ``stage2`` (B, 32k, H/2, W/2),
    ``stage3`` (B, 64k, H/4, W/4). In a pre-activation net a stage's output is the residual
    sum before the next BN-ReLU, which is what CRD taps; the final BN-ReLU sits in
    ``pre_logits`` (B, 64k) with the pooling.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        depth: int,
        k: int,
        width: float = 1,
        name: str = "WideResNet",
    ) -> None:
        super().__init__()
        shape = _check(name, in_shape, num_classes, width)
        require(depth >= 10 and (depth - 4) % 6 == 0,
                f"{name}: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, …), got {depth}.")
        require(k >= 1, f"{name}: widen factor k must be >= 1, got {k}.")
        blocks = (depth - 4) // 6
        c0 = _scale(16, width)
        self.stem = _conv3x3(shape[0], c0)
        cin = c0
        for i, base in enumerate((16 * k, 32 * k, 64 * k), start=1):
            cout, stride = _scale(base, width), 1 if i == 1 else 2
            layers = [_WideBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1) for b in range(blocks)]
            self.add_module(f"stage{i}", nn.Sequential(*layers))
            cin = cout
        self.pre_logits = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), *_pool_flat())
        self.head = nn.Linear(cin, num_classes)
        _init_weights(self)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(self.pre_logits(x))


def wrn_16_2(in_shape: Sequence[int], num_classes: int, width: float = 1) -> WideResNet:
    """WRN-16-2 (depth 16, widen factor 2); ``width`` multiplies every channel count."""
    return WideResNet(in_shape, num_classes, depth=16, k=2, width=width, name="wrn_16_2")


def wrn_40_1(in_shape: Sequence[int], num_classes: int, width: float = 1) -> WideResNet:
    """WRN-40-1 (depth 40, widen factor 1); ``width`` multiplies every channel count."""
    return WideResNet(in_shape, num_classes, depth=40, k=1, width=width, name="wrn_40_1")


def wrn_40_2(in_shape: Sequence[int], num_classes: int, width: float = 1) -> WideResNet:
    """WRN-40-2 (depth 40, widen factor 2); ``width`` multiplies every channel count."""
    return WideResNet(in_shape, num_classes, depth=40, k=2, width=width, name="wrn_40_2")


# --- VGG with BN, CIFAR variant -------------------------------------------------------


class CifarVGG(nn.Module):
    """Five conv-BN-ReLU blocks with ``convs_per_stage`` convs each (64, 128, 256, 512, 512 channels).

    Each of the first four blocks ends in 2×2 max-pooling while its map is larger than
    4×4 (at 32×32: after blocks 1–3, as in CRD, which pools after block 4 only for 64×64
    inputs); block 5 is followed by global average pooling. Convs keep their bias, as
    CRD's do, so the parameter count matches the published one.
    Stages: ``stage1``–``stage5`` (B, C_k, H_k, W_k), after ReLU and any pooling;
    ``pre_logits`` (B, 512).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        convs_per_stage: Sequence[int],
        width: float = 1,
        name: str = "CifarVGG",
    ) -> None:
        super().__init__()
        shape = _check(name, in_shape, num_classes, width)
        require(len(convs_per_stage) == 5 and min(convs_per_stage) >= 1,
                f"{name}: convs_per_stage must give five counts >= 1, got {list(convs_per_stage)}.")
        cin, size = shape[0], min(shape[1:])
        for i, (base, convs) in enumerate(zip((64, 128, 256, 512, 512), convs_per_stage), start=1):
            cout = _scale(base, width)
            layers: list[nn.Module] = []
            for _ in range(convs):
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
                cin = cout
            if i < 5 and size > 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            self.add_module(f"stage{i}", nn.Sequential(*layers))
        self.pre_logits = _pool_flat()
        self.head = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, 6):
            x = getattr(self, f"stage{i}")(x)
        return self.head(self.pre_logits(x))


def vgg8(in_shape: Sequence[int], num_classes: int, width: float = 1) -> CifarVGG:
    """VGG8 with BN (CRD's CIFAR variant): one conv per block; ``width`` multiplies every channel count."""
    return CifarVGG(in_shape, num_classes, convs_per_stage=(1, 1, 1, 1, 1), width=width, name="vgg8")


def vgg13(in_shape: Sequence[int], num_classes: int, width: float = 1) -> CifarVGG:
    """VGG13 with BN (CRD's CIFAR variant): two convs per block; ``width`` multiplies every channel count."""
    return CifarVGG(in_shape, num_classes, convs_per_stage=(2, 2, 2, 2, 2), width=width, name="vgg13")



# Validation reads this marker: a CIFAR net's width is a channel multiplier (0.5 halves it),
# while the small zoo models (MLP, CNN1D, CNN2D) take a whole number of units or channels.
for _factory in (resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110, resnet8x4, resnet32x4,
                 wrn_16_2, wrn_40_1, wrn_40_2, vgg8, vgg13):
    _factory.fractional_width = True  # type: ignore[attr-defined]
