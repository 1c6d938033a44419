"""Packed grid points recorded as single runs: each member of a pack gets the run folder,
record, checkpoints and W&B run it would have had alone.

``kdexp sweep FILE --pack N`` writes its packs to a queue folder and starts ``--jobs``
workers (``python -m kdexp.packed_runs QUEUE``); each takes pack after pack. A pack's
members are composed exactly as Hydra composes a multirun job (the same config, overrides,
folder name and ``.hydra/`` files), each claims its folder as ``kdexp train`` does (a
finished run is skipped or archived, never overwritten), the shared parts (data, teacher,
teacher outputs) are built once, the students train together (:mod:`kdexp.packed`), and
then each member's record, ``best.ckpt``/``last.ckpt`` and W&B run are written.

A member's W&B run is written after the pack has trained: its per-epoch history is replayed
into a run of the same name, config, group, tags and steps as a single run logs, one member
at a time (one active W&B run per process). Records say ``packed: {size, index, members}``
and their ``timings_s`` are the pack's (shared by its members); everything else is what a
single run writes.

Nothing here imports Lightning (4 s of every pack worker's start otherwise): data modules are
plain classes, metrics are :mod:`kdexp.metrics`, seeding is :mod:`kdexp.seeding`, and W&B runs
are written through :class:`kdexp.core.tracking.WandbRun`; only a logger other than kdexp's W&B one
(``logger=csv``, a user's) brings Lightning in, as its logger.

A pack that is killed leaves no ``last.ckpt``: a re-run archives its members' unfinished
folders and trains them again (packs do not resume mid-run; single runs do).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kdexp.core.config import conf_initialized
from kdexp.core.errors import KdexpError, NonFiniteLossError, RunInterrupted
from kdexp.core.records import read_record

log = logging.getLogger("kdexp")


@dataclass
class JobConfig:
    """One grid point as Hydra hands it to a multirun job."""

    full: DictConfig  # with the hydra node (for .hydra/hydra.yaml and ${hydra:...})
    task: DictConfig  # without it: what the task function receives
    output_dir: Path


def job_configs(sweep_dir: Path, jobs: list[list[str]], hydra_overrides: list[str] | None = None) -> list[JobConfig]:
    """Compose each job's config as Hydra's multirun does (master config, then one sweep config per job)."""
    return pack_jobs(load_sweep_jobs(sweep_dir, jobs, hydra_overrides))


def load_sweep_jobs(sweep_dir: Path, jobs: list[list[str]], hydra_overrides: list[str] | None = None
                    ) -> list[DictConfig]:
    """Hydra's own composition of each job (``load_sweep_config`` on the multirun's master config): the
    costly part of :func:`job_configs`, about 0.3 s a job, which a sweep does ahead in a helper process."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    with conf_initialized():
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("train", [f"hydra.sweep.dir={sweep_dir}", *(hydra_overrides or [])],
                                           run_mode=RunMode.MULTIRUN)
        return [loader.load_sweep_config(master, list(overrides)) for overrides in jobs]


def pack_jobs(loaded: list[DictConfig]) -> list[JobConfig]:
    """Composed jobs (:func:`load_sweep_jobs`) as the numbered jobs of one pack, each with its output
    folder and its task config, as Hydra's ``run_job`` sets them up. Takes ownership of ``loaded``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode

    setup_globals()  # Hydra's resolvers (${hydra:...}), as its launchers register them before running jobs
    out = []
    for index, full in enumerate(loaded):
        with open_dict(full):
            full.hydra.job.id = index
            full.hydra.job.num = index
            full.hydra.mode = RunMode.MULTIRUN
        HydraConfig.instance().set_config(full)
        output_dir = Path(str(full.hydra.sweep.dir)) / str(full.hydra.sweep.subdir)
        with read_write(full.hydra.runtime), open_dict(full.hydra.runtime):  # as Hydra's run_job sets it
            full.hydra.runtime.output_dir = str(output_dir.resolve())
        HydraConfig.instance().set_config(full)
        task = copy.deepcopy(full)
        with read_write(task), open_dict(task):
            del task["hydra"]
        out.append(JobConfig(full, task, output_dir.resolve()))
    return out


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


@contextmanager
def as_job(job: JobConfig):
    """Make ``job``'s Hydra config the current one (``${hydra:...}``, HydraConfig.get())."""
    from hydra.core.hydra_config import HydraConfig

    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job.full)
    try:
        yield
    finally:
        if previous is not None:
            HydraConfig.instance().cfg = previous


def claim_members(jobs: list[JobConfig], if_finished: str, resume: bool = True) -> list[Member]:
    """Validate each job and claim its folder as ``kdexp train`` does; returns the members to train.

    A finished run is skipped (or archived, with ``if_finished=rerun``); a killed single run
    with a checkpoint is left for the single-run pass, which resumes it; a config that fails
    validation gets its failed record, as a single run's would.
    """
    from kdexp.core.config import to_plain
    from kdexp.core.errors import ConfigError
    from kdexp.pipeline import base_record, with_runtime
    from kdexp.run_folder import claim_run_folder
    from kdexp.train import AnnouncingRecorder, record_rejected_config, write_hydra_files
    from kdexp.validation import validate_config

    members = []
    for job in jobs:
        with as_job(job):
            cfg = with_runtime(job.task)
            OmegaConf.resolve(cfg)  # ${hydra:...} and the run's paths, while this job's Hydra config is current
            try:
                validate_config(cfg)
            except ConfigError as err:
                record_rejected_config(job.output_dir, cfg, err)
                log.error("kdexp: %s: ConfigError: %s", job.output_dir.name, err)
                continue
            try:
                claim = claim_run_folder(job.output_dir, to_plain(cfg), if_finished, resume)
            except KdexpError as err:  # busy, or finished with if_finished=error
                log.error("kdexp: %s: %s", type(err).__name__, err)
                continue
            if claim.action == "skip":
                log.info("Skipping %s: it already holds a finished run.", job.output_dir)
                continue
            if claim.action == "resume":
                claim.release()
                log.info("%s holds a killed single run: it resumes in the single-run pass.", job.output_dir)
                continue
            write_hydra_files(job.output_dir, job.task)
            members.append(Member(job, cfg, claim, AnnouncingRecorder(job.output_dir, base_record(cfg))))
    return members


def member_checkpoint(snapshot: Any, steps_per_epoch: int, optimizer_state: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """A Lightning-layout checkpoint of one member: ``model.*`` weights, the epoch and global step of
    the snapshot, and the metrics of that epoch. ``last.ckpt`` also holds the member's optimiser state."""
    import torch

    from kdexp.core.records import library_versions

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
    from kdexp.core.vocabulary import TEACHER_TEST_ACC

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
    """Train the grid points ``jobs`` (one packing key, see :func:`kdexp.packed.pack_groups`) together
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
                member.recorder.finish(status, err)
        raise


def _train_members(members: list[Member]) -> None:
    from kdexp.core.config import instantiate, objective_node
    from kdexp.core.errors import ConfigError
    from kdexp.models.zoo import count_parameters
    from kdexp.packed import early_stopping_of, test_pack, train_pack
    from kdexp.pipeline import (apply_num_threads, data_sizes, get_teacher, majority_share, objective_label,
                                require_better_than_chance, run_name_for, student_wandb_config, teacher_fields)
    from kdexp.core.records import PartTimer
    from kdexp.seeding import seed_everything
    from kdexp.teacher_source import get_teacher_outputs
    from kdexp.core.tracking import packages_listed_once

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
    from kdexp.core.files import atomic_torch_save
    from kdexp.pipeline import build_logger, checkpoint_files
    from kdexp.core.tracking import finish_wandb, wandb_run_info
    from kdexp.train import announce_finished

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
        finish_wandb(exit_code=1)
        recorder.finish("failed", NonFiniteLossError(outcome.error))
        log.error("kdexp: %s failed: NonFiniteLossError: %s", record["run_name"], outcome.error)
        return
    recorder.update(metrics=outcome.metrics, epochs=outcome.epochs, global_steps=outcome.epochs * steps_per_epoch,
                    checkpoints=checkpoint_files(folder))
    with recorder.timed("logger_finish"):
        finish_wandb()
    recorder.finish("finished")
    announce_finished(recorder.record, folder)


def logs_to_wandb(cfg: Any) -> bool:
    return bool(cfg.get("logger")) and str(cfg.logger.get("_target_", "")).endswith("wandb_logger")


def import_for_workers(wandb: bool) -> None:
    """Import what every pack worker would otherwise import for itself, once, in the sweep that forks
    them: ``torch._dynamo`` (building a torch optimiser imports it: 1.3 s) and, when runs log to W&B,
    wandb (0.7 s). The sweep does it while its helper composes the grid (:mod:`kdexp.grid_compose`)."""
    import torch._dynamo  # noqa: F401

    if wandb:
        import_wandb()


def import_wandb() -> None:
    """Import what a process's first W&B run imports (wandb, and its launch inputs: 0.7–2 s). A sweep
    does it before it forks its pack workers, so that it is done once, not once per worker."""
    try:
        import wandb  # noqa: F401
        import wandb.sdk.launch.inputs.internal  # noqa: F401 - wandb.init imports it for every first run
    except Exception:  # noqa: BLE001 - the members' own wandb.init imports it, and reports what fails
        log.debug("W&B could not be imported ahead", exc_info=True)


def start_wandb_service() -> None:
    """Start W&B's service process (run in a thread while a pack trains): a process's first W&B run
    otherwise waits seconds for it, after training, before the members' runs can be replayed."""
    try:
        import wandb

        wandb.setup()
    except Exception:  # noqa: BLE001 - the members' own wandb.init then starts it, and reports what fails
        log.debug("W&B's service did not start early", exc_info=True)


# -- the worker a sweep starts ------------------------------------------------------------
PACK_GLOB = "pack-*.json"


def write_queue(queue: Path, packs: list[dict[str, Any]]) -> list[Path]:
    """One JSON file per pack (``sweep_dir``, ``jobs``: each member's overrides, ``if_finished``,
    ``hydra_overrides``), taken by workers in name order."""
    from kdexp.core.files import atomic_write_text

    return [atomic_write_text(queue / f"pack-{i:04d}.json", json.dumps(pack, indent=1), what="pack")
            for i, pack in enumerate(packs)]


def take(path: Path) -> bool:
    """Claim a queued pack for this worker (exactly one worker wins)."""
    try:
        os.close(os.open(path.with_suffix(".taken"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def work(queue: Path, composed: dict[str, list[DictConfig]] | None = None) -> int:
    """Take packs from ``queue`` until none is left; a pack that fails is recorded in its members'
    records and the worker goes on to the next one.

    ``composed``: the members' Hydra configs (:func:`load_sweep_jobs`) by pack file name, composed
    ahead by the sweep that forked this worker; a pack not in it is composed here.
    """
    from kdexp.core.console import ConsoleFormatter, configure_console

    handler = logging.StreamHandler(sys.stderr)  # the same short lines a multirun job prints
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)  # force: a forked worker
    configure_console(False, lightning=False)  # packs train without Lightning
    signal.signal(signal.SIGTERM, _interrupt)  # the sweep stops its workers with SIGTERM: record "interrupted"
    exit_code = 0
    for path in sorted(queue.glob(PACK_GLOB)):
        if not take(path):
            continue
        spec = json.loads(path.read_text())
        ahead = (composed or {}).get(path.name)
        jobs = pack_jobs(ahead) if ahead is not None else \
            job_configs(Path(spec["sweep_dir"]), spec["jobs"], spec.get("hydra_overrides"))
        configure_console(bool(jobs[0].task.get("verbose", False)) if jobs else False, lightning=False)
        log.info("Training a pack of %d students: %s", len(jobs), ", ".join(j.output_dir.name for j in jobs))
        try:
            run_pack(jobs, spec.get("if_finished", "skip"))
        except (KeyboardInterrupt, RunInterrupted):
            log.error("kdexp: interrupted: the pack's members are recorded as interrupted")
            return 130
        except KdexpError as err:
            log.error("kdexp: this pack failed (its members' records say why): %s: %s", type(err).__name__, err)
            exit_code = 1
        except Exception:
            log.exception("kdexp: this pack failed (its members' records say why); the sweep goes on")
            exit_code = 1
    return exit_code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kdexp.packed_runs QUEUE_DIR  (started by kdexp sweep --pack)", file=sys.stderr)
        return 2
    return work(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
