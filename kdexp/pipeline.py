"""One experiment, start to finish: data, teacher, student, fit, test, record.

``kdexp.train`` is the thin Hydra entry point; the steps live here so they can be
read top to bottom and reused (e.g. to train a teacher inside a student run).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger
from torch import nn

from kdexp.config import instantiate, to_plain
from kdexp.data.base import InMemoryDataModule
from kdexp.data.batches import IndexBatches
from kdexp.errors import ConfigError, RunExistsError
from kdexp.models.zoo import count_parameters
from kdexp.modules import DistillationModule, SupervisedModule
from kdexp.records import RECORD_NAME, RunRecorder, read_record
from kdexp.teacher import Teacher, provision_teacher, teacher_cache_key
from kdexp.tracking import finish_wandb, wandb_run_config, wandb_run_info

log = logging.getLogger(__name__)


# -- small builders ------------------------------------------------------------------
@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: IndexBatches) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode, restored after) on ``batches``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y, _ in batches:
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def build_trainer(cfg: DictConfig, output_dir: Path, logger: Logger | None, max_epochs: int | None = None) -> pl.Trainer:
    """The configured Trainer, with checkpoints under ``output_dir/checkpoints``."""
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(output_dir / "checkpoints")  # beside the run's record, not lightning_logs/
    overrides: dict[str, Any] = {"default_root_dir": str(output_dir)}
    if max_epochs is not None:
        overrides["max_epochs"] = max_epochs
    return instantiate(cfg.trainer, logger=logger if logger is not None else False, callbacks=callbacks, **overrides)


def build_logger(cfg: DictConfig, save_dir: Path, run_name: str, job_type: str, config: dict[str, Any]) -> Logger | None:
    """The configured experiment logger (``logger=none`` gives None)."""
    if not cfg.get("logger"):
        return None
    group = cfg.get("group") or f"{choice(cfg, 'data')}-{choice(cfg, 'teacher')}"
    factory = instantiate(cfg.logger)
    extra: dict[str, Any] = {}
    if "tags" in cfg.logger:  # automatic tags plus the user's (top-level `tags` and `logger.tags`)
        extra["tags"] = [choice(cfg, "data"), choice(cfg, "kd"), choice(cfg, "student"), job_type,
                         *cfg.get("tags", []), *cfg.logger.tags]
    return factory(save_dir=save_dir, run_name=run_name, job_type=job_type, group=group, config=config, **extra)


def choices(cfg: DictConfig) -> dict[str, str]:
    """Which option of each config group was composed (``{"kd": "hinton", ...}``)."""
    return dict(cfg.get("choices") or {})


def choice(cfg: DictConfig, group: str) -> str:
    return str(choices(cfg).get(group, group))


def fit_and_test(trainer: pl.Trainer, module: SupervisedModule, datamodule: InMemoryDataModule) -> dict[str, float]:
    """Fit, then test at the last epoch (``test/*_last``) and at the best-val checkpoint (``test/*``)."""
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    module.test_suffix = "_last"
    metrics.update(trainer.test(module, datamodule=datamodule, verbose=False)[0])
    module.test_suffix = ""
    has_best = trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path
    metrics.update(trainer.test(module, datamodule=datamodule, ckpt_path="best" if has_best else None, verbose=False)[0])
    if has_best:
        metrics["best_val_score"] = float(trainer.checkpoint_callback.best_model_score)
    return metrics


def apply_num_threads(num_threads: int | None) -> None:
    """Pin torch's CPU threads (null keeps torch's default of one per core)."""
    if num_threads is None:
        return
    if int(num_threads) < 1:
        raise ConfigError(f"num_threads must be >= 1 or null, got {num_threads}.")
    torch.set_num_threads(int(num_threads))


@contextmanager
def recorded(recorder: RunRecorder) -> Iterator[RunRecorder]:
    """Close the run's record and its W&B run however the block ends.

    A clean exit marks both finished; an exception (KeyboardInterrupt included)
    marks them failed, keeps the error in the record, and propagates.
    """
    try:
        yield recorder
    except BaseException as err:
        recorder.finish("failed", err)
        finish_wandb(exit_code=1)
        raise
    finish_wandb()
    recorder.finish("finished")


# -- the teacher -------------------------------------------------------------------
def get_teacher(cfg: DictConfig, test_data: InMemoryDataModule) -> Teacher:
    """Load ``teacher.checkpoint`` or train-once-and-cache (see :mod:`kdexp.teacher`).

    ``test_data`` (the run's data) measures a loaded checkpoint's test accuracy.
    """
    tcfg = cfg.teacher
    num_classes = int(cfg.data.num_classes)

    def build_model() -> nn.Module:
        pl.seed_everything(int(tcfg.seed), verbose=False)
        return instantiate(tcfg.model)

    def evaluate(model: nn.Module) -> float:
        return evaluate_accuracy(model, test_data.eval_batches("test"))

    def train(model: nn.Module, folder: Path) -> float:
        return train_teacher(cfg, model, folder)

    # num_threads changes summation order, hence the trained weights: part of the key.
    trainer_settings = {**to_plain(cfg.trainer), "num_threads": cfg.get("num_threads")}
    key = teacher_cache_key(to_plain(tcfg), to_plain(cfg.data), trainer_settings)
    return provision_teacher(build_model, tcfg.get("checkpoint"), num_classes, Path(cfg.paths.cache_dir) / "teachers",
                             key, train=train, evaluate=evaluate)


def train_teacher(cfg: DictConfig, model: nn.Module, folder: Path) -> float:
    """Train ``model`` in place as the teacher; its own record and W&B run go to ``folder``."""
    tcfg = cfg.teacher
    recorder = RunRecorder(folder, {"job_type": "teacher", "config": to_plain(cfg.teacher), "data": to_plain(cfg.data),
                                    "choices": choices(cfg)})
    with recorded(recorder):
        datamodule: InMemoryDataModule = instantiate(cfg.data, shuffle_seed=int(tcfg.seed))
        fingerprint = datamodule.fingerprint()
        module = SupervisedModule(model, optimizer=instantiate(tcfg.optimizer), num_classes=int(cfg.data.num_classes))
        run_name = f"teacher-{choice(cfg, 'teacher')}{tcfg.model.get('width', '')}-{folder.name[:8]}"
        config = {"teacher": to_plain(tcfg), "data": to_plain(cfg.data), "data_fingerprint": fingerprint}
        logger = build_logger(cfg, folder, run_name, "teacher", config)
        trainer = build_trainer(cfg, folder, logger, max_epochs=int(tcfg.max_epochs))
        metrics = fit_and_test(trainer, module, datamodule)  # leaves the best-val weights in `model`
        recorder.update(metrics=metrics, data_fingerprint=fingerprint, parameters=count_parameters(model))
    log.info("Teacher trained: test/acc %.4f (best val %.4f)", metrics["test/acc"], metrics.get("val/acc_best", float("nan")))
    return float(metrics["test/acc"])


# -- a student run -----------------------------------------------------------------
IF_FINISHED = ("error", "skip", "rerun")


def check_output_dir(output_dir: Path, if_finished: str) -> dict[str, Any] | None:
    """Protect a finished run in ``output_dir``.

    ``error``: refuse. ``skip``: return its record so the caller skips the run (a
    half-done sweep resumes). ``rerun``: move the finished run's files into
    ``output_dir/archive/<finished_at>/`` first, so nothing finished is ever lost.
    """
    if if_finished not in IF_FINISHED:
        raise ConfigError(f"if_finished must be one of {', '.join(IF_FINISHED)}; got '{if_finished}'.")
    previous = read_record(output_dir)
    if previous is None or previous.get("status") != "finished":
        return None
    if if_finished == "skip":
        return previous
    if if_finished == "rerun":
        archive_run(output_dir, previous)
        return None
    raise RunExistsError(
        f"{output_dir} already holds a finished run (record {output_dir / RECORD_NAME}); it is never "
        "overwritten. Choose another hydra.run.dir, delete that folder, or pass if_finished=skip "
        "(keep it) or if_finished=rerun (archive it and run again)."
    )


def archive_run(output_dir: Path, record: dict[str, Any]) -> Path:
    """Move a finished run's record, checkpoints and logs under ``archive/<finished_at>``."""
    stamp = str(record.get("finished_at", "unknown")).replace(":", "-")
    target = output_dir / "archive" / stamp
    target.mkdir(parents=True, exist_ok=True)
    for item in output_dir.iterdir():
        if item.name not in ("archive", ".hydra"):
            item.rename(target / item.name)
    log.info("Archived the finished run in %s to %s before running again.", output_dir, target)
    return target


def run_name_for(cfg: DictConfig, job_type: str, objective_label: str) -> str:
    width = cfg.student.get("width", "")
    return f"{job_type}-{choice(cfg, 'student')}{width}-{objective_label}-s{cfg.seed}"


def run_experiment(cfg: DictConfig, recorder: RunRecorder) -> dict[str, Any]:
    """Train one student (distilled, or CE-only for ``kd=none``) and fill its record."""
    output_dir = recorder.folder
    apply_num_threads(cfg.get("num_threads"))
    datamodule: InMemoryDataModule = instantiate(cfg.data)
    datamodule.setup()
    fingerprint = datamodule.fingerprint()
    recorder.update(data_fingerprint=fingerprint)

    objective = instantiate(cfg.kd)  # validates T and alpha before any teacher training
    teacher = get_teacher(cfg, datamodule)
    recorder.update(teacher={"hash": teacher.weights_hash, "test_acc": teacher.test_acc, "source": teacher.source,
                             "path": teacher.path, "cache_key": teacher.cache_key})

    pl.seed_everything(int(cfg.seed), verbose=False)  # after the teacher, so a cache hit changes nothing
    student = instantiate(cfg.student)
    job_type = "distill" if objective.needs_teacher else "baseline"
    run_name = run_name_for(cfg, job_type, objective.describe())
    parameters = count_parameters(student)
    recorder.update(job_type=job_type, run_name=run_name, parameters=parameters)

    wandb_config = wandb_run_config(to_plain(cfg), job_type=job_type, teacher_hash=teacher.weights_hash,
                                    teacher_test_acc=teacher.test_acc, data_fingerprint=fingerprint,
                                    student_parameters=parameters, output_dir=str(output_dir))
    logger = build_logger(cfg, output_dir, run_name, job_type, wandb_config)
    recorder.update(wandb=wandb_run_info(logger))
    if logger is not None:
        logger.log_metrics({"teacher/test_acc": teacher.test_acc}, step=0)

    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = DistillationModule(model=student, teacher=teacher.model, objective=objective,
                                optimizer=instantiate(cfg.optimizer), scheduler=scheduler,
                                num_classes=int(cfg.data.num_classes))
    initial = {"val/acc_init": evaluate_accuracy(student, datamodule.eval_batches("val"))}
    trainer = build_trainer(cfg, output_dir, logger)
    metrics = {**initial, **fit_and_test(trainer, module, datamodule), "teacher/test_acc": teacher.test_acc}
    checkpoint = trainer.checkpoint_callback
    recorder.update(metrics=metrics, epochs=trainer.current_epoch, global_steps=trainer.global_step,
                    checkpoints={"best": getattr(checkpoint, "best_model_path", None),
                                 "last": getattr(checkpoint, "last_model_path", None)})
    return recorder.record


def base_record(cfg: DictConfig) -> dict[str, Any]:
    """What a record knows before the run starts."""
    return {"config": to_plain(cfg), "choices": choices(cfg), "overrides": list(cfg.get("overrides") or []),
            "seed": cfg.get("seed")}


def with_runtime(cfg: DictConfig) -> DictConfig:
    """Copy Hydra's runtime facts (group choices, overrides) into the config as plain keys."""
    from hydra.core.hydra_config import HydraConfig

    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        cfg.choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") and v is not None}
        cfg.overrides = list(hc.overrides.task)
    return cfg
