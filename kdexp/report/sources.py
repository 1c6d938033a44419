"""Where records come from: run folders (every ``run_record.json`` below them) or W&B."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kdexp.core.records import RECORD_NAME, read_record
from kdexp.report import wandb_runs
from kdexp.report.errors import ReportError
from kdexp.report.runs import is_student_record, missing_fields
from kdexp.core.vocabulary import ARCHIVE_DIR


def records_from_folder(folder: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable record below ``folder`` (or the record file itself), and notes on the files
    skipped: unreadable ones, and JSON that parses but lacks a run record's fields.

    Runs moved aside by a rerun (``archive/`` inside a run folder: ``if_finished=rerun``,
    ``kdexp sweep --force``) are superseded and left out.
    """
    root = Path(folder)
    archived: list[Path] = []
    if root.is_file() and root.name == RECORD_NAME:
        paths = [root]
    elif root.is_dir():
        paths = sorted(root.rglob(RECORD_NAME))
        archived = [p for p in paths if ARCHIVE_DIR in p.relative_to(root).parts[:-1]]
        paths = [p for p in paths if p not in archived]
    else:
        raise ReportError(f"'{folder}' is neither a folder nor a {RECORD_NAME}: pass a run or sweep folder "
                          "(e.g. outputs/sweeps/<name>) or wandb:ENTITY/PROJECT.")
    records: list[dict[str, Any]] = []
    notes = [f"{len(archived)} archived run(s) under {root} left out (superseded by a rerun)"] if archived else []
    for path in paths:
        record = read_record(path.parent)
        if not isinstance(record, dict):
            notes.append(f"unreadable record skipped: {path}")
            continue
        lacking = missing_fields(record) if is_student_record(record) else []
        if lacking:
            notes.append(f"record without a run's {' and '.join(lacking)} skipped: {path} (it holds only "
                         f"{', '.join(sorted(record)) or 'nothing'})")
            continue
        record["_source"] = str(path.parent)
        records.append(record)
    return records, notes


def load_sources(sources: Sequence[str], *, group: str | None = None,
                 filters: Iterable[str] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of student runs from all ``sources``, and notes on what was skipped."""
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    filters = list(filters)
    for source in sources:
        if source.startswith(wandb_runs.WANDB_PREFIX):
            path = wandb_runs.wandb_path(source)
            runs = wandb_runs.fetch_wandb_runs(path, wandb_runs.wandb_filters(group, filters))
            found = wandb_runs.records_from_wandb_runs(runs)
        else:
            if group or filters:
                notes.append(f"--group/--filter apply to W&B sources only; ignored for {source}")
            found, unreadable = records_from_folder(source)
            notes += unreadable
        kept = [r for r in found if is_student_record(r)]
        if not found:
            notes.append(f"no run records in {source}")
        records += kept
    if not records:
        raise ReportError(
            f"no student run records found in {', '.join(sources)}. Point at a folder that holds run folders "
            f"with {RECORD_NAME} (e.g. outputs/sweeps/<name> or outputs/multiruns/<date>) or at "
            "wandb:ENTITY/PROJECT; teacher records alone make no table."
        )
    return records, notes
