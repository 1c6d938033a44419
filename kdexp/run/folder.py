"""One writer per run folder, and what to do with what a folder already holds.

A run claims its output folder before it writes anything there: it takes an
exclusive lock (``.kdexp.lock``; the OS releases it when the holder dies, so the
lock of a killed run is simply taken over, while a live holder is refused with its
pid and host), then decides from the folder's record:

=========================  ==========================================================
folder holds               action
=========================  ==========================================================
nothing                    start
a finished run             ``if_finished``: refuse (error), return it (skip), or
                           archive it and start (rerun)
an interrupted or killed   resume from ``checkpoints/last.ckpt`` when the config is
run (running/interrupted)  the same and ``resume=true``; otherwise archive it, start
a failed run, an           archive it, start
unreadable record, or
other leftovers
=========================  ==========================================================

Archiving moves every file of the old run (``.hydra/`` and its log included) to
``archive/<stamp>/``, so nothing is ever deleted.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from kdexp.core.errors import CheckpointError, RunBusyError, RunExistsError
from kdexp.core.files import storage_error, weights_file_problem
from kdexp.core.records import RECORD_NAME, read_record
from kdexp.core.vocabulary import ARCHIVE_DIR, run_identity

log = logging.getLogger(__name__)

LOCK_NAME = ".kdexp.lock"
OWNER_NAME = ".kdexp.owner"
ARCHIVE_NAME = ARCHIVE_DIR
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
RESUMABLE_STATUSES = ("running", "interrupted")
# Entries that belong to the folder, not to any one run of it.
_FOLDER_ENTRIES = {ARCHIVE_NAME, LOCK_NAME, OWNER_NAME}


@dataclass
class Claim:
    """What a run found in its folder and will do: ``start``, ``resume`` or ``skip``."""

    action: str
    lock: FileLock | None = None
    previous: dict[str, Any] | None = None
    checkpoint: Path | None = None
    archived: list[Path] = field(default_factory=list)

    def release(self) -> None:
        if self.lock is not None and self.lock.is_locked:
            self.lock.release()


def lock_folder(folder: Path, busy: str | None = None) -> FileLock:
    """Hold the folder's lock, or explain who holds it. ``busy``: the explanation for a folder that is not
    a run's (``{folder}`` and ``{owner}`` are filled in)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / LOCK_NAME), timeout=0)
        lock.acquire()
    except Timeout:
        owner = _read_owner(folder)
        if busy is not None:
            raise RunBusyError(busy.format(folder=folder, owner=owner)) from None
        raise RunBusyError(
            f"{folder} is in use by another run ({owner}). Two runs never write one folder: wait for it to "
            "finish, or choose another hydra.run.dir. (A lock left by a killed process is released by the OS "
            "and taken over automatically.)"
        ) from None
    except OSError as err:
        raise storage_error(err, folder, "run folder") from err
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        (folder / OWNER_NAME).write_text(json.dumps(owner))
    except OSError:
        pass  # only used to name the holder in the message above
    return lock


def _read_owner(folder: Path) -> str:
    try:
        owner = json.loads((folder / OWNER_NAME).read_text())
        return f"pid {owner['pid']} on {owner['host']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


def archive(folder: Path, label: str) -> Path:
    """Move every entry of the old run in ``folder`` to ``archive/<label>/`` (never deletes)."""
    target = folder / ARCHIVE_NAME / label.replace(":", "-")
    suffix = 1
    while target.exists():
        target = target.with_name(f"{target.name.split('~')[0]}~{suffix}")
        suffix += 1
    target.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name not in _FOLDER_ENTRIES:
            item.rename(target / item.name)
    log.info("Archived the previous run in %s to %s.", folder, target)
    return target


def _holds_run_files(folder: Path) -> bool:
    return any(item.name not in _FOLDER_ENTRIES for item in folder.iterdir())


def claim_run_folder(folder: Path, config: dict[str, Any], if_finished: str = "error", resume: bool = True) -> Claim:
    """Lock ``folder`` and decide what to do with its contents (see the module docstring).

    ``config`` is the plain resolved config of the new run; a previous run is resumed
    only when its recorded config has the same :func:`run_identity`.
    """
    folder = Path(folder)
    previous = read_record(folder)
    # A finished run is protected before anything is locked or written: a refused or
    # skipped run leaves the folder byte for byte as it was.
    if previous is not None and previous.get("status") == "finished" and if_finished != "rerun":
        if if_finished == "skip":
            return Claim("skip", previous=previous)
        raise RunExistsError(
            f"{folder} already holds a finished run (record {folder / RECORD_NAME}); it is never overwritten. "
            "Choose another hydra.run.dir, delete that folder, or pass if_finished=skip (keep it) or "
            "if_finished=rerun (archive it and run again)."
        )
    lock = lock_folder(folder)
    try:
        previous = read_record(folder)  # again, under the lock: the holder may just have finished
        claim = _decide(folder, previous, config, if_finished, resume)
    except BaseException:
        lock.release()
        raise
    claim.lock = lock
    return claim


def _decide(folder: Path, previous: dict[str, Any] | None, config: dict[str, Any], if_finished: str,
            resume: bool) -> Claim:
    if not _holds_run_files(folder):
        return Claim("start")
    if previous is None:
        unreadable = (folder / RECORD_NAME).exists()
        why = f"an unreadable {RECORD_NAME}" if unreadable else "files but no run record"
        log.warning("%s holds %s: archiving them and starting this run afresh.", folder, why)
        return Claim("start", archived=[archive(folder, f"unreadable-{time.strftime('%Y%m%dT%H%M%S')}")])
    status = previous.get("status")
    stamp = str(previous.get("finished_at") or previous.get("started_at") or "unknown")
    if status == "finished":
        if if_finished == "skip":  # finished while we waited for the lock
            return Claim("skip", previous=previous)
        if if_finished != "rerun":
            raise RunExistsError(f"{folder} already holds a finished run; it is never overwritten.")
        return Claim("start", previous=previous, archived=[archive(folder, stamp)])
    checkpoint = folder / LAST_CHECKPOINT
    if status in RESUMABLE_STATUSES and resume and checkpoint.is_file():
        if run_identity(previous.get("config") or {}) == run_identity(config):
            refuse_unreadable_checkpoints(folder)
            log.info("Resuming the %s run in %s from %s.", status, folder, checkpoint)
            return Claim("resume", previous=previous, checkpoint=checkpoint)
        log.warning("%s holds an unfinished run of another config: archiving it and starting this one.", folder)
    elif status in RESUMABLE_STATUSES and resume:
        log.info("%s holds an unfinished run without a checkpoint: archiving it and starting afresh.", folder)
    return Claim("start", previous=previous, archived=[archive(folder, f"{status}-{stamp}")])


def refuse_unreadable_checkpoints(folder: Path) -> None:
    """Before a resume, read every checkpoint of the folder weights-only, or refuse with the folder untouched.

    Training continues from ``last.ckpt`` but tests at ``best.ckpt`` only after the remaining
    epochs; a file that would run code, or a truncated one, is found now rather than after them.
    """
    for path in sorted((folder / LAST_CHECKPOINT.parent).glob("*.ckpt")):
        problem = weights_file_problem(path)
        if problem:
            raise CheckpointError(
                f"cannot resume the unfinished run in {folder}: its checkpoint {path.relative_to(folder)} {problem}. "
                "Nothing in the folder was changed. Rerun with resume=false to archive the unfinished run (moved to "
                f"{ARCHIVE_NAME}/, never deleted) and start afresh, or put back a good copy of the file to resume."
            )
