"""Tables as text: markdown (stdout), LaTeX (booktabs tabular) and tidy CSV.

All three read the same tidy cells; the grid (rows × columns of cell texts) is laid
out once with pandas and printed by each format.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kdexp.report.table import DELTA_COLUMNS, PAIRED_COLUMNS, Table, is_accuracy_metric
from kdexp.report.values import format_value, is_missing, sort_key
from kdexp.core.vocabulary import METRIC_TITLES

CE_LABEL, TEACHER_LABEL = "CE only", "teacher"


# -- cell texts ------------------------------------------------------------------
def scale_of(metric: str) -> tuple[float, int, str]:
    """(factor, decimals, unit): accuracies as percent with 2 decimals, others raw with 4."""
    return (100.0, 2, "%") if is_accuracy_metric(metric) else (1.0, 4, "")


def number_text(value: float, decimals: int, signed: bool = False) -> str:
    """A value already in display units (see :func:`scale_of`) as every table cell, plot label and
    heatmap cell prints it, so a figure never reads otherwise than its table (64.25, not 64.2)."""
    return f"{value:{'+' if signed else ''}.{decimals}f}"


def direction(better: str) -> str:
    """``higher is better`` / ``lower is better``: which way a cell (and a difference) improves."""
    return "higher is better" if better == "max" else "lower is better"


def short_name(metric: str) -> str:
    """The metric's own name for a Δ: ``test/bpb`` → ``bpb``."""
    return metric.rsplit("/", 1)[-1]


def caption(table: Table) -> str:
    """What the KD cells hold and which way is better, for the heading: ``Δ bpb vs CE only (KD − CE,
    paired over seeds), lower is better``; differences read the same way as the metric."""
    name = short_name(table.metric)
    shown = {"raw": "mean over seeds", "delta": f"Δ {name} vs CE only (mean KD − mean CE)",
             "paired": f"Δ {name} vs CE only (KD − CE, paired over seeds)"}[table.mode]
    return f"{shown}, {direction(table.better)}"


def cell_text(cell: pd.Series, table: Table) -> str:
    """``65.70 ± 0.82 (n=3)``, or the Δ / paired Δ of a KD cell; ``—`` when nothing finished."""
    factor, dp, _ = scale_of(table.metric)
    n, failed, running = int(cell["n"]), int(cell["n_failed"]), int(cell["n_running"])
    tags = [f"+{failed} failed"] * bool(failed) + [f"+{running} running"] * bool(running)
    mode = table.mode if cell["_kind"] == "distill" else "raw"  # reference rows stay raw
    if mode == "raw":
        return _stat(cell["mean"] * factor, cell["std"] * factor, [f"n={n}"], tags, dp, n, signed=False)
    if mode == "delta":
        base_n = int(cell.get("baseline_n", 0) or 0)
        if n == 0 or base_n == 0:
            return _nothing(tags, "no CE-only" if n else "")
        return _stat(cell["delta"] * factor, cell["delta_se"] * factor, [f"n={n} vs {base_n}"], tags, dp, 2, True)
    pn = int(cell.get("paired_n", 0) or 0)
    if pn == 0:
        return _nothing(tags, "no paired seeds" if n else "")
    extra = [f"n={pn}"]
    if pn > 1:
        extra += [f"t={cell['paired_t']:.2f}", f"95% CI [{number_text(cell['paired_ci_low'] * factor, dp, True)}, "
                                              f"{number_text(cell['paired_ci_high'] * factor, dp, True)}]"]
    return _stat(cell["paired_mean"] * factor, cell["paired_std"] * factor, extra, tags, dp, pn, True)


def _stat(mean: float, spread: float, inside: list[str], tags: list[str], dp: int, n: int, signed: bool) -> str:
    if is_missing(mean):
        return _nothing(tags, "")
    text = number_text(mean, dp, signed)
    if n > 1 and not is_missing(spread) and math.isfinite(spread):
        text += f" ± {number_text(spread, dp)}"
    return f"{text} ({', '.join(inside + tags)})"


def _nothing(tags: list[str], why: str) -> str:
    inside = ([why] if why else []) + [t.lstrip("+") for t in tags]
    return "—" + (f" ({', '.join(inside)})" if inside else "")


# -- the grid --------------------------------------------------------------------
@dataclass
class GridRow:
    labels: list[str]
    kind: str
    texts: list[str]  # one per column
    best: list[bool]
    span: str | None  # a reference value that holds for every column


@dataclass
class Grid:
    row_axes: list[str]
    columns: list[tuple]  # column axis values, one tuple per column
    rows: list[GridRow]


def layout(table: Table) -> Grid:
    """Cells → rows (teacher, then per row value the CE-only row and the KD rows) × column values."""
    cells = table.cells
    rows, cols = table.rows, table.cols
    texts = cells.apply(lambda c: cell_text(c, table), axis=1)
    spans = cells[cols].isna().all(axis=1) & bool(cols)
    columns = sorted({_col_key(c, cols) for _, c in cells[~spans].iterrows()},
                     key=lambda t: tuple(sort_key(v) for v in t)) or [()]
    # A CE-only cell that has every row axis (e.g. --rows student.width --cols kd) shares the KD row.
    row_key = cells.apply(lambda c: _col_key(c, rows), axis=1)
    col_key = cells.apply(lambda c: _col_key(c, cols), axis=1)
    distill = cells["_kind"].eq("distill")
    kd_rows = set(row_key[distill])
    kd_cells = set(zip(row_key[distill], col_key[distill]))
    # ... unless a KD cell already sits in its column (a shared setting, e.g. data.transfer_set=null): own row then.
    # A CE-only cell that spans every column (its run has none of the column settings) keeps its own row too.
    shares = pd.Series([rk in kd_rows and (rk, ck) not in kd_cells for rk, ck in zip(row_key, col_key)],
                       index=cells.index) & ~spans
    row_kind = cells["_kind"].where(~(cells["_kind"].eq("baseline") & shares), "distill")
    row_ids = cells.assign(_row_kind=row_kind).groupby(["_row_kind", *rows], dropna=False, sort=False).ngroup()
    grid_rows = []
    for _, group in cells.groupby(row_ids, sort=True):
        first = group.iloc[0]
        by_col = {_col_key(c, cols): i for i, c in group[~spans.loc[group.index]].iterrows()}
        span_idx = group.index[spans.loc[group.index]]
        kind = row_kind[group.index[0]]
        found = [by_col.get(col) for col in columns]
        filler = "" if len(span_idx) else "—"
        grid_rows.append(GridRow(
            labels=_row_labels(first, rows, kind),
            kind=kind,
            texts=[texts[i] if i is not None else filler for i in found],
            best=[bool(cells.at[i, "best"]) if i is not None else False for i in found],
            span=texts[span_idx[0]] if len(span_idx) else None,
        ))
    return Grid(row_axes=list(rows), columns=columns, rows=grid_rows)


def _col_key(cell: pd.Series, cols: Sequence[str]) -> tuple:
    """The cell's values on ``cols`` (a column's or a row's identity)."""
    # None, not NaN: NaN != NaN would make a column with an absent value unfindable
    return tuple(None if is_missing(cell[a]) else cell[a] for a in cols)


def _row_labels(cell: pd.Series, rows: Sequence[str], kind: str) -> list[str]:
    labels = [format_value(cell[a]) if not is_missing(cell[a]) else "" for a in rows]
    if kind == "distill":
        return [label or "—" for label in labels]
    name = CE_LABEL if kind == "baseline" else TEACHER_LABEL
    missing = [i for i, a in enumerate(rows) if is_missing(cell[a])]
    if missing:
        labels[missing[0]] = name
    elif labels:
        # A baseline row named by its own objective (kd=svm_none, a hinge loss) is "no teacher", not "CE only".
        own = kind == "baseline" and rows[-1] == "kd" and labels[-1] != "none"
        labels[-1] += f" ({'no teacher' if own else name})"
    return labels


def column_title(values: tuple, cols: Sequence[str], metric: str) -> str:
    return ", ".join(f"{a}={format_value(v)}" for a, v in zip(cols, values)) or metric


# -- legend and notes ----------------------------------------------------------------
def legend(table: Table) -> str:
    """One paragraph: metric, what ± and n are, best marking, missing cells."""
    _, _, unit = scale_of(table.metric)
    title = METRIC_TITLES.get(table.metric, table.metric)
    units = " in %" if unit else ""
    points = "percentage points" if unit else "metric units"
    best = f"bold = best cell of its row ({'highest' if table.better == 'max' else 'lowest'})"
    # A difference is read like the metric: for a lower-is-better one a KD improvement is negative.
    improves = "positive" if table.better == "max" else "negative"
    sign = f"{direction(table.better)}: a {improves} Δ means KD did better than CE only"
    if table.mode == "raw":
        what = (f"{table.metric} ({title}){units}: mean ± sample std over seeds (ddof=1; no ± when n=1), "
                "n = finished seeds averaged")
    elif table.mode == "delta":
        what = (f"{table.metric} ({title}): KD cells show Δ {short_name(table.metric)} = mean(KD) − mean(CE only, "
                f"same student) in {points} ({sign}); ± = standard error of that difference, "
                "√(s²_KD/n_KD + s²_CE/n_CE); n = KD vs CE-only seeds; "
                f"reference rows show raw mean ± std{units}")
    else:
        what = (f"{table.metric} ({title}): KD cells show the paired Δ {short_name(table.metric)}, mean over seeds "
                f"of KD − CE only (same student, same seed) in {points} ({sign}); ± = sample std of those "
                "differences; t = paired t statistic (df = n−1) with its 95% CI; n = paired seeds; "
                f"reference rows show raw mean ± std{units}")
    teacher = (f"; teacher row: the teacher's {table.teacher_metric}, n = distinct teachers"
               if table.cells["_kind"].eq("teacher").any() else "")
    spans = ("; a reference row that holds for every column (the teacher; a CE-only run without the column "
             "settings) repeats its one value in each column") if table.cols else ""
    return (f"{what}. {best}; — = no finished run; failed runs are counted (+k failed), never averaged"
            f"{teacher}{spans}.")


# -- markdown --------------------------------------------------------------------
def render_markdown(tables: Sequence[Table]) -> str:
    """All tables as one markdown document (a heading per table when --split made several)."""
    return "\n\n".join(_markdown_one(t) for t in tables) + "\n"


def _markdown_one(table: Table) -> str:
    grid = layout(table)
    heading = table.heading if table.heading else f"{table.metric} — {METRIC_TITLES.get(table.metric, '')}"
    heading = f"{heading.rstrip(' —')} · {caption(table)}"
    headers = [*grid.row_axes, *(column_title(c, table.cols, table.metric) for c in grid.columns)]
    lines = [f"### {heading}", "", f"{table.context}", "",
             _md_row(headers), "| " + " | ".join(["---"] * len(grid.row_axes) + ["---:"] * len(grid.columns)) + " |"]
    for row in grid.rows:
        texts = [f"**{t}**" if b else t for t, b in zip(row.texts, row.best)]
        if row.span is not None:  # markdown cannot span columns: the one value stands in each
            texts = [row.span] * len(texts)
        lines.append(_md_row([*row.labels, *texts]))
    lines += ["", legend(table)]
    lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines)


def _md_row(values: Iterable[str]) -> str:
    return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"


# -- LaTeX -------------------------------------------------------------------------
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    escaped = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    return (escaped.replace("±", r"$\pm$").replace("—", "---").replace("−", "$-$")
            .replace("√", r"$\surd$").replace("²", r"$^2$"))


def render_latex(tables: Sequence[Table]) -> str:
    """One booktabs ``tabular`` per table, each preceded by its legend as a comment (needs \\usepackage{booktabs})."""
    return "\n\n".join(_latex_one(t) for t in tables) + "\n"


def _latex_one(table: Table) -> str:
    grid = layout(table)
    n_rows, n_cols = len(grid.row_axes), len(grid.columns)
    lines = [f"% {table.heading + ' · ' if table.heading else ''}{table.metric}: {caption(table)}"]
    lines += [f"% {line}" for line in (legend(table), table.context, *table.notes)]
    lines += [r"\begin{tabular}{" + "l" * n_rows + "r" * n_cols + "}", r"\toprule"]
    row_heads = [latex_escape(a) for a in grid.row_axes]
    if len(table.cols) == 1:  # two header lines: the column axis, then its values
        lines.append(" & ".join([""] * n_rows + [rf"\multicolumn{{{n_cols}}}{{c}}{{{latex_escape(table.cols[0])}}}"])
                     + r" \\")
        lines.append(rf"\cmidrule(lr){{{n_rows + 1}-{n_rows + n_cols}}}")
        heads = [latex_escape(format_value(c[0])) for c in grid.columns]
    else:
        heads = [latex_escape(column_title(c, table.cols, table.metric)) for c in grid.columns]
    lines += [" & ".join(row_heads + heads) + r" \\", r"\midrule"]
    previous = None
    for row in grid.rows:
        if previous == "teacher" and row.kind != "teacher":
            lines.append(r"\midrule")
        previous = row.kind
        labels = [latex_escape(label) for label in row.labels]
        if row.span is not None:
            values = [rf"\multicolumn{{{n_cols}}}{{c}}{{{latex_escape(row.span)}}}"]
        else:
            values = [rf"\textbf{{{latex_escape(t)}}}" if b else latex_escape(t) for t, b in zip(row.texts, row.best)]
        lines.append(" & ".join(labels + values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


# -- CSV -------------------------------------------------------------------------
_BASE_COLUMNS = ("mean", "std", "n", "n_failed", "n_running", "seeds", "best")


def tidy_frame(tables: Sequence[Table], *, delta: bool | None = None, paired: bool | None = None) -> pd.DataFrame:
    """One line per cell, in the metric's own units (fractions for accuracies, as in the records).

    ``delta`` / ``paired`` add those columns; ``None`` follows each table's mode (paired implies delta).
    """
    frames = []
    for table in tables:
        cells = table.cells
        with_delta = table.mode in ("delta", "paired") if delta is None else delta
        with_paired = table.mode == "paired" if paired is None else paired
        wanted = [*_BASE_COLUMNS, *(DELTA_COLUMNS if with_delta else ()), *(PAIRED_COLUMNS if with_paired else ())]
        frame = cells.reindex(columns=[*table.axes, *wanted]).copy()
        for axis in table.axes:  # numbers stay numbers; lists and flags become their printed form
            frame[axis] = frame[axis].map(lambda v: v if isinstance(v, float) or is_missing(v) else format_value(v))
        frame.insert(0, "metric", table.metric)
        frame.insert(0, "row_type", cells["_kind"].values)
        for i, (key, value) in enumerate(table.split.items()):
            frame.insert(i, key, value)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def render_csv(tables: Sequence[Table], *, delta: bool | None = None, paired: bool | None = None) -> str:
    """:func:`tidy_frame` as CSV text."""
    return tidy_frame(tables, delta=delta, paired=paired).to_csv(index=False)


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path``, making its folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target
