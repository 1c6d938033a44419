"""The single-run engine: one student (distilled, or CE-only) trained with Lightning, start to finish:
data, teacher, objective, teacher outputs, W&B, fit, test, record. Chain stages are trained here too,
as runs of this engine (:func:`ensure_stages`).

``kdexp.train`` is the Hydra entry point; :mod:`kdexp.run.lifecycle` opens and closes the run around
:func:`run_experiment`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdexp.core.agent import outside_agent_run
from kdexp.core.config import choice, instantiate, objective_node
from kdexp.core.errors import ConfigError
from kdexp.core.files import storage_error
from kdexp.core.records import RunRecorder, read_record
from kdexp.core.tasks import task_of
from kdexp.core.tracking import wandb_run_info
from kdexp.core.vocabulary import TEACHER_TEST_ACC, teacher_metric
from kdexp.data.base import InMemoryDataModule
from kdexp.models.zoo import count_parameters
from kdexp.run.lifecycle import build_logger, checkpoint_files, earlier_wandb_run, run_in_folder
from kdexp.run.metrics import EvalMetrics
from kdexp.run.seeding import apply_num_threads, seed_everything
from kdexp.run.student import data_sizes, objective_label, run_name_for, student_wandb_config
from kdexp.run.teacher import get_teachers, refuse_training_in_joined_rank
from kdexp.schedules import Schedule
from kdexp.teachers.chain import assistant_config, chain_of
from kdexp.teachers.provision import INIT_FILE_ROLE, Teacher, load_teacher_weights, weights_hash
from kdexp.teachers.quality import evaluate_accuracy, majority_share, require_better_than_chance, teacher_fields
from kdexp.teachers.source import get_teacher_outputs, read_predictions, teacher_of_predictions
from kdexp.teachers.stages import stage_place

log = logging.getLogger(__name__)


@torch.no_grad()
def teacher_reference_metrics(teacher: Teacher, datamodule: InMemoryDataModule) -> dict[str, float]:
    """A language-model teacher's test nll, bpb and ppl as ``teacher/test_nll`` etc.: the teacher's
    reference row of a report on those metrics, measured on the student's test split. Empty for
    classifiers (their tables compare accuracies: ``teacher/test_acc``) and for a teacher known only
    from a predictions file."""
    if teacher.model is None or datamodule.task != "causal_lm":
        return {}

    was_training = teacher.model.training
    teacher.model.eval()
    metrics = EvalMetrics(int(datamodule.num_classes))
    for x, y, _ in datamodule.eval_batches("test"):
        metrics.update(teacher.model(x), y)
    teacher.model.train(was_training)
    return {teacher_metric(f"test/{name}"): float(value) for name, value in metrics.compute().items()
            if name in ("nll", "bpb", "ppl")}


# -- a chain's stages ----------------------------------------------------------------
def ensure_stages(cfg: DictConfig) -> None:
    """Train the assistants of ``cfg``'s chain that have not finished, first to last, each as an ordinary
    run in its stage folder (``<cache>/stages/<key>``); :func:`kdexp.teachers.stages.load_stage` then loads
    the last one as the teacher. A lock per stage makes one process train it while others wait; a finished
    stage is reused, an interrupted one resumes."""
    if chain_of(cfg):
        trained_stage(assistant_config(cfg))


def trained_stage(stage_cfg: DictConfig) -> None:
    """The chain stage that ``stage_cfg`` runs, trained now if it has not finished (its teacher, an earlier
    stage, first: stages train and are announced in order)."""
    key, folder = stage_place(stage_cfg)
    if chain_of(stage_cfg) and (read_record(folder) or {}).get("status") != "finished":
        trained_stage(assistant_config(stage_cfg))
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder.parent / f"{key}.lock"))
        lock.acquire()
    except OSError as err:
        raise storage_error(err, folder.parent, "chain stage folder") from err
    try:
        if (read_record(folder) or {}).get("status") != "finished":
            train_stage(stage_cfg, folder)
    finally:
        lock.release()


def train_stage(stage_cfg: DictConfig, folder: Path) -> None:
    """Run one assistant of a chain as an ordinary run in ``folder`` (resuming an interrupted one), in one
    process (:func:`~kdexp.teachers.chain.assistant_config`): under DDP, rank 0 trains the stages before
    the other ranks exist, and they load them."""
    refuse_training_in_joined_rank(f"chain stage in {folder}")
    stage_cfg = stage_cfg.copy()
    OmegaConf.set_struct(stage_cfg, False)
    stage_cfg.paths.output_dir = str(folder)
    message = (f"Training chain stage {len(chain_of(stage_cfg)) + 1} ({choice(stage_cfg, 'student')}"
               f"{stage_cfg.student.get('width')}) in {folder}")
    with outside_agent_run():  # under `wandb agent` the agent's W&B run is the student's, not a stage's
        run_in_folder(stage_cfg, folder, lambda recorder, last: run_experiment(stage_cfg, recorder, resume_from=last),
                      if_finished="skip", resume=True, validate=False, announce=False, start_message=message)


# -- a student run -----------------------------------------------------------------
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
            ensure_stages(cfg)
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

    # Lightning loads here, not at the top: pack workers import the modules this one shares, never a fit.
    from kdexp.run.fit import build_trainer, fit_and_test
    from kdexp.run.modules import DistillationModule

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


