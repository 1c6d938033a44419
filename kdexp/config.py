"""OmegaConf resolvers used by ``conf/`` and small helpers for composed configs."""

from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf


def is_interactive() -> bool:
    """True on a terminal, False in CI or when output is piped (then no progress bars)."""
    if os.environ.get("CI"):
        return False
    return sys.stderr.isatty()


def best_gpu_precision() -> str:
    """``bf16-mixed`` where the GPU supports it, else ``16-mixed``."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "16-mixed"


def register_resolvers() -> None:
    """Register ``${kdexp.interactive:}`` and ``${kdexp.gpu_precision:}`` (idempotent)."""
    if not OmegaConf.has_resolver("kdexp.interactive"):
        OmegaConf.register_new_resolver("kdexp.interactive", is_interactive)
    if not OmegaConf.has_resolver("kdexp.gpu_precision"):
        OmegaConf.register_new_resolver("kdexp.gpu_precision", best_gpu_precision)


def to_plain(cfg: DictConfig | None) -> Any:
    """The resolved config as plain Python containers (for JSON, W&B and hashing)."""
    if cfg is None:
        return None
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but a kdexp error raised by the target surfaces as itself.

    Hydra wraps exceptions from constructors in ``InstantiationException``; unwrapping
    keeps messages like "kd.alpha must lie in [0, 1]" readable and catchable.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    from kdexp.errors import KdexpError

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, KdexpError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
