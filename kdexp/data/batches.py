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
    ``seed + e``. Under DDP (Lightning's sampler injection is switched off for these)
    each rank of a shuffled (training) split takes every ``world_size``-th batch of the
    same permutation, and every rank the same number of batches, or DDP would hang on
    the last one: a global step trains on ``world_size`` consecutive batches, and an
    epoch leaves out the last ``len % world_size`` of them. An unshuffled (evaluation)
    split is divided by samples instead: rank ``r`` takes the ``r``-th of ``world_size``
    contiguous shares, so every sample is evaluated exactly once (the metrics add the
    ranks' sums up, see :mod:`kdexp.run.metrics`).

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

    def _sample_share(self) -> tuple[int, int] | None:
        """This rank's contiguous ``[start, stop)`` of an unshuffled split under DDP; None otherwise."""
        if self.shuffle or self.world_size <= 1:
            return None
        n = len(self.x)
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def __len__(self) -> int:
        share = self._sample_share()
        if share is not None:  # may differ by one batch between ranks: evaluation steps need no partner
            size = share[1] - share[0]
            return size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)
        return self._num_batches_total() // self.world_size if self.world_size > 1 else self._num_batches_total()

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.position() if self.position is not None else (self.epoch, 0)
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = (int(state.get("epoch", 0)), int(state.get("batches_done", 0)))

    def __iter__(self):
        n = len(self.x)
        epoch = self.position()[0] if self.position is not None else self.epoch
        share = self._sample_share()
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(*share) if share is not None else torch.arange(n)
        self.epoch = epoch + 1
        # Skip what was trained before a mid-epoch stop; a checkpoint taken at the end of
        # an epoch (all batches done) continues with the next epoch from its start.
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == epoch and self._resume_at[1] < len(self):
            skip = self._resume_at[1]
        self._resume_at = None
        rank, world = (0, 1) if share is not None else (self.rank, self.world_size)  # a share is batched whole
        for b in range(rank + skip * world, len(self) * world, world):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.x[index]
            if self.transform is not None:
                x = self.transform(x)
            yield x, self.y[index], index
