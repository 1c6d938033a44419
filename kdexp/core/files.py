"""Reading and writing the files kdexp owns, safely.

Two rules, kept here so every module follows them the same way:

- **Write to a temporary name, then rename.** ``os.replace`` is atomic on one file
  system, so a kill or a full disk never leaves half a record, cache entry or
  teacher file that a later run reads as whole.
- **Load weights, never code.** ``torch.load(weights_only=True)`` refuses a pickle
  that asks to call anything (``os.system``, a class constructor), so a checkpoint
  found on disk cannot run code on this machine. A file that needs code to load is
  refused with a message that says why and what to do instead.
"""

from __future__ import annotations

import errno
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdexp.core.errors import CheckpointError, StorageError


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def storage_error(err: OSError, path: str | Path, what: str) -> StorageError:
    """A one-paragraph explanation of an ``OSError`` met while writing ``path``."""
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "it is not writable (permission denied or a read-only file system)"
        fix = "choose a writable folder (hydra.run.dir=..., paths.cache_dir=... or KDEXP_CACHE_DIR)"
    elif err.errno == errno.ENOSPC:
        reason = "the disk is full"
        fix = "free space or point the outputs elsewhere (hydra.run.dir=..., KDEXP_CACHE_DIR)"
    else:
        reason = f"{type(err).__name__}: {err.strerror or err}"
        fix = "check the path and the file system"
    return StorageError(f"cannot write {what} {path}: {reason}. Nothing half-written was left behind; {fix}.")


def atomic_write(path: str | Path, write: Callable[[Path], None], what: str = "file") -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise storage_error(err, path, what) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, what: str = "file") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), what)


def atomic_torch_save(path: str | Path, obj: Any, what: str = "checkpoint") -> Path:
    import torch  # here, not at the top: a sweep's launcher process writes files but never loads torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp), what)


def load_weights(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load`` that only reads tensors and plain containers; never runs code from the file."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise refused_pickle(err, path, what) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from err


def refused_pickle(err: BaseException, path: str | Path, what: str,
                   fix: str = "If you trust the file, re-save just its weights: "
                              "torch.save(model.state_dict(), 'weights.pt').") -> CheckpointError:
    """kdexp's words for torch's weights-only refusal of ``path``: that the file would run code, or that
    it is no weights file. torch's own message advises loading with ``weights_only=False``, which runs
    whatever the file asks for; it is never passed on, only its informative line."""
    detail = _unpickling_detail(str(err))
    if "GLOBAL" in detail:  # e.g. "Trying to load unsupported GLOBAL posix.system ..."
        return CheckpointError(
            f"refused to load {what} {path}: loading it would run code ({detail}), so it was not loaded. kdexp "
            f"loads weights only (torch.load with weights_only=True), so a file from elsewhere never executes "
            f"anything here. {fix}")
    return CheckpointError(f"cannot read {what} {path}: it is not a PyTorch weights file, or it is damaged "
                           f"({detail}).")


def weights_file_problem(path: str | Path) -> str | None:
    """What keeps ``path`` from being read weights-only ("would run code ...", "cannot be read ..."),
    or None when it reads. Nothing in the file runs: the check is the weights-only load itself."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickling_detail(str(err))
        if "GLOBAL" in detail:
            return (f"would run code if loaded ({detail}) and was refused: a checkpoint kdexp writes holds tensors "
                    "and plain values only, so this file was replaced or changed")
        return f"is not a PyTorch checkpoint, or is damaged ({detail})"
    except Exception as err:  # noqa: BLE001 - a torn archive fails in many ways; each is "cannot be read"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"cannot be read: it is truncated or damaged ({type(err).__name__}: {first})"
    return None


def is_weights_only_refusal(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is torch's weights-only refusal of a pickle."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:  # the chain of causes; a loop ends it
        chain.append(current)
        current = current.__cause__ or current.__context__
    return any(isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) for e in chain)


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running")


def _unpickling_detail(message: str) -> str:
    """The informative line of torch's weights-only error (it wraps it in advice to load unsafely)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_BOILERPLATE)]
    return (useful[0] if useful else (lines[0] if lines else "unreadable")).removeprefix("WeightsUnpickler error: ")
