"""Where a student run's teacher outputs come from: the teacher online, the shared cache
(:mod:`kdexp.teachers.outputs`), or a saved-predictions file, and what must match for a
file to serve a run (teacher weights, data, tapped layers, members, dtype, top-k).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import Tensor

from kdexp.core.config import choice, to_plain
from kdexp.core.errors import CheckpointError, ConfigError
from kdexp.data.base import InMemoryDataModule
from kdexp.objectives.base import DistillationObjective
from kdexp.teachers.chain import lineage_entry
from kdexp.teachers.outputs import (
    OutputsMismatchError,
    TeacherOutputStore,
    cached_store,
    compute_store,
    identity_mismatch,
    read_store,
    verify_against_teacher,
)
from kdexp.teachers.provision import Teacher

log = logging.getLogger(__name__)

# Data settings that change how many samples a batch holds or their order, never a sample's
# input as the teacher sees it: left out of the teacher-outputs identity.
_DATA_KEYS_NOT_IN_OUTPUTS = {"batch_size", "eval_batch_size", "shuffle_seed", "cache_dir", "data_dir", "download"}


def teacher_output_identity(cfg: DictConfig, teacher: Teacher, fingerprint: str, members: int,
                            teacher_layers: list[str]) -> dict[str, Any]:
    """What a teacher-outputs file must have been computed from to serve this run."""
    return {
        "teacher_hash": teacher.weights_hash,
        **data_identity(cfg, fingerprint),
        "teacher_layers": sorted(teacher_layers),
        "members": members,
        "teacher_dtype": cfg.teacher.get("dtype"),
        "topk": cfg.kd.get("cache_topk"),
        "num_threads": cfg.get("num_threads"),
        "teacher": {"test_acc": teacher.test_acc, "source": teacher.source, "path": teacher.path,
                    "model": to_plain(cfg.teacher.model)},
    }


def data_identity(cfg: DictConfig, fingerprint: str) -> dict[str, Any]:
    """The inputs as the teacher sees them: every split's content and the settings that shape a sample."""
    return {"data_fingerprint": fingerprint,
            "data_transform": {k: v for k, v in to_plain(cfg.data).items() if k not in _DATA_KEYS_NOT_IN_OUTPUTS}}


def read_predictions(cfg: DictConfig, datamodule: InMemoryDataModule) -> TeacherOutputStore | None:
    """The ``teacher.predictions`` file, checked against this run's data before any teacher is loaded."""
    path = cfg.teacher.get("predictions")
    if not path:
        return None
    if datamodule.train_augmentation() is not None:
        raise ConfigError(f"teacher.predictions is set, but data={choice(cfg, 'data')} augments its training "
                          "inputs at random: saved predictions hold the teacher's outputs on un-augmented inputs, "
                          "not on the views the student would see. Drop teacher.predictions (the teacher then "
                          "runs online), or use data without augmentation.")
    store = read_store(path, "teacher predictions file (teacher.predictions)")
    _refuse_other_origin(store, data_identity(cfg, datamodule.fingerprint()), path)
    return store


def teacher_of_predictions(cfg: DictConfig, store: TeacherOutputStore) -> Teacher:
    """The teacher as a predictions file states it, never loaded (``teacher.load=false``: a teacher too
    large to hold beside the student). Its hash and test accuracy are the file's, not re-measured."""
    stated = store.manifest.get("teacher") or {}
    _refuse_other_model(cfg, stated.get("model"), str(store.path))
    teacher = Teacher(None, str(store.manifest.get("teacher_hash")), float(stated.get("test_acc") or 0.0),
                      "predictions", str(store.path))
    teacher.lineage = [lineage_entry(0, choice(cfg, "teacher"), (stated.get("model") or {}).get("width"),
                                     "predictions", teacher.weights_hash, teacher.test_acc, teacher.path)]
    return teacher


# Where a model's weights are read from, not what the model is: a copy elsewhere is the same teacher
# (its weights hash, in the file, says which weights they were).
_MODEL_KEYS_NOT_IDENTITY = {"pretrained", "revision"}


def _refuse_other_model(cfg: DictConfig, stated: Any, path: str) -> None:
    """With ``teacher.load=false`` the record names the teacher from ``teacher=``; the file must agree.

    The file states the model config of the teacher that wrote it; a run whose ``teacher=`` (or
    ``teacher.model.*``) says another architecture would record a teacher it never read."""
    mine = to_plain(cfg.teacher.model)
    if not isinstance(stated, dict):
        raise ConfigError(f"teacher.predictions={path} does not state its teacher's model, so with teacher.load=false "
                          "this run cannot say which teacher it distils from. Write the file again with `kdexp "
                          "predict`, or set teacher.load=true (the teacher is then loaded and its hash checked).")
    keys = sorted((stated.keys() & mine.keys()) - _MODEL_KEYS_NOT_IDENTITY)
    differ = [f"{k}: file {stated[k]!r}, this run {mine[k]!r}" for k in keys if stated[k] != mine[k]]
    if differ:
        raise ConfigError(
            f"teacher.predictions={path} was written by another teacher than teacher={choice(cfg, 'teacher')} "
            f"describes ({'; '.join(differ)}). With teacher.load=false the teacher is never loaded, so the record "
            "would name the wrong one: set teacher=... and teacher.model.* to the teacher that wrote the file, or "
            "use the file written for this teacher."
        )


def _refuse_other_origin(store: TeacherOutputStore, expected: dict[str, Any], path: str) -> None:
    problems = identity_mismatch(store, expected)
    if problems:
        raise CheckpointError(
            f"teacher.predictions={path} was written for another teacher or data set (" + "; ".join(problems)
            + "). Write it again with `kdexp predict` and this run's teacher/data/kd overrides, or drop "
            "teacher.predictions to run the teacher."
        )


# Above this, `auto` keeps the teacher online: a language model's full (N, L, V) logits (2 GB for
# the default text set) would cost more disk and page cache than the forward pass saves.
CACHE_MAX_MB = 1024


def outputs_megabytes(datamodule: InMemoryDataModule, num_classes: int, topk: int | None = None) -> float:
    """Size of every split's teacher logits (float32; with ``topk``: k values, k indices and the rest's
    log-sum-exp per position), tapped features not counted."""
    positions = sum(split.y.numel() for split in datamodule.splits.values())  # samples, or samples × length
    per_position = (8 * min(topk, num_classes) + 4) if topk else 4 * num_classes
    return positions * per_position / 2**20


def get_teacher_outputs(cfg: DictConfig, datamodule: InMemoryDataModule, teacher: Teacher, members: int,
                        objective: DistillationObjective, predictions: TeacherOutputStore | None = None,
                        ) -> tuple[TeacherOutputStore | None, dict[str, Any]]:
    """Where this run's teacher outputs come from, and a note of it for the record and W&B.

    ``predictions`` (from :func:`read_predictions`) must come from this very teacher.
    Otherwise ``kd.cache_teacher``: ``auto`` (the default) and ``true`` share one cached
    computation per teacher and data set; ``false`` runs the teacher on every batch.
    With random augmentation the teacher always runs online, on the very view the
    student sees: a cache holds one view per sample, and a student trained against the
    teacher's view of another crop (or of the un-augmented input) would learn another
    target than the objective defines.
    """
    mode = cfg.kd.get("cache_teacher", "auto")
    identity = teacher_output_identity(cfg, teacher, datamodule.fingerprint(), members,
                                       list(objective.teacher_features))
    if predictions is not None:  # full or top-k: the file says which, the run reads either
        _refuse_other_origin(predictions, {k: v for k, v in identity.items() if k != "topk"},
                             str(cfg.teacher.predictions))
        note = {"source": "predictions", "path": str(predictions.path)}
        if teacher.model is None:  # teacher.load=false: nothing to recompute rows with
            return predictions, {**note, "verified": False,
                                 "unverified_because": "teacher.load=false: the teacher was never loaded, so the "
                                                       "file's outputs are taken as written"}
        try:
            verified = verify_against_teacher(predictions, teacher.model, inputs_of(datamodule))
        except OutputsMismatchError as err:
            raise CheckpointError(f"teacher.predictions={cfg.teacher.predictions}: {err}. Write it again with "
                                  "`kdexp predict` and this run's teacher/data/kd overrides, or drop "
                                  "teacher.predictions to run the teacher.") from None
        return predictions, {**note, "verified": verified}
    if mode is False or mode == "false":
        return None, {"source": "online", "reason": "kd.cache_teacher=false"}
    megabytes = outputs_megabytes(datamodule, int(cfg.data.num_classes), cfg.kd.get("cache_topk"))
    if megabytes > CACHE_MAX_MB and mode not in (True, "true"):
        return None, {"source": "online", "reason": f"outputs too large to cache ({megabytes:.0f} MB > "
                                                    f"{CACHE_MAX_MB} MB; kd.cache_topk=8 stores a fraction)"}
    if datamodule.train_augmentation() is not None:
        if mode is True or mode == "true":
            raise ConfigError(f"kd.cache_teacher=true, but data={choice(cfg, 'data')} augments its training "
                              "inputs at random, and cached outputs would be the teacher's view of other inputs "
                              "than the student sees. Use kd.cache_teacher=auto (the teacher then runs online "
                              "for augmented data) or false.")
        return None, {"source": "online", "reason": "random augmentation"}

    def compute() -> TeacherOutputStore:
        log.debug("Computing the teacher's outputs on every split once (shared by all runs of this teacher and data)")
        return compute_store(teacher.model, datamodule.eval_batches, identity)

    def verify(store: TeacherOutputStore) -> None:  # rows of a file read, recomputed: it may have been edited
        verify_against_teacher(store, teacher.model, inputs_of(datamodule))

    store, what = cached_store(Path(cfg.paths.cache_dir) / "teacher_outputs", identity, compute, verify)
    return store, {"source": "cache", "path": str(store.path), "computed": what == "computed",
                   **({"verified": store.verification} if store.verification else {}),
                   **({"topk": identity["topk"]} if identity.get("topk") else {})}


def inputs_of(datamodule: InMemoryDataModule) -> Callable[[str, Tensor], Tensor]:
    """Samples ``index`` of a split as the teacher reads them (as :meth:`eval_batches` gives them)."""
    return lambda split, index: datamodule.batch_transform(datamodule.splits[split].x[index])
