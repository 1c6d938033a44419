"""Packed grid points recorded as single runs: each member of a pack gets the run folder,
record, checkpoints and W&B run it would have had alone.

``kdexp sweep FILE --pack N`` writes its packs to a queue folder and starts ``--jobs``
workers (:mod:`kdexp.grid.workers`); each takes pack after pack. A pack's
members are composed exactly as Hydra composes a multirun job (the same config, overrides,
folder name and ``.hydra/`` files), each claims its folder as ``kdexp train`` does (a
finished run is skipped or archived, never overwritten), the shared parts (data, teacher,
teacher outputs) are built once, the students train together (:mod:`kdexp.grid.pack`), and
then each member's record, ``best.ckpt``/``last.ckpt`` and W&B run are written.

A member's W&B run is written after the pack has trained: its per-epoch history is replayed
into a run of the same name, config, group, tags and steps as a single run logs, one member
at a time (one active W&B run per process). Records say ``packed: {size, index, members}``
and their ``timings_s`` are the pack's (shared by its members); everything else is what a
single run writes.

Nothing here imports Lightning (4 s of every pack worker's start otherwise): data modules are
plain classes, metrics are :mod:`kdexp.run.metrics`, seeding is :mod:`kdexp.run.seeding`, and W&B runs
are written through :class:`kdexp.core.tracking.WandbRun`; only a logger other than kdexp's W&B one
(``logger=csv``, a user's) brings Lightning in, as its logger.

A pack that is killed leaves no ``last.ckpt``: a re-run archives its members' unfinished
folders and trains them again (packs do not resume mid-run; single runs do).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdexp.core.config import instantiate, objective_node
from kdexp.core.errors import ConfigError, KdexpError, NonFiniteLossError, RunInterrupted
from kdexp.core.files import atomic_torch_save
from kdexp.core.records import PartTimer, library_versions, read_record
from kdexp.core.tracking import logs_to_wandb, packages_listed_once, start_wandb_service, wandb_run_info
from kdexp.core.vocabulary import TEACHER_TEST_ACC
from kdexp.grid.compose import JobConfig, as_job
from kdexp.grid.pack import early_stopping_of, test_pack, train_pack
from kdexp.models.zoo import count_parameters
from kdexp.run.lifecycle import announce_finished, build_logger, checkpoint_files, finish_run, open_run, with_runtime
from kdexp.run.seeding import apply_num_threads, seed_everything
from kdexp.run.student import data_sizes, objective_label, run_name_for, student_wandb_config
from kdexp.run.teacher import get_teacher
from kdexp.teachers.quality import majority_share, require_better_than_chance, teacher_fields
from kdexp.teachers.source import get_teacher_outputs

log = logging.getLogger("kdexp")


@dataclass
class Member:
    """One claimed grid point of a pack, from its folder claim to its finished record."""

    job: JobConfig
    cfg: DictConfig  # with runtime facts (choices, overrides, task), fully resolved
    claim: Any
    recorder: Any
    objective: Any = None
    student: Any = None
    wandb_config: dict[str, Any] = field(default_factory=dict)


def claim_members(jobs: list[JobConfig], if_finished: str, resume: bool = True) -> list[Member]:
    """Open each job's run as ``kdexp train`` does (:func:`kdexp.run.lifecycle.open_run`); returns the
    members to train.

    A finished run is skipped (or archived, with ``if_finished=rerun``); a killed single run
    with a checkpoint is left for the single-run pass, which resumes it; a config that fails
    validation gets its failed record, as a single run's would.
    """
    members = []
    for job in jobs:
        with as_job(job):
            cfg = with_runtime(job.task)
            OmegaConf.resolve(cfg)  # ${hydra:...} and the run's paths, while this job's Hydra config is current
            try:
                opened = open_run(cfg, job.output_dir, task_cfg=job.task, if_finished=if_finished, resume=resume,
                                  leave_resumable=True)
            except ConfigError as err:
                log.error("kdexp: %s: ConfigError: %s", job.output_dir.name, err)
                continue
            except KdexpError as err:  # busy, or finished with if_finished=error
                log.error("kdexp: %s: %s", type(err).__name__, err)
                continue
            if opened.recorder is not None:
                members.append(Member(job, cfg, opened.claim, opened.recorder))
    return members


def member_checkpoint(snapshot: Any, steps_per_epoch: int, optimizer_state: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """A Lightning-layout checkpoint of one member: ``model.*`` weights, the epoch and global step of
    the snapshot, and the metrics of that epoch. ``last.ckpt`` also holds the member's optimiser state."""
    import torch

    state = {f"model.{name}": tensor for name, tensor in snapshot.weights.items()}
    state["val_acc_best.max_value"] = torch.tensor(snapshot.metrics["val/acc_best"])
    checkpoint: dict[str, Any] = {
        "epoch": snapshot.epoch, "global_step": (snapshot.epoch + 1) * steps_per_epoch,
        "pytorch-lightning_version": library_versions()["pytorch-lightning"], "state_dict": state,
        "kdexp": {"metrics": dict(snapshot.metrics), "packed": True},
    }
    if optimizer_state is not None:
        checkpoint.update(optimizer_states=[optimizer_state], lr_schedulers=[])
    return checkpoint


def replay_history(logger: Any, outcome: Any, steps_per_epoch: int, teacher_test_acc: float) -> None:
    """Log a member's history as its single run's Lightning logger logs it: the teacher's accuracy at
    step 0, each epoch's ``val/*`` and ``train/*`` at the epoch's last step, the test metrics at the end."""
    logger.log_metrics({TEACHER_TEST_ACC: teacher_test_acc}, step=0)
    for entry in outcome.history:
        step = (entry["epoch"] + 1) * steps_per_epoch - 1
        logger.log_metrics({**entry["val"], "epoch": entry["epoch"]}, step=step)
        logger.log_metrics({**entry["train"], "epoch": entry["epoch"]}, step=step)
    if outcome.error is None:
        metrics = outcome.metrics
        for suffix_last in (True, False):
            test = {k: v for k, v in metrics.items() if k.startswith("test/") and k.endswith("_last") == suffix_last}
            logger.log_metrics({**test, "epoch": outcome.epochs}, step=outcome.epochs * steps_per_epoch)
    logger.save()


def run_pack(jobs: list[JobConfig], if_finished: str = "skip") -> dict[Path, str]:
    """Train the grid points ``jobs`` (one packing key, see :func:`kdexp.grid.pack.pack_groups`) together
    and write each one's run as a single run would. Returns each folder's record status."""
    members = claim_members(jobs, if_finished)
    try:
        if members:
            train_members(members)
    finally:
        for member in members:
            member.claim.release()
    return {job.output_dir: (read_record(job.output_dir) or {}).get("status", "missing") for job in jobs}


def train_members(members: list[Member]) -> None:
    """The shared parts once, the students together, then each member's files; a member whose loss
    goes non-finite fails alone, anything that stops the pack fails (or interrupts) every member."""
    try:
        _train_members(members)
    except BaseException as err:
        status = "interrupted" if isinstance(err, (KeyboardInterrupt, RunInterrupted)) else "failed"
        for member in members:
            if member.recorder.record.get("status") == "running":
                finish_run(member.recorder, status, err)
        raise


def _train_members(members: list[Member]) -> None:
    base = members[0].cfg
    shared = PartTimer()  # the parts the members share: each member's timings_s holds them
    apply_num_threads(base.get("num_threads"))
    names = [m.job.output_dir.name for m in members]
    for index, member in enumerate(members):
        member.recorder.update(packed={"size": len(members), "index": index, "members": names})
    with shared.timed("data"):
        datamodule = instantiate(base.data)
        datamodule.setup()
        fingerprint = datamodule.fingerprint()
    with shared.timed("teacher"):
        teacher = get_teacher(base, datamodule)
    better = require_better_than_chance(teacher, int(base.data.num_classes),
                                        bool(base.teacher.get("allow_untrained", False)),
                                        majority_share(datamodule.splits["test"].y))
    for member in members:
        member.recorder.update(task=datamodule.task, data_fingerprint=fingerprint, data_sizes=data_sizes(datamodule),
                               **teacher_fields(teacher, better))
    for member in members:  # seeded and built in the order run_experiment builds them
        cfg = member.cfg
        seed_everything(int(cfg.seed))
        member.objective = instantiate(objective_node(cfg), what="kd")
        member.student = instantiate(cfg.student)
        job_type = "distill" if member.objective.needs_teacher else "baseline"
        identity = {**member.objective.identity(), "label": objective_label(member.objective, {})}
        parameters = count_parameters(member.student)
        member.recorder.update(job_type=job_type, run_name=run_name_for(cfg, job_type, identity["label"]),
                               parameters=parameters, objective=identity)
    with shared.timed("teacher_outputs"):  # one lookup serves all: packable objectives tap no teacher features
        store, note = get_teacher_outputs(base, datamodule, teacher, 0, members[0].objective)
    if store is None:
        raise ConfigError(f"packed training reads the teacher's cached outputs, but these runs' come from the "
                          f"online teacher ({note.get('reason')}); run these points without --pack.")
    for member in members:
        member.recorder.update(teacher_outputs=note)
        member.wandb_config = student_wandb_config(member.cfg, member.recorder.record, teacher)
    logits = {split: store.splits[split].logits for split in ("train", "val", "test")}
    students = [m.student for m in members]
    if logs_to_wandb(base):
        threading.Thread(target=start_wandb_service, name="kdexp-wandb-service", daemon=True).start()
    with shared.timed("fit"):
        fit = train_pack(students, shuffle_seeds=[int(m.cfg.data.shuffle_seed) for m in members],
                         objectives=[m.objective for m in members], datamodule=datamodule, teacher_logits=logits,
                         optimizer_factory=instantiate(base.optimizer), max_epochs=int(base.trainer.max_epochs),
                         num_classes=int(base.data.num_classes), early_stopping=early_stopping_of(base),
                         progress=bool(base.trainer.get("enable_progress_bar")))
    with shared.timed("test"):
        test_pack(fit, students, datamodule, logits, int(base.data.num_classes), teacher.test_acc)

    with packages_listed_once():  # the members' W&B runs, one after another
        for member, outcome in zip(members, fit.outcomes):
            write_member(member, outcome, fit.steps_per_epoch, shared.seconds, teacher.test_acc)


def write_member(member: Member, outcome: Any, steps_per_epoch: int, shared_seconds: dict[str, float],
                 teacher_test_acc: float) -> None:
    """A trained member's checkpoints, W&B run (its history replayed) and finished (or failed) record."""
    recorder = member.recorder
    folder = member.job.output_dir
    recorder.timer.seconds.update(shared_seconds)
    if outcome.error is None:
        atomic_torch_save(folder / "checkpoints" / "best.ckpt", member_checkpoint(outcome.best, steps_per_epoch))
        atomic_torch_save(folder / "checkpoints" / "last.ckpt",
                          member_checkpoint(outcome.last, steps_per_epoch, outcome.optimizer_state))
    record = recorder.record
    with recorder.timed("logger_start"):
        logger = build_logger(member.cfg, folder, record["run_name"], record["job_type"], member.wandb_config,
                              objective_name=member.objective.name, lightning=False)
    recorder.update(wandb=wandb_run_info(logger))
    if logger is not None:
        replay_history(logger, outcome, steps_per_epoch, teacher_test_acc)
    if outcome.error is not None:
        finish_run(recorder, "failed", NonFiniteLossError(outcome.error))
        log.error("kdexp: %s failed: NonFiniteLossError: %s", record["run_name"], outcome.error)
        return
    recorder.update(metrics=outcome.metrics, epochs=outcome.epochs, global_steps=outcome.epochs * steps_per_epoch,
                    checkpoints=checkpoint_files(folder))
    finish_run(recorder, "finished")
    announce_finished(recorder.record, folder)
