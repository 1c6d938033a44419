"""Hugging Face Transformers models as teachers and students (``pip install -e '.[text]'``).

:class:`HFModel` holds an ``AutoModelForCausalLM`` (``task=causal_lm``: logits ``(B, L, V)``)
or an ``AutoModelForSequenceClassification`` (``task=sequence_classification``: ``(B, C)``):

- ``pretrained``: a local directory written by ``save_pretrained``, or a hub name
  (``from_pretrained``; a hub name needs network once, then the local HF cache);
- otherwise built from scratch from a small config of ``family`` (``gpt2`` | ``llama`` for
  causal LM, ``bert`` | ``distilbert`` for classification, or any of them for either), with
  ``width`` as the hidden size and ``depth`` as the number of layers, so the T × α × width
  grid means the same thing as for the other students.

Inputs are token ids; the attention mask is ``ids != pad_id`` (right padding), so padding
never changes a prediction. Each transformer layer's output is a tap point named
``blocks.<i>`` (for hidden-state KD), whatever the architecture calls its layer list, and
the hidden state its head reads is ``pre_logits``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kdexp.core.errors import CheckpointError, ConfigError
from kdexp.core.files import is_weights_only_refusal, refused_pickle
from kdexp.core.huggingface import import_transformers, is_local_path

FAMILIES = ("gpt2", "llama", "bert", "distilbert")
# The hidden state the head reads, per model_type: tap point ``pre_logits`` (as in kdexp's own models).
PRE_LOGITS = {"gpt2": "transformer.ln_f", "llama": "model.norm", "bert": "bert.pooler", "distilbert": "pre_classifier"}
HEADS = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def scratch_config(family: str, width: int, depth: int, heads: int, vocab_size: int, context: int,
                   pad_id: int | None, dropout: float) -> dict[str, Any]:
    """The ``AutoConfig.for_model`` arguments of a ``family`` model of hidden size ``width`` and ``depth`` layers."""
    special = {"pad_token_id": pad_id, "bos_token_id": None, "eos_token_id": None}
    if family == "gpt2":
        return dict(n_embd=width, n_layer=depth, n_head=heads, n_positions=context, vocab_size=vocab_size,
                    resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **special)
    if family == "llama":
        return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                    num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context,
                    vocab_size=vocab_size, attention_dropout=dropout, **special)
    if family == "bert":
        return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth, num_attention_heads=heads,
                    max_position_embeddings=context, vocab_size=vocab_size, hidden_dropout_prob=dropout,
                    attention_probs_dropout_prob=dropout, **special)
    if family == "distilbert":
        return dict(dim=width, hidden_dim=4 * width, n_layers=depth, n_heads=heads, max_position_embeddings=context,
                    vocab_size=vocab_size, dropout=dropout, attention_dropout=dropout, seq_classif_dropout=dropout,
                    pad_token_id=pad_id)
    raise ConfigError(f"model family '{family}' is not one kdexp builds from scratch; choose one of "
                      f"{', '.join(FAMILIES)}, or load a model with pretrained=<directory or hub name>.")


def pretrained_identity(name: str, revision: str | None = None) -> str:
    """What a pretrained model's weights are, for cache keys: a hash of a local directory's weight
    files (a model replaced in place gets a new key), or the hub name and revision."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return f"{name}@{revision or 'main'}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.name in WEIGHT_FILES or p.name.startswith("model-")):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def load_pretrained(auto_class: Any, name: str, revision: str | None, **kwargs: Any) -> nn.Module:
    """``from_pretrained`` with errors that say what to fix."""
    if is_local_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ConfigError(f"pretrained model directory not found: {path.resolve()}. Point model.pretrained at a "
                              "folder written by save_pretrained, or at a hub name such as 'gpt2'.")
        if not any((path / f).is_file() for f in (*WEIGHT_FILES, "config.json")):
            raise ConfigError(f"{path.resolve()} holds no Hugging Face model (no config.json or weights): point "
                              "model.pretrained at a folder written by save_pretrained.")
    try:
        return auto_class.from_pretrained(name, revision=revision, **kwargs)
    except Exception as err:  # noqa: BLE001 - a refused pickle and OSError are put in kdexp's words; others re-raised
        if is_weights_only_refusal(err):  # torch's message advises weights_only=False: never passed on
            raise refused_weights(name, err) from None
        if not isinstance(err, OSError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot load the pretrained model '{name}': {first}. A hub name needs network the first "
                          "time (then the HF cache serves it; HF_HUB_OFFLINE=1 reads only the cache); a local "
                          "model is a directory written by save_pretrained.") from None


def refused_weights(name: str, err: BaseException) -> CheckpointError:
    """A model whose pickled weights (``pytorch_model.bin``) would run code when loaded: refused.

    ``from_pretrained`` reads them with ``torch.load(weights_only=True)``, which stops before
    anything runs; torch's message then advises ``weights_only=False``, which would run it."""
    path = Path(name).expanduser()
    pickles = sorted(p.name for p in path.glob("*.bin")) if path.is_dir() else []
    where = f"{path.resolve()} ({', '.join(pickles)})" if pickles else f"'{name}'"
    return refused_pickle(
        err, where, "the pretrained model's weights",
        fix="If you trust its source, convert it to safetensors with transformers (save_pretrained writes "
            "model.safetensors, which holds tensors only) and point model.pretrained at that copy.")


class HFModel(nn.Module):
    """Token ids ``(B, L)`` → logits of a Hugging Face model (see the module docstring)."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, task: str = "causal_lm",
                 pretrained: str | None = None, revision: str | None = None, family: str = "gpt2",
                 width: int = 64, depth: int = 2, heads: int = 4, vocab_size: int | None = None,
                 pad_id: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if task not in HEADS:
            raise ConfigError(f"Hugging Face models serve task=causal_lm or task=sequence_classification, not {task}.")
        if len(in_shape) != 1:
            raise ConfigError(f"Hugging Face text models read token sequences (data.input_shape [L]), got "
                              f"{list(in_shape)}; use a text data set (data=stdlib_text, text_files, stdlib_topics).")
        transformers = import_transformers("a Hugging Face model (teacher=hf, student=hf)")
        auto_class = getattr(transformers, HEADS[task])
        self.task, self.pad_id = task, pad_id
        vocab = int(vocab_size if vocab_size is not None else num_classes)
        if pretrained:
            extra = {"num_labels": int(num_classes)} if task == "sequence_classification" else {}
            self.hf = load_pretrained(auto_class, str(pretrained), revision, **extra)
        else:
            if width % heads:
                raise ConfigError(f"width {width} must be a multiple of heads {heads} (the attention head size).")
            config = transformers.AutoConfig.for_model(
                family, **scratch_config(family, int(width), int(depth), int(heads), vocab, int(in_shape[0]),
                                         pad_id, float(dropout)))
            if task == "sequence_classification":
                config.num_labels = int(num_classes)
            self.hf = auto_class.from_config(config)
        model_vocab = int(self.hf.get_input_embeddings().num_embeddings)
        if model_vocab < vocab:
            raise ConfigError(f"the model's vocabulary has {model_vocab} tokens but the data's tokenizer has {vocab}: "
                              "they were not made for each other. Tokenize the data with the model's own tokenizer "
                              "(data.tokenizer=<the model's directory>).")
        if task == "causal_lm" and model_vocab != num_classes:
            raise ConfigError(f"the language model predicts {model_vocab} tokens but data.num_classes is "
                              f"{num_classes}: set data.num_classes={model_vocab} (the tokenizer's vocabulary).")
        if pad_id is not None and self.hf.config.pad_token_id is None:
            self.hf.config.pad_token_id = pad_id  # sequence classification with GPT-style models reads it
        self.tap_aliases = self._layer_aliases()

    def _layer_aliases(self) -> dict[str, str]:
        """``blocks.<i>`` → the path of the i-th transformer layer (the longest ModuleList of layers)."""
        depth = getattr(self.hf.config, "num_hidden_layers", None)
        lists = [(name, module) for name, module in self.named_modules()
                 if isinstance(module, nn.ModuleList) and (depth is None or len(module) == depth)]
        aliases = {}
        if lists:
            name, layers = max(lists, key=lambda item: len(item[1]))
            aliases = {f"blocks.{i}": f"{name}.{i}" for i in range(len(layers))}
        pre_logits = PRE_LOGITS.get(getattr(self.hf.config, "model_type", ""))
        if pre_logits and pre_logits in dict(self.hf.named_modules()):
            aliases["pre_logits"] = f"hf.{pre_logits}"
        return aliases

    def forward(self, x: Tensor) -> Tensor:
        mask = (x != self.pad_id).long() if self.pad_id is not None else None
        extra = {"use_cache": False} if self.task == "causal_lm" else {}  # no key/value cache in training
        return self.hf(input_ids=x, attention_mask=mask, **extra).logits

    def save_pretrained(self, directory: str | Path) -> None:
        """The model as a Hugging Face directory (``from_pretrained`` loads it)."""
        self.hf.save_pretrained(str(directory))
