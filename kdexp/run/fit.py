"""One Lightning fit: the configured Trainer, graceful stops on pre-emption signals, and
fit-then-test with an interruption told apart from a failure. Everything here imports
Lightning; :mod:`kdexp.run.engine` builds runs around it without importing it up front.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from pytorch_lightning.utilities.exceptions import SIGTERMException

from kdexp.core.config import instantiate, to_plain
from kdexp.core.console import quiet_lightning
from kdexp.core.distributed import joining_environment, one_process_trainer, runs_several_processes
from kdexp.core.errors import ConfigError, KdexpError, RunInterrupted
from kdexp.core.files import load_weights
from kdexp.core.records import RunRecorder
from kdexp.data.lightning import for_trainer
from kdexp.run.preemption import stop_requested

if TYPE_CHECKING:
    from kdexp.data.base import InMemoryDataModule
    from kdexp.run.modules import SupervisedModule

quiet_lightning()  # a run that chose its verbosity before Lightning was imported (a pack training its teacher)


class StopWatcher(pl.Callback):
    """Remembers the exception that stopped ``fit``, and stops it after the batch on a requested stop.

    Lightning turns Ctrl-C into ``sys.exit(1)`` and SIGTERM into a ``SystemExit``;
    this is how the run tells an interruption (resumable) from a failure. A stop asked for through
    :func:`kdexp.run.preemption.request_stop` (a scheduler's pre-emption warning) takes Lightning's
    SIGTERM path: stop after the batch, ``last.ckpt`` written, the run ``interrupted``.
    """

    def __init__(self) -> None:
        self.exception: BaseException | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Lightning reads this flag right after each training batch; it resets it when a fit starts,
        # so the flag is set here (per batch), never before the fit.
        if stop_requested() and getattr(trainer, "_signal_connector", None) is not None:
            trainer._signal_connector.received_sigterm = True

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


class KeepThreads(pl.Callback):
    """Keep torch's CPU threads at ``num_threads`` in every DDP rank: Lightning's launcher sets them to
    cores ÷ processes (unless ``OMP_NUM_THREADS`` is set), and results depend on the count."""

    def __init__(self, num_threads: int) -> None:
        self.num_threads = num_threads

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_num_threads(self.num_threads)


def build_trainer(cfg: DictConfig, output_dir: Path, logger: Logger | None, max_epochs: int | None = None,
                  one_process: bool = False) -> pl.Trainer:
    """The configured Trainer, with checkpoints under ``output_dir/checkpoints``.

    ``one_process``: a DDP config trains on one device in this process (a DDP run's teacher and chain
    stages, trained in rank 0 before the other ranks exist: see :mod:`kdexp.core.distributed`).
    """
    callbacks = [instantiate(node, what="callbacks") for node in (cfg.get("callbacks") or {}).values() if node]
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(output_dir / "checkpoints")  # beside the run's record, not lightning_logs/
    callbacks.append(StopWatcher())
    trainer_cfg = OmegaConf.create(one_process_trainer(to_plain(cfg.trainer))) if one_process else cfg.trainer
    if runs_several_processes(trainer_cfg) and cfg.get("num_threads") is not None:
        callbacks.append(KeepThreads(int(cfg.num_threads)))
    overrides: dict[str, Any] = {"default_root_dir": str(output_dir)}
    if max_epochs is not None:
        overrides["max_epochs"] = max_epochs
    return instantiate(trainer_cfg, logger=logger if logger is not None else False, callbacks=callbacks, **overrides)


@contextmanager
def other_ranks_join(trainer: pl.Trainer, folder: Path, resume_from: Path | None,
                     recorder: RunRecorder | None = None) -> Iterator[None]:
    """Around rank 0's ``fit``, when it starts the other ranks (strategy ``ddp``): they run
    ``python -m kdexp.train`` with this process's overrides and join this run (``$KDEXP_DDP_RUN``).

    Lightning runs ``python -m <__main__'s module> <sys.argv[1:]>`` again for each rank; a run started
    as ``kdexp train ...`` has ``kdexp.cli`` or a console script as its main module, so the module that
    Lightning reads is kdexp.train's while it starts them (``sys.argv[1:]`` holds the overrides either way).
    While they train, :func:`watch_ranks` marks the record failed as soon as one of them dies.
    """
    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _SubprocessScriptLauncher) or launcher.cluster_environment.creates_processes_externally \
            or trainer.world_size <= 1:
        yield
        return
    shared = joining_environment(str(folder), str(resume_from) if resume_from is not None else None)
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    os.environ.update(shared)
    main.__spec__ = importlib.util.find_spec("kdexp.train")
    stop = threading.Event()
    if recorder is not None:
        threading.Thread(target=watch_ranks, args=(launcher, recorder, stop), daemon=True, name="kdexp-ranks").start()
    try:
        yield
    finally:
        stop.set()
        main.__spec__ = spec
        for name in shared:
            os.environ.pop(name, None)


def watch_ranks(launcher: _SubprocessScriptLauncher, recorder: RunRecorder, stop: threading.Event) -> None:
    """Mark the record failed when a rank that rank 0 started exits with an error during ``fit``.

    Lightning's own watcher then kills rank 0 with SIGKILL (within 5 s), so rank 0 cannot record the
    failure itself when it is waiting for that rank to join; without this the record would say ``running``.
    """
    while not stop.wait(0.5):
        for rank, proc in enumerate(list(launcher.procs), start=1):
            code = proc.poll()
            if code not in (None, 0):
                # A second for rank 0 to record it itself (an interrupt, Ctrl-C, stops every rank at once).
                if stop.wait(1.0) or recorder.record.get("status") != "running":
                    return
                recorder.finish("failed", KdexpError(
                    f"DDP rank {rank} (pid {proc.pid}) exited with code {code} during training (its own error, if it "
                    f"printed one, is on the console, its lines marked [rank {rank}]); Lightning stops the other ranks."))
                return


def compare_ranks(trainer: pl.Trainer) -> dict[str, Any] | None:
    """Under DDP, every rank's view of the training it just finished (best checkpoint and its val score,
    epochs, steps), gathered from all ranks; raises :class:`KdexpError` when they differ. None for one process.

    Validation metrics are all-reduced before the checkpoint callback reads them, so every rank picks
    the same best epoch; this proves it for the run at hand, and the record keeps what each rank saw.
    """
    if trainer.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    best = trainer.checkpoint_callback
    score = best.best_model_score if best is not None else None
    mine = {"rank": trainer.global_rank, "best_checkpoint": best.best_model_path if best is not None else None,
            "best_val_score": float(score) if score is not None else None,
            "epochs": trainer.current_epoch, "steps": trainer.global_step}
    everyone: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, mine)
    differ = [key for key in mine if key != "rank" and len({json.dumps(view[key]) for view in everyone}) > 1]
    if differ:
        raise KdexpError(f"the {trainer.world_size} DDP ranks finished training with different {', '.join(differ)}: "
                         f"{everyone}. Their results cannot be one run's; please report this with the command line.")
    return {"world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
            "backend": str(torch.distributed.get_backend()), "ranks": everyone}


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
    folder = recorder.folder if recorder is not None else Path(trainer.default_root_dir)
    if stop_requested():  # asked while the data or the teacher were prepared: do not start a fit to stop it
        raise RunInterrupted(f"stopped by {stop_requested()} before training started. Run the same command again "
                             "to continue (a requeued SLURM job does so by itself).")
    try:
        with preemption_signals_stop_gracefully(trainer), timed("fit"), \
                other_ranks_join(trainer, folder, ckpt_path, recorder):
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                        weights_only=True)
    except SystemExit as stop:
        raise_if_interrupted(trainer, stop)
        raise
    if trainer.current_epoch < 1 or trainer.global_step < 1:
        raise ConfigError(f"training ran {trainer.current_epoch} epochs ({trainer.global_step} steps): nothing was "
                          "trained, so there is no result to record. Check trainer.max_epochs / max_steps / "
                          "limit_train_batches.")
    ranks = compare_ranks(trainer)
    if ranks is not None and recorder is not None:
        recorder.update(distributed=ranks)
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
        what = ("Ctrl-C" if isinstance(cause, KeyboardInterrupt) else stop_requested()
                or "SIGTERM (or a pre-emption signal)")
        raise RunInterrupted(
            f"stopped by {what} at epoch {trainer.current_epoch}, step {trainer.global_step}; checkpoints/last.ckpt "
            "holds the progress. Run the same command again to continue from there."
        ) from None
