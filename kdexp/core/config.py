"""OmegaConf resolvers used by ``conf/`` and small helpers for composed configs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdexp.core.agent import under_agent
from kdexp.core.errors import ConfigError, KdexpError
from kdexp.core.files import is_weights_only_refusal, refused_pickle
from kdexp.core.tasks import task_of

# The config tree shipped beside the package (kdexp/core/config.py → <repo>/conf).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@contextmanager
def conf_initialized() -> Iterator[None]:
    """Hydra's compose API pointed at :data:`CONF_DIR` for the block (outside a Hydra app), cleared after."""
    from hydra import initialize_config_dir  # Hydra loads only where a config is composed
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().clear()


def compose_run(overrides: list[str], output_dir: str | Path, root_dir: str | Path | None = None) -> DictConfig:
    """The run config for ``overrides``, composed as ``kdexp train`` would, with its output in ``output_dir``."""
    from hydra import compose

    with conf_initialized():
        return compose("train", overrides=[*overrides, f"paths.root_dir={root_dir or os.getcwd()}",
                                           f"paths.output_dir={output_dir}"])


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

    return task_of(_root_).name


def _hydra_config() -> Any:
    """Hydra's config of the running job, or None (a multirun's launching process before any job,
    the compose API, a library call)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def launch_dir() -> str:
    """``${kdexp.launch_dir:}``: the folder the command was started in (``paths.root_dir``).

    Inside a job it is Hydra's ``runtime.cwd``. ``${hydra:runtime.cwd}`` itself cannot be used:
    a multirun resolves ``hydra.sweep.dir`` (which is built from it) before Hydra's config is set.
    There the working directory is the same folder: with ``hydra.job.chdir=false`` it never changes.
    """
    hydra_cfg = _hydra_config()
    cwd = hydra_cfg.runtime.get("cwd") if hydra_cfg is not None else None
    return str(cwd) if cwd else os.getcwd()


# Set by `kdexp sweep` (skip, or rerun with --force); a user may set it for any command.
IF_FINISHED_ENV = "KDEXP_IF_FINISHED"


def default_if_finished() -> str:
    """``${kdexp.if_finished:}``: what a run does with a folder that holds a finished run, unless
    ``if_finished=`` is given: ``$KDEXP_IF_FINISHED`` when set; else ``skip`` in a multirun job
    (re-running a sweep into the same ``hydra.sweep.dir`` finishes what is left) and in a run a W&B
    sweep agent started (its folder is the sweep's, as in ``kdexp sweep``), ``error`` in a single
    run (its folder was named on purpose, and a finished result there is not retrained silently)."""
    chosen = os.environ.get(IF_FINISHED_ENV)
    if chosen:  # an empty value counts as unset
        return chosen
    if under_agent():
        return "skip"
    from hydra.types import RunMode

    hydra_cfg = _hydra_config()
    return "skip" if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN else "error"


def register_resolvers() -> None:
    """Register the ``${kdexp.*:}`` resolvers that ``conf/`` uses (idempotent): ``interactive``,
    ``gpu_precision``, ``task``, ``launch_dir`` and ``if_finished``."""
    if not OmegaConf.has_resolver("kdexp.interactive"):
        OmegaConf.register_new_resolver("kdexp.interactive", is_interactive)
    if not OmegaConf.has_resolver("kdexp.gpu_precision"):
        OmegaConf.register_new_resolver("kdexp.gpu_precision", best_gpu_precision)
    if not OmegaConf.has_resolver("kdexp.task"):
        OmegaConf.register_new_resolver("kdexp.task", resolved_task)
    if not OmegaConf.has_resolver("kdexp.launch_dir"):
        OmegaConf.register_new_resolver("kdexp.launch_dir", launch_dir)
    if not OmegaConf.has_resolver("kdexp.if_finished"):
        OmegaConf.register_new_resolver("kdexp.if_finished", default_if_finished)


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
        if is_weights_only_refusal(cause):  # a plug-in's torch.load refused a pickle: never echo "weights_only=False"
            raise refused_pickle(cause, f"read while building {label} ({target}){_where(cause)}", "a file") from None
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
