"""Hand kdexp's data modules to a Lightning Trainer.

kdexp's data modules (:class:`~kdexp.data.base.InMemoryDataModule`) are plain classes with the
hooks Lightning calls, so that code that only needs the data (packed sweeps' workers, the
teacher-output cache) does not import Lightning. A Trainer accepts only ``LightningDataModule``
instances: :func:`for_trainer` wraps a data module in one that forwards those hooks.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


class LightningData(pl.LightningDataModule):
    """A ``LightningDataModule`` that serves ``data``'s splits; ``data.trainer`` follows the Trainer
    it is attached to (the data reads ranks and the resume position from it). Other attributes
    (``task``, ``splits``, ``num_classes`` ...) are read from ``data``."""

    def __init__(self, data: Any) -> None:
        self.__dict__["data"] = data  # before Lightning's __init__ sets self.trainer
        super().__init__()

    @property
    def trainer(self) -> Any:
        return self.data.trainer

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        self.data._trainer = trainer

    def setup(self, stage: str | None = None) -> None:
        self.data.setup(stage)

    def train_dataloader(self) -> Any:
        return self.data.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.data.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.data.test_dataloader()

    def __getattr__(self, name: str) -> Any:
        if name == "data":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.data, name)


def for_trainer(data: Any) -> pl.LightningDataModule:
    """``data`` as a Trainer's ``datamodule``: a ``LightningDataModule`` (a user's own) as it is,
    a kdexp data module wrapped in :class:`LightningData`."""
    if isinstance(data, pl.LightningDataModule):
        return data
    return LightningData(data)
