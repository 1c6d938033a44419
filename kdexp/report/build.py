"""Records → tables: validate the request, filter, check what may be averaged, aggregate.

This is the whole report without I/O; ``kdexp report``, the Python API
(:func:`kdexp.api.ablation_table`) and tests all go through :func:`make_ablation` /
:func:`make_tables`, whether the records came from folders or from W&B.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from kdexp.report.consistency import check_consistent, split_groups
from kdexp.report.errors import ReportError
from kdexp.report.formats import render_latex, render_markdown, tidy_frame
from kdexp.report.runs import (apply_where, check_metric, is_student_record, known_paths, objective_knobs,
                               runs_frame, with_axes)
from kdexp.report.table import MODES, Table, build_table, default_better
from kdexp.core.vocabulary import TEST_ACC

DEFAULT_ROWS = ("student.width", "kd.temperature")
DEFAULT_COLS = ("kd.alpha",)


@dataclass(frozen=True)
class ReportSpec:
    """What table to build (the CLI options, parsed)."""

    rows: tuple[str, ...] = DEFAULT_ROWS
    cols: tuple[str, ...] = DEFAULT_COLS
    metric: str = TEST_ACC
    where: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    split: bool = False
    mode: str = "raw"  # raw | delta | paired
    better: str = "auto"  # auto | max | min


def make_tables(records: Sequence[Mapping[str, Any]], spec: ReportSpec = ReportSpec()) -> tuple[list[Table], list[str]]:
    """The tables for ``records`` (one, or one per combination with ``split``), and notes."""
    if spec.mode not in MODES:
        raise ReportError(f"mode must be one of {', '.join(MODES)}; got '{spec.mode}'.")
    runs = runs_frame([r for r in records if is_student_record(r)])
    if runs.empty:
        raise ReportError("no student runs to report on (only teacher records?): point at a sweep or run folder.")
    known = known_paths(runs)
    rows, cols, notes = _axes(spec, known, objective_knobs(runs))
    runs = apply_where(with_axes(runs, [*rows, *cols], known), spec.where, known)
    if runs.empty:
        shown = " ".join(f"--where {k}={v}" for k, v in spec.where)
        raise ReportError(f"no run matches {shown}: check the values (kdexp report … --rows KEY shows which exist).")
    check_metric(runs, spec.metric)
    better = default_better(spec.metric) if spec.better == "auto" else spec.better
    axes = [*rows, *cols]
    if spec.split:
        groups = split_groups(runs, axes, spec.ignore)
    else:
        check_consistent(runs, axes, spec.ignore)
        groups = [({}, runs)]
    tables = [build_table(group, rows=rows, cols=cols, metric=spec.metric, mode=spec.mode, better=better,
                          split=label) for label, group in groups]
    return tables, notes


@dataclass(frozen=True)
class AblationTable:
    """The tables of one report and its notes, in each form ``kdexp report`` writes them."""

    tables: list[Table]  # one, or one per combination of settings (split)
    notes: list[str]  # what kdexp report prints as `note:` lines (e.g. dropped default axes)

    @property
    def markdown(self) -> str:
        """What ``kdexp report`` prints on stdout."""
        return render_markdown(self.tables)

    @property
    def frame(self) -> pd.DataFrame:
        """One row per cell (``row_type``, the axes, ``mean``, ``std``, ``n``, ``seeds``, ``best``, ...) in the
        metric's own units (fractions for accuracies): the CSV of ``kdexp report --csv``."""
        return tidy_frame(self.tables)

    @property
    def latex(self) -> str:
        """The booktabs tabular of ``kdexp report --latex``."""
        return render_latex(self.tables)

    def __str__(self) -> str:
        return self.markdown

    def _repr_markdown_(self) -> str:  # a notebook renders the table
        return self.markdown


def make_ablation(records: Sequence[Mapping[str, Any]], spec: ReportSpec = ReportSpec()) -> AblationTable:
    """:func:`make_tables`, kept with its notes and rendered on demand."""
    tables, notes = make_tables(records, spec)
    return AblationTable(tables, notes)


def default_axes(knobs: list[str]) -> tuple[list[str], list[str]]:
    """Rows: student width and the objective's first knob; columns: its second knob.

    Any objective's own knobs (``kd.beta`` for DKD) become the table's axes; with no
    declared knobs (older records) the Hinton grid's T × α is assumed.
    """
    if not knobs:
        return list(DEFAULT_ROWS), list(DEFAULT_COLS)
    return ["student.width", knobs[0]], knobs[1:2]


def _axes(spec: ReportSpec, known: set[str], knobs: list[str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """The axes, checked; default axes not in ``known`` are dropped (explicit ones must exist)."""
    rows, cols = list(spec.rows), list(spec.cols)
    notes = []
    if (rows, cols) == (list(DEFAULT_ROWS), list(DEFAULT_COLS)):
        rows, cols = default_axes(knobs or [])
        absent = [a for a in rows + cols if a not in known]
        if absent:
            notes.append(f"default axes {', '.join(absent)} are in no record and were dropped")
            rows, cols = [a for a in rows if a not in absent], [a for a in cols if a not in absent]
    overlap = set(rows) & set(cols)
    if overlap:
        raise ReportError(f"{', '.join(sorted(overlap))} is both a row and a column axis: use it in --rows or --cols.")
    if len(set(rows)) != len(rows) or len(set(cols)) != len(cols):
        raise ReportError("an axis is listed twice in --rows or --cols.")
    if not rows:
        raise ReportError("the table needs at least one row axis: pass --rows, e.g. --rows student.width.")
    if any(a.startswith("_") for a in rows + cols):
        raise ReportError("axis names cannot start with '_': use a config path such as student.width.")
    return rows, cols, notes
