"""A run's teacher: loaded from a checkpoint, taken from the train-once cache, or trained now as a run of
its own (folder, record, W&B run with job type ``teacher``) through the run lifecycle; extra
``teachers`` make an ensemble."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdexp.core.agent import outside_agent_run
from kdexp.core.config import choice, choices, instantiate, to_plain
from kdexp.core.distributed import joined_run
from kdexp.core.errors import KdexpError
from kdexp.core.records import RunRecorder, slurm_fields
from kdexp.core.vocabulary import TEST_ACC, VAL_ACC_BEST
from kdexp.data.base import InMemoryDataModule
from kdexp.models.ensemble import TeacherEnsemble
from kdexp.models.zoo import count_parameters
from kdexp.run.lifecycle import build_logger, run_in_folder
from kdexp.run.seeding import seed_everything
from kdexp.teachers.chain import chain_of, lineage_entry
from kdexp.teachers.provision import Teacher, provision_teacher, trained_teacher_key, weights_hash
from kdexp.teachers.quality import evaluate_accuracy
from kdexp.teachers.stages import load_stage

log = logging.getLogger(__name__)


def get_teacher(cfg: DictConfig, test_data: InMemoryDataModule) -> Teacher:
    """Load ``teacher.checkpoint`` or train-once-and-cache (see :mod:`kdexp.teachers.provision`); with a
    ``chain``, the last assistant of the chain (trained before, by :func:`kdexp.run.engine.ensure_stages`).

    ``test_data`` (the run's data) measures a loaded checkpoint's test accuracy.
    """
    if chain_of(cfg):
        return load_stage(cfg, test_data)
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
    """Train ``model`` in place as the teacher, as a run of its own in ``folder`` (its record and W&B run;
    the cache lock that :func:`~kdexp.teachers.provision.provision_teacher` holds is its claim)."""
    tcfg = cfg.teacher
    refuse_training_in_joined_rank(f"the teacher cached under {folder}")

    def fit(recorder: RunRecorder, _resume_from: Path | None) -> None:
        # Lightning loads here, not at the top: pack workers import this module and never fit a teacher.
        from kdexp.run.fit import build_trainer, fit_and_test
        from kdexp.run.modules import SupervisedModule

        # The labelled training set only: a student's transfer set is the student's, never the teacher's.
        no_transfer = {"transfer_set": None} if "transfer_set" in cfg.data else {}
        datamodule: InMemoryDataModule = instantiate(cfg.data, shuffle_seed=int(tcfg.seed), **no_transfer)
        fingerprint = datamodule.fingerprint()
        # The teacher's own recipe: its optimizer and, optionally, its lr scheduler (CRD's steps).
        scheduler = instantiate(tcfg.scheduler, what="teacher.scheduler") if tcfg.get("scheduler") else None
        module = SupervisedModule(model, optimizer=instantiate(tcfg.optimizer), num_classes=int(cfg.data.num_classes),
                                  scheduler=scheduler)
        run_name = f"teacher-{choice(cfg, 'teacher')}{tcfg.model.get('width', '')}-{folder.name[:8]}"
        config = {"teacher": to_plain(tcfg), "data": to_plain(cfg.data), "data_fingerprint": fingerprint}
        logger = build_logger(cfg, folder, run_name, "teacher", config)
        # One process: under DDP, rank 0 trains the teacher before the other ranks exist (they load it).
        trainer = build_trainer(cfg, folder, logger, max_epochs=int(tcfg.max_epochs), one_process=True)
        metrics = fit_and_test(trainer, module, datamodule)  # leaves the best-val weights in `model`
        recorder.update(metrics=metrics, data_fingerprint=fingerprint, parameters=count_parameters(model))

    base = {"job_type": "teacher", "config": to_plain(tcfg), "data": to_plain(cfg.data), "choices": choices(cfg),
            **slurm_fields()}
    with outside_agent_run():  # under `wandb agent` the agent's W&B run is the student's, not the teacher's
        metrics = run_in_folder(cfg, folder, fit, claim=False, announce=False, base=base)["metrics"]
    log.info("Teacher trained: test/acc %.4f (best val %.4f)", metrics[TEST_ACC], metrics.get(VAL_ACC_BEST, float("nan")))
    return float(metrics[TEST_ACC])


def refuse_training_in_joined_rank(what: str) -> None:
    """A DDP rank above 0 never trains a teacher or a chain stage: rank 0 trained it before starting the
    other ranks, so one missing here means the ranks do not share a cache."""
    joined = joined_run()
    if joined is not None:
        raise KdexpError(f"DDP rank {joined.rank} found no trained {what}, which rank 0 provisioned before it started "
                         "this rank. Every rank must see the same cache: set KDEXP_CACHE_DIR (paths.cache_dir) to a "
                         "folder on a file system all of them share.")
