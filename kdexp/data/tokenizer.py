"""Text → token ids, one interface for bytes and for Hugging Face tokenizers.

- :class:`ByteTokenizer`: a text's UTF-8 bytes are its ids (0..255); 256 is the pad id.
  Needs nothing beyond the standard library.
- :class:`HFTokenizer`: ``transformers.AutoTokenizer`` for a local directory (written by
  ``save_pretrained``) or a hub name (``pip install -e '.[text]'``; a hub name needs
  network once, then the local HF cache serves it).

Both give ``vocab_size``, ``pad_id``, ``encode(text)`` and ``fingerprint()``: equal
fingerprints mean equal tokenization, which is what lets a run refuse a teacher and a
student (or data) that range over different vocabularies.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdexp.core.errors import ConfigError
from kdexp.core.huggingface import import_transformers, is_local_path

# Files save_pretrained writes for a tokenizer (fast, sentencepiece, WordPiece and BPE ones).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "tokenizer.model", "special_tokens_map.json")
# Parts of a fast tokenizer's serialised pipeline that decide which ids a text gets (not the
# decoder, nor truncation/padding state, which encode() never uses).
PIPELINE_KEYS = ("normalizer", "pre_tokenizer", "post_processor", "added_tokens")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; id 256 pads."""

    name = "bytes"
    vocab_size = 257
    pad_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def fingerprint(self) -> str:
        return f"bytes-{self.vocab_size}"


class HFTokenizer:
    """A Hugging Face tokenizer loaded with ``AutoTokenizer.from_pretrained(spec)``."""

    def __init__(self, spec: str) -> None:
        transformers = import_transformers(f"tokenizer '{spec}' is a Hugging Face tokenizer, which",
                                           ", or use the byte-level tokenizer (data.tokenizer=bytes)")
        self.name = str(spec)
        local = is_local_path(self.name)
        path = Path(self.name).expanduser()
        if local and not path.is_dir():
            raise ConfigError(f"tokenizer directory not found: {path.resolve()} (data.tokenizer={spec}). Point "
                              "data.tokenizer at a folder written by save_pretrained, at a hub name (needs "
                              "network once), or use data.tokenizer=bytes.")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path) if local else self.name)
        except Exception as err:  # OSError offline, ValueError for folders without tokenizer files, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if local:
                hint = (f"the local directory {path.resolve()} holds no tokenizer that loads; save one there with "
                        "tokenizer.save_pretrained(...)")
            else:
                offline = " (HF_HUB_OFFLINE is set, so only the local HF cache is read)" if os.environ.get(
                    "HF_HUB_OFFLINE", "") not in ("", "0") else ""
                hint = (f"'{spec}' is not a local directory, so it was read as a hub name, which needs network the "
                        f"first time{offline}; download it where there is network, or point data.tokenizer at a "
                        "directory written by save_pretrained")
            raise ConfigError(f"cannot load the tokenizer '{spec}': {type(err).__name__}: {first}. {hint}.") from None
        self.vocab_size = len(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id  # GPT-style tokenizers have no pad token: their EOS pads
        if pad is None:
            raise ConfigError(f"the tokenizer '{spec}' has neither a pad nor an end-of-sequence token, so inputs "
                              "cannot be padded: give the tokenizer a pad token (tokenizer.add_special_tokens("
                              "{'pad_token': '[PAD]'}) and save_pretrained it again).")
        self.pad_id = int(pad)
        self._fingerprint: str | None = None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    def fingerprint(self) -> str:
        """A short sha256 of the vocabulary (token → id), the special tokens and, for fast
        tokenizers, the pipeline that splits text (normaliser, pre-tokeniser, merges, templates)."""
        if self._fingerprint is None:
            tok = self.tokenizer
            state: dict[str, Any] = {
                "vocab": sorted(tok.get_vocab().items(), key=lambda item: item[1]),
                "special": sorted((str(k), str(v)) for k, v in tok.special_tokens_map.items()),
                "pad_id": self.pad_id,
            }
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None:
                pipeline = json.loads(backend.to_str())
                state["pipeline"] = {key: pipeline.get(key) for key in PIPELINE_KEYS}
                model = dict(pipeline.get("model") or {})
                model.pop("vocab", None)  # already hashed above, in id order
                state["model"] = model
            blob = json.dumps(state, sort_keys=True, ensure_ascii=False, default=str)
            self._fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._fingerprint


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``None`` or ``"bytes"``: :class:`ByteTokenizer`; anything else: a directory or hub name."""
    if spec is None or str(spec) == ByteTokenizer.name:
        return ByteTokenizer()
    return HFTokenizer(str(spec))


def model_dir_tokenizer_fingerprint(path: str | Path) -> str | None:
    """The fingerprint of the tokenizer saved in a Hugging Face model directory; None when it holds none."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model directory not found: {folder.resolve()}; point it at a folder written by "
                          "save_pretrained.")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    return HFTokenizer(str(folder.resolve())).fingerprint()
