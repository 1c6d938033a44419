"""Serve in-memory tensors as whole batches gathered by index.

For data sets that fit in memory, a ``DataLoader`` that collates sample by sample
costs more per step than a small student's forward pass. ``IndexBatches`` instead
gathers a batch with one indexing operation. Each batch is ``(x, y, index)``: the
index of every sample in its split lets a distillation step look the teacher's
logits up instead of recomputing them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class IndexBatches:
    """An iterable of ``(x, y, index)`` batches over in-memory tensors.

    Shuffling is reproducible: epoch ``e`` uses the permutation drawn from
    ``seed + e``. Under DDP each rank takes every ``world_size``-th batch of the
    same permutation (Lightning's sampler injection is switched off for these).
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
        self.epoch = 0

    def _num_batches_total(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        # Every rank gets the same number of batches, or DDP would hang on the last one.
        return self._num_batches_total() // self.world_size if self.world_size > 1 else self._num_batches_total()

    def __iter__(self):
        n = len(self.x)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        self.epoch += 1
        for b in range(self.rank, len(self) * self.world_size, self.world_size):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.x[index]
            if self.transform is not None:
                x = self.transform(x)
            yield x, self.y[index], index
