"""Records → one pandas row per run, and the lookups the table keys on.

A run's config is flattened to dotted paths (``kd.temperature``), so any setting can
be an axis, a ``--where`` filter or a key the consistency check compares. Internal
columns start with ``_``; axis columns are named by their path.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from kdexp.core.vocabulary import DATA_FINGERPRINT, TEACHER_HASH, TEACHER_TEST_ACC, flatten_config
from kdexp.report.errors import ReportError
from kdexp.report.values import format_value, matches, normalize, parse_scalar, sort_key

NULL = "null"  # a setting a run has, set to null, on a table axis (absent settings stay NaN)

# Record fields (not config) a table may key on.
RECORD_FIELDS = (TEACHER_HASH, DATA_FINGERPRINT)
# Teacher runs (the cache) and earlier reports are not students: they never enter a cell.
SKIPPED_JOB_TYPES = ("teacher", "report")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"kd.temperature": 8.0, ...}`` with normalized values."""
    return {key: normalize(value) for key, value in flatten_config(tree, prefix).items()}


def is_student_record(record: Mapping[str, Any]) -> bool:
    """Whether a record is a student run (not a teacher run or an earlier report)."""
    return record.get("job_type") not in SKIPPED_JOB_TYPES


def missing_fields(record: Mapping[str, Any]) -> list[str]:
    """The fields every run's record has (``status``, a non-empty ``config``) that ``record`` lacks:
    a JSON file that parses but is no kdexp record would otherwise enter a table with no settings."""
    missing = [] if isinstance(record.get("status"), str) else ["status"]
    config = record.get("config")
    return missing + ([] if isinstance(config, Mapping) and config else ["config"])


def run_kind(job_type: str | None, choices: Mapping[str, Any]) -> str:
    """``distill`` or ``baseline``; a run that failed before it knew its job type goes by ``kd=none``."""
    if job_type in ("distill", "baseline"):
        return job_type
    if job_type == "finetune":  # a distilled student trained on: a result of KD, not the CE-only reference
        return "distill"
    return "baseline" if choices.get("kd") == "none" else "distill"


def runs_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per student run with its kind, status, seed, flat config, metrics and identity."""
    rows = []
    for record in records:
        config = record.get("config") or {}
        choices = dict(record.get("choices") or config.get("choices") or {})
        teacher = record.get("teacher") if isinstance(record.get("teacher"), Mapping) else {}
        metrics = dict(record.get("metrics") or {})
        error = record.get("error") if isinstance(record.get("error"), Mapping) else {}
        objective = record.get("objective") if isinstance(record.get("objective"), Mapping) else {}
        seed = record.get("seed", config.get("seed"))
        rows.append({
            "_kind": run_kind(record.get("job_type"), choices),
            "_status": str(record.get("status") or "running"),
            "_seed": None if seed is None else int(seed),
            "_config": flatten(config),
            "_choices": choices,
            "_metrics": metrics,
            "_teacher_hash": teacher.get("hash"),
            "_teacher_acc": metrics.get(TEACHER_TEST_ACC, teacher.get("test_acc")),
            "_teacher_weak": teacher.get("better_than_chance") is False,  # allowed by teacher.allow_untrained
            "_data_fingerprint": record.get("data_fingerprint"),
            "_error": error.get("type"),
            "_source": record.get("_source") or record.get("output_dir") or record.get("run_name"),
            "_time": record.get("finished_at") or record.get("started_at"),
            "_objective": objective.get("name"),
            "_knobs": tuple(objective.get("knobs") or ()),
        })
    frame = pd.DataFrame(rows, columns=["_kind", "_status", "_seed", "_config", "_choices", "_metrics",
                                        "_teacher_hash", "_teacher_acc", "_teacher_weak", "_data_fingerprint", "_error",
                                        "_source", "_time", "_objective", "_knobs"])
    return frame.assign(_teacher_acc=pd.to_numeric(frame["_teacher_acc"], errors="coerce"))


def objective_knobs(runs: pd.DataFrame) -> list[str]:
    """The knobs (``kd.beta``, …) the KD runs' objectives declare, in declaration order.

    Records written before objectives declared knobs have none; callers fall back to
    Hinton's ``kd.temperature`` × ``kd.alpha``.
    """
    knobs: list[str] = []
    for declared in runs.loc[runs["_kind"].eq("distill"), "_knobs"]:
        knobs += [k for k in declared if k not in knobs]
    return knobs


# Settings that only distillation has: a transfer set is learnt from the teacher alone, so a
# CE-only run never has one (its null there is not a setting of its own).
KD_ONLY_DATA_KEYS = ("data.transfer_set", "data.transfer_size", "data.transfer_seed")


def is_kd_scoped(path: str) -> bool:
    """Settings of the KD objective (or only meaningful with one): a CE-only baseline has none of them."""
    return path == "kd" or path.startswith("kd.") or path == "choices.kd" or path in KD_ONLY_DATA_KEYS


def is_teacher_side(path: str) -> bool:
    """The teacher's and the data's groups and settings: what picks the teacher a student learns from."""
    return path in ("teacher", "data") or path.startswith(("teacher.", "data."))


def is_choice_axis(runs: pd.DataFrame, path: str) -> bool:
    """A bare group name (``kd``, ``student``) that some run lists in its ``choices``."""
    return "." not in path and bool(runs["_choices"].map(lambda c: path in c).any())


def axis_values(runs: pd.DataFrame, path: str, explicit_null: bool = False) -> pd.Series:
    """Each run's value at ``path``: a group's chosen option, a record field, or a dotted config path.

    ``explicit_null``: a setting the run has, with the value null (``data.transfer_set: null``),
    is :data:`NULL` (a value of its own on a table axis) rather than absent.
    """
    if is_choice_axis(runs, path):
        values = runs["_choices"].map(lambda c: c.get(path))
    elif path in RECORD_FIELDS:
        values = runs[f"_{path}"]
    elif explicit_null:
        values = runs["_config"].map(lambda c: NULL if path in c and c[path] is None else c.get(path))
    else:
        values = runs["_config"].map(lambda c: c.get(path))
    # one null marker (NaN) for absent settings, so pandas groups and merges them alike
    return values.astype(object).where(values.notna(), np.nan)


def known_paths(runs: pd.DataFrame) -> set[str]:
    """Every name an axis or ``--where`` key may use: record fields, config paths and group names."""
    keys: set[str] = set(RECORD_FIELDS)
    for config in runs["_config"]:
        keys.update(config)
    for choices in runs["_choices"]:
        keys.update(choices)
    return keys


def check_path(known: set[str], path: str, what: str) -> None:
    """Refuse a path not in ``known`` (see :func:`known_paths`), naming the closest real ones."""
    if path in known:
        return
    below = sorted(k for k in known if k.startswith(f"{path}."))
    if below:
        raise ReportError(f"{what} '{path}' is a group of settings, not one value; pick one of: "
                          f"{', '.join(below[:8])}.")
    close = difflib.get_close_matches(path, sorted(known), n=4, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ReportError(f"{what} '{path}' is not a setting of any run.{hint} Use a dotted config path "
                      "(student.width, kd.temperature, trainer.max_epochs) or a group name "
                      "(kd, student, data, teacher).")


def with_axes(runs: pd.DataFrame, axes: Sequence[str], known: set[str]) -> pd.DataFrame:
    """``runs`` with one column per axis, named by its path (each checked against ``known``)."""
    for axis in axes:
        check_path(known, axis, "axis")
    def values(axis: str) -> pd.Series:
        found = axis_values(runs, axis, explicit_null=True)
        if axis in KD_ONLY_DATA_KEYS and "_kind" in runs:  # the CE-only reference belongs to every KD column
            found = found.where(runs["_kind"].ne("baseline"), np.nan)
        return found

    return runs.assign(**{axis: values(axis) for axis in axes})


def apply_where(runs: pd.DataFrame, clauses: Sequence[tuple[str, str]], known: set[str]) -> pd.DataFrame:
    """Keep runs whose setting equals one of the comma-separated values of each clause.

    A clause on a KD setting (``kd.alpha=0.9``) selects among the KD runs only: the
    CE-only baseline has no α and must stay as the reference.
    """
    keep = pd.Series(True, index=runs.index)
    for key, wanted in clauses:
        check_path(known, key, "--where key")
        options = wanted.split(",")
        values = axis_values(runs, key)
        hit = values.map(lambda v: any(matches(v, w) for w in options)).astype(bool)
        if not hit.any():
            present = sorted({format_value(v) for v in values.dropna()}, key=lambda t: sort_key(parse_scalar(t)))
            raise ReportError(f"no run matches --where {key}={wanted}; the runs have {key} = "
                              f"{', '.join(present) or 'nothing'}.")
        if is_kd_scoped(key) and key != "kd":
            hit = hit | runs["_kind"].eq("baseline")
        keep &= hit
    return runs[keep]


def metric_values(runs: pd.DataFrame, metric: str) -> pd.Series:
    """The metric of each run as a float (NaN where the run has none)."""
    return pd.to_numeric(runs["_metrics"].map(lambda m: m.get(metric)), errors="coerce").astype(float)


def available_metrics(runs: pd.DataFrame) -> list[str]:
    """Numeric metrics that finished runs recorded."""
    names: set[str] = set()
    for metrics in runs.loc[runs["_status"].eq("finished"), "_metrics"]:
        names.update(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return sorted(names)


def check_metric(runs: pd.DataFrame, metric: str) -> None:
    """Refuse a metric no finished run recorded, listing the ones that exist."""
    available = available_metrics(runs)
    if metric in available:
        return
    close = difflib.get_close_matches(metric, available, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    listing = ", ".join(available) if available else "none (no run finished)"
    raise ReportError(f"metric '{metric}' is not in any finished run's record.{hint} Available: {listing}.")
