"""PNG figures of a table's runs: a T × α heatmap per student width, and metric vs width.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, so no pyplot
state or interactive backend is touched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kdexp.report.formats import direction, number_text, scale_of
from kdexp.report.runs import axis_values, metric_values
from kdexp.report.table import Table
from kdexp.report.values import format_value, matches
from kdexp.core.vocabulary import METRIC_TITLES, VAL_ACC_BEST

SELECT_ON = VAL_ACC_BEST  # what picks the KD setting shown per width (never a test metric)

WIDTH, TEMPERATURE, ALPHA = "student.width", "kd.temperature", "kd.alpha"
_KNOB_LABELS = {TEMPERATURE: "T (kd.temperature)", ALPHA: "α (kd.alpha)"}


def slug(text: str) -> str:
    """A file-name-safe form: ``test/acc`` → ``test_acc``."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_") or "report"


def plot_table(table: Table, out_dir: str | Path, *,
               kd_at: Mapping[str, str] | None = None) -> tuple[list[Path], list[str]]:
    """Write the figures of ``table`` under ``out_dir``; returns (files, notes on figures skipped)."""
    out = Path(out_dir)
    y_knob, x_knob = heatmap_axes(table.axes)
    runs = table.runs.assign(_w=axis_values(table.runs, WIDTH), _t=axis_values(table.runs, y_knob),
                             _a=axis_values(table.runs, x_knob))
    mixed = _other_varying_axes(runs, table.axes, (y_knob, x_knob))
    if mixed:
        return [], [f"plots skipped for {table.heading or table.metric}: they would average over {', '.join(mixed)} "
                    "(fix it with --where or --split)"]
    out.mkdir(parents=True, exist_ok=True)
    files, notes = [], []
    kd = runs[runs["_kind"].eq("distill")]
    if kd["_t"].notna().any() and kd["_a"].notna().any():
        files += [_save(fig, out / name) for name, fig in heatmap_figures(table, runs, (y_knob, x_knob))]
    else:
        notes.append(f"no heatmap: the KD runs have no {y_knob} and {x_knob}")
    if runs["_w"].notna().any():
        path, note = _width_plot(table, runs, out, kd_at or {})
        files += [path] if path else []
        notes += [note] if note else []
    else:
        notes.append("no width plot: the runs have no student.width")
    return files, notes


def heatmap_axes(axes: list[str]) -> tuple[str, str]:
    """The two objective settings a heatmap spans: the table's first two ``kd.*`` axes, else T × α."""
    knobs = [a for a in axes if a.startswith("kd.")]
    return (knobs[0], knobs[1]) if len(knobs) >= 2 else (TEMPERATURE, ALPHA)


def _other_varying_axes(runs: pd.DataFrame, axes: list[str], knobs: tuple[str, str]) -> list[str]:
    """Table axes besides width and the heatmap's two knobs that take several values within KD or CE-only runs."""
    out = []
    for axis in axes:
        if axis in (WIDTH, *knobs):
            continue
        if any(runs.loc[runs["_kind"].eq(kind), axis].nunique() > 1 for kind in ("distill", "baseline")):
            out.append(axis)
    return out


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def heatmap_figures(table: Table, runs: pd.DataFrame | None = None,
                    knobs: tuple[str, str] | None = None) -> list[tuple[str, Figure]]:
    """(file name, figure) per student width: the mean of ``table.metric`` over seeds per knob pair.

    ``runs`` are ``table.runs`` with ``_w`` / ``_t`` / ``_a`` axis columns (made here when not given).
    Cell labels are printed by the table's own :func:`number_text`, so they read as the table does.
    """
    if knobs is None:
        knobs = heatmap_axes(table.axes)
    if runs is None:
        runs = table.runs.assign(_w=axis_values(table.runs, WIDTH), _t=axis_values(table.runs, knobs[0]),
                                 _a=axis_values(table.runs, knobs[1]))
    factor, dp, unit = scale_of(table.metric)
    kd = runs[runs["_kind"].eq("distill") & runs["_t"].notna() & runs["_a"].notna()]
    ce = runs[runs["_kind"].eq("baseline")]
    figures = []
    for width in sorted(kd["_w"].dropna().unique()) or [None]:
        sub = kd if width is None else kd[kd["_w"].eq(width)]
        grid = sub.astype({"_t": float, "_a": float}).pivot_table(
            index="_t", columns="_a", values="_value", aggfunc="mean") * factor
        fig = Figure(figsize=(1.2 + 1.1 * grid.shape[1], 1.0 + 0.8 * grid.shape[0]))
        ax = fig.add_subplot()
        image = ax.imshow(grid.to_numpy(), cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(grid.shape[1]), [format_value(a) for a in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [format_value(t) for t in grid.index])
        ax.set_xlabel(_KNOB_LABELS.get(knobs[1], knobs[1]))
        ax.set_ylabel(_KNOB_LABELS.get(knobs[0], knobs[0]))
        low, high = np.nanmin(grid.to_numpy()), np.nanmax(grid.to_numpy())
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            bright = not math.isnan(value) and value > (low + high) / 2
            ax.text(j, i, "—" if math.isnan(value) else number_text(value, dp), ha="center", va="center",
                    color="black" if bright else "white", fontsize=8)
        fig.colorbar(image, ax=ax, label=f"{table.metric}{' (%)' if unit else ''}, {direction(table.better)}")
        title = f"{table.metric}, mean over seeds" + ("" if width is None else f", student width {format_value(width)}")
        base = ce if width is None else ce[ce["_w"].eq(width)]
        if len(base):
            title += f"\nCE only: {number_text(base['_value'].mean() * factor, dp)}"
        ax.set_title(title, fontsize=10)
        suffix = "" if width is None else f"_width{format_value(width)}"
        figures.append((f"heatmap_{slug(table.metric)}{suffix}.png", fig))
    return figures


def _cells(kd: pd.DataFrame) -> pd.DataFrame:
    """Mean and std of the plotted metric, and mean ``SELECT_ON``, per (width, T, α)."""
    kd = kd.assign(_select=metric_values(kd, SELECT_ON))
    return (kd.groupby(["_w", "_t", "_a"], dropna=False)
            .agg(mean=("_value", "mean"), std=("_value", "std"), select=("_select", "mean"))
            .reset_index().dropna(subset=["_w"]))


def kd_setting_per_width(kd: pd.DataFrame) -> pd.DataFrame:
    """Per width, the (T, α) cell with the best mean ``SELECT_ON`` (validation accuracy).

    Choosing it on the plotted test metric would let the test set select the result it
    reports; ``kd`` holds KD runs with ``_w``/``_t``/``_a`` axis columns and ``_value``.
    """
    cells = _cells(kd)
    pick = cells.groupby("_w")["select"].transform("max").eq(cells["select"])
    return cells[pick].drop_duplicates("_w").sort_values("_w")


def _width_plot(table: Table, runs: pd.DataFrame, out: Path,
                kd_at: Mapping[str, str]) -> tuple[Path | None, str | None]:
    factor, dp, unit = scale_of(table.metric)
    kd = runs[runs["_kind"].eq("distill")]
    if kd_at:
        for key, wanted in kd_at.items():
            kd = kd[axis_values(kd, key).map(lambda v, w=wanted: matches(v, w))]
        label = "KD at " + ", ".join(f"{k.removeprefix('kd.')}={v}" for k, v in kd_at.items())
        best = _cells(kd).drop_duplicates("_w").sort_values("_w")
    else:
        label = f"KD, the setting with the best {SELECT_ON} per width"
        best = kd_setting_per_width(kd)
    ce = (runs[runs["_kind"].eq("baseline")].groupby("_w").agg(mean=("_value", "mean"), std=("_value", "std"))
          .reset_index().sort_values("_w"))
    if best.empty and ce.empty:
        return None, "no width plot: no runs" + (f" at {label}" if kd_at else "")
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    if len(best):
        x = best["_w"].astype(float)
        ax.errorbar(x, best["mean"] * factor, yerr=best["std"].fillna(0) * factor, marker="o", capsize=3, label=label)
        if not kd_at:
            for xi, yi, t, a in zip(x, best["mean"] * factor, best["_t"], best["_a"]):
                ax.annotate(f"T={format_value(t)}, α={format_value(a)}", (xi, yi), textcoords="offset points",
                            xytext=(4, 6), fontsize=7)
    if len(ce):
        ax.errorbar(ce["_w"].astype(float), ce["mean"] * factor, yerr=ce["std"].fillna(0) * factor, marker="s",
                    capsize=3, label="CE only (kd=none)")
    teacher = table.cells[table.cells["_kind"].eq("teacher")]
    if len(teacher):
        ax.axhline(teacher["mean"].iloc[0] * factor, color="gray", linestyle="--",
                   label=f"teacher ({table.teacher_metric})")
    widths = sorted(set(best["_w"].astype(float)) | set(ce["_w"].astype(float)))
    if widths and min(widths) > 0 and max(widths) / min(widths) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [format_value(w) for w in widths])
    ax.set_xlabel("student width (student.width)")
    ax.set_ylabel(f"{table.metric}{' (%)' if unit else ''}, {direction(table.better)}")
    ax.set_title(f"{METRIC_TITLES.get(table.metric, table.metric)}\nmean ± std over seeds", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out / f"width_{slug(table.metric)}.png"), None
