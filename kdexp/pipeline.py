"""One experiment, start to finish: data, teacher, student, fit, test, record.

``kdexp.train`` is the thin Hydra entry point; the steps live here so they can be
read top to bottom and reused (e.g. to train a teacher inside a student run).
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdexp.chain import (assistant_config, chain_of, lineage_entry, route_of, route_tag, stage_file,
                          stage_key, stage_lineage)
from kdexp.core.config import choice, choices, instantiate, objective_node, to_plain
from kdexp.data.base import InMemoryDataModule
from kdexp.data.batches import IndexBatches
from kdexp.core.errors import CheckpointError, ConfigError, RunInterrupted
from kdexp.core.files import storage_error
from kdexp.models.ensemble import TeacherEnsemble
from kdexp.models.zoo import count_parameters
from kdexp.objectives.base import UNLABELLED, DistillationObjective
from kdexp.core.records import RunRecorder, read_record, sweep_fields
from kdexp.run_folder import claim_run_folder
from kdexp.schedules import Schedule
from kdexp.seeding import seed_everything
from kdexp.core.tasks import AUTO, task_of
from kdexp.teacher import (INIT_FILE_ROLE, CheckpointRole, Teacher, load_teacher_weights, provision_teacher,
                           teacher_cache_key, weights_hash)
from kdexp.teacher_source import get_teacher_outputs, read_predictions, teacher_of_predictions
from kdexp.core.tracking import finish_wandb, wandb_run_config, wandb_run_info
from kdexp.core.vocabulary import TEACHER_TEST_ACC, TEST_ACC, VAL_ACC_BEST, teacher_metric

log = logging.getLogger(__name__)


# -- small builders ------------------------------------------------------------------
@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: IndexBatches) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode, restored after) on ``batches``: per sample, or
    per labelled position for a language model's (B, L) targets."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y, _ in batches:
        valid = y != UNLABELLED
        correct += int(((model(x).argmax(-1) == y) & valid).sum())
        total += int(valid.sum())
    model.train(was_training)
    return correct / max(total, 1)


@torch.no_grad()
def teacher_reference_metrics(teacher: Teacher, datamodule: InMemoryDataModule) -> dict[str, float]:
    """A language-model teacher's test nll, bpb and ppl as ``teacher/test_nll`` etc.: the teacher's
    reference row of a report on those metrics, measured on the student's test split. Empty for
    classifiers (their tables compare accuracies: ``teacher/test_acc``) and for a teacher known only
    from a predictions file."""
    if teacher.model is None or datamodule.task != "causal_lm":
        return {}
    from kdexp.metrics import EvalMetrics

    was_training = teacher.model.training
    teacher.model.eval()
    metrics = EvalMetrics(int(datamodule.num_classes))
    for x, y, _ in datamodule.eval_batches("test"):
        metrics.update(teacher.model(x), y)
    teacher.model.train(was_training)
    return {teacher_metric(f"test/{name}"): float(value) for name, value in metrics.compute().items()
            if name in ("nll", "bpb", "ppl")}


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
    group = cfg.get("group") or f"{choice(cfg, 'data')}-{choice(cfg, 'teacher')}"
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


def checkpoint_files(output_dir: Path) -> dict[str, str | None]:
    """The run's checkpoint files (``best``: best val/acc; ``last``: the last finished epoch)."""
    folder = output_dir / "checkpoints"
    return {name: str(folder / f"{name}.ckpt") if (folder / f"{name}.ckpt").is_file() else None
            for name in ("best", "last")}


def apply_num_threads(num_threads: int | None) -> None:
    """Pin torch's CPU threads (null keeps torch's default of one per core)."""
    if num_threads is None:
        return
    if int(num_threads) < 1:
        raise ConfigError(f"num_threads must be >= 1 or null, got {num_threads}.")
    torch.set_num_threads(int(num_threads))


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
            recorder.finish("interrupted", err)
            finish_wandb(exit_code=1)
            raise
        except BaseException as err:
            recorder.finish("failed", err)
            finish_wandb(exit_code=1)
            raise
        with recorder.timed("logger_finish"):
            finish_wandb()
        recorder.finish("finished")


# -- the teacher -------------------------------------------------------------------
def trained_teacher_key(cfg: DictConfig) -> str:
    """The cache key of a teacher trained here: its recipe (with the weights it starts from when it
    fine-tunes a pretrained model), the data and the trainer settings."""
    # num_threads changes summation order, hence the trained weights: part of the key.
    trainer_settings = {**to_plain(cfg.trainer), "num_threads": cfg.get("num_threads")}
    recipe = to_plain(cfg.teacher)
    pretrained = cfg.teacher.model.get("pretrained")
    if pretrained:  # a pretrained model replaced in place is another starting point
        from kdexp.models.hf import pretrained_identity

        recipe["pretrained_weights"] = pretrained_identity(str(pretrained), cfg.teacher.model.get("revision"))
    return teacher_cache_key(recipe, to_plain(cfg.data), trainer_settings)


def root_teacher_key(cfg: DictConfig) -> str:
    """The cache key of the run's (root) teacher: its recipe, data and trainer settings."""
    key = trained_teacher_key(cfg)
    checkpoint = cfg.teacher.get("checkpoint")
    return hashlib.sha256(f"{key}:{checkpoint}".encode()).hexdigest()[:16] if checkpoint else key


def teacher_key(cfg: DictConfig) -> str:
    """The key of whatever teaches ``cfg``'s student: the root teacher, or the last assistant of its chain."""
    if not chain_of(cfg):
        return root_teacher_key(cfg)
    stage = assistant_config(cfg)
    return stage_key(stage, teacher_key(stage))


def get_teacher(cfg: DictConfig, test_data: InMemoryDataModule) -> Teacher:
    """Load ``teacher.checkpoint`` or train-once-and-cache (see :mod:`kdexp.teacher`); with a
    ``chain``, the last assistant of the chain (trained first if needed, see :mod:`kdexp.chain`).

    ``test_data`` (the run's data) measures a loaded checkpoint's test accuracy.
    """
    if chain_of(cfg):
        return get_assistant(cfg, test_data)
    tcfg = cfg.teacher
    num_classes = int(cfg.data.num_classes)

    def build_model() -> nn.Module:
        seed_everything(int(tcfg.seed))
        return instantiate(tcfg.model)

    def evaluate(model: nn.Module) -> float:
        return evaluate_accuracy(model, test_data.eval_batches("test"))

    def train(model: nn.Module, folder: Path) -> float:
        return train_teacher(cfg, model, folder)

    pretrained = tcfg.model.get("pretrained")
    if pretrained and int(tcfg.max_epochs) == 0 and not tcfg.get("checkpoint"):  # used as it is: nothing to cache
        model = build_model().eval()
        teacher = Teacher(model, weights_hash(model), evaluate(model), "pretrained", str(pretrained))
    else:
        teacher = provision_teacher(build_model, tcfg.get("checkpoint"), num_classes,
                                    Path(cfg.paths.cache_dir) / "teachers", trained_teacher_key(cfg),
                                    train=train, evaluate=evaluate)
    recipe = "checkpoint" if tcfg.get("checkpoint") else "pretrained" if teacher.source == "pretrained" else "ce"
    teacher.lineage = [lineage_entry(0, choice(cfg, "teacher"), tcfg.model.get("width"), recipe,
                                     teacher.weights_hash, teacher.test_acc, teacher.path)]
    return teacher


def get_assistant(cfg: DictConfig, datamodule: InMemoryDataModule) -> Teacher:
    """The chain's last assistant as a frozen teacher, trained first (as an ordinary run) if needed.

    The stage's run folder is ``<cache>/stages/<key>``; a lock makes one process train
    it while others wait. A finished stage is reused; an interrupted one resumes. Its
    files are read where the cache is now (a moved or copied cache reads its own).
    """
    stage_cfg = assistant_config(cfg)
    key, folder, record = trained_stage(stage_cfg)
    best = stage_file(record, folder, "best")
    if record.get("status") != "finished" or best is None:
        raise CheckpointError(f"chain stage {folder} did not finish (status {record.get('status')}); see its "
                              f"record {folder / 'run_record.json'}.")
    role = CheckpointRole(
        "cached chain stage checkpoint", "teacher",
        f"The stage's record says it finished, so the cache (paths.cache_dir, KDEXP_CACHE_DIR) was moved or copied "
        f"without its files, or damaged. Delete {folder} to train this stage again, or point KDEXP_CACHE_DIR at the "
        "complete cache",
        f"The file was changed after the stage wrote it: delete {folder} to train this stage again")
    model = load_teacher_weights(instantiate(stage_cfg.student, what="chain stage"), best,
                                 int(cfg.data.num_classes), role)
    test_acc = evaluate_accuracy(model, datamodule.eval_batches("test"))
    digest = weights_hash(model)
    earlier = stage_lineage(record, folder)
    lineage = [*earlier, lineage_entry(len(earlier), choice(stage_cfg, "student"), stage_cfg.student.get("width"),
                                       (record.get("objective") or {}).get("label", "?"), digest, test_acc, str(best))]
    log.info("Chain stage %s (width %s, test acc %.4f) is the teacher", folder, stage_cfg.student.get("width"), test_acc)
    return Teacher(model.eval(), digest, test_acc, "stage", str(best), key, lineage)


def trained_stage(stage_cfg: DictConfig) -> tuple[str, Path, dict[str, Any]]:
    """The key, folder and record of the chain stage that ``stage_cfg`` runs, trained now if it has not
    finished; the stages before it are trained first, so stages train and are announced in order."""
    key = stage_key(stage_cfg, teacher_key(stage_cfg))
    folder = Path(stage_cfg.paths.cache_dir) / "stages" / key
    if chain_of(stage_cfg) and (read_record(folder) or {}).get("status") != "finished":
        trained_stage(assistant_config(stage_cfg))  # its teacher, an earlier stage
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder.parent / f"{key}.lock"))
        lock.acquire()
    except OSError as err:
        raise storage_error(err, folder.parent, "chain stage folder") from err
    try:
        record = read_record(folder)
        if not record or record.get("status") != "finished":
            train_stage(stage_cfg, folder)
            record = read_record(folder) or {}
    finally:
        lock.release()
    return key, folder, record


def train_stage(stage_cfg: DictConfig, folder: Path) -> None:
    """Run one assistant of a chain as an ordinary run in ``folder`` (resuming an interrupted one)."""
    stage_cfg = stage_cfg.copy()
    OmegaConf.set_struct(stage_cfg, False)
    stage_cfg.paths.output_dir = str(folder)
    claim = claim_run_folder(folder, to_plain(stage_cfg), "skip", True)
    if claim.action == "skip":
        return
    try:
        resumes = claim.previous if claim.action == "resume" else None
        log.info("Training chain stage %d (%s%s) in %s", len(chain_of(stage_cfg)) + 1, choice(stage_cfg, "student"),
                 stage_cfg.student.get("width"), folder)
        with recorded(RunRecorder(folder, base_record(stage_cfg), resumes=resumes)) as recorder:
            run_experiment(stage_cfg, recorder, resume_from=claim.checkpoint)
    finally:
        claim.release()


def get_teachers(cfg: DictConfig, datamodule: InMemoryDataModule) -> tuple[Teacher, list[Teacher]]:
    """The run's teacher, and, with extra ``teachers`` listed, the ensemble of all of them.

    Each member is provisioned like a single teacher (its own checkpoint or cache key,
    trained once); the returned teacher is the ensemble, identified by the hash of its
    members' hashes, with the ensemble's (averaged-probability) test accuracy.
    """
    first = get_teacher(cfg, datamodule)
    extra = list(cfg.get("teachers") or [])
    if not extra:
        return first, []
    members = [first]
    for node in extra:
        member_cfg = cfg.copy()
        OmegaConf.set_struct(member_cfg, False)
        member_cfg.teacher = OmegaConf.create(to_plain(node))  # resolved first: ${teacher.*} means the run's teacher
        members.append(get_teacher(member_cfg, datamodule))
    ensemble = TeacherEnsemble([m.model for m in members]).eval()
    digest = hashlib.sha256("+".join(m.weights_hash for m in members).encode()).hexdigest()[:16]
    test_acc = evaluate_accuracy(ensemble, datamodule.eval_batches("test"))
    lineage = [lineage_entry(0, "ensemble", len(members), "ensemble", digest, test_acc)]
    return Teacher(ensemble, digest, test_acc, "ensemble", ", ".join(m.path for m in members), lineage=lineage), members


def train_teacher(cfg: DictConfig, model: nn.Module, folder: Path) -> float:
    """Train ``model`` in place as the teacher; its own record and W&B run go to ``folder``."""
    tcfg = cfg.teacher
    recorder = RunRecorder(folder, {"job_type": "teacher", "config": to_plain(cfg.teacher), "data": to_plain(cfg.data),
                                    "choices": choices(cfg)})
    with recorded(recorder):
        # The labelled training set only: a student's transfer set is the student's, never the teacher's.
        no_transfer = {"transfer_set": None} if "transfer_set" in cfg.data else {}
        datamodule: InMemoryDataModule = instantiate(cfg.data, shuffle_seed=int(tcfg.seed), **no_transfer)
        fingerprint = datamodule.fingerprint()
        # The teacher's own recipe: its optimizer and, optionally, its lr scheduler (CRD's steps).
        scheduler = instantiate(tcfg.scheduler, what="teacher.scheduler") if tcfg.get("scheduler") else None
        from kdexp.fitting import build_trainer, fit_and_test
        from kdexp.modules import SupervisedModule

        module = SupervisedModule(model, optimizer=instantiate(tcfg.optimizer), num_classes=int(cfg.data.num_classes),
                                  scheduler=scheduler)
        run_name = f"teacher-{choice(cfg, 'teacher')}{tcfg.model.get('width', '')}-{folder.name[:8]}"
        config = {"teacher": to_plain(tcfg), "data": to_plain(cfg.data), "data_fingerprint": fingerprint}
        logger = build_logger(cfg, folder, run_name, "teacher", config)
        trainer = build_trainer(cfg, folder, logger, max_epochs=int(tcfg.max_epochs))
        metrics = fit_and_test(trainer, module, datamodule)  # leaves the best-val weights in `model`
        recorder.update(metrics=metrics, data_fingerprint=fingerprint, parameters=count_parameters(model))
    log.info("Teacher trained: test/acc %.4f (best val %.4f)", metrics[TEST_ACC], metrics.get(VAL_ACC_BEST, float("nan")))
    return float(metrics[TEST_ACC])


# -- a student run -----------------------------------------------------------------
def majority_share(targets: torch.Tensor) -> float:
    """The accuracy of always predicting the most frequent labelled target (the next-token task's
    most common byte, an imbalanced data set's largest class)."""
    labelled = targets[targets != UNLABELLED]
    return float(torch.bincount(labelled).max()) / max(len(labelled), 1) if len(labelled) else 0.0


def require_better_than_chance(teacher: Teacher, num_classes: int, allowed: bool, majority: float = 0.0) -> bool:
    """Refuse to distil from a teacher that scores no better than guessing (an untrained or broken file).

    Guessing is 1/C, or always answering the most frequent target (``majority``): a random
    language model that happens to predict the space character everywhere is no teacher.
    A record must not call a run "distilled" when there was nothing to distil; a
    random-teacher control is still possible, on purpose, with ``+teacher.allow_untrained=true``
    (``debug=fast`` sets it: its one-epoch teachers check that things run). Returns whether the
    teacher beat chance, for the record (``teacher.better_than_chance``).
    """
    chance = 1.0 / num_classes
    better = teacher.test_acc >= max(1.5 * chance, majority + 0.01)
    if not better and allowed:
        log.warning("The teacher scores %.1f %% on the test set, no better than chance (always answering the most "
                    "frequent target scores %.1f %%); distilling from it anyway (teacher.allow_untrained=true): "
                    "this run's record says teacher.better_than_chance: false.", 100 * teacher.test_acc,
                    100 * max(chance, majority))
    if not better and not allowed:
        raise CheckpointError(
            f"the teacher ({teacher.source}: {teacher.path}) scores {100 * teacher.test_acc:.1f} % on the test set, "
            f"no better than chance ({100 * chance:.1f} % for {num_classes} classes; always answering the most "
            f"frequent target scores {100 * majority:.1f} %): it looks untrained or broken. Check "
            "teacher.checkpoint (or teacher.max_epochs), or pass +teacher.allow_untrained=true for a deliberate "
            "random-teacher control."
        )
    return better


def same_as_before(before: str | None, now: str, what: str) -> None:
    """A resumed run continues only with the data and teacher it started with: never a mix of two."""
    if before is not None and before != now:
        raise ConfigError(
            f"this run is being resumed, but its {what} is {now} now and was {before} when it started (a cache "
            "was cleared or another machine kind retrained it). Rerun with resume=false to archive the unfinished "
            "run and start afresh."
        )


def build_schedules(cfg: DictConfig) -> dict[str, Schedule]:
    """``schedule.<setting>`` nodes → ``{setting: Schedule}`` (empty for ``schedule=none``)."""
    nodes = cfg.get("schedule") or {}
    return {str(name): instantiate(node, what=f"schedule.{name}") for name, node in nodes.items() if node}


def objective_label(objective: DistillationObjective, schedules: dict[str, Schedule]) -> str:
    """The objective's own label plus its schedules: ``hinton-T4-a0.9-alpha~lin0-0.9e20``."""
    return "-".join([objective.describe(), *(f"{name}~{s.describe()}" for name, s in schedules.items())])


def init_student(cfg: DictConfig, student: nn.Module) -> dict[str, Any] | None:
    """Start the student from ``init_from`` (a kdexp run's checkpoint, or a state dict) when given.

    This is the "fine-tune after distillation" stage: ``kd=none init_from=<distilled run>/checkpoints/best.ckpt``.
    Returns what the record states about it (path, weights hash as loaded, the source run's record).
    """
    path = cfg.get("init_from")
    if not path:
        return None
    load_teacher_weights(student, path, int(cfg.data.num_classes), INIT_FILE_ROLE)
    source = read_record(Path(path).resolve().parent.parent) or {}
    return {"path": str(Path(path).resolve()), "hash": weights_hash(student),
            "run": source.get("run_name"), "objective": (source.get("objective") or {}).get("label")}


def run_name_for(cfg: DictConfig, job_type: str, objective_label: str) -> str:
    """``distill-mlp16-hinton-T4-a0.9-s1``; through a chain, the route too: ``distill-mlp16-via48-32-hinton-…``."""
    width = cfg.student.get("width", "")
    route = f"{route_tag(cfg)}-" if route_tag(cfg) else ""
    return f"{job_type}-{choice(cfg, 'student')}{width}-{route}{objective_label}-s{cfg.seed}"  # finetune-gpt64-ce-s1


def run_experiment(cfg: DictConfig, recorder: RunRecorder, resume_from: Path | None = None) -> dict[str, Any]:
    """Train one student (distilled, or CE-only for ``kd=none``) and fill its record.

    ``resume_from``: a ``last.ckpt`` of this run killed or interrupted earlier; training
    continues from it and logs into the same W&B run.
    """
    output_dir = recorder.folder
    apply_num_threads(cfg.get("num_threads"))
    with recorder.timed("data"):
        datamodule: InMemoryDataModule = instantiate(cfg.data)
        datamodule.setup()
        fingerprint = datamodule.fingerprint()
    if resume_from is not None:
        same_as_before(recorder.record.get("data_fingerprint"), fingerprint, "data (fingerprint)")
    recorder.update(task=datamodule.task, data_fingerprint=fingerprint, data_sizes=data_sizes(datamodule))
    predictions = read_predictions(cfg, datamodule)  # a file for other data is refused before a teacher is trained

    with recorder.timed("teacher"):
        if predictions is not None and not cfg.teacher.get("load", True):
            teacher, members = teacher_of_predictions(cfg, predictions), []
        else:
            teacher, members = get_teachers(cfg, datamodule)
    better = require_better_than_chance(teacher, int(cfg.data.num_classes),
                                        bool(cfg.teacher.get("allow_untrained", False)),
                                        majority_share(datamodule.splits["test"].y))
    reference = {TEACHER_TEST_ACC: teacher.test_acc, **teacher_reference_metrics(teacher, datamodule)}  # in float32
    if cfg.teacher.get("dtype") and teacher.model is not None:  # e.g. bfloat16: half the memory of a large teacher (its test accuracy was measured
        teacher.model.to(getattr(torch, str(cfg.teacher.dtype)))  # in float32, the hash is of the trained weights)
    if members:
        recorder.update(teachers=[{"hash": m.weights_hash, "test_acc": m.test_acc, "source": m.source, "path": m.path,
                                   "cache_key": m.cache_key} for m in members])
    if resume_from is not None:
        same_as_before((recorder.record.get("teacher") or {}).get("hash"), teacher.weights_hash, "teacher (weights hash)")
    recorder.update(**teacher_fields(teacher, better))

    # Seeded after the teacher (so a cache hit changes nothing) and before anything random
    # is built: an objective with parameters (a FitNets regressor) is as reproducible as the student.
    seed_everything(int(cfg.seed))
    objective = instantiate(objective_node(cfg), what="kd")
    student = instantiate(cfg.student)
    initial_weights = init_student(cfg, student)
    schedules = build_schedules(cfg)
    # A CE-only run that starts from a distilled student is fine-tuning, not the CE-only baseline.
    job_type = "distill" if objective.needs_teacher else "finetune" if initial_weights else "baseline"
    identity = {**objective.identity(), "label": objective_label(objective, schedules)}
    run_name = run_name_for(cfg, job_type, identity["label"])
    parameters = count_parameters(student)
    recorder.update(job_type=job_type, run_name=run_name, parameters=parameters, objective=identity,
                    **({"init_from": initial_weights} if initial_weights else {}))
    with recorder.timed("teacher_outputs"):
        member_count = len(members) if teacher.model is not None else int(predictions.manifest.get("members") or 0)
        teacher_store, outputs_note = get_teacher_outputs(cfg, datamodule, teacher, member_count, objective,
                                                         predictions)
    recorder.update(teacher_outputs={**outputs_note, **topk_approximation(teacher_store, task_of(cfg).per_position)})

    wandb_config = student_wandb_config(cfg, recorder.record, teacher)
    previous_wandb = recorder.record.get("wandb") or {}
    with recorder.timed("logger_start"):
        logger = build_logger(cfg, output_dir, run_name, job_type, wandb_config,
                              run_id=previous_wandb.get("id") if resume_from is not None else None,
                              objective_name=objective.name)
    recorder.update(wandb=wandb_run_info(logger) or earlier_wandb_run(previous_wandb, recorder.record, resume_from))
    if logger is not None and resume_from is None:  # a resumed W&B run already has it (and is past step 0)
        logger.log_metrics(reference, step=0)

    from kdexp.fitting import build_trainer, fit_and_test
    from kdexp.modules import DistillationModule

    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = DistillationModule(model=student, teacher=teacher.model, objective=objective,
                                optimizer=instantiate(cfg.optimizer), scheduler=scheduler, schedules=schedules,
                                num_classes=int(cfg.data.num_classes), teacher_store=teacher_store)
    probe_x, _, probe_index = next(iter(datamodule.eval_batches("train")))
    module.bind_objective(probe_x, probe_index)  # adapters exist before the optimiser
    initial = {"val/acc_init": evaluate_accuracy(student, datamodule.eval_batches("val"))}
    trainer = build_trainer(cfg, output_dir, logger)
    metrics = {**initial, **fit_and_test(trainer, module, datamodule, resume_from, recorder), **reference}
    recorder.update(metrics=metrics, epochs=trainer.current_epoch, global_steps=trainer.global_step,
                    checkpoints=checkpoint_files(output_dir))
    return recorder.record


def topk_approximation(store: Any, per_position: bool) -> dict[str, str]:
    """What top-k teacher outputs (``kd.cache_topk``, ``kdexp predict --topk``) lose, for the record
    (``teacher_outputs.approximation``); nothing for full logits, or a k that keeps every class.

    Top-k is made for language models, whose full logits over a large vocabulary are too large to
    cache (4 bytes × vocabulary per position against 8k + 4). A classifier's few logits cost little,
    and top-k changes its soft targets: that is said as a warning at the start of the run.
    """
    split = store.splits.get("train") if store is not None else None
    if split is None or split.topk_indices is None or split.logits.shape[-1] >= split.vocab:
        return {}
    k, vocab = int(split.logits.shape[-1]), int(split.vocab)
    kept = (f"the teacher's {k} largest of {vocab} logits per {'position' if per_position else 'input'}; the other "
            f"{vocab - k} share the remaining probability evenly")
    if not per_position:
        log.warning("kd.cache_topk=%d on a %d-class classifier: the soft targets are an approximation of the "
                    "teacher's (%s), so results differ from KD on its full outputs. Top-k is meant for language "
                    "models, whose large vocabularies make full logits too large to cache; %d classes cost %d "
                    "bytes per input in full (%d as top-%d). Drop kd.cache_topk unless the approximation is what "
                    "you study.", k, vocab, kept, vocab, 4 * vocab, 8 * k + 4, k)
    return {"approximation": kept}


def earlier_wandb_run(previous: dict[str, Any], record: dict[str, Any], resume_from: Path | None
                      ) -> dict[str, Any] | None:
    """The W&B run that holds a resumed run's earlier epochs, when the resumed part logs to none
    (``logger=csv`` or ``none``): still this run's, so the record keeps pointing at it, and says that
    its history ends where this continuation began (``history_until``)."""
    if resume_from is None or not previous.get("id"):
        return None
    return {**previous, "history_until": previous.get("history_until") or record["resumed"][-1]["at"]}


def data_sizes(datamodule: InMemoryDataModule) -> dict[str, int]:
    """The split sizes a record states (a transfer set's inputs counted apart from the labelled ones)."""
    return {"train_labelled": datamodule.labelled_train_size,
            "train_transfer": len(datamodule.splits["train"].x) - datamodule.labelled_train_size,
            "val": len(datamodule.splits["val"].x), "test": len(datamodule.splits["test"].x)}


def teacher_fields(teacher: Teacher, better_than_chance: bool) -> dict[str, Any]:
    """What a student's record states about its teacher: identity, lineage, stage and route, and whether
    it beat chance (false only where ``teacher.allow_untrained=true`` let a weak teacher through)."""
    return {"teacher": {"hash": teacher.weights_hash, "test_acc": teacher.test_acc, "source": teacher.source,
                        "path": teacher.path, "cache_key": teacher.cache_key,
                        "verified": teacher.model is not None,  # False: taken from a predictions file
                        "better_than_chance": better_than_chance},
            "lineage": teacher.lineage, "stage": len(teacher.lineage), "route": route_of(teacher.lineage)}


def student_wandb_config(cfg: DictConfig, record: dict[str, Any], teacher: Teacher) -> dict[str, Any]:
    """A student run's W&B config: the resolved config plus what its record states (job type,
    teacher, data, parameters, objective, teacher outputs, lineage)."""
    return wandb_run_config(to_plain(cfg), job_type=record["job_type"], teacher_hash=teacher.weights_hash,
                            teacher_test_acc=teacher.test_acc, data_fingerprint=record["data_fingerprint"],
                            student_parameters=record["parameters"], output_dir=str(record["output_dir"]),
                            objective=record["objective"], teacher_outputs=record["teacher_outputs"],
                            stage=len(teacher.lineage), lineage=teacher.lineage)


def base_record(cfg: DictConfig) -> dict[str, Any]:
    """What a record knows before the run starts."""
    return {"config": to_plain(cfg), "choices": choices(cfg), "overrides": list(cfg.get("overrides") or []),
            "seed": cfg.get("seed"), **sweep_fields()}


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
