"""In-memory data modules with a validation split carved from training data.

They are plain classes with Lightning's data-module hooks (``setup``, ``*_dataloader``), not
``LightningDataModule`` subclasses, so that a packed sweep's workers build them without
importing Lightning (4 s); a Trainer gets them through :func:`kdexp.data.lightning.for_trainer`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdexp.core.errors import ConfigError, require
from kdexp.core.tasks import UNLABELLED, choose_task
from kdexp.data.batches import IndexBatches


@dataclass
class Split:
    x: Tensor
    y: Tensor  # int64 class labels


@dataclass
class RawData:
    """Train and test arrays as the data set ships them (no validation split yet)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


log = logging.getLogger(__name__)

# Where unlabelled transfer inputs come from (data.transfer_set): none, or a generator's new samples.
TRANSFER_SETS = (None, "generated")


def available_memory_bytes() -> int | None:
    """Memory this process can still take: the kernel's MemAvailable, capped by a cgroup limit (a
    container's or a SLURM job's) when one is set; elsewhere (macOS) the machine's physical memory, an
    upper bound; None where none of these can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2, v1
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 2**60:  # v1 writes a huge number for "no limit"
                found.append(int(cap) - int(Path(usage).read_text()))
                break
        except (OSError, ValueError):
            continue
    if not found:
        try:
            found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            pass
    return min(found) if found else None


class GenerationProgress:
    """Log lines while something slow is generated: what and how much at the start, then (for ``total``
    of at least ``report_from``) every tenth with the time left, and the time taken at the end.

    Log lines, not a terminal bar: they reach ``train.log``, a SLURM job's output file and a pack
    worker's console alike.
    """

    def __init__(self, total: int, what: str, report_from: int = 20_000) -> None:
        self.total, self.what, self.done = int(total), what, 0
        self._next = max(self.total // 10, 1) if self.total >= report_from else self.total + 1
        self._start = time.perf_counter()
        log.info("Generating %s %s ...", f"{self.total:,}", what)

    def step(self, count: int = 1) -> None:
        self.done += count
        if self.done >= self._next and self.done < self.total:
            elapsed = time.perf_counter() - self._start
            left = elapsed * (self.total - self.done) / self.done
            log.info("  %s of %s %s (%d %%), about %s left", f"{self.done:,}", f"{self.total:,}", self.what,
                     100 * self.done // self.total, _duration(left))
            self._next += max(self.total // 10, 1)

    def finish(self) -> None:
        log.info("Generated %s %s in %s", f"{self.done:,}", self.what, _duration(time.perf_counter() - self._start))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def gigabytes(size: float) -> str:
    """``size`` bytes in MB, GB or TB."""
    if size >= 1e12:
        return f"{size / 1e12:.1f} TB"
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.0f} MB"


# An augmentation takes a raw batch (B, ...) and a generator that holds all of its randomness.
Augmentation = Callable[[Tensor, torch.Generator], Tensor]


class AugmentedBatches(IndexBatches):
    """:class:`IndexBatches` that augment each raw batch before ``transform``.

    Each batch's randomness comes from its own generator, seeded from ``(seed, epoch,
    first sample index)``: the first index names the batch within the epoch's
    permutation, so a batch is augmented the same way in a straight run, after a
    mid-epoch resume (which skips batches) and on whichever DDP rank draws it.
    """

    def __init__(self, *args, augment: Augmentation, transform: Callable[[Tensor], Tensor] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, transform=None, **kwargs)  # the parent must hand out raw batches
        self.augment = augment
        self.after_augment = transform

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for x, y, index in super().__iter__():
            # The parent has set self.epoch to the epoch being served + 1 before its first batch.
            entropy = [self.seed % 2**63, self.epoch - 1, int(index[0])]
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
            x = self.augment(x, generator)
            yield (self.after_augment(x) if self.after_augment is not None else x), y, index


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, holdout): exactly ``round(fraction * N)`` held out, stratified by class, drawn with ``seed``.

    Each class gives ``floor(fraction * n_c)`` examples; the few left over to reach
    the exact total go to the classes with the largest remainders. Rounding every
    class separately instead held out 399 of MNIST-1D's 4,000, not the 400 the docs say.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = fraction * counts
    n_out = np.floor(quotas).astype(int)
    missing = int(round(fraction * len(labels))) - int(n_out.sum())
    # Largest remainder first; a stable sort breaks ties by class order, so the split is deterministic.
    for c in np.argsort(-(quotas - n_out), kind="stable")[:max(missing, 0)]:
        n_out[c] += 1
    keep, holdout = [], []
    for cls, n in zip(classes, n_out):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        holdout.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(holdout))


class InMemoryDataModule:
    """Base class: subclasses implement :meth:`load_raw`; splitting and batching live here.

    ``val_fraction`` of the training set (stratified) becomes the validation set,
    drawn with ``split_seed``. Keep ``split_seed`` fixed across a sweep so every
    run validates on the same examples; the test set is never used for selection.
    """

    name = "data"
    _trainer = None  # the Trainer using this data, while one does: set by kdexp.data.lightning.LightningData
    supported_tasks: tuple[str, ...] = ("classification",)  # what its data can be framed as; the first is the default

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        batch_size: int = 100,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        transfer_set: str | None = None,
        transfer_size: int = 0,
        transfer_seed: int = 1,
        task: str | None = None,
        input_dtype: str = "float32",
    ) -> None:
        require(batch_size > 0, f"data.batch_size must be positive, got {batch_size}.")
        require(0.0 < val_fraction < 1.0, f"data.val_fraction must lie in (0, 1), got {val_fraction}.")
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        require(transfer_set in TRANSFER_SETS, f"data.transfer_set={transfer_set!r} is not an option: it must be "
                f"one of {', '.join(str(t).lower() for t in TRANSFER_SETS)}.")
        require(transfer_set is None or (isinstance(transfer_size, int) and transfer_size > 0),
                f"data.transfer_size must be a positive number of inputs with data.transfer_set={transfer_set}, "
                f"got {transfer_size!r} (e.g. data.transfer_size=20000).")
        self.transfer_set = transfer_set
        self.transfer_size = int(transfer_size or 0)
        self.transfer_seed = transfer_seed
        self.task = choose_task(task, self.supported_tasks, self.name).name  # see kdexp.core.tasks
        self.input_dtype = input_dtype
        self.labelled_train_size = 0  # training examples with a label; the rest of "train" is the transfer set
        self.splits: dict[str, Split] = {}
        self._fingerprint: str | None = None

    @property
    def trainer(self):  # noqa: ANN201 - a pytorch_lightning.Trainer, not imported here
        """The Lightning Trainer using this data, while one does (the data reads ranks and the resume position)."""
        return self._trainer

    @trainer.setter
    def trainer(self, trainer) -> None:  # noqa: ANN001
        # Lightning sets it when it is handed this module directly, then fails on it with "Expected a parent".
        raise ConfigError(
            f"{type(self).__name__} is not a LightningDataModule (kdexp's data modules are plain classes, so that "
            "packed sweeps need not import Lightning): hand it to a Trainer wrapped, as "
            "`trainer.fit(module, datamodule=kdexp.data.lightning.for_trainer(data))`.")

    # -- to implement -------------------------------------------------------
    def load_raw(self) -> RawData:
        raise NotImplementedError

    def batch_transform(self, x: Tensor) -> Tensor:
        """Applied to each gathered batch (e.g. uint8 → normalised float)."""
        return x

    @classmethod
    def transfer_set_bytes(cls, size: int, input_shape: Sequence[int]) -> int | None:
        """The peak memory of generating ``size`` transfer inputs and adding them to the training split;
        None for a data set that cannot generate them."""
        return None

    def transfer_inputs(self, size: int, seed: int) -> np.ndarray:
        """``size`` new unlabelled inputs for ``data.transfer_set=generated``, drawn with ``seed``.

        Only data sets with a generator can make them (MNIST-1D); the default refuses.
        """
        raise ConfigError(f"data={self.name} cannot generate transfer inputs (data.transfer_set=generated); "
                          "use data=mnist1d, or data.transfer_set=null.")

    def train_augmentation(self) -> Augmentation | None:
        """Random augmentation of raw training batches (before :meth:`batch_transform`); None: none.

        Only the training split is augmented; validation, test and :meth:`eval_batches` never are.
        """
        return None

    # -- data-module hooks (as LightningDataModule names them) --------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self.load_raw()
        keep, val = stratified_holdout(raw.y_train, self.val_fraction, self.split_seed)
        self.splits = {
            "train": self._to_split(raw.x_train[keep], raw.y_train[keep]),
            "val": self._to_split(raw.x_train[val], raw.y_train[val]),
            "test": self._to_split(raw.x_test, raw.y_test),
        }
        self.labelled_train_size = len(keep)
        self._check_shapes()
        if self.transfer_set == "generated":
            self._add_transfer_set(self.transfer_inputs(self.transfer_size, self.transfer_seed))

    def _add_transfer_set(self, inputs: np.ndarray) -> None:
        """Append unlabelled inputs (target ``UNLABELLED``) to the training split, after checking
        that none of them is a validation or test input (that would leak the held-out sets)."""

        transfer = self._to_split(inputs, np.full(len(inputs), UNLABELLED, dtype=np.int64))
        held_out = {row.tobytes() for name in ("val", "test") for row in self.splits[name].x.numpy()}
        overlap = sum(row.tobytes() in held_out for row in transfer.x.numpy())
        if overlap:
            raise ConfigError(f"{overlap} of the {len(inputs)} transfer inputs equal validation or test inputs: they "
                              "would leak the held-out sets into training. Choose another data.transfer_seed.")
        train = self.splits["train"]
        self.splits["train"] = Split(torch.cat([train.x, transfer.x]), torch.cat([train.y, transfer.y]))

    def _to_split(self, x: np.ndarray, y: np.ndarray) -> Split:
        xt = torch.from_numpy(np.ascontiguousarray(x))
        if xt.is_floating_point():
            xt = xt.float()
        return Split(xt, torch.from_numpy(np.asarray(y)).long())

    def _check_shapes(self) -> None:
        train = self.splits["train"]
        shape = tuple(train.x.shape[1:])
        if shape != self.input_shape:
            raise ConfigError(
                f"data set '{self.name}' has inputs of shape {list(shape)} but data.input_shape is "
                f"{list(self.input_shape)}; fix data.input_shape in the data config."
            )
        found = int(torch.cat([s.y for s in self.splits.values()]).max()) + 1  # before any unlabelled rows
        if found > self.num_classes:
            raise ConfigError(
                f"data set '{self.name}' has {found} classes but data.num_classes is {self.num_classes}."
            )

    def _batches(self, split: str, train: bool) -> IndexBatches:
        self.setup()
        rank, world, position = 0, 1, None
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            rank, world = trainer.global_rank, trainer.world_size
            if train:
                def position() -> tuple[int, int]:
                    return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.completed
        s = self.splits[split]
        augment = self.train_augmentation() if train else None
        batches = IndexBatches if augment is None else partial(AugmentedBatches, augment=augment)
        return batches(
            s.x, s.y,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.shuffle_seed,
            rank=rank,
            world_size=world,
            transform=self.batch_transform,
            position=position,
        )

    def train_dataloader(self) -> IndexBatches:
        return self._batches("train", train=True)

    def val_dataloader(self) -> IndexBatches:
        return self._batches("val", train=False)

    def test_dataloader(self) -> IndexBatches:
        return self._batches("test", train=False)

    def eval_batches(self, split: str) -> IndexBatches:
        """Unshuffled, single-process batches of ``split`` (for evaluation outside a Trainer)."""
        self.setup()
        s = self.splits[split]
        return IndexBatches(s.x, s.y, self.eval_batch_size, transform=self.batch_transform)

    def fingerprint(self) -> str:
        """A short hash of every split's inputs and labels: equal hash, equal data.

        Computed once: the splits never change after setup, and a run asks for it several
        times (its record, the resume guard, the teacher-outputs identity).
        """
        if self._fingerprint is not None:
            return self._fingerprint
        self.setup()
        digest = hashlib.sha256()
        for name in ("train", "val", "test"):
            s = self.splits[name]
            digest.update(name.encode())
            digest.update(s.x.contiguous().numpy().tobytes())
            digest.update(s.y.numpy().tobytes())
        self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint
