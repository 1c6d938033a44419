"""The life of one run, whoever trains it: a single ``kdexp train``, a packed member, a chain stage, a
teacher trained for a student.

:func:`open_run` takes a run from its config to an open record: is the point this process's to train
(a ``--pack`` sweep's multirun leaves packed points alone), is the config valid (a rejected one leaves a
``failed`` record in a fresh folder only), claim the folder (one writer; a finished run is skipped or
archived, a killed one resumed), write ``.hydra/``, open the record. :func:`recorded` closes the record
and its W&B run however the training ends, and :func:`announce_finished` prints the result line.
:func:`run_in_folder` is the three in a row. Nothing here imports Lightning: pack workers use it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

from omegaconf import DictConfig, OmegaConf

from kdexp.core.agent import under_agent
from kdexp.core.config import choice, choices, instantiate, to_plain
from kdexp.core.errors import ConfigError, KdexpError, RunInterrupted
from kdexp.core.files import atomic_write_text
from kdexp.core.records import RECORD_NAME, SELECTION_ENV, RunRecorder, read_record, slurm_fields, sweep_fields
from kdexp.core.tasks import AUTO, task_of
from kdexp.core.tracking import finish_wandb, logs_to_wandb, wandb_group, wandb_run_config
from kdexp.core.vocabulary import TEACHER_TEST_ACC, TEST_ACC, TEST_ACC_LAST
from kdexp.run.folder import Claim, claim_run_folder, lock_folder
from kdexp.run.validation import validate_config

log = logging.getLogger("kdexp")


# -- opening a run -----------------------------------------------------------------
def selected(overrides: list[str]) -> bool:
    """False in a multirun job whose grid point a ``kdexp sweep --pack`` trains in a pack instead
    (the sweep lists the points left to its multirun in the file ``$KDEXP_SWEEP_SELECTION``)."""
    path = os.environ.get(SELECTION_ENV)
    if not path:
        return True
    chosen = {tuple(point) for point in json.loads(Path(path).read_text())}
    return tuple(sorted(overrides)) in chosen


@dataclass
class OpenedRun:
    """What :func:`open_run` made of a run folder. ``action``: ``start`` or ``resume`` (``recorder`` is
    open and the folder is this process's until :meth:`release`), ``skip`` (a finished run: ``previous``
    is its record), ``left`` (a killed run left to a single run to resume) or ``unselected``."""

    action: str
    folder: Path
    recorder: RunRecorder | None = None
    claim: Claim | None = None
    previous: dict[str, Any] | None = None

    @property
    def resume_from(self) -> Path | None:
        """The ``last.ckpt`` a resumed run continues from."""
        return self.claim.checkpoint if self.claim is not None and self.action == "resume" else None

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()


def open_run(cfg: DictConfig, folder: Path, *, task_cfg: DictConfig | None = None, if_finished: str = "skip",
             resume: bool = True, claim: bool = True, validate: bool = True, leave_resumable: bool = False,
             announce: bool = True, base: dict[str, Any] | None = None,
             held: Callable[[], ContextManager[Any]] = contextlib.nullcontext, start_message: str | None = None,
             ) -> OpenedRun:
    """Take the run ``cfg`` (with runtime facts, see :func:`with_runtime`) to an open record in ``folder``.

    ``task_cfg``: the config Hydra handed the task, written to ``.hydra/``. ``claim=False``: the caller
    already owns the folder (a teacher under its cache lock). ``leave_resumable``: a killed run is left for
    a single run to resume (a pack does not resume). ``announce``: the console says what trains and what
    is skipped. ``held``: a context kept around the checks and the claim (the Hydra entry point keeps the
    run's log file closed until the folder is its own). Raises :class:`ConfigError` for an invalid config
    and :class:`KdexpError` for a folder that cannot be claimed.
    """
    # A Hydra job (one with a task config) of a `--pack` sweep's multirun whose point a pack trains:
    # hands off, not even a log line in its folder. A stage or a teacher is always its student's to train.
    if task_cfg is not None and not selected(list(cfg.get("overrides") or [])):
        return OpenedRun("unselected", folder, previous=read_record(folder) or {})
    taken: Claim | None = None
    if claim:
        with held():
            if validate:
                try:
                    validate_config(cfg)
                except ConfigError as err:
                    record_rejected_config(folder, cfg, err)
                    raise
            taken = claim_run_folder(folder, to_plain(cfg), if_finished, resume)
            if taken.action == "skip":  # said while the log file is held back: a finished folder is never written
                taken.release()
                if announce:
                    log.info("Skipping %s: it already holds a finished run.", folder)
                return OpenedRun("skip", folder, previous=taken.previous)
        if taken.action == "resume" and leave_resumable:
            taken.release()
            log.info("%s holds a killed single run: it resumes in the single-run pass.", folder)
            return OpenedRun("left", folder, previous=taken.previous)
    try:
        if task_cfg is not None:
            write_hydra_files(folder, task_cfg)
        if start_message:
            log.info(start_message)
        resumes = taken.previous if taken is not None and taken.action == "resume" else None
        recorder = (AnnouncingRecorder if announce else RunRecorder)(folder, base or base_record(cfg), resumes=resumes)
    except BaseException:
        if taken is not None:
            taken.release()
        raise
    return OpenedRun(taken.action if taken is not None else "start", folder, recorder, taken, taken and taken.previous)


def run_in_folder(cfg: DictConfig, folder: Path, train: Callable[[RunRecorder, Path | None], object],
                  announce: bool = True, **open_options: Any) -> dict[str, Any]:
    """:func:`open_run`, then ``train(recorder, resume_from)`` inside :func:`recorded`, then the result
    line (with ``announce``). Returns the run's record (a skipped run's earlier one; ``{}`` for an
    unselected point)."""
    opened = open_run(cfg, folder, announce=announce, **open_options)
    if opened.recorder is None:
        if opened.action == "skip" and under_agent():
            result_to_agent_run(cfg, opened.previous or {})
        return opened.previous or {}
    try:
        with recorded(opened.recorder) as recorder:
            train(recorder, opened.resume_from)
    finally:
        opened.release()
    if announce:
        announce_finished(recorder.record, folder)
    return recorder.record


# -- what a run's config and record start with -----------------------------------------
def with_runtime(cfg: DictConfig) -> DictConfig:
    """Copy Hydra's runtime facts (group choices, overrides) into the config as plain keys."""
    from hydra.core.hydra_config import HydraConfig

    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        cfg.choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") and v is not None}
        cfg.overrides = list(hc.overrides.task)
    if cfg.get("task", AUTO) == AUTO and "_target_" in cfg.get("data", {}):
        cfg.task = task_of(cfg).name  # records and W&B state the task itself, not "auto"
    return cfg


def base_record(cfg: DictConfig) -> dict[str, Any]:
    """What a record knows before the run starts."""
    return {"config": to_plain(cfg), "choices": choices(cfg), "overrides": list(cfg.get("overrides") or []),
            "seed": cfg.get("seed"), **sweep_fields(), **slurm_fields()}


def write_hydra_files(output_dir: Path, cfg: DictConfig) -> None:
    """``.hydra/{config,hydra,overrides}.yaml`` as Hydra writes them, once the folder is ours."""
    from hydra.core.hydra_config import HydraConfig

    folder = output_dir / ".hydra"
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg), what="Hydra config")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}), what="Hydra config")
        atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(list(hydra_cfg.overrides.task)),
                          what="Hydra config")


def record_rejected_config(output_dir: Path, cfg: DictConfig, err: ConfigError) -> None:
    """Leave a ``failed`` record for a config rejected before it started, in a fresh folder only.

    A folder that holds anything of an earlier run (finished, resumable, or busy) is
    left exactly as it is: a bad value on the command line must not cost a result.
    """
    if output_dir.exists() and any(output_dir.iterdir()):
        return
    try:
        lock = lock_folder(output_dir)
    except KdexpError:
        return
    try:
        RunRecorder(output_dir, base_record(cfg)).finish("failed", err)
    finally:
        lock.release()


class AnnouncingRecorder(RunRecorder):
    """The run's recorder; it also says on the console what is being trained, once the run has a name.

    The name (``distill-mlp128-hinton-T4-a0.9-s1``) is known only inside the experiment,
    after the teacher is ready and the objective is built; it reaches the record here.
    """

    _announced = False

    def update(self, **fields: Any) -> None:
        super().update(**fields)
        if "run_name" in fields and not self._announced:
            self._announced = True
            resumed = " (resumed)" if self.record.get("resumed") else ""
            log.info("Training %s%s → %s", fields["run_name"], resumed, self.folder)


# -- the run's W&B run and files ------------------------------------------------------
def build_logger(cfg: DictConfig, save_dir: Path, run_name: str, job_type: str, config: dict[str, Any],
                 run_id: str | None = None, objective_name: str = "ce", lightning: bool = True) -> Any:
    """The configured experiment logger, a Lightning ``Logger`` (``logger=none`` gives None); ``run_id``
    continues that W&B run. ``lightning=False``: kdexp's W&B logger gives its run as a
    :class:`~kdexp.core.tracking.WandbRun`, without importing Lightning (other loggers are Lightning's).

    Tags name the objective actually used (``objective_name``), not the ``kd`` option it
    was composed from: a plug-in set with ``kd._target_=...`` is tagged as itself.
    """
    if not cfg.get("logger"):
        return None
    group = wandb_group(cfg.get("group"), choices(cfg))
    factory = instantiate(cfg.logger)
    extra: dict[str, Any] = {}
    if "tags" in cfg.logger:  # automatic tags plus the user's (top-level `tags` and `logger.tags`)
        extra["tags"] = [choice(cfg, "data"), objective_name, choice(cfg, "student"), job_type,
                         *cfg.get("tags", []), *cfg.logger.tags]
    if run_id:
        extra["run_id"] = run_id
    if not lightning and cfg.logger.get("_target_") == "kdexp.core.tracking.wandb_logger":
        extra["lightning"] = False
    return factory(save_dir=save_dir, run_name=run_name, job_type=job_type, group=group, config=config, **extra)


def result_to_agent_run(cfg: DictConfig, record: dict[str, Any]) -> None:
    """Give the run ``wandb agent`` started for a point that was already finished (and is skipped) that
    run's config and final metrics, so W&B's sweep holds every point's result (a bayes search learns it).
    Its W&B files go to the agent's folder (``WANDB_DIR``), never into the finished run's."""
    if record.get("status") != "finished" or not logs_to_wandb(cfg):
        return
    teacher = record.get("teacher") or {}
    config = wandb_run_config(record.get("config") or {}, job_type=record.get("job_type"),
                              teacher_hash=teacher.get("hash"), teacher_test_acc=teacher.get("test_acc"),
                              data_fingerprint=record.get("data_fingerprint"),
                              student_parameters=record.get("parameters"), output_dir=record.get("output_dir"),
                              objective=record.get("objective"))
    save_dir = Path(os.environ.get("WANDB_DIR") or ".")
    logger = build_logger(cfg, save_dir, str(record.get("run_name") or "kdexp"), str(record.get("job_type")),
                          config, objective_name=str((record.get("objective") or {}).get("name") or "ce"),
                          lightning=False)
    logger.experiment.summary.update(record.get("metrics") or {})
    run_id = logger.experiment.id
    finish_wandb()
    log.info("W&B: the agent's run %s holds this finished run's result.", run_id)


def earlier_wandb_run(previous: dict[str, Any], record: dict[str, Any], resume_from: Path | None
                      ) -> dict[str, Any] | None:
    """The W&B run that holds a resumed run's earlier epochs, when the resumed part logs to none
    (``logger=csv`` or ``none``): still this run's, so the record keeps pointing at it, and says that
    its history ends where this continuation began (``history_until``)."""
    if resume_from is None or not previous.get("id"):
        return None
    return {**previous, "history_until": previous.get("history_until") or record["resumed"][-1]["at"]}


def checkpoint_files(output_dir: Path) -> dict[str, str | None]:
    """The run's checkpoint files (``best``: best val/acc; ``last``: the last finished epoch)."""
    folder = output_dir / "checkpoints"
    return {name: str(folder / f"{name}.ckpt") if (folder / f"{name}.ckpt").is_file() else None
            for name in ("best", "last")}


# -- closing a run, however it ends ---------------------------------------------------
def finish_run(recorder: RunRecorder, status: str, error: BaseException | None = None) -> None:
    """Close the run's W&B run (first: the record then states what W&B did) and its record."""
    if status == "finished":
        with recorder.timed("logger_finish"):
            finish_wandb()
    else:
        finish_wandb(exit_code=1)
    recorder.finish(status, error)


def _interrupt_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM outside Lightning (making the data or a teacher's outputs): stop as Ctrl-C does.

    While Lightning fits or tests, its own handler runs first and then calls this one, the handler it
    found: Lightning stops after the batch and saves ``last.ckpt``, so this one leaves the stop to it.
    """
    if signal.getsignal(signal.SIGTERM) is _interrupt_on_sigterm:
        raise RunInterrupted("stopped by SIGTERM outside training (while the data, the teacher or its outputs "
                             "were prepared). Run the same command again: it continues from checkpoints/last.ckpt "
                             "when there is one, and starts afresh otherwise.")


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`RunInterrupted` (whose record then says interrupted)
    instead of killing the process with its record left ``running``. A handler installed before
    (submitit's, a pack worker's) stays in charge, as it does in a fit."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, _interrupt_on_sigterm):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def recorded(recorder: RunRecorder) -> Iterator[RunRecorder]:
    """Close the run's record and its W&B run however the block ends.

    A clean exit marks both finished; Ctrl-C or a stop signal (SIGTERM outside a fit too, see
    :func:`sigterm_interrupts`) marks the record ``interrupted`` (a later run of the same command
    resumes it); any other exception marks it failed. The error is kept in the record and propagates.
    """
    with sigterm_interrupts():
        try:
            yield recorder
        except (KeyboardInterrupt, RunInterrupted) as err:
            finish_run(recorder, "interrupted", err)
            raise
        except BaseException as err:
            finish_run(recorder, "failed", err)
            raise
        finish_run(recorder, "finished")


def announce_finished(record: dict[str, Any], output_dir: Path) -> None:
    """The result line of a finished run: its test accuracies, the teacher's, and where the record is."""
    metrics = record["metrics"]
    wandb_url = (record.get("wandb") or {}).get("url")  # online runs only
    log.info(
        "%s finished: test/acc %.4f (last epoch %.4f), teacher %.4f, agreement %s | record: %s%s",
        record["run_name"], metrics[TEST_ACC], metrics[TEST_ACC_LAST], metrics[TEACHER_TEST_ACC],
        f"{metrics['test/agreement']:.4f}" if "test/agreement" in metrics else "n/a",
        output_dir / RECORD_NAME, f" | W&B: {wandb_url}" if wandb_url else "",
    )
