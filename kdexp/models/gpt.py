"""A small decoder-only Transformer (GPT-style) for byte-level language modelling.

Written for the embedded causal-LM task: a teacher of a few million parameters and
smaller students train on 2 CPU cores in minutes. ``width`` is the model dimension and
``depth`` the number of blocks, so the T × α × width grid keeps its meaning for
language models. Stages are named for feature taps: ``blocks.0`` … and ``pre_logits``
(the final layer norm's output, the hidden state the head reads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdexp.core.errors import ConfigError


def gpt_init(module: nn.Module) -> None:
    """GPT-2's initialisation (``model.apply(gpt_init)``): N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class Block(nn.Module):
    """Pre-norm self-attention and MLP, each with a residual connection.

    Causal (GPT: a position attends to itself and earlier ones), or bidirectional over the
    real tokens of a padded batch (an encoder: ``keep`` (B, L) is True at real tokens).
    """

    def __init__(self, width: int, heads: int, dropout: float, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.dropout = dropout

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:  # (B, L, D)
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, length, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
        mask = None if self.causal or keep is None else keep[:, None, None, :]  # keys: the real tokens only
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                                  dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, length, d))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Token ids (B, L) → next-token logits (B, L, V)."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, width: int = 128, depth: int = 2,
                 heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if len(in_shape) != 1:
            raise ConfigError(f"TinyGPT reads token sequences (data.input_shape [L]), got {list(in_shape)}; use it "
                              "with a text data set (data=stdlib_text).")
        if width % heads:
            raise ConfigError(f"TinyGPT width {width} must be a multiple of heads {heads}.")
        self.context = int(in_shape[0])
        self.token = nn.Embedding(num_classes, width)
        self.position = nn.Embedding(self.context, width)
        self.blocks = nn.Sequential(*(Block(width, heads, dropout) for _ in range(depth)))
        self.pre_logits = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes, bias=False)
        self.apply(gpt_init)

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = tokens.long()
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.token(tokens) + self.position(positions)  # (B, L, D)
        return self.head(self.pre_logits(self.blocks(h)))  # (B, L, V)

