"""A small bidirectional Transformer encoder for token-sequence classification.

Token + position embeddings, ``depth`` pre-norm encoder blocks, a mean over the non-pad
positions, a layer norm and a linear head: ``(B, L)`` ids → ``(B, C)`` logits. Written for
the embedded ``stdlib_topics`` task and for ``text_files``: a teacher of ~0.8 M parameters
trains on 2 CPU cores in minutes, without transformers installed.

Pad positions are masked out as attention keys and left out of the mean, so padding never
changes a prediction (right padding keeps every real token's position). Tap points for
feature objectives: ``blocks.0`` … (each block's output, ``(B, L, D)``) and ``pooled`` (the
normalised mean the head reads, ``(B, D)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdexp.core.errors import ConfigError
from kdexp.models.gpt import Block, gpt_init


class MaskedMeanPool(nn.Module):
    """Mean of the hidden states at real tokens, layer-normalised: ``(B, L, D)`` → ``(B, D)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)

    def forward(self, h: Tensor, keep: Tensor) -> Tensor:
        weights = keep.to(h.dtype).unsqueeze(-1)  # (B, L, 1)
        mean = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.norm(mean)


class TextEncoderClassifier(nn.Module):
    """Token ids ``(B, L)``, right-padded with ``pad_id`` → class logits ``(B, C)``."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, vocab_size: int, pad_id: int, width: int = 64,
                 depth: int = 2, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if len(in_shape) != 1:
            raise ConfigError(f"TextEncoderClassifier reads token sequences (data.input_shape [L]), got "
                              f"{list(in_shape)}; use it with a text data set (data=stdlib_topics or text_files).")
        if width % heads:
            raise ConfigError(f"TextEncoderClassifier width {width} must be a multiple of heads {heads}.")
        if not 0 <= pad_id < vocab_size:
            raise ConfigError(f"pad_id {pad_id} is not a token id of a vocabulary of {vocab_size}: check "
                              "data.pad_id and data.vocab_size.")
        self.context, self.pad_id, self.vocab_size = int(in_shape[0]), int(pad_id), int(vocab_size)
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(self.context, width)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, causal=False) for _ in range(depth))
        self.pooled = MaskedMeanPool(width)
        self.head = nn.Linear(width, num_classes)
        self.apply(gpt_init)

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = tokens.long()
        length = tokens.shape[1]
        if length > self.context:
            raise ConfigError(f"TextEncoderClassifier was built for sequences of up to {self.context} tokens "
                              f"(data.input_shape), got {length}.")
        keep = tokens != self.pad_id
        # A sequence of nothing but padding (an empty text) would leave its queries no key to attend
        # to (NaN); let it attend to all of its positions instead. Real sequences are unaffected.
        keep = keep | ~keep.any(dim=1, keepdim=True)
        h = self.token(tokens) + self.position(torch.arange(length, device=tokens.device))  # (B, L, D)
        for block in self.blocks:
            h = block(h, keep)
        return self.head(self.pooled(h, keep))
