"""Runs → the cells of one ablation table.

A cell is one combination of axis values: mean ± sample std of the metric over the
seeds of its finished runs, with n and the failed runs counted beside it. Reference
cells: the CE-only baseline (one per value of the axes it has, e.g. per student
width) and the teacher. Every KD cell also gets its difference to the baseline with
the same student (Welch) and, where seeds match, the paired difference with its t test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kdexp.report.runs import RECORD_FIELDS, is_kd_scoped, is_teacher_side, metric_values
from kdexp.report.stats import paired_summary, welch_se
from kdexp.report.values import format_value, is_missing, sort_key
from kdexp.core.vocabulary import teacher_metric

KINDS = ("teacher", "baseline", "distill")  # the order rows appear in
MODES = ("raw", "delta", "paired")
# What _with_delta and _with_paired add to each KD cell.
DELTA_COLUMNS = ("baseline_mean", "baseline_std", "baseline_n", "delta", "delta_se")
PAIRED_COLUMNS = ("paired_mean", "paired_std", "paired_n", "paired_t", "paired_p", "paired_ci_low", "paired_ci_high")
SHOWN = {"raw": "mean", "delta": "delta", "paired": "paired_mean"}  # what KD cells display, per mode
_LOWER_IS_BETTER = ("ece", "loss", "kl", "nll", "err", "bpb", "ppl")


def is_accuracy_metric(metric: str) -> bool:
    """Accuracy-like metrics (acc, agreement) are fractions, shown in percent."""
    name = metric.rsplit("/", 1)[-1]
    return "acc" in name or "agreement" in name


def default_better(metric: str) -> str:
    """``min`` for errors, losses, KL and calibration error; ``max`` otherwise."""
    name = metric.rsplit("/", 1)[-1]
    return "min" if any(word in name for word in _LOWER_IS_BETTER) else "max"


@dataclass
class Table:
    """One ablation table: tidy ``cells`` (one row per cell, ``_kind`` says which row type)."""

    metric: str
    rows: list[str]
    cols: list[str]
    cells: pd.DataFrame
    runs: pd.DataFrame  # the finished runs that were averaged (after de-duplication), with `_value`
    mode: str = "raw"
    better: str = "max"
    split: dict[str, str] = field(default_factory=dict)  # the combination this table is for (--split)
    context: str = ""
    notes: list[str] = field(default_factory=list)
    teacher_metric: str = "test accuracy"  # what the teacher row shows (see teacher_values)

    @property
    def axes(self) -> list[str]:
        return [*self.rows, *self.cols]

    @property
    def heading(self) -> str | None:
        return ", ".join(f"{k}={v}" for k, v in self.split.items()) or None


def build_table(runs: pd.DataFrame, *, rows: Sequence[str], cols: Sequence[str], metric: str,
                mode: str = "raw", better: str = "max", split: dict[str, str] | None = None) -> Table:
    """Aggregate ``runs`` (with axis columns, see :func:`kdexp.report.runs.with_axes`) into a table.

    ``rows`` must hold at least one axis (:func:`kdexp.report.build.make_tables` ensures it).
    """
    rows, cols = list(rows), list(cols)
    axes = [*rows, *cols]
    runs = runs.assign(_value=metric_values(runs, metric))
    usable = runs["_status"].eq("finished") & runs["_value"].notna()
    superseded = _superseded(runs[usable], axes)
    counted = runs.drop(index=superseded)
    ok = usable.loc[counted.index]
    counted = counted.assign(_v=counted["_value"].where(ok), _seed_ok=counted["_seed"].where(ok),
                             _failed=counted["_status"].eq("failed"), _running=counted["_status"].eq("running"))

    cells = (counted.groupby(["_kind", *axes], dropna=False, sort=False)
             .agg(mean=("_v", "mean"), std=("_v", "std"), n=("_v", "count"), n_failed=("_failed", "sum"),
                  n_running=("_running", "sum"), seeds=("_seed_ok", _join_seeds))
             .reset_index())
    distill, baseline = _complete(cells[cells["_kind"].eq("distill")], rows, cols), cells[cells["_kind"].eq("baseline")]
    match = [a for a in axes if not is_kd_scoped(a) and baseline[a].notna().any()]
    distill = _with_delta(distill, baseline, match)
    distill = _with_paired(distill, counted[ok], axes, match)
    distill, baseline = _mark_best(distill, baseline, rows, SHOWN[mode], better, mode == "raw")

    reference, reference_name = teacher_values(counted, metric)
    parts = [_teacher_cells(counted.assign(_teacher_value=reference), axes)] if reference.notna().any() else []
    cells = pd.concat([*parts, baseline, distill], ignore_index=True)
    return Table(metric=metric, rows=rows, cols=cols, cells=_sorted(cells, rows, cols), runs=counted[ok], mode=mode,
                 better=better, split=dict(split or {}), context=describe_context(counted, axes),
                 notes=_notes(runs, counted, superseded, axes, metric), teacher_metric=reference_name)


def teacher_values(runs: pd.DataFrame, metric: str) -> tuple[pd.Series, str]:
    """Each run's figure for its teacher's reference row, and what that figure is.

    The teacher's own value of ``metric`` where the record has it (``teacher/test_bpb`` for
    ``test/bpb``: language models record nll, bpb and ppl); for any accuracy metric, the
    teacher's test accuracy (the figure every student record states); else none (no row).
    """
    own = pd.to_numeric(runs["_metrics"].map(lambda m: m.get(teacher_metric(metric))), errors="coerce").astype(float)
    if own.notna().any():
        return own, metric
    if "acc" in metric.rsplit("/", 1)[-1]:
        return runs["_teacher_acc"].astype(float), "test accuracy"
    return pd.Series(np.nan, index=runs.index, dtype=float), ""


def _complete(distill: pd.DataFrame, rows: list[str], cols: list[str]) -> pd.DataFrame:
    """Every KD row × every KD column, so a grid point with no run at all is a cell with n = 0."""
    if not cols or distill.empty:
        return distill
    grid = distill[rows].drop_duplicates().merge(distill[cols].drop_duplicates(), how="cross")
    # counts and seeds of the new cells are filled in _sorted
    return grid.merge(distill, on=[*rows, *cols], how="left").assign(_kind="distill")


def _superseded(finished: pd.DataFrame, axes: list[str]) -> pd.Index:
    """Older copies of the same run (same kind, axes and seed, e.g. a demo run inside outputs/)."""
    ordered = finished.sort_values("_time", na_position="first", kind="stable")
    duplicated = ordered.duplicated(["_kind", *axes, "_seed"], keep="last") & ordered["_seed"].notna()
    return ordered.index[duplicated]


def _join_seeds(seeds: pd.Series) -> str:
    return ";".join(str(int(s)) for s in sorted(seeds.dropna()))


def _with_delta(distill: pd.DataFrame, baseline: pd.DataFrame, match: list[str]) -> pd.DataFrame:
    """KD mean − CE-only mean of the same student (same values on the baseline's axes)."""
    if distill.empty or baseline.empty:
        return distill.assign(**{**dict.fromkeys(DELTA_COLUMNS, np.nan), "baseline_n": 0})
    ref = baseline[[*match, "mean", "std", "n"]].rename(
        columns={"mean": "baseline_mean", "std": "baseline_std", "n": "baseline_n"})
    ref = ref[~ref.duplicated(match, keep=False)] if match else ref.iloc[:1]  # ambiguous → no delta
    out = distill.assign(_one=0).merge(ref.assign(_one=0), on=["_one", *match], how="left").drop(columns="_one")
    out["delta"] = out["mean"] - out["baseline_mean"]
    out["delta_se"] = welch_se(out["std"], out["n"], out["baseline_std"], out["baseline_n"])
    return out


def _with_paired(distill: pd.DataFrame, ok_runs: pd.DataFrame, axes: list[str], match: list[str]) -> pd.DataFrame:
    """Gain over the CE-only run with the same student and the same seed, averaged over seeds."""
    kd = ok_runs[ok_runs["_kind"].eq("distill")][[*axes, "_seed", "_v"]]
    ce = ok_runs[ok_runs["_kind"].eq("baseline")][[*match, "_seed", "_v"]].rename(columns={"_v": "_v_base"})
    if kd.empty or ce.empty:  # nothing to pair (and empty frames would not merge on their dtypes)
        return distill.assign(**{**dict.fromkeys(PAIRED_COLUMNS, np.nan), "paired_n": 0})
    pairs = kd.merge(ce, on=[*match, "_seed"])
    pairs["diff"] = pairs["_v"] - pairs["_v_base"]
    summary = paired_summary(pairs, axes)
    out = distill.merge(summary, on=axes, how="left")
    out["paired_n"] = out["paired_n"].fillna(0).astype(int)
    return out


def _mark_best(distill: pd.DataFrame, baseline: pd.DataFrame, rows: list[str], column: str, better: str,
               with_baseline: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mark the best cell of each row by ``column`` (ties all marked; a row with one cell has no best).

    A CE-only cell that has every row axis sits in a KD row (e.g. ``--cols kd``) and,
    when raw values are shown, competes there too.
    """
    in_row = baseline[rows].notna().all(axis=1) & with_baseline
    ranked = pd.concat([distill.assign(_shown=distill[column], _from="distill"),
                        baseline[in_row].assign(_shown=lambda d: d["mean"], _from="baseline")], ignore_index=True)
    grouped = ranked.groupby(rows, dropna=False, sort=False)["_shown"]
    best = (ranked["_shown"].notna() & ranked["_shown"].eq(grouped.transform(better))
            & grouped.transform("count").ge(2)).to_numpy(dtype=bool)
    is_kd = ranked["_from"].eq("distill").to_numpy(dtype=bool)
    distill = distill.assign(best=best[is_kd])
    baseline = baseline.assign(best=pd.Series(best[~is_kd], index=baseline.index[in_row], dtype=object))
    return distill, baseline.assign(best=baseline["best"].fillna(False).astype(bool))


def _teacher_cells(runs: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """The teacher's figure (``_teacher_value``); one teacher counts once however many students used it."""
    known = runs[runs["_teacher_value"].notna()]
    hashed = known[known["_teacher_hash"].notna()]
    # by weights hash; only when no run knows its teacher's hash, by the value itself
    teachers = hashed.drop_duplicates("_teacher_hash") if len(hashed) else known.drop_duplicates("_teacher_value")
    side = [a for a in axes if is_teacher_side(a) or a in RECORD_FIELDS]
    cells = (teachers.assign(_one=0).groupby(["_one", *side], dropna=False, sort=False)
             .agg(mean=("_teacher_value", "mean"), std=("_teacher_value", "std"), n=("_teacher_value", "count"))
             .reset_index().drop(columns="_one"))
    return cells.assign(_kind="teacher", n_failed=0, n_running=0, seeds="", best=False)


def _sorted(cells: pd.DataFrame, rows: list[str], cols: list[str]) -> pd.DataFrame:
    """Teacher first; then by row axes (the CE-only row before its KD rows), then by columns."""
    cells = cells.assign(_not_teacher=cells["_kind"].ne("teacher"), _kind_order=cells["_kind"].map(KINDS.index))
    axes = set(rows) | set(cols)
    ordered = cells.sort_values(["_not_teacher", *rows, "_kind_order", *cols], kind="stable",
                                key=lambda s: s.map(sort_key) if s.name in axes else s)
    for column in ("n", "n_failed", "n_running", "baseline_n"):
        if column in ordered:
            ordered[column] = ordered[column].fillna(0).astype(int)
    ordered["seeds"] = ordered["seeds"].fillna("")
    return ordered.drop(columns=["_not_teacher", "_kind_order"]).reset_index(drop=True)


def describe_context(runs: pd.DataFrame, axes: Sequence[str]) -> str:
    """The settings every run of the table shares, e.g. ``data=mnist1d · teacher=cnn1d (weights cc05b196) · …``."""
    parts = []
    for group in ("data", "teacher", "student", "optimizer", "scheduler"):
        values = runs["_choices"].map(lambda c, g=group: c.get(g)).dropna().unique()
        if group not in axes and len(values) == 1:
            text = f"{group}={values[0]}"
            if group == "teacher":
                hashes = runs["_teacher_hash"].dropna().unique()
                if len(hashes) == 1:
                    text += f" (weights {str(hashes[0])[:8]})"
            parts.append(text)
    # The objective actually used (a plug-in set by kd._target_ names itself); older records: the kd option.
    distill = runs[runs["_kind"].eq("distill")]
    kd = distill["_objective"].where(distill["_objective"].notna(),
                                     distill["_choices"].map(lambda c: c.get("kd"))).dropna().unique()
    if "kd" not in axes and len(kd) == 1:
        parts.append(f"kd={kd[0]}" + (" vs CE-only" if runs["_kind"].eq("baseline").any() else ""))
    epochs = runs["_config"].map(lambda c: c.get("trainer.max_epochs")).dropna().unique()
    if "trainer.max_epochs" not in axes and len(epochs) == 1:
        parts.append(f"trainer.max_epochs={format_value(epochs[0])}")
    finished = runs[runs["_status"].eq("finished")]
    seeds = sorted({int(s) for s in finished["_seed"].dropna()})
    if seeds:
        parts.append("seeds " + ", ".join(map(str, seeds)))
    status = runs["_status"].value_counts()
    parts.append(f"{len(runs)} runs (" + ", ".join(f"{n} {s}" for s, n in status.items()) + ")")
    return " · ".join(parts)


def _notes(runs: pd.DataFrame, counted: pd.DataFrame, superseded: pd.Index, axes: list[str],
           metric: str) -> list[str]:
    """What a reader must know about runs that were not averaged."""
    notes = []
    for status, verb in (("failed", "failed"), ("running", "still running or killed before finishing")):
        bad = counted[counted["_status"].eq(status)]
        if bad.empty:
            continue
        listed = [f"{_run_label(run, axes)}" + (f" — {run['_error']}" if run["_error"] else "")
                  + f" ({run['_source']})" for _, run in bad.head(10).iterrows()]
        more = [f"… and {len(bad) - 10} more"] if len(bad) > 10 else []
        notes.append(f"{len(bad)} run{'s' * (len(bad) != 1)} {verb}, counted but not averaged: "
                     + "; ".join(listed + more))
    no_metric = counted[counted["_status"].eq("finished") & counted["_value"].isna()]
    if not no_metric.empty:
        notes.append(f"{len(no_metric)} finished run(s) have no '{metric}' and are left out: "
                     + "; ".join(_run_label(r, axes) for _, r in no_metric.head(10).iterrows()))
    if len(superseded):
        dup = runs.loc[superseded]
        notes.append(f"{len(dup)} duplicate run(s) (same settings and seed as a newer run) left out: "
                     + "; ".join(str(s) for s in dup["_source"].head(3)) + ("; …" if len(dup) > 3 else ""))
    if not counted["_kind"].eq("baseline").any():
        notes.append("no CE-only baseline (kd=none) among these runs: run one per student to get the reference row.")
    weak = counted[counted["_teacher_weak"].eq(True)]
    if not weak.empty:  # e.g. debug=fast, whose one-epoch teachers may be no better than guessing
        notes.append(f"{len(weak)} run(s) distilled from a teacher no better than chance (teacher.allow_untrained; "
                     "their records say teacher.better_than_chance: false): "
                     + "; ".join(str(s) for s in weak["_source"].head(3)) + ("; …" if len(weak) > 3 else ""))
    return notes


def _run_label(run: pd.Series, axes: Sequence[str]) -> str:
    labels = [f"{a}={format_value(run[a])}" for a in axes if not is_missing(run[a])]
    seed = run["_seed"]
    labels.append(f"seed {format_value(seed)}" if not is_missing(seed) else "seed ?")
    prefix = "CE-only " if run["_kind"] == "baseline" else ""
    return prefix + ", ".join(labels)
