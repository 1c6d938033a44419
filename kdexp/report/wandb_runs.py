"""Runs from the W&B API, turned into records of the same shape as ``run_record.json``.

The network call is one thin function; the conversion is separate and pure, so it
can be tested on plain objects without a server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from kdexp.core.tracking import RUN_CONFIG_EXTRAS
from kdexp.core.vocabulary import TEACHER_TEST_ACC
from kdexp.report.errors import ReportError
from kdexp.report.values import parse_assignments, parse_scalar

WANDB_PREFIX = "wandb:"

# W&B run states → record statuses. A crashed or killed run did not finish: it is a
# failure for the table (counted, never averaged); anything else is still going.
_STATES = {"finished": "finished", "failed": "failed", "crashed": "failed", "killed": "failed"}


# Fields of a W&B run that filters may name directly; other keys are config paths.
_RUN_FIELDS = ("group", "state", "tags", "jobType", "job_type", "displayName", "display_name", "createdAt",
               "username", "sweep", "name")


def wandb_path(source: str) -> str:
    """``wandb:ENTITY/PROJECT`` → ``ENTITY/PROJECT`` (refuses anything else)."""
    path = source[len(WANDB_PREFIX):].strip("/")
    if path.count("/") != 1 or not all(path.split("/")):
        raise ReportError(f"'{source}' is not a W&B source: write it as wandb:ENTITY/PROJECT, "
                          "e.g. wandb:my-team/kdexp.")
    return path


def wandb_filters(group: str | None = None, filters: Iterable[str] = ()) -> dict[str, Any]:
    """``--group`` and ``--filter key=value`` as a W&B API (MongoDB-style) filter.

    A key that is not a run field (``group``, ``state``, …) or already prefixed is a
    config path, so ``kd.alpha=0.9`` becomes ``{"config.kd.alpha": 0.9}``.
    """
    out: dict[str, Any] = {}
    if group:
        out["group"] = group
    for key, value in parse_assignments(filters, "--filter", example="config.kd.alpha=0.9"):
        if not key.startswith(("config.", "summary_metrics.", "$")) and key not in _RUN_FIELDS:
            key = f"config.{key}"
        out[key] = parse_scalar(value)
    return out


def fetch_wandb_runs(path: str, filters: Mapping[str, Any]) -> list[Any]:
    """The runs of ``path`` (``ENTITY/PROJECT``) that match ``filters``: the only network call."""
    try:
        import wandb

        return list(wandb.Api(timeout=30).runs(path, filters=dict(filters)))
    except Exception as err:  # the API raises several error types; all mean "could not fetch"
        raise ReportError(
            f"could not fetch runs from W&B project '{path}' ({type(err).__name__}: {err}). Check the path, "
            "your network and `wandb login`, or report from the local run folders instead (kdexp report outputs/)."
        ) from err


def records_from_wandb_runs(runs: Iterable[Any]) -> list[dict[str, Any]]:
    """W&B runs (objects with ``.config``, ``.summary``, ``.state``, ``.id``, ``.name``, ``.group``) → records."""
    return [_record_from_run(run) for run in runs]


def _record_from_run(run: Any) -> dict[str, Any]:
    config = _unflatten(_unwrap_values(dict(getattr(run, "config", None) or {})))
    extra = {key: config.pop(key, None) for key in RUN_CONFIG_EXTRAS}
    metrics = _numeric(_summary_dict(getattr(run, "summary", None)))
    if TEACHER_TEST_ACC not in metrics and isinstance(extra["teacher_test_acc"], (int, float)):
        metrics[TEACHER_TEST_ACC] = float(extra["teacher_test_acc"])
    state = str(getattr(run, "state", "") or "").lower()
    status = _STATES.get(state, "running")
    job_type = extra["job_type"] or getattr(run, "job_type", None) or getattr(run, "jobType", None)
    if not job_type and "student" not in config and "kd" not in config:
        job_type = "teacher"  # teacher runs carry only {teacher, data, data_fingerprint}
    run_id, name = getattr(run, "id", None), getattr(run, "name", None)
    record: dict[str, Any] = {
        "status": status,
        "config": config,
        "choices": dict(config.get("choices") or {}),
        "overrides": list(config.get("overrides") or []),
        "seed": config.get("seed"),
        "job_type": job_type,
        "metrics": metrics,
        "teacher": {"hash": extra["teacher_hash"], "test_acc": extra["teacher_test_acc"]},
        "data_fingerprint": extra["data_fingerprint"],
        "output_dir": extra["output_dir"],
        "objective": extra["objective"],
        "run_name": name,
        "group": getattr(run, "group", None),
        "wandb": {"id": run_id, "name": name, "state": state, "url": getattr(run, "url", None)},
        "started_at": _text_or_none(getattr(run, "created_at", None)),
        "_source": f"W&B run {run_id} ({name})",
    }
    if status == "failed":
        record["error"] = {"type": f"W&B state {state}", "message": ""}
    return record


def _summary_dict(summary: Any) -> dict[str, Any]:
    """A W&B summary as a plain dict; the API's summary object is read via ``_json_dict``."""
    if summary is None:
        return {}
    try:
        return dict(summary)
    except (TypeError, ValueError, AttributeError, KeyError):
        raw = getattr(summary, "_json_dict", None)
        return dict(raw) if isinstance(raw, Mapping) else {}


def _numeric(summary: Mapping[str, Any]) -> dict[str, float]:
    """Metric values only: W&B's private keys (``_step``, ``_runtime``) and media are dropped."""
    out = {}
    for key, value in summary.items():
        if str(key).startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[str(key)] = float(value)
    return out


def _unwrap_values(config: dict[str, Any]) -> dict[str, Any]:
    """Older W&B exports wrap each config entry as ``{"value": …, "desc": …}``."""
    return {key: value["value"] if isinstance(value, dict) and set(value) <= {"value", "desc"} and "value" in value
            else value for key, value in config.items()}


def _unflatten(config: dict[str, Any]) -> dict[str, Any]:
    """Nest dotted keys (``{"kd.alpha": 0.9}`` → ``{"kd": {"alpha": 0.9}}``), as in a record's config.

    A run started by ``wandb agent`` holds each sweep parameter as W&B locked it: a group's choice as a
    plain value (``"kd": "hinton"``, which hides kdexp's ``kd`` settings) beside the swept settings
    (``"kd.alpha": 0.9``). The settings win; the choice stays under ``choices`` (``choices.kd``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        node = out
        *parents, leaf = str(key).split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if isinstance(node.get(leaf), dict):
            if isinstance(value, dict):
                node[leaf].update(value)
        else:
            node[leaf] = value
    return out


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
