"""A W&B dashboard for one sweep, as a plain specification (no W&B import here).

``kdexp dashboard`` builds it from a sweep file (what the sweep will run: its axes, with
command-line ``key=value`` overrides replacing the file's, as ``kdexp sweep`` does) or from a
sweep folder (what its runs' records say they ran). :mod:`kdexp.report.dashboard_wandb` turns
it into a ``wandb_workspaces`` workspace (and report); offline it is written as JSON.

Every name a panel reads is the key the runs log: metrics from :mod:`kdexp.core.vocabulary`,
swept settings at their config path in the run's W&B config (a group option such as ``kd``
under ``choices.kd``), the group filter from :func:`kdexp.core.tracking.wandb_group`.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdexp.core.config import CONF_DIR, conf_initialized
from kdexp.core.errors import ConfigError
from kdexp.core.records import RECORD_NAME
from kdexp.core.sweep_file import load_sweep, sweep_axes
from kdexp.core.tracking import wandb_group
from kdexp.core.vocabulary import (
    CHOICES,
    DATA_FINGERPRINT,
    EPOCH,
    GROUP,
    NO_KD,
    SEED,
    STATUS,
    TEACHER_HASH,
    TEST_ACC,
    VAL_ACC,
    VAL_ACC_BEST,
    canonical_json,
    flatten_config,
    is_bookkeeping,
)
from kdexp.report.build import ReportSpec, make_ablation
from kdexp.report.errors import ReportError
from kdexp.report.runs import SKIPPED_JOB_TYPES, is_student_record
from kdexp.report.sources import records_from_folder

SPEC_FILE = "wandb_dashboard.json"  # written into the sweep folder when W&B is not online
DEFAULT_PROJECT = "kdexp"  # conf/logger/wandb.yaml's logger.project
WIDTH = "student.width"  # the curves are grouped by it
KD = "kd"  # the config group of the objective (kd=none: the CE-only baseline)

# Panel kinds.
PARALLEL = "parallel_coordinates"
SCATTER = "scatter"
CURVES = "curves"
RUNS_TABLE = "runs_table"

# Where W&B keeps a value of a run: its config, its summary (last/best metrics), its history
# (per-step rows) or a run attribute (W&B's own names: state, group, jobType, displayName).
SOURCES = ("config", "summary", "history", "run")


@dataclass(frozen=True)
class Field:
    """One value of a run as W&B holds it."""

    source: str  # one of SOURCES
    key: str  # the W&B key: "kd.temperature", "choices.kd", "test/acc", "state"
    label: str  # what kdexp calls it: "kd.temperature", "kd", "test/acc", "status"

    @property
    def column(self) -> str:
        """The runs-table / parallel-coordinates accessor W&B uses (and ``wandb_workspaces`` writes):
        ``config:kd.value.temperature`` (W&B wraps each top-level config entry in ``value``),
        ``summary:test/acc``, ``run:state``; a history key is used as it is."""
        if self.source == "config":
            first, _, rest = self.key.partition(".")
            return f"config:{first}.value" + (f".{rest}" if rest else "")
        return self.key if self.source == "history" else f"{self.source}:{self.key}"


def config_field(path: str) -> Field:
    """Where a swept setting lives in a run's W&B config: a config group's option (``kd``,
    ``student``) under ``choices.<group>``, any other setting at its dotted path."""
    return Field("config", f"{CHOICES}.{path}" if is_config_group(path) else path, path)


def summary_field(metric: str) -> Field:
    return Field("summary", metric, metric)


def history_field(metric: str) -> Field:
    return Field("history", metric, metric)


def is_config_group(path: str) -> bool:
    """A bare name that is a folder of options in ``conf/`` (``kd``, ``data``, ``experiment``)."""
    return "." not in path and "/" not in path and (Path(CONF_DIR) / path).is_dir()


@dataclass(frozen=True)
class Axis:
    """A swept setting: more than one value (or a range, for a search)."""

    path: str  # as the sweep names it: kd.temperature, kd, student.width
    field: Field
    values: tuple[Any, ...] = ()  # in sweep order; empty for a range
    range: tuple[Any, Any] | None = None  # method: bayes: (min, max)


@dataclass(frozen=True)
class Panel:
    """One panel of the dashboard."""

    kind: str  # PARALLEL | SCATTER | CURVES | RUNS_TABLE
    title: str
    x: Field | None = None
    y: tuple[Field, ...] = ()
    group_by: tuple[Field, ...] = ()  # scatter: the other axes; curves: the student width
    columns: tuple[Field, ...] = ()  # parallel coordinates (left to right) and the runs table
    reference: tuple[Field, Any] | None = None  # curves: runs with this value are the reference (kd=none)


@dataclass(frozen=True)
class DashboardSpec:
    """What the dashboard of one sweep shows, and for which runs."""

    name: str  # the sweep's name
    source: str  # the sweep file or folder it was made from
    project: str
    entity: str | None
    groups: tuple[str, ...]  # W&B groups of the sweep's runs: the workspace's filter
    exclude_job_types: tuple[str, ...]  # teacher runs share the group; they are not students
    metric: str  # the selection metric (the sweep's metric.name)
    goal: str  # maximize | minimize
    axes: tuple[Axis, ...]  # swept settings compared (seed excluded)
    seeds: tuple[Any, ...]  # the seeds run (not a comparison axis)
    panels: tuple[Panel, ...]
    expected_runs: int  # runs of the sweep (file: its grid or run_cap; folder: its records)
    runs: Mapping[str, int] = field(default_factory=dict)  # folder: runs per status, and CE-only runs
    ablation_markdown: str | None = None  # folder: the table `kdexp report FOLDER` prints
    notes: tuple[str, ...] = ()

    def panel(self, kind: str) -> list[Panel]:
        return [p for p in self.panels if p.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (each field's W&B ``column`` accessor spelled out)."""
        def with_columns(node: Any) -> Any:
            if isinstance(node, dict):
                out = {k: with_columns(v) for k, v in node.items()}
                if set(node) == {"source", "key", "label"}:
                    out["column"] = Field(**node).column
                return out
            if isinstance(node, (list, tuple)):
                return [with_columns(v) for v in node]
            return node

        return with_columns(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"


# -- the panels ----------------------------------------------------------------------------
def runs_table_columns(axes: Sequence[Axis], metric: str) -> tuple[Field, ...]:
    """The runs table: the run, its swept settings, seed, teacher, data, status and metrics."""
    fixed = (Field("config", SEED, SEED), Field("config", TEACHER_HASH, TEACHER_HASH),
             Field("config", DATA_FINGERPRINT, DATA_FINGERPRINT), Field("run", "state", STATUS))
    return _unique((Field("run", "displayName", "run"), *(a.field for a in axes), *fixed,
                    summary_field(metric), summary_field(TEST_ACC)))


def make_panels(axes: Sequence[Axis], metric: str) -> tuple[Panel, ...]:
    """(1) parallel coordinates over the axes ending in the selection metric and test/acc; (2) test/acc
    against each axis, grouped by the others; (3) val/acc per epoch grouped by student width, the
    CE-only runs (kd=none) as reference; (4) the runs table."""
    ends = _unique((summary_field(metric), summary_field(TEST_ACC)))
    panels = [Panel(PARALLEL, f"{' · '.join(a.path for a in axes) or 'runs'} → {' and '.join(f.key for f in ends)}",
                    columns=_unique((*(a.field for a in axes), *ends)))]
    for axis in axes:
        panels.append(Panel(SCATTER, f"{TEST_ACC} vs {axis.path}", x=axis.field, y=(summary_field(TEST_ACC),),
                            group_by=tuple(a.field for a in axes if a is not axis)))
    panels.append(Panel(CURVES, f"{VAL_ACC} per {EPOCH} by {WIDTH}; CE only ({KD}={NO_KD}) as reference",
                        x=history_field(EPOCH), y=(history_field(VAL_ACC),), group_by=(config_field(WIDTH),),
                        reference=(config_field(KD), NO_KD)))
    panels.append(Panel(RUNS_TABLE, "runs", columns=runs_table_columns(axes, metric)))
    return tuple(panels)


def _unique(fields: Iterable[Field]) -> tuple[Field, ...]:
    return tuple(dict.fromkeys(fields))


# -- from a sweep file ---------------------------------------------------------------------
def typed(path: str, text: str) -> Any:
    """An override's value as Hydra reads it (``2`` → 2, ``0.9`` → 0.9); a group's option stays text."""
    if is_config_group(path):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def is_compared(path: str) -> bool:
    """A swept setting the panels compare: not the seed, not Hydra's or a bookkeeping setting (group, logger.*)."""
    key = path.lstrip("+~")
    return key != SEED and not key.startswith(("hydra.", "hydra/")) and not is_bookkeeping(key)


def spec_from_sweep_file(path: str | Path, overrides: Sequence[str] = (), *, project: str | None = None,
                         entity: str | None = None, metric: str | None = None) -> DashboardSpec:
    """The dashboard of what ``kdexp sweep PATH OVERRIDES`` runs."""
    sweep = load_sweep(path)
    values = {k: [typed(k, v) for v in vs] for k, vs in sweep_axes(sweep, list(overrides)).items()}
    axes = [Axis(k, config_field(k.lstrip("+~")), tuple(vs)) for k, vs in values.items()
            if len(vs) > 1 and is_compared(k)]
    ranges = {k: r for k, r in (getattr(sweep, "ranges", None) or {}).items() if k not in values and is_compared(k)}
    axes += [Axis(k, config_field(k), range=(r.get("min"), r.get("max"))) for k, r in ranges.items()]
    order = list(sweep.raw.get("parameters") or {})  # the file's order; command-line-only axes last
    axes.sort(key=lambda a: order.index(a.path) if a.path in order else len(order))
    settings = composed_settings(values)
    goal_metric = sweep.raw.get("metric") if isinstance(sweep.raw.get("metric"), dict) else {}
    metric = metric or goal_metric.get("name") or VAL_ACC_BEST
    notes = list(settings["notes"])
    return DashboardSpec(
        name=sweep.name, source=str(path), project=project or settings["project"],
        entity=entity or settings["entity"], groups=tuple(settings["groups"]), exclude_job_types=SKIPPED_JOB_TYPES,
        metric=metric, goal=str(goal_metric.get("goal") or "maximize"), axes=tuple(axes),
        seeds=tuple(values.get(SEED, ())), panels=make_panels(axes, metric),
        expected_runs=_grid_size(sweep.raw, values), notes=tuple(notes))


def _grid_size(raw: Mapping[str, Any], values: Mapping[str, list[Any]]) -> int:
    """How many runs the sweep makes: its grid, ``run_cap`` points of it (random), or ``run_cap`` trials (bayes)."""
    size = math.prod(len(vs) for k, vs in values.items() if not k.lstrip("+~").startswith(("hydra.", "hydra/")))
    cap = raw.get("run_cap")
    if not isinstance(cap, int) or isinstance(cap, bool):
        return size
    return {"random": min(size, cap), "bayes": cap}.get(str(raw.get("method")), size)


def composed_settings(values: Mapping[str, list[Any]]) -> dict[str, Any]:
    """The W&B groups, project and entity the sweep's runs log with, as Hydra composes them.

    Only the settings that decide them vary here (``group``, the config groups' options, which may
    pull in ``data`` and ``teacher`` through an ``experiment``, and ``logger.*``): one composition per
    combination of those, each group taken from :func:`wandb_group` as a run takes it.
    """
    from hydra import compose  # Hydra's compose API: only when a sweep file is read

    decisive = {k: vs for k, vs in values.items()
                if k == GROUP or is_config_group(k.lstrip("+~")) or k.startswith("logger.")}
    keys = list(decisive)
    groups: list[str] = []
    project = entity = None
    notes: list[str] = []
    with conf_initialized():
        for combo in itertools.product(*decisive.values()):
            overrides = [f"{k}={_hydra_text(v)}" for k, v in zip(keys, combo)]
            try:
                cfg = compose("train", overrides=overrides, return_hydra_config=True)
            except Exception as err:  # noqa: BLE001 - Hydra's composition errors, one message for the user
                raise ConfigError(f"the sweep's runs do not compose with {' '.join(overrides)}: "
                                  f"{' '.join(str(err).split()).split(' Config search path')[0][:300]}. Fix the "
                                  "sweep file or the overrides "
                                  "(kdexp sweep FILE --dry-run lists the runs).") from None
            choices = {k: v for k, v in cfg.hydra.runtime.choices.items()
                       if not k.startswith("hydra/") and v is not None}
            group = wandb_group(cfg.get(GROUP), choices)
            if group not in groups:
                groups.append(group)
            logger = cfg.get("logger") or {}
            if not str(logger.get("_target_", "")).endswith("wandb_logger"):
                notes.append(f"runs with {' '.join(overrides) or 'the defaults'} log with logger="
                             f"{choices.get('logger')}, not to W&B: the dashboard shows none of them")
                continue
            project = project or logger.get("project")
            entity = entity or logger.get("entity")
    return {"groups": groups, "project": project or DEFAULT_PROJECT, "entity": entity, "notes": notes}


def _hydra_text(value: Any) -> str:
    """A typed value back into override text (``None`` → ``null``, ``True`` → ``true``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# -- from a sweep folder ---------------------------------------------------------------------
def spec_from_folder(folder: str | Path, *, project: str | None = None, entity: str | None = None,
                     metric: str | None = None) -> DashboardSpec:
    """The dashboard of the runs a sweep folder holds, from their records."""
    folder = Path(folder)
    found, skipped = records_from_folder(folder)
    records = [r for r in found if is_student_record(r)]
    if not records:
        raise ReportError(f"no student run records ({RECORD_NAME}) in {folder}: run the sweep first "
                          f"(kdexp sweep FILE --dir {folder}), or pass the sweep file instead of its folder.")
    per_run = [_override_values(r) for r in records]
    paths = list(dict.fromkeys(k for values in per_run for k in values))
    values = {k: _distinct(v[k] for v in per_run if k in v) for k in paths}
    axes = [Axis(k, config_field(k.lstrip("+~")), tuple(vs)) for k, vs in values.items()
            if len(vs) > 1 and is_compared(k)]
    seeds = _distinct(r.get(SEED, (r.get("config") or {}).get(SEED)) for r in records)
    groups = _distinct(wandb_group((r.get("config") or {}).get(GROUP), r.get(CHOICES) or {}) for r in records)
    metric = metric or VAL_ACC_BEST
    notes = list(skipped)
    statuses: dict[str, int] = {}
    for record in records:
        statuses[str(record.get(STATUS))] = statuses.get(str(record.get(STATUS)), 0) + 1
    ce_only = sum((r.get(CHOICES) or {}).get(KD) == NO_KD for r in records)
    if not ce_only:
        notes.append(f"no CE-only run ({KD}={NO_KD}) in {folder}: the curves' reference comes from CE-only runs "
                     f"of group {', '.join(groups)} on W&B (e.g. a baseline sweep with the same group)")
    no_wandb = [r for r in records if (r.get(CHOICES) or {}).get("logger") not in (None, "wandb")]
    if no_wandb:
        notes.append(f"{len(no_wandb)} of {len(records)} runs logged with logger="
                     f"{', '.join(sorted({str(r[CHOICES]['logger']) for r in no_wandb}))}, not to W&B: "
                     "the dashboard cannot show them")
    return DashboardSpec(
        name=folder.resolve().name, source=str(folder), project=project or _logged(records, "project")
        or DEFAULT_PROJECT, entity=entity or _logged(records, "entity"), groups=tuple(str(g) for g in groups),
        exclude_job_types=SKIPPED_JOB_TYPES, metric=metric, goal="maximize", axes=tuple(axes),
        seeds=tuple(seeds), panels=make_panels(axes, metric), expected_runs=len(records),
        runs={**statuses, "ce_only": ce_only}, ablation_markdown=_ablation(records, notes), notes=tuple(notes))


def _override_values(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's command-line overrides as ``path → typed value``."""
    out = {}
    for item in record.get("overrides") or []:
        key, sep, text = str(item).partition("=")
        if sep:
            out[key] = typed(key.lstrip("+~"), text)
    return out


def _distinct(values: Iterable[Any]) -> list[Any]:
    """Distinct values in first-seen order (``2`` and ``2.0`` are one)."""
    seen: dict[str, Any] = {}
    for value in values:
        seen.setdefault(canonical_json(value), value)
    return list(seen.values())


def _logged(records: Sequence[Mapping[str, Any]], key: str) -> str | None:
    """The W&B project or entity the runs logged to (their W&B run, else their logger config)."""
    for record in records:
        value = (record.get("wandb") or {}).get(key) or \
            flatten_config(record.get("config") or {}).get(f"logger.{key}")
        if value:
            return str(value)
    return None


def _ablation(records: Sequence[Mapping[str, Any]], notes: list[str]) -> str | None:
    """The markdown table ``kdexp report`` prints for these records (None, with a note, when it cannot)."""
    try:
        return make_ablation(records, ReportSpec()).markdown
    except ReportError as err:
        notes.append(f"no ablation table: {err}")
        return None


# -- either ----------------------------------------------------------------------------------
def dashboard_spec(source: str | Path, overrides: Sequence[str] = (), *, project: str | None = None,
                   entity: str | None = None, metric: str | None = None) -> DashboardSpec:
    """The dashboard of a sweep file (with overrides) or of a sweep folder."""
    path = Path(source)
    if path.is_dir():
        if overrides:
            raise ReportError(f"key=value overrides ({' '.join(overrides)}) apply to a sweep file; a folder's "
                              f"runs already say what they ran. Pass the sweep file instead of {path}.")
        return spec_from_folder(path, project=project, entity=entity, metric=metric)
    if path.is_file():
        return spec_from_sweep_file(path, overrides, project=project, entity=entity, metric=metric)
    raise ReportError(f"'{source}' is neither a sweep file nor a sweep folder: pass a file such as "
                      "sweeps/hinton_grid.yaml or a folder such as outputs/sweeps/hinton_grid.")


def default_output(source: str | Path, spec: DashboardSpec, root: str | Path = ".") -> Path:
    """Where the offline spec goes: into the sweep folder (a file's: ``outputs/sweeps/<name>``, as ``kdexp sweep``)."""
    path = Path(source)
    folder = path if path.is_dir() else Path(root) / "outputs" / "sweeps" / spec.name
    return folder / SPEC_FILE
