"""torchvision image sets (MNIST, Fashion-MNIST, CIFAR-10/100), held in memory as uint8.

Needs the ``vision`` extra (``pip install 'kdexp[vision]'``). Files are read from
``data_dir``; they are fetched only when ``data.download=true``. Batches are
converted to normalised floats one batch at a time, so CIFAR stays 150 MB in RAM.
With ``augment=true`` training batches get the standard CIFAR augmentation
(:func:`random_crop_flip`) on the raw pixels first, as a whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdexp.core.errors import ConfigError, DataUnavailableError, require
from kdexp.data.base import Augmentation, InMemoryDataModule, RawData

# torchvision class name, the files that must exist under data_dir, per-channel mean / std.
_DATASETS: dict[str, tuple[str, list[str], tuple[float, ...], tuple[float, ...]]] = {
    "mnist": (
        "MNIST",
        [f"MNIST/raw/{f}" for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
        (0.1307,), (0.3081,),
    ),
    "fashion_mnist": (
        "FashionMNIST",
        [f"FashionMNIST/raw/{f}" for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
        (0.2860,), (0.3530,),
    ),
    "cifar10": (
        "CIFAR10",
        [f"cifar-10-batches-py/{f}" for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]],
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": (
        "CIFAR100",
        ["cifar-100-python/train", "cifar-100-python/test"],
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
    ),
}


def missing_files(dataset: str, data_dir: str | Path) -> list[Path]:
    """The files of ``dataset`` that are not under ``data_dir``."""
    return [Path(data_dir) / f for f in _DATASETS[dataset][1] if not (Path(data_dir) / f).exists()]


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random ``H×W`` crop of the zero-padded images and a horizontal flip with probability ½, per sample.

    The standard CIFAR augmentation of ResNet training (He et al. 2016, sec. 4.2) that
    CRD and DKD use: torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``,
    here for a whole (B, C, H, W) batch with one gather. Padding is black in pixel space
    (0), as there, so it runs on the raw uint8 batch before normalisation. All
    randomness comes from ``generator``: offsets first, then flips.
    """
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    top = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = top + torch.arange(h)  # (B, H)
    cols = left + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # reading columns backwards flips the crop
    batch = torch.arange(b)[:, None, None, None]
    channel = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _as_nchw(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:  # (N, H, W) grey
        return images[:, None]
    return images.transpose(0, 3, 1, 2)  # (N, H, W, C) → (N, C, H, W)


class TorchvisionDataModule(InMemoryDataModule):
    """One of the torchvision classification sets named by ``dataset``.

    ``augment``: random crop (4-pixel padding) and horizontal flip of the training
    batches only, seeded from ``shuffle_seed``, the epoch and the batch (see
    :class:`~kdexp.data.base.AugmentedBatches`). On for CIFAR in its configs; off by
    default, because a flipped digit is not always the same digit.
    """

    def __init__(
        self,
        dataset: str,
        num_classes: int,
        input_shape: Sequence[int],
        data_dir: str = "data",
        download: bool = False,
        augment: bool = False,
        **kwargs,
    ) -> None:
        if dataset not in _DATASETS:
            raise ConfigError(f"unknown torchvision data set '{dataset}'; choose one of {sorted(_DATASETS)}.")
        require(isinstance(augment, bool), f"data.augment must be true or false, got {augment!r}.")
        super().__init__(num_classes=num_classes, input_shape=input_shape, **kwargs)
        self.name = dataset
        self.data_dir = Path(data_dir)
        self.download = download
        self.augment = augment
        _, _, mean, std = _DATASETS[dataset]
        self._mean = torch.tensor(mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std).view(1, -1, 1, 1)

    def _torchvision_class(self):
        try:
            import torchvision.datasets
        except Exception as err:  # ImportError, or a torchvision built for another torch
            raise DataUnavailableError(
                f"data={self.name} needs torchvision, which is not usable here ({type(err).__name__}: {err}). "
                "Install the vision extra: pip install 'kdexp[vision]' "
                "(or use the embedded data sets data=mnist1d / data=digits)."
            ) from err
        return getattr(torchvision.datasets, _DATASETS[self.name][0])

    def load_raw(self) -> RawData:
        missing = missing_files(self.name, self.data_dir)
        if missing and not self.download:
            raise DataUnavailableError(
                f"data={self.name}: {len(missing)} file(s) missing under {self.data_dir.resolve()}, "
                f"e.g. {missing[0]}. Set data.download=true to fetch them (needs network), "
                "or point data.data_dir at a folder that holds them."
            )
        dataset_class = self._torchvision_class()
        try:
            train = dataset_class(str(self.data_dir), train=True, download=self.download)
            test = dataset_class(str(self.data_dir), train=False, download=self.download)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise DataUnavailableError(
                f"data={self.name}: could not fetch or read the files under {self.data_dir.resolve()} "
                f"({type(err).__name__}: {err}). Are you offline? Copy the files there and set data.download=false."
            ) from err
        return RawData(
            x_train=_as_nchw(np.asarray(train.data)),
            y_train=np.asarray(train.targets, dtype=np.int64),
            x_test=_as_nchw(np.asarray(test.data)),
            y_test=np.asarray(test.targets, dtype=np.int64),
        )

    def batch_transform(self, x: Tensor) -> Tensor:
        return (x.float() / 255.0 - self._mean) / self._std

    def train_augmentation(self) -> Augmentation | None:
        return random_crop_flip if self.augment else None
