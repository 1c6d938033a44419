"""One Lightning fit: the configured Trainer, graceful stops on pre-emption signals, and
fit-then-test with an interruption told apart from a failure. Everything here imports
Lightning; :mod:`kdexp.run.engine` builds runs around it without importing it up front.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from kdexp.core.config import instantiate
from kdexp.core.console import quiet_lightning
from kdexp.core.errors import ConfigError, RunInterrupted
from kdexp.core.files import load_weights
from kdexp.core.records import RunRecorder
from kdexp.data.lightning import for_trainer

if TYPE_CHECKING:
    from kdexp.data.base import InMemoryDataModule
    from kdexp.run.modules import SupervisedModule

quiet_lightning()  # a run that chose its verbosity before Lightning was imported (a pack training its teacher)


class StopWatcher(pl.Callback):
    """Remembers the exception that stopped ``fit``.

    Lightning turns Ctrl-C into ``sys.exit(1)`` and SIGTERM into a ``SystemExit``;
    this is how the run tells an interruption (resumable) from a failure.
    """

    def __init__(self) -> None:
        self.exception: BaseException | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.exception = exception


@contextmanager
def preemption_signals_stop_gracefully(trainer: pl.Trainer) -> Iterator[None]:
    """While fitting, make SIGUSR1 (SLURM's pre-emption warning) stop training like SIGTERM does.

    Lightning stops after the current batch on SIGTERM (its signal connector), and the
    ``last_checkpoint`` callback (``save_on_exception``) then writes ``last.ckpt``. Under
    SLURM, Lightning's own SIGUSR1 handler (checkpoint and requeue) stays in charge, as
    does any handler installed before (submitit's); elsewhere SIGUSR1 would kill the
    process outright, so it is routed to the same graceful stop.
    """
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    connector = getattr(trainer, "_signal_connector", None)
    usr1 = getattr(signal, "SIGUSR1", None)
    if connector is None or usr1 is None or SLURMEnvironment.detect() or signal.getsignal(usr1) != signal.SIG_DFL:
        yield
        return
    signal.signal(usr1, lambda signum, frame: setattr(connector, "received_sigterm", True))
    try:
        yield
    finally:
        signal.signal(usr1, signal.SIG_DFL)


def build_trainer(cfg: DictConfig, output_dir: Path, logger: Logger | None, max_epochs: int | None = None) -> pl.Trainer:
    """The configured Trainer, with checkpoints under ``output_dir/checkpoints``."""
    callbacks = [instantiate(node, what="callbacks") for node in (cfg.get("callbacks") or {}).values() if node]
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(output_dir / "checkpoints")  # beside the run's record, not lightning_logs/
    callbacks.append(StopWatcher())
    overrides: dict[str, Any] = {"default_root_dir": str(output_dir)}
    if max_epochs is not None:
        overrides["max_epochs"] = max_epochs
    return instantiate(cfg.trainer, logger=logger if logger is not None else False, callbacks=callbacks, **overrides)


def fit_and_test(trainer: pl.Trainer, module: SupervisedModule, datamodule: InMemoryDataModule,
                 ckpt_path: Path | None = None, recorder: RunRecorder | None = None) -> dict[str, float]:
    """Fit (continuing from ``ckpt_path`` when given), then test at the last epoch
    (``test/*_last``) and at the best-val checkpoint (``test/*``).

    Checkpoints are read weights-only: resuming never runs code from a file.
    """
    timed = recorder.timed if recorder is not None else _untimed
    datamodule = for_trainer(datamodule)
    if ckpt_path is not None:
        load_weights(ckpt_path, what="checkpoint to resume from")  # refuses, with a clear message, a file that runs code
    try:
        with preemption_signals_stop_gracefully(trainer), timed("fit"):
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                        weights_only=True)
    except SystemExit as stop:
        raise_if_interrupted(trainer, stop)
        raise
    if trainer.current_epoch < 1 or trainer.global_step < 1:
        raise ConfigError(f"training ran {trainer.current_epoch} epochs ({trainer.global_step} steps): nothing was "
                          "trained, so there is no result to record. Check trainer.max_epochs / max_steps / "
                          "limit_train_batches.")
    metrics = dict(module.restored_metrics)  # a resumed run with no epoch left still reports its last epoch
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))})
    with timed("test"):
        module.test_suffix = "_last"
        metrics.update(trainer.test(module, datamodule=datamodule, verbose=False)[0])
        module.test_suffix = ""
        has_best = trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path
        metrics.update(trainer.test(module, datamodule=datamodule, ckpt_path="best" if has_best else None,
                                    weights_only=True, verbose=False)[0])
    if has_best:
        metrics["best_val_score"] = float(trainer.checkpoint_callback.best_model_score)
    return metrics


@contextmanager
def _untimed(part: str) -> Iterator[None]:
    yield


def raise_if_interrupted(trainer: pl.Trainer, stop: SystemExit) -> None:
    """Turn Lightning's exit after Ctrl-C or SIGTERM into :class:`RunInterrupted`."""
    watcher = next((cb for cb in trainer.callbacks if isinstance(cb, StopWatcher)), None)
    cause = watcher.exception if watcher is not None else None
    if isinstance(cause, KeyboardInterrupt) or isinstance(stop, SIGTERMException) or isinstance(cause, SIGTERMException):
        what = "Ctrl-C" if isinstance(cause, KeyboardInterrupt) else "SIGTERM (or a pre-emption signal)"
        raise RunInterrupted(
            f"stopped by {what} at epoch {trainer.current_epoch}, step {trainer.global_step}; checkpoints/last.ckpt "
            "holds the progress. Run the same command again to continue from there."
        ) from None
