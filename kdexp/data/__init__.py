"""Data modules: embedded (no download) and torchvision sets; :mod:`kdexp.data.lightning` hands them to a Trainer."""

from kdexp.data.base import InMemoryDataModule, RawData
from kdexp.data.batches import IndexBatches
from kdexp.data.embedded import DigitsDataModule, MNIST1DDataModule, MNIST5kDataModule
from kdexp.data.vision import TorchvisionDataModule

__all__ = [
    "DigitsDataModule",
    "InMemoryDataModule",
    "IndexBatches",
    "MNIST1DDataModule",
    "MNIST5kDataModule",
    "RawData",
    "TorchvisionDataModule",
]
