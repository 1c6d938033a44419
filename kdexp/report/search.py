"""A local search's trials (``kdexp sweep`` of a ``method: bayes`` file) as a table and a plot.

A grid's runs are averaged over seeds into cells; each trial of a search is a setting of its own,
so its table has one row per trial, best first by the search's metric (``metric.name`` and
``goal`` of the sweep file, stated in every trial's record), with its parameters, the phase that
proposed it (``random`` before the sampler had enough results, then ``tpe`` or ``gp``), another
metric (``--metric``, default test/acc) and its status. The plot shows the metric against the
trial number, each phase in its colour, with the best so far as a step line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kdexp.core.vocabulary import METRIC_TITLES, TEST_ACC
from kdexp.report.formats import number_text, scale_of
from kdexp.report.plots import slug

SEARCH_FIELD = "search"  # what a trial's record holds about its search (kdexp.core.records.sweep_fields)


def is_search(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every record is a trial of a local search."""
    return bool(records) and all(isinstance(r.get(SEARCH_FIELD), Mapping) for r in records)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def shown(value: Any) -> str:
    """A parameter as the table prints it: floats with 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


@dataclass(frozen=True)
class SearchTable:
    """One search's trials, best first (``frame``), and what the search was."""

    name: str
    metric: str
    goal: str  # maximize | minimize
    sampler: str
    seed: Any
    params: list[str]  # the searched parameters, in the order the records list them
    frame: pd.DataFrame  # trial, phase, status, the metric, the other metric, each parameter, run
    other: str | None  # the second metric column (None when it is the search's own)

    @property
    def finished(self) -> pd.DataFrame:
        return self.frame[self.frame[self.metric].notna()]

    def best(self) -> pd.Series | None:
        return None if self.finished.empty else self.finished.iloc[0]

    def phase_means(self) -> dict[str, tuple[float, int]]:
        """Mean of the metric over each phase's finished trials, and how many, in the order phases began."""
        done = self.finished.sort_values("trial")
        return {phase: (float(group[self.metric].mean()), len(group))
                for phase, group in done.groupby("phase", sort=False)}

    @property
    def markdown(self) -> str:
        return render_one(self)


def search_tables(records: Sequence[Mapping[str, Any]], other: str = TEST_ACC) -> list[SearchTable]:
    """One table per search (by its name) among ``records`` (all trials: :func:`is_search`)."""
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_name.setdefault(str(record[SEARCH_FIELD].get("name", "search")), []).append(record)
    return [_table(name, trials, other) for name, trials in by_name.items()]


def _table(name: str, records: list[Mapping[str, Any]], other: str) -> SearchTable:
    first = records[0][SEARCH_FIELD]
    metric, goal = str(first.get("metric")), str(first.get("goal", "maximize"))
    other_metric = other if other != metric else None
    params: list[str] = []
    rows = []
    for record in records:
        search = record[SEARCH_FIELD]
        values = search.get("params") or {}
        params += [k for k in values if k not in params]
        metrics = record.get("metrics") or {}
        status = str(record.get("status") or "running")
        rows.append({"trial": int(search.get("trial", -1)), "phase": str(search.get("phase", "?")), "status": status,
                     metric: _number(metrics.get(metric)) if status == "finished" else None,
                     **({other_metric: _number(metrics.get(other_metric))} if other_metric else {}),
                     **{f"param:{k}": v for k, v in values.items()},
                     "wall_time_s": record.get("wall_time_s"),
                     "run": record.get("_source") or record.get("output_dir")})
    frame = pd.DataFrame(rows)
    frame[metric] = frame[metric].astype(float)
    ascending = goal == "minimize"
    done = frame[frame[metric].notna()].sort_values([metric, "trial"], ascending=[ascending, True])
    rest = frame[frame[metric].isna()].sort_values("trial")
    frame = pd.concat([done, rest]).reset_index(drop=True)
    frame = frame.rename(columns={f"param:{k}": k for k in params})
    return SearchTable(name, metric, goal, str(first.get("sampler", "?")), first.get("seed"), params, frame,
                       other_metric)


def _value_text(value: Any, metric: str, unit: bool = False) -> str:
    """A metric in the table's units (percent for accuracies); ``unit``: with its unit, as in prose."""
    factor, dp, sign = scale_of(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return number_text(value * factor, dp) + (f" {sign}" if unit and sign else "")


def _title(metric: str) -> str:
    unit = scale_of(metric)[2]
    return f"{metric}{' (' + unit + ')' if unit else ''}"


def render_one(table: SearchTable) -> str:
    """The search as markdown: a heading, the best trial, the phases' means, one row per trial."""
    counts = table.frame["status"].value_counts()
    status_text = ", ".join(f"{n} {status}" for status, n in counts.items())
    arrow = "↑" if table.goal == "maximize" else "↓"
    lines = [f"### search {table.name} · {table.goal} {table.metric} · {table.sampler} sampler, seed {table.seed} · "
             f"{len(table.frame)} trials ({status_text})", ""]
    best = table.best()
    if best is not None:
        other = f" ({table.other} {_value_text(best[table.other], table.other, unit=True)})" if table.other else ""
        lines.append(f"best: trial {best['trial']}, {table.metric} "
                     f"{_value_text(best[table.metric], table.metric, unit=True)}"
                     f"{other}: " + " ".join(f"{k}={shown(best[k])}" for k in table.params))
        means = ", ".join(f"{phase} {_value_text(mean, table.metric, unit=True)} ({n} trial{'s' * (n > 1)})"
                          for phase, (mean, n) in table.phase_means().items())
        lines += [f"{table.metric} mean by phase: {means}", ""]
    headers = ["rank", "trial", f"{_title(table.metric)} {arrow}"]
    headers += [_title(table.other)] if table.other else []
    headers += [*table.params, "phase", "status"]
    lines += ["| " + " | ".join(headers) + " |",
              "| " + " | ".join(["---:"] * (len(headers) - 2) + ["---", "---"]) + " |"]
    for rank, row in table.frame.iterrows():
        finished = row[table.metric] == row[table.metric]  # not NaN
        value = _value_text(row[table.metric], table.metric)
        cells = [str(rank + 1) if finished else "–", str(row["trial"]), f"**{value}**" if rank == 0 and finished
                 else value]
        cells += [_value_text(row[table.other], table.other)] if table.other else []
        cells += [shown(row[k]) for k in table.params] + [row["phase"], row["status"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", f"One row per trial, best {table.metric} first ({table.goal}); phase: random = drawn before the "
              f"sampler had enough results, {table.sampler} = proposed by it. Failed or unfinished trials last."]
    return "\n".join(lines)


def render_search(tables: Sequence[SearchTable]) -> str:
    return "\n\n".join(render_one(t) for t in tables) + "\n"


def search_csv(tables: Sequence[SearchTable]) -> str:
    """Every trial, one line each, in the metrics' own units (fractions for accuracies)."""
    frames = [t.frame.assign(search=t.name, rank=range(1, len(t.frame) + 1)) for t in tables]
    return pd.concat(frames).to_csv(index=False)


def plot_search(table: SearchTable, out_dir: str | Path) -> Path:
    """``search_<name>_<metric>.png``: the metric of each finished trial against its number, coloured by
    phase, failed trials marked on the axis, and the best so far as a step line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib only when figures are asked for
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    factor, _, unit = scale_of(table.metric)
    frame = table.frame.sort_values("trial")
    done = frame[frame[table.metric].notna()]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for phase, group in done.groupby("phase", sort=False):
        ax.scatter(group["trial"], group[table.metric] * factor, label=f"{phase} ({len(group)})", zorder=3)
    if len(done):
        values = done[table.metric] * factor
        best = values.cummax() if table.goal == "maximize" else values.cummin()
        ax.step(done["trial"], best, where="post", color="black", linewidth=1.2, label="best so far", zorder=2)
    failed = frame[frame[table.metric].isna()]
    if len(failed):
        low = ax.get_ylim()[0]
        ax.scatter(failed["trial"], [low] * len(failed), marker="x", color="red", label=f"failed ({len(failed)})",
                   zorder=3, clip_on=False)
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{table.metric}{' (%)' if unit else ''}, {'higher' if table.goal == 'maximize' else 'lower'} "
                  "is better")
    ax.set_title(f"search {table.name}: {METRIC_TITLES.get(table.metric, table.metric)}\n{table.sampler} sampler, "
                 f"seed {table.seed}", fontsize=10)
    ax.legend(fontsize=8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"search_{slug(table.name)}_{slug(table.metric)}.png"
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
