"""Which standard-library package does this snippet of source come from? (no download)

A byte-level sequence-classification set: windows of ``L`` bytes of the standard library's
own ``*.py`` files (tests excluded, as in :func:`kdexp.data.text.stdlib_files`), each
labelled with the top-level package it was cut from. Only full windows are used, so no
input is padded; a file shorter than ``L`` bytes gives none.

Files, not windows, are split into train / validation / test by a hash of their path
(:func:`kdexp.data.text.split_of`), so held-out text comes from files never seen in
training. Training windows start every ``train_stride`` bytes (overlapping when the stride
is below ``L``: more windows for the small packages); held-out windows do not overlap. Each
class keeps at most ``max_train_windows_per_class`` training and
``max_eval_windows_per_class`` validation / test windows, drawn with ``split_seed``, so the
classes are roughly balanced and setup takes well under a second.

The default packages exist in every CPython 3.10–3.13 and each has files in all three
splits at the default 15 % / 15 %. The corpus differs between Python versions; the run's
data fingerprint records which.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kdexp.core.errors import ConfigError, require
from kdexp.data.base import InMemoryDataModule, Split
from kdexp.data.text import split_of, stdlib_files
from kdexp.data.tokenizer import ByteTokenizer

PACKAGES = ("asyncio", "ctypes", "email", "encodings", "importlib", "multiprocessing", "wsgiref", "xml")
SPLITS = ("train", "val", "test")


class StdlibTopicsDataModule(InMemoryDataModule):
    """Byte windows of standard-library source → the package they come from (see the module docstring)."""

    name = "stdlib_topics"
    supported_tasks = ("sequence_classification",)

    def __init__(self, num_classes: int = len(PACKAGES), input_shape: Sequence[int] = (128,),
                 packages: Sequence[str] = PACKAGES, max_train_windows_per_class: int = 800,
                 max_eval_windows_per_class: int = 200, train_stride: int = 64, val_percent: int = 15,
                 test_percent: int = 15, vocab_size: int = ByteTokenizer.vocab_size,
                 pad_id: int = ByteTokenizer.pad_id, root: str | None = None,
                 label_names: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.pop("cache_dir", None)
        kwargs.setdefault("input_dtype", "int64")
        super().__init__(num_classes=num_classes, input_shape=input_shape, **kwargs)
        tokenizer = ByteTokenizer()
        self.packages = tuple(str(p) for p in packages)
        require(len(self.input_shape) == 1 and self.input_shape[0] >= 1,
                f"data.input_shape is [window length in bytes] for text, e.g. [128]; got {list(self.input_shape)}.")
        require(self.input_dtype == "int64", f"stdlib_topics gives token ids: data.input_dtype must be int64, "
                f"got {self.input_dtype}.")
        require(label_names is None or [str(n) for n in label_names] == list(self.packages),
                f"data.label_names {list(label_names or [])} must be the packages {list(self.packages)}: "
                "choose the classes with data.packages (label_names follows it).")
        require(len(set(self.packages)) == len(self.packages) >= 2,
                f"data.packages must name at least two different packages, got {list(self.packages)}.")
        require(self.num_classes == len(self.packages),
                f"data.packages lists {len(self.packages)} packages (one class each) but data.num_classes is "
                f"{self.num_classes}: set data.num_classes={len(self.packages)}.")
        require(vocab_size == tokenizer.vocab_size, f"stdlib_topics is byte-level: set data.vocab_size="
                f"{tokenizer.vocab_size} (256 bytes and the pad id), got {vocab_size}.")
        require(pad_id == tokenizer.pad_id, f"stdlib_topics pads with id {tokenizer.pad_id}: set data.pad_id="
                f"{tokenizer.pad_id}, got {pad_id}.")
        require(max_train_windows_per_class > 0 and max_eval_windows_per_class > 0,
                "data.max_train_windows_per_class and data.max_eval_windows_per_class must be > 0.")
        require(train_stride > 0, f"data.train_stride must be > 0, got {train_stride}.")
        require(val_percent > 0 and test_percent > 0 and val_percent + test_percent < 100,
                f"data.val_percent and data.test_percent must be > 0 with a sum below 100, got {val_percent} "
                f"and {test_percent}.")
        self.vocab_size, self.pad_id = tokenizer.vocab_size, tokenizer.pad_id
        self.tokenizer_fingerprint = tokenizer.fingerprint()
        self.label_names = list(self.packages)
        self.max_windows = {"train": int(max_train_windows_per_class), "val": int(max_eval_windows_per_class),
                            "test": int(max_eval_windows_per_class)}
        self.train_stride = int(train_stride)
        self.val_percent, self.test_percent = int(val_percent), int(test_percent)
        self.root = root
        self.files: dict[str, list[str]] = {}  # split → the files (relative to the stdlib) its windows come from
        self.class_sizes: dict[str, list[int]] = {}  # split → windows per class

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        root = Path(self.root or sysconfig.get_paths()["stdlib"])
        by_split: dict[str, dict[str, list[Path]]] = {s: {p: [] for p in self.packages} for s in SPLITS}
        for package in self.packages:
            if not (root / package).is_dir():
                raise ConfigError(f"stdlib_topics: no package '{package}' under {root}; choose data.packages "
                                  "among the standard library's packages (folders), e.g. asyncio, email, xml.")
            for path in stdlib_files(root / package):  # only the packages' own folders: fast
                split = split_of(path.relative_to(root).as_posix(), self.val_percent, self.test_percent)
                by_split[split][package].append(path)
        rng = np.random.default_rng(self.split_seed)
        self.splits = {split: self._windows(root, split, by_split[split], rng) for split in SPLITS}
        self.labelled_train_size = len(self.splits["train"].x)
        self._check_shapes()

    def _windows(self, root: Path, split: str, files: dict[str, list[Path]], rng: np.random.Generator) -> Split:
        """The split's windows, at most ``max_windows[split]`` per package, drawn with ``rng``."""
        length = self.input_shape[0]
        stride = self.train_stride if split == "train" else length
        xs, ys, used, sizes = [], [], set(), []
        for label, package in enumerate(self.packages):
            texts = [np.frombuffer(path.read_bytes(), dtype=np.uint8) for path in files[package]]
            starts = [(i, s) for i, text in enumerate(texts) for s in range(0, len(text) - length + 1, stride)]
            if not starts:
                raise ConfigError(
                    f"stdlib_topics: package '{package}' has no {split} file of at least {length} bytes under "
                    f"{root} (at data.val_percent={self.val_percent}, data.test_percent={self.test_percent}); "
                    "choose other data.packages or split percentages, or a shorter data.input_shape.")
            chosen = sorted(rng.permutation(len(starts))[: self.max_windows[split]])  # sorted: file order
            for j in chosen:
                i, start = starts[j]
                xs.append(texts[i][start:start + length])
                used.add(files[package][i].relative_to(root).as_posix())
            ys.extend([label] * len(chosen))
            sizes.append(len(chosen))
        self.files[split] = sorted(used)
        self.class_sizes[split] = sizes
        x = torch.from_numpy(np.stack(xs).astype(np.int64))
        return Split(x, torch.tensor(ys, dtype=torch.int64))
