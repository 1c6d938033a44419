"""Byte-level causal language modelling on text every Python installation carries.

The corpus is the standard library's own source files (``sysconfig`` "stdlib", ``*.py``
outside tests), so nothing is downloaded. Files, not windows, are split into train /
validation / test (by a hash of their path: the same file is always in the same split),
so no held-out text was seen in training. Each split's bytes are cut into windows of
``context + 1`` bytes: inputs are the first ``context``, targets the next byte at every
position (a byte is a token: 256 classes, so bits per token are bits per byte).

Training text is the first ``max_train_bytes`` of the training files, in path order, cut into
consecutive windows. Validation and test windows (``max_eval_bytes`` worth each) are spread
evenly over *all* of their split's text (38 and 33 files, 0.59 and 0.47 MB on CPython 3.11),
so both are samples of the same kind of text. Their first files are not: the first 100 kB of
the test files are mostly generated codec tables (``encodings/*.py``), on which a teacher scores
28.3 % next-byte accuracy against 41.5 % on the first 100 kB of the validation files. Spread,
that teacher's recipe (GPT 128×4, 300 kB of training text, 3 epochs) scores 37.3 % on
validation and 37.5 % on test (3.68 and 3.61 bits per byte), and a bigram model fitted on the
training text is within 2 points of accuracy on both for eval budgets from 5 kB to 200 kB
(``tests/test_language_model.py`` holds the default 100 kB to 2 points and 0.1 bits per byte;
the first-file sets are 8 points apart).

The corpus differs between Python versions; the run's data fingerprint records which.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kdexp.core.errors import ConfigError, require
from kdexp.data.base import InMemoryDataModule, Split

SEPARATOR = b"\n\x00\n"  # between files: a byte sequence that never occurs inside source text


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``*.py`` files (tests and site-packages excluded), in a fixed order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not ({"test", "tests", "site-packages", "idle_test", "__pycache__"} & set(p.relative_to(root).parts))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_of(relative: str, val_percent: int, test_percent: int) -> str:
    """``train`` / ``val`` / ``test`` for a file, from a hash of its path (stable across machines)."""
    bucket = int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16) % 100
    if bucket < val_percent:
        return "val"
    return "test" if bucket < val_percent + test_percent else "train"


class StdlibTextDataModule(InMemoryDataModule):
    """Next-byte prediction on the standard library's source (see the module docstring)."""

    name = "stdlib_text"
    supported_tasks = ("causal_lm",)

    def __init__(self, num_classes: int = 256, input_shape: Sequence[int] = (128,), max_train_bytes: int = 2_000_000,
                 max_eval_bytes: int = 100_000, val_percent: int = 5, test_percent: int = 5,
                 root: str | None = None, **kwargs) -> None:
        kwargs.pop("cache_dir", None)
        super().__init__(num_classes=num_classes, input_shape=input_shape, **kwargs)
        require(num_classes == 256, f"stdlib_text is byte-level: data.num_classes must be 256, got {num_classes}.")
        require(len(self.input_shape) == 1 and self.input_shape[0] >= 2,
                f"data.input_shape is [context length] for text, e.g. [128]; got {list(self.input_shape)}.")
        require(max_train_bytes > 0 and max_eval_bytes > 0, "data.max_train_bytes and max_eval_bytes must be > 0.")
        self.max_train_bytes, self.max_eval_bytes = int(max_train_bytes), int(max_eval_bytes)
        self.val_percent, self.test_percent = int(val_percent), int(test_percent)
        self.root = root

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        root = Path(self.root or sysconfig.get_paths()["stdlib"])
        files = stdlib_files(root)
        if not files:
            raise ConfigError(f"no Python source files under {root} to build the text corpus from.")
        chunks: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
        train_length = -len(SEPARATOR)  # of the training text so far
        for path in files:  # in a fixed order, so stopping once train is full reads the same text
            split = split_of(path.relative_to(root).as_posix(), self.val_percent, self.test_percent)
            if split == "train" and train_length >= self.max_train_bytes:
                continue
            chunks[split].append(path.read_bytes())  # held-out splits: every file, windows are spread over them
            if split == "train":
                train_length += len(SEPARATOR) + len(chunks["train"][-1])
        texts = {name: SEPARATOR.join(parts) for name, parts in chunks.items()}
        self.splits = {"train": self._windows(texts["train"][:self.max_train_bytes], "train"),
                       "val": self._spread_windows(texts["val"], "val"),
                       "test": self._spread_windows(texts["test"], "test")}
        self.labelled_train_size = len(self.splits["train"].x)

    def _windows(self, text: bytes, name: str) -> Split:
        """Consecutive windows: each one's last target byte is the next one's first input byte."""
        context = self.input_shape[0]
        data = np.frombuffer(text, dtype=np.uint8)
        count = self._count(len(data) - 1, name, len(data))
        tokens = torch.from_numpy(data[: count * context + 1].astype(np.int64))
        x = tokens[:-1].view(count, context)  # (N, L) inputs
        y = tokens[1:].view(count, context)   # (N, L) next byte at every position
        return Split(x.contiguous(), y.contiguous())

    def _spread_windows(self, text: bytes, name: str) -> Split:
        """``max_eval_bytes`` worth of windows at evenly spaced offsets over the whole text, so every
        file of the split contributes in proportion to its size (all of the text when it holds
        fewer bytes). Starts are at least ``context`` apart: no position is predicted twice."""
        if self.max_eval_bytes >= len(text):
            return self._windows(text, name)
        context = self.input_shape[0]
        data = np.frombuffer(text, dtype=np.uint8)
        count = self._count(self.max_eval_bytes - 1, name, len(data))
        last = len(data) - (context + 1)  # the last possible start
        starts = np.arange(count, dtype=np.int64) * last // max(count - 1, 1)  # (N,) spacing >= context
        windows = torch.from_numpy(data[starts[:, None] + np.arange(context + 1)].astype(np.int64))  # (N, L + 1)
        return Split(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())

    def _count(self, usable: int, name: str, size: int) -> int:
        """How many windows ``usable`` bytes give (one byte of each window is only a target)."""
        context = self.input_shape[0]
        if usable // context < 1:
            raise ConfigError(f"the {name} split holds {size} bytes, fewer than one window of {context + 1}; "
                              "raise data.max_*_bytes or lower data.input_shape.")
        return usable // context
