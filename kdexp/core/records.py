"""The JSON run record every run leaves in its output folder, finished or failed.

Tables are built from these records, so they hold everything needed to tell runs
apart: the resolved config, the overrides, metrics, status, timing, git commit,
library versions, the teacher's identity and the data fingerprint. W&B offline
runs do not write a summary file, which is why kdexp keeps its own record.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from kdexp.core.files import atomic_write_text

RECORD_NAME = "run_record.json"
SCHEMA_VERSION = 1
# Set by `kdexp sweep` for the runs it starts: their records say which sweep ran them (``sweep_id``), so
# a sweep's summary tells its own runs from those another process ran or holds in the same folders.
SWEEP_ID_ENV = "KDEXP_SWEEP_ID"
# Set by a local search (`kdexp sweep` of a method: bayes file) for each trial it starts: the trial, as JSON.
SEARCH_TRIAL_ENV = "KDEXP_SEARCH_TRIAL"
# Set by `kdexp sweep --pack` for its multirun: a file listing the grid points left to it (packs train the rest).
SELECTION_ENV = "KDEXP_SWEEP_SELECTION"
_PACKAGES = ("kdexp", "torch", "pytorch-lightning", "hydra-core", "omegaconf", "wandb", "torchmetrics", "mnist1d")


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The record in ``folder``, or None when there is none (or it is unreadable)."""
    path = Path(folder) / RECORD_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def sweep_fields() -> dict[str, Any]:
    """``{"sweep_id": ...}`` when this process runs a job of a ``kdexp sweep``, and ``{"search": {...}}``
    when it is a trial of a local search (its name, trial number, sampler, seed, phase, parameters,
    metric and goal: :mod:`kdexp.grid.search`), else nothing."""
    sweep_id = os.environ.get(SWEEP_ID_ENV)
    fields: dict[str, Any] = {"sweep_id": sweep_id} if sweep_id else {}
    trial = os.environ.get(SEARCH_TRIAL_ENV)
    if trial:
        fields["search"] = json.loads(trial)
    return fields


# What a SLURM job's environment says about it (sbatch sets these in every job), as record keys.
SLURM_ENV = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
             "node": "SLURMD_NODENAME", "partition": "SLURM_JOB_PARTITION"}


def slurm_fields() -> dict[str, dict[str, str | None]]:
    """``{"slurm": {"job_id", "array_job_id", "array_task_id", "node", "partition", "restart_count"}}``
    inside a SLURM job (``SLURM_JOB_ID`` set), else nothing. ``job_id`` is the task's own id (what
    ``scontrol`` and ``sacct`` take); squeue shows an array task as ``<array_job_id>_<array_task_id>``.
    ``restart_count`` is how many times SLURM requeued the job before this start ("0" the first time)."""
    if not os.environ.get("SLURM_JOB_ID"):
        return {}
    fields: dict[str, str | None] = {key: os.environ.get(name) or None for key, name in SLURM_ENV.items()}
    fields["restart_count"] = os.environ.get("SLURM_RESTART_COUNT") or "0"
    return {"slurm": fields}


def write_record(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write atomically, so a crash never leaves half a record."""
    text = json.dumps(_jsonable(record), indent=2, sort_keys=True) + "\n"
    return atomic_write_text(Path(folder) / RECORD_NAME, text, what="run record")


def _jsonable(value: Any) -> Any:
    """Plain JSON: tensors become numbers, NaN/inf become strings (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the repository at ``cwd`` (``+dirty`` if it has changes), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str | None]:
    """The versions of Python and of the packages a run's numbers depend on (read once per process:
    each is a metadata file to parse, and a pack writes many records and checkpoints)."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class PartTimer:
    """Wall seconds per named part of a run (``timings_s`` in its record)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the wall time of the block to ``seconds[part]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start


class RunRecorder:
    """Builds one run's record and rewrites it on each status change.

    The record is written as ``running`` at the start, so a run killed from
    outside still leaves a trace of what it was. ``resumes`` continues the record of
    an interrupted run of the same config: its start time, W&B id and earlier wall
    time are kept, and ``resumed`` lists each continuation. ``written=False``: the record is
    kept in memory only (a DDP rank above 0, whose run's record is rank 0's).
    """

    def __init__(self, folder: str | Path, base: dict[str, Any], resumes: dict[str, Any] | None = None,
                 written: bool = True) -> None:
        self.folder = Path(folder)
        self.written = written
        self._start = time.time()
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self._start))
        self._earlier_wall_time = float((resumes or {}).get("wall_time_s") or 0.0)
        self.record: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "started_at": now,
            "output_dir": str(self.folder),
            "git_commit": git_commit(),
            "versions": library_versions(),
            "metrics": {},
        }
        if resumes is not None:
            keep = ("started_at", "wandb", "resumed", "teacher", "data_fingerprint")
            self.record.update({k: resumes[k] for k in keep if k in resumes})
            self.record["resumed"] = [*self.record.get("resumed", []), {
                "at": now, "previous_status": resumes.get("status"),
                "previous_git_commit": resumes.get("git_commit"), "previous_error": resumes.get("error"),
                **slurm_fields(),  # a requeued SLURM job: which job and which restart picked the run up
            }]
        self.record.update({**base, "status": "running"})
        self.timer = PartTimer()  # seconds per part of the run, written at the end
        self._write()

    def timed(self, part: str):
        """Add the wall time of the block to ``timings_s[part]`` (where a run's time goes)."""
        return self.timer.timed(part)

    def _write(self) -> None:
        if self.written:
            write_record(self.folder, self.record)

    def update(self, **fields: Any) -> None:
        self.record.update(fields)
        self._write()

    def finish(self, status: str, error: BaseException | None = None) -> dict[str, Any]:
        self.record["status"] = status
        # Wall time over every attempt whose end was recorded (a SIGKILLed attempt's is unknown).
        self.record["wall_time_s"] = round(self._earlier_wall_time + time.time() - self._start, 3)
        self.record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.record["timings_s"] = {part: round(seconds, 4) for part, seconds in self.timer.seconds.items()}
        self.record.pop("error", None)
        if error is not None:
            self.record["error"] = {
                "type": type(error).__name__,
                "message": str(error),
                "traceback": traceback.format_exception(type(error), error, error.__traceback__)[-6:],
            }
        self._write()
        return self.record
