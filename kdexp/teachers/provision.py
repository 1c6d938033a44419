"""Teacher provisioning: load a checkpoint, or train once and cache.

With ``teacher.checkpoint: null`` the teacher is trained with the run's data
config and cached under a key derived from the teacher, data and training
config. A file lock makes exactly one process train it; every other run (and
every parallel sweep worker) waits, then loads the cached weights.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from filelock import FileLock
from omegaconf import DictConfig
from torch import nn

from kdexp.core.config import to_plain
from kdexp.core.distributed import one_process_trainer
from kdexp.core.errors import CheckpointError
from kdexp.core.files import atomic_torch_save, load_weights, storage_error
from kdexp.core.vocabulary import canonical_json
from kdexp.models.hf import pretrained_identity

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: zoo models with named stages (parameter names changed)
TEACHER_FILE = "teacher.pt"
# Data settings that do not change what a teacher learns; left out of the cache key.
# The teacher learns from the labelled set alone: a student's transfer set is not in its key.
_DATA_KEYS_NOT_IN_KEY = {"cache_dir", "data_dir", "download", "shuffle_seed", "eval_batch_size",
                         "transfer_set", "transfer_size", "transfer_seed"}
# Teacher settings about how a run uses its teacher, not how the teacher is trained.
_TEACHER_KEYS_NOT_IN_KEY = {"checkpoint", "predictions", "allow_untrained", "dtype", "load"}
# Trainer settings that only change what is displayed; everything else (limits,
# precision, clipping, devices) is part of the key. The teacher has its own max_epochs.
_TRAINER_KEYS_NOT_IN_KEY = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps",
                            "default_root_dir", "max_epochs"}


@dataclass
class Teacher:
    """A ready, frozen teacher and what identifies it."""

    model: nn.Module | None  # None: never loaded, its outputs come from a predictions file
    weights_hash: str
    test_acc: float
    source: str  # "checkpoint" | "cache" | "trained" | "pretrained" | "predictions"
    path: str
    cache_key: str | None = None
    lineage: list[dict[str, Any]] = field(default_factory=list)  # root teacher first (see kdexp.teachers.chain)


def weights_hash(model: nn.Module) -> str:
    """A short hash of the parameter and buffer values: equal hash, same teacher."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def teacher_cache_key(teacher_cfg: dict[str, Any], data_cfg: dict[str, Any], trainer_cfg: dict[str, Any]) -> str:
    """Key of a trained teacher: architecture, training recipe, data and trainer settings."""
    payload = {
        "format": CACHE_FORMAT,
        "teacher": {k: v for k, v in teacher_cfg.items() if k not in _TEACHER_KEYS_NOT_IN_KEY},
        "data": {k: v for k, v in data_cfg.items() if k not in _DATA_KEYS_NOT_IN_KEY},
        "trainer": {k: v for k, v in trainer_cfg.items() if k not in _TRAINER_KEYS_NOT_IN_KEY},
    }
    # Canonical: `teacher.optimizer.lr=1` from a command line is the same teacher as `lr: 1.0`.
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def save_teacher(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Atomic write: a reader never sees half a file. Plain tensors and values only, so it loads weights-only."""
    atomic_torch_save(path, {"state_dict": model.state_dict(), "kdexp_meta": meta}, what="teacher file")


def _extract_state_dict(blob: Any) -> dict[str, torch.Tensor]:
    """Accept a kdexp teacher file, a Lightning checkpoint of a kdexp run, or a bare state dict."""
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("the file holds no state dict (expected a kdexp teacher, a Lightning checkpoint or a state_dict)")
    if any(k.startswith("model.") for k in state):  # Lightning checkpoint: the trained net is `model`
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state


class CheckpointRole(NamedTuple):
    """What a checkpoint is loaded as, for the messages that explain a missing or mismatched file."""

    what: str  # "teacher checkpoint"
    model: str  # which model it loads into: "teacher" or "student"
    fix_missing: str
    fix_mismatch: str


TEACHER_FILE_ROLE = CheckpointRole("teacher checkpoint", "teacher",
                     "Fix teacher.checkpoint, or set teacher.checkpoint=null to train the teacher once and cache it",
                     "Check teacher=<arch> and teacher.model.width against the checkpoint")
INIT_FILE_ROLE = CheckpointRole("init_from checkpoint", "student",
                  "Fix init_from: it names the checkpoint the student starts from (a run's checkpoints/best.ckpt)",
                  "Check student=<arch> and student.width against the run that wrote it")


def read_checkpoint(path: str | Path, role: CheckpointRole = TEACHER_FILE_ROLE) -> Any:
    """The unpickled contents of a checkpoint, or a clear error when there is none."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{role.what} not found: {path.resolve()}. {role.fix_missing}.")
    return load_weights(path, what=role.what)


def apply_checkpoint(model: nn.Module, blob: Any, path: str | Path, num_classes: int,
                     role: CheckpointRole = TEACHER_FILE_ROLE) -> nn.Module:
    """Load the weights in ``blob`` (read from ``path``) into ``model`` or explain why they do not fit."""
    what, which, check = role.what, role.model, role.fix_mismatch
    try:
        state = _extract_state_dict(blob)
    except CheckpointError as err:
        raise CheckpointError(f"{what} {path}: {err}") from err
    head = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if head and head[-1].shape[0] != num_classes:
        raise CheckpointError(
            f"{what} {path} predicts {head[-1].shape[0]} classes but the data set has "
            f"{num_classes}. Use a model trained on this data set" + (", or teacher.checkpoint=null." if
                                                                        which == "teacher" else ".")
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise CheckpointError(
            f"{what} {path} does not match {which} model {type(model).__name__}: {' '.join(first)}. {check}."
        ) from err
    return model


def load_teacher_weights(model: nn.Module, path: str | Path, num_classes: int,
                         role: CheckpointRole = TEACHER_FILE_ROLE) -> nn.Module:
    """Load ``path`` into ``model`` or explain why it does not fit."""
    return apply_checkpoint(model, read_checkpoint(path, role), path, num_classes, role)


def provision_teacher(
    build_model: Callable[[], nn.Module],
    checkpoint: str | None,
    num_classes: int,
    cache_dir: Path,
    cache_key: str,
    train: Callable[[nn.Module, Path], float],
    evaluate: Callable[[nn.Module], float],
) -> Teacher:
    """Return the teacher: from ``checkpoint``, from the cache, or trained now and cached.

    ``train(model, folder)`` trains in place; ``evaluate(model)`` returns the test
    accuracy of a trained or loaded model (the figure every record states).
    """
    if checkpoint:
        model = load_teacher_weights(build_model(), checkpoint, num_classes)
        return Teacher(model.eval(), weights_hash(model), evaluate(model), "checkpoint", str(checkpoint))

    folder = cache_dir / cache_key
    path = folder / TEACHER_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / ".lock"))
        lock.acquire()
    except OSError as err:
        if path.is_file():  # a read-only shared cache still serves the teachers it holds
            log.info("Teacher cache %s is not writable (%s); reading the cached teacher without a lock.",
                     folder, err.strerror)
            return load_cached_teacher(build_model, path, num_classes, cache_key, evaluate)
        raise storage_error(err, folder, "teacher cache folder") from err
    try:  # exactly one process trains; the others wait here, then load
        if path.is_file():
            return load_cached_teacher(build_model, path, num_classes, cache_key, evaluate)
        log.info("No cached teacher under %s: training it now (once for all runs that share it)", folder)
        model = build_model()
        train(model, folder)
        # Measured by the same function as on every cache hit, so the figure a record states
        # is the same number whether this run trained the teacher or loaded it.
        test_acc = evaluate(model)
        meta = {"test_acc": float(test_acc), "weights_hash": weights_hash(model), "cache_key": cache_key}
        save_teacher(path, model, meta)
        return Teacher(model.eval(), meta["weights_hash"], float(test_acc), "trained", str(path), cache_key)
    finally:
        lock.release()


def load_cached_teacher(build_model: Callable[[], nn.Module], path: Path, num_classes: int, cache_key: str,
                        evaluate: Callable[[nn.Module], float]) -> Teacher:
    """Load a cached teacher and verify it: the record states what was loaded, not what the file claims.

    The weights are hashed as loaded and must match the hash stored when the teacher
    was trained (a replaced file is refused); the test accuracy is measured again.
    """
    blob = read_checkpoint(path)
    model = apply_checkpoint(build_model(), blob, path, num_classes)
    meta = blob.get("kdexp_meta") or {}
    loaded = weights_hash(model)
    if loaded != meta.get("weights_hash"):
        raise CheckpointError(
            f"cached teacher {path} holds weights (hash {loaded}) other than the ones stored when it was trained "
            f"(hash {meta.get('weights_hash')}): the file was changed after it was written. Delete {path.parent} "
            "to train the teacher again, or pass the file as teacher.checkpoint=... to use it as it is."
        )
    test_acc = evaluate(model)
    if meta.get("test_acc") is not None and abs(test_acc - float(meta["test_acc"])) > 1e-6:
        log.warning("Cached teacher %s: test accuracy measured now %.4f, stored %.4f (another CPU kind or "
                    "torch build?); the record keeps the measured value.", path, test_acc, meta["test_acc"])
    log.debug("Reusing cached teacher %s (hash %s, test acc %.4f)", path, loaded, test_acc)
    return Teacher(model.eval(), loaded, test_acc, "cache", str(path), cache_key)


# -- the cache keys of a run's teacher ------------------------------------------------
def trained_teacher_key(cfg: DictConfig) -> str:
    """The cache key of a teacher trained here: its recipe (with the weights it starts from when it
    fine-tunes a pretrained model), the data and the trainer settings."""
    # num_threads changes summation order, hence the trained weights: part of the key. A DDP run trains its
    # teacher in one process (kdexp.core.distributed): its key is that of the one-process trainer.
    trainer_settings = {**one_process_trainer(to_plain(cfg.trainer)), "num_threads": cfg.get("num_threads")}
    recipe = to_plain(cfg.teacher)
    pretrained = cfg.teacher.model.get("pretrained")
    if pretrained:  # a pretrained model replaced in place is another starting point
        recipe["pretrained_weights"] = pretrained_identity(str(pretrained), cfg.teacher.model.get("revision"))
    return teacher_cache_key(recipe, to_plain(cfg.data), trainer_settings)


def root_teacher_key(cfg: DictConfig) -> str:
    """The cache key of the run's (root) teacher: its recipe, data and trainer settings."""
    key = trained_teacher_key(cfg)
    checkpoint = cfg.teacher.get("checkpoint")
    return hashlib.sha256(f"{key}:{checkpoint}".encode()).hexdigest()[:16] if checkpoint else key
