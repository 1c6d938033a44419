"""Your own text: CSV / JSON-lines files (or a Hugging Face ``datasets`` set) as token ids.

Two framings (``task``):

- ``sequence_classification``: ``x`` = the tokenized ``text_field``, truncated to ``L`` and
  right-padded with the tokenizer's pad id, ``(N, L)``; ``y`` = the class id of
  ``label_field``, ``(N,)``. Labels may be ints or strings; class ids follow their sorted
  order (numeric when every label is an integer), or the order of ``labels`` when given.
- ``causal_lm``: per row, ``ids = encode(prompt) + encode(text)`` cut to ``L + 1`` tokens;
  ``x = ids[:-1]`` padded to ``L``, ``y = ids[1:]`` with padding and the prompt's own tokens
  set to ``UNLABELLED``: the prompt is read but only the completion is learned.

Sources: ``path`` (``.csv``, ``.jsonl`` / ``.json-lines`` / ``.ndjson``) with optional
``val_path`` / ``test_path``; a split without a file of its own is carved from ``path``'s
rows (first ``test_fraction`` of them as test, then ``val_fraction`` of the rest as
validation; stratified by class, drawn with ``split_seed``). Or ``hub``: a ``datasets`` name
(``pip install datasets``, network once), whose splits ``hub_splits`` maps onto ours.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdexp.core.config import to_plain
from kdexp.core.errors import ConfigError, require
from kdexp.core.tasks import UNLABELLED
from kdexp.data.base import InMemoryDataModule, Split, stratified_holdout
from kdexp.data.tokenizer import load_tokenizer

SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json-lines": "jsonl", ".ndjson": "jsonl"}
SPLITS = ("train", "val", "test")
PATH_KEYS = {"train": "data.path", "val": "data.val_path", "test": "data.test_path"}
DEFAULT_HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
INTEGER = re.compile(r"[+-]?\d+")


@dataclass
class Table:
    """Rows of one source, the fields it has, and how to name it in messages."""

    rows: list[dict[str, Any]]
    fields: list[str]
    source: str


def read_table(path: Path, key: str) -> Table:
    """The rows of a CSV or JSON-lines file (format from the suffix); ``key`` names it in errors."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{key}={path}: unknown file type '{path.suffix}'; give a .csv, .jsonl or .json-lines "
                          "file (one JSON object per line).")
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file ({path.resolve()}).")
    if kind == "csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # texts longer than csv's default 128 KiB cell
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's byte-order mark
            reader = csv.DictReader(handle)
            rows = [dict(row) for row in reader]
            fields = list(reader.fieldnames or [])
    else:
        rows, fields = [], {}
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{key}={path}: line {number} is not JSON ({err.msg}); a .jsonl file holds "
                                      "one JSON object per line.") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{key}={path}: line {number} is a JSON {type(row).__name__}, not an object "
                                      "of fields.")
                rows.append(row)
                fields.update(dict.fromkeys(row))
        fields = list(fields)
    if not rows:
        raise ConfigError(f"{key}={path} holds no rows: give a file with a header and at least one row (CSV) or "
                          "one JSON object per line.")
    return Table(rows, fields, f"{key}={path}")


def load_hub(name: str, config: str | None, options: Mapping[str, Any]) -> Any:
    """``datasets.load_dataset`` for ``data.hub``, with errors that say what to do."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.hub={name} reads a Hugging Face data set, which needs the datasets package: "
                          "pip install datasets (or give a local file with data.path=...).") from None
    if config is None and "/" in name:  # "glue/sst2" → load_dataset("glue", "sst2")
        name, config = name.rsplit("/", 1)
    try:
        return datasets.load_dataset(name, config, **dict(options))
    except Exception as err:  # offline: ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        label = f"{name}/{config}" if config else name
        raise ConfigError(f"cannot load the data set '{label}' (data.hub): {type(err).__name__}: {first}. The hub "
                          "needs network the first time (then the HF cache serves it); without network give a "
                          "local file with data.path=... (and data.hub=null).") from None


def hub_tables(hub: str, config: str | None, splits: Mapping[str, str | None],
               options: Mapping[str, Any]) -> dict[str, Table | None]:
    """Our splits from the hub data set's splits (None: carve it from train)."""
    loaded = load_hub(hub, config, options)
    available = list(loaded.keys())
    tables: dict[str, Table | None] = {}
    for ours in SPLITS:
        theirs = splits.get(ours)
        if theirs is None:
            require(ours != "train", "data.hub_splits.train must name the hub's training split (e.g. train).")
            tables[ours] = None
            continue
        if theirs not in available:
            raise ConfigError(f"data.hub={hub} has no split '{theirs}' (data.hub_splits.{ours}); its splits: "
                              f"{', '.join(available)}. Set data.hub_splits.{ours} to one of them, or to null to "
                              "carve it from the training split.")
        part = loaded[theirs]
        rows = part.to_list()
        if not rows:
            raise ConfigError(f"the split '{theirs}' of data.hub={hub} is empty (data.hub_splits.{ours}).")
        tables[ours] = Table(rows, list(part.column_names), f"data.hub={hub} split {theirs}")
    return tables


class TextFilesDataModule(InMemoryDataModule):
    """Text classification or language modelling on your own files (see the module docstring)."""

    name = "text_files"
    supported_tasks = ("sequence_classification", "causal_lm")

    def __init__(self, num_classes: int = 2, input_shape: Sequence[int] = (128,), path: str | None = None,
                 val_path: str | None = None, test_path: str | None = None, hub: str | None = None,
                 hub_config: str | None = None, hub_splits: Mapping[str, str | None] | None = None,
                 hub_options: Mapping[str, Any] | None = None, text_field: str = "text", label_field: str = "label",
                 prompt_field: str | None = None, labels: Sequence[Any] | None = None, tokenizer: str = "bytes",
                 vocab_size: int = 257, pad_id: int = 256, test_fraction: float = 0.1, **kwargs) -> None:
        kwargs.pop("cache_dir", None)
        kwargs.setdefault("input_dtype", "int64")
        super().__init__(num_classes=num_classes, input_shape=input_shape, **kwargs)
        require(len(self.input_shape) == 1 and self.input_shape[0] >= 1,
                f"data.input_shape is [maximum length in tokens] for text, e.g. [128]; got {list(self.input_shape)}.")
        require(self.input_dtype == "int64", f"text_files gives token ids: data.input_dtype must be int64, got "
                f"{self.input_dtype}.")
        require(path is not None or hub is not None, "text_files needs its text: set data.path=<a .csv or .jsonl "
                "file> or data.hub=<a Hugging Face data set, e.g. glue/sst2>.")
        require(path is None or hub is None, f"data.path={path} and data.hub={hub} are both set: choose one (set "
                "the other to null).")
        require(0.0 < test_fraction < 1.0, f"data.test_fraction must lie in (0, 1), got {test_fraction}.")
        self.tokenizer = load_tokenizer(tokenizer)
        self.vocab_size, self.pad_id = self.tokenizer.vocab_size, self.tokenizer.pad_id
        self.tokenizer_fingerprint = self.tokenizer.fingerprint()
        require(int(vocab_size) == self.vocab_size,
                f"the tokenizer (data.tokenizer={tokenizer}) has {self.vocab_size} tokens but data.vocab_size is "
                f"{vocab_size}: set data.vocab_size={self.vocab_size}.")
        require(int(pad_id) == self.pad_id, f"the tokenizer (data.tokenizer={tokenizer}) pads with id {self.pad_id} "
                f"but data.pad_id is {pad_id}: set data.pad_id={self.pad_id}.")
        if self.task == "causal_lm":
            require(self.num_classes == self.vocab_size,
                    f"task=causal_lm predicts the next token, one class per token of the tokenizer: set "
                    f"data.num_classes={self.vocab_size} (data.num_classes is {self.num_classes}).")
        self.paths = {"train": path, "val": val_path, "test": test_path}
        self.hub, self.hub_config = hub, hub_config
        self.hub_splits = dict(DEFAULT_HUB_SPLITS if hub_splits is None else to_plain(hub_splits))
        self.hub_options = dict(to_plain(hub_options) or {})  # load_dataset wants plain dicts (data_files=...)
        self.text_field, self.label_field, self.prompt_field = text_field, label_field, prompt_field
        self.labels = None if labels is None else list(to_plain(labels))
        self.test_fraction = float(test_fraction)
        self.label_names: list[str] = []
        self._integer_labels = False
        self._class_index: dict[int | str, int] = {}
        self._mixed_fingerprint: str | None = None

    # -- reading ------------------------------------------------------------
    def _tables(self) -> dict[str, Table | None]:
        tables: dict[str, Table | None] = dict.fromkeys(SPLITS)
        if self.hub is not None:
            tables.update(hub_tables(self.hub, self.hub_config, self.hub_splits, self.hub_options))
        for split in SPLITS:
            if self.paths[split] is not None:  # a file of its own wins over the hub's split
                tables[split] = read_table(Path(str(self.paths[split])).expanduser(), PATH_KEYS[split])
        return tables

    def _fields(self) -> dict[str, str]:
        """The fields each row needs, by the config key that names them."""
        needed = {"data.text_field": self.text_field}
        if self.task == "sequence_classification":
            needed["data.label_field"] = self.label_field
        elif self.prompt_field is not None:
            needed["data.prompt_field"] = self.prompt_field
        return needed

    def _check_fields(self, table: Table) -> None:
        for key, field in self._fields().items():
            if field not in table.fields:
                raise ConfigError(f"{key}={field} is not a field of {table.source}; its fields: "
                                  f"{', '.join(map(str, table.fields)) or '(none)'}. Set {key} to one of them.")
            for number, row in enumerate(table.rows, 1):
                if row.get(field) is None or (key == "data.label_field" and row[field] == ""):
                    raise ConfigError(f"row {number} of {table.source} has no value for {key}={field}; fill it "
                                      "in or drop the row.")

    # -- labels -------------------------------------------------------------
    def _find_classes(self, tables: dict[str, Table | None]) -> None:
        """The classes (``label_names``, in class-id order), from ``data.labels`` or the training
        rows before any split is carved from them; refuses labels no class stands for."""
        given = self.labels or []
        values = [*given, *(row[self.label_field] for t in tables.values() if t is not None for row in t.rows)]
        # One decision for all sources: CSV gives "3" where JSON gives 3, and both are class 3.
        self._integer_labels = all(
            (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and INTEGER.fullmatch(v.strip()))
            for v in values)
        if self.labels is not None:
            classes = [self._label_key(v) for v in given]
            require(len(set(classes)) == len(classes), f"data.labels lists a label twice: {self.labels}.")
            known = "data.labels"
        else:
            train = tables["train"]
            assert train is not None  # __init__ required path or hub, and hub_tables required its train split
            classes = sorted({self._label_key(row[self.label_field]) for row in train.rows})
            known = f"the training data ({train.source})"
        self._class_index = {label: i for i, label in enumerate(classes)}
        for table in tables.values():
            if table is None:
                continue
            unseen = sorted({str(k) for row in table.rows
                             if (k := self._label_key(row[self.label_field])) not in self._class_index})
            if unseen:
                raise ConfigError(f"{table.source} has labels that {known} does not: {', '.join(unseen[:10])}"
                                  f"{' …' if len(unseen) > 10 else ''}. Add them to data.labels, or fix the file.")
        if len(classes) != self.num_classes:
            raise ConfigError(f"the data has {len(classes)} classes ({', '.join(map(str, classes[:10]))}"
                              f"{' …' if len(classes) > 10 else ''}) but data.num_classes is {self.num_classes}: set "
                              f"data.num_classes={len(classes)}.")
        self.label_names = [str(c) for c in classes]

    def _label_key(self, value: Any) -> int | str:
        return int(value) if self._integer_labels else str(value)

    def _class_ids(self, table: Table) -> np.ndarray:
        return np.array([self._class_index[self._label_key(row[self.label_field])] for row in table.rows],
                        dtype=np.int64)

    # -- building -----------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        sources = self._tables()
        for table in sources.values():
            if table is not None:
                self._check_fields(table)
        if self.task == "sequence_classification":
            self._find_classes(sources)
        tables = self._carve(sources)
        if self.task == "sequence_classification":
            self.splits = {s: self._classification(tables[s], self._class_ids(tables[s])) for s in SPLITS}
        else:
            self.splits = {s: self._language_model(tables[s]) for s in SPLITS}
        self.labelled_train_size = len(self.splits["train"].x)
        self._check_shapes()

    def _carve(self, tables: dict[str, Table | None]) -> dict[str, Table]:
        """Fill a split without a source of its own with rows held out of train (test first, then val),
        stratified by class."""
        train = tables["train"]
        assert train is not None
        carved = dict(tables)
        for split, fraction, key in (("test", self.test_fraction, "data.test_fraction"),
                                     ("val", self.val_fraction, "data.val_fraction")):
            if carved[split] is not None:
                continue
            strata = self._strata(train)
            keep, held = stratified_holdout(strata, fraction, self.split_seed)
            if len(held) == 0 or len(keep) == 0:
                raise ConfigError(f"{train.source} has {len(train.rows)} rows: {key}={fraction} leaves the {split} "
                                  f"split {'empty' if len(held) == 0 else 'all of them'}. Give it its own file "
                                  f"({PATH_KEYS[split]}=...), change {key}, or use more rows.")
            carved[split] = Table([train.rows[i] for i in held], train.fields, f"{train.source} ({split} part)")
            train = Table([train.rows[i] for i in keep], train.fields, train.source)
        carved["train"] = train
        return carved  # type: ignore[return-value]

    def _strata(self, table: Table) -> np.ndarray:
        """What held-out rows are stratified by: the rank of the label among the sorted labels (not
        the class id, so reordering data.labels holds out the same rows), or nothing (causal LM)."""
        if self.task != "sequence_classification":
            return np.zeros(len(table.rows), dtype=np.int64)
        keys = [self._label_key(row[self.label_field]) for row in table.rows]
        rank = {key: i for i, key in enumerate(sorted(set(keys)))}
        return np.array([rank[key] for key in keys], dtype=np.int64)

    def _texts(self, table: Table, field: str) -> list[str]:
        return [str(row[field]) for row in table.rows]

    def _classification(self, table: Table, labels: np.ndarray) -> Split:
        length = self.input_shape[0]
        x = np.full((len(table.rows), length), self.pad_id, dtype=np.int64)
        for i, ids in enumerate(self.tokenizer.encode_batch(self._texts(table, self.text_field))):
            ids = ids[:length]
            x[i, :len(ids)] = ids
        return Split(torch.from_numpy(x), torch.from_numpy(labels))

    def _language_model(self, table: Table) -> Split:

        length = self.input_shape[0]
        texts = self.tokenizer.encode_batch(self._texts(table, self.text_field))
        prompts = (self.tokenizer.encode_batch(self._texts(table, self.prompt_field)) if self.prompt_field
                   else [[] for _ in texts])
        x = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        y = np.full((len(texts), length), UNLABELLED, dtype=np.int64)
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            ids = (prompt + text)[:length + 1]
            if len(ids) < 2:
                continue  # no next token to predict: the row is all padding
            x[i, :len(ids) - 1] = ids[:-1]
            y[i, :len(ids) - 1] = ids[1:]
            # y[j] is token j + 1: a prompt token for j + 1 < len(prompt), which is read, not learned.
            y[i, :max(len(prompt) - 1, 0)] = UNLABELLED
        return Split(torch.from_numpy(x), torch.from_numpy(y))

    def fingerprint(self) -> str:
        """The splits' hash (see the base class) mixed with the tokenizer's and the class names:
        the same ids mean other text under another tokenizer, and other classes under other names."""
        if self._mixed_fingerprint is None:
            digest = hashlib.sha256(super().fingerprint().encode())
            digest.update(self.tokenizer_fingerprint.encode())
            digest.update(json.dumps(self.label_names).encode())
            self._mixed_fingerprint = digest.hexdigest()[:16]
        return self._mixed_fingerprint
