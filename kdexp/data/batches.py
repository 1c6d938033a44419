"""Serve in-memory tensors as whole batches gathered by index.

For data sets that fit in memory, a ``DataLoader`` that collates sample by sample
costs more per step than a small student's forward pass. ``IndexBatches`` instead
gathers a batch with one indexing operation. Each batch is ``(x, y, index)``: the
index of every sample in its split lets a distillation step look the teacher's
logits up instead of recomputing them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


class IndexBatches:
    """An iterable of ``(x, y, index)`` batches over in-memory tensors.

    Shuffling is reproducible: epoch ``e`` uses the permutation drawn from
    ``seed + e``. Under DDP each rank takes every ``world_size``-th batch of the
    same permutation (Lightning's sampler injection is switched off for these).

    Inside a Trainer, ``position`` reports ``(epoch, batches already trained in it)``
    from the trainer's own progress counters. The epoch then picks the permutation
    (so a run resumed at epoch 10 draws epoch 10's order), and the pair is this
    loader's checkpoint state (``state_dict``): a run stopped mid-epoch resumes at
    the next untrained batch of the same permutation. The trainer's counter is used,
    not a count of batches handed out, because Lightning fetches one batch ahead.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        transform=None,
        position: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.transform = transform
        self.position = position
        self.epoch = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches trained in it) before a resume

    def _num_batches_total(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        # Every rank gets the same number of batches, or DDP would hang on the last one.
        return self._num_batches_total() // self.world_size if self.world_size > 1 else self._num_batches_total()

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.position() if self.position is not None else (self.epoch, 0)
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = (int(state.get("epoch", 0)), int(state.get("batches_done", 0)))

    def __iter__(self):
        n = len(self.x)
        epoch = self.position()[0] if self.position is not None else self.epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        self.epoch = epoch + 1
        # Skip what was trained before a mid-epoch stop; a checkpoint taken at the end of
        # an epoch (all batches done) continues with the next epoch from its start.
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == epoch and self._resume_at[1] < len(self):
            skip = self._resume_at[1]
        self._resume_at = None
        for b in range(self.rank + skip * self.world_size, len(self) * self.world_size, self.world_size):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.x[index]
            if self.transform is not None:
                x = self.transform(x)
            yield x, self.y[index], index
