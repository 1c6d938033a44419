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


def resolved_task(*, _root_: DictConfig) -> str:
    """``${kdexp.task:}``: the run's task name (``task=auto`` resolved by the data set), for model configs."""
    from kdexp.tasks import task_of

    return task_of(_root_).name


def register_resolvers() -> None:
    """Register ``${kdexp.interactive:}``, ``${kdexp.gpu_precision:}`` and ``${kdexp.task:}`` (idempotent)."""
    if not OmegaConf.has_resolver("kdexp.interactive"):
        OmegaConf.register_new_resolver("kdexp.interactive", is_interactive)
    if not OmegaConf.has_resolver("kdexp.gpu_precision"):
        OmegaConf.register_new_resolver("kdexp.gpu_precision", best_gpu_precision)
    if not OmegaConf.has_resolver("kdexp.task"):
        OmegaConf.register_new_resolver("kdexp.task", resolved_task)


def to_plain(cfg: Any) -> Any:
    """The resolved config as plain Python containers (for JSON, W&B and hashing); a value that is
    not a config node (None, a plain list or dict) as it is."""
    if not OmegaConf.is_config(cfg):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


# Keys of the ``kd`` node that say how a run obtains its teacher's outputs; they are not
# arguments of the objective, so they are left out when it is built.
RUN_LEVEL_KD_KEYS = ("cache_teacher", "cache_topk")


def objective_node(cfg: DictConfig) -> DictConfig:
    """``cfg.kd`` without :data:`RUN_LEVEL_KD_KEYS`: the objective's own constructor arguments."""
    node = cfg.kd.copy()
    OmegaConf.set_struct(node, False)
    for key in RUN_LEVEL_KD_KEYS:
        node.pop(key, None)
    return node


def choices(cfg: DictConfig) -> dict[str, str]:
    """Which option of each config group was composed (``{"kd": "hinton", ...}``)."""
    return dict(cfg.get("choices") or {})


def choice(cfg: DictConfig, group: str) -> str:
    return str(choices(cfg).get(group, group))


def instantiate(node: Any, *, what: str | None = None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, with errors that show their real cause.

    Hydra wraps exceptions from constructors in ``InstantiationException`` and, for a
    ``_target_`` that cannot be imported, says only "Error locating target … set
    HYDRA_FULL_ERROR=1". A kdexp error raised by the target surfaces as itself (so
    "kd.alpha must lie in [0, 1]" stays readable); any other cause becomes a
    :class:`ConfigError` naming the config node (``what``), the target, the real
    exception and where it was raised.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    from kdexp.errors import ConfigError, KdexpError

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause: BaseException | None = err.__cause__
        while cause is not None and not isinstance(cause, KdexpError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, KdexpError):
            raise cause from None
        label = what or "a config node"
        target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
        if cause is None:
            raise ConfigError(f"cannot build {label} ({target}): {err}") from None
        if "Error locating target" in str(err):
            raise ConfigError(
                f"{label}._target_={target} cannot be imported: {type(cause).__name__}: {cause}. Check the dotted "
                "path, and that its package is installed or on PYTHONPATH."
            ) from None
        raise ConfigError(
            f"{label} ({target}) raised while being built: {type(cause).__name__}: {cause}{_where(cause)}"
        ) from cause


def _where(err: BaseException) -> str:
    """`` (at file:line in function)`` of the innermost frame that raised ``err``."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {last.filename}:{last.lineno} in {last.name})"
