"""A chain's stages as teachers: the key of whatever teaches a run's student, and the chain's last
assistant loaded from its finished stage folder (``<cache>/stages/<key>``). Stages are trained, as
ordinary runs, by :func:`kdexp.run.engine.ensure_stages`; nothing here trains."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdexp.core.config import choice, instantiate
from kdexp.core.errors import CheckpointError
from kdexp.core.records import read_record
from kdexp.data.base import InMemoryDataModule
from kdexp.teachers.chain import assistant_config, chain_of, lineage_entry, stage_file, stage_key, stage_lineage
from kdexp.teachers.provision import CheckpointRole, Teacher, load_teacher_weights, root_teacher_key, weights_hash
from kdexp.teachers.quality import evaluate_accuracy

log = logging.getLogger(__name__)


def teacher_key(cfg: DictConfig) -> str:
    """The key of whatever teaches ``cfg``'s student: the root teacher, or the last assistant of its chain."""
    if not chain_of(cfg):
        return root_teacher_key(cfg)
    stage = assistant_config(cfg)
    return stage_key(stage, teacher_key(stage))


def stage_place(stage_cfg: DictConfig) -> tuple[str, Path]:
    """The key and run folder (``<cache>/stages/<key>``) of the chain stage ``stage_cfg`` runs."""
    key = stage_key(stage_cfg, teacher_key(stage_cfg))
    return key, Path(stage_cfg.paths.cache_dir) / "stages" / key


def load_stage(cfg: DictConfig, datamodule: InMemoryDataModule) -> Teacher:
    """The chain's last assistant, from its finished stage folder, as a frozen teacher.

    Its files are read where the cache is now (a moved or copied cache reads its own). The stage must
    have been trained (:func:`kdexp.run.engine.ensure_stages`); an unfinished one is refused.
    """
    stage_cfg = assistant_config(cfg)
    key, folder = stage_place(stage_cfg)
    record: dict[str, Any] = read_record(folder) or {}
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
