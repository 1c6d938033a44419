"""The chain view (``kdexp report --chain``): does a route through teacher assistants beat direct KD?

Rows are the final student's width; columns are routes: ``CE only`` (``kd=none``),
``direct`` (distilled from the root teacher) and ``via 64→32`` (through assistants of
those widths, read from each record's lineage). Cells are mean ± sample std over seeds
with n; each route through assistants also gets its seed-paired gain over direct KD
(same width and seed) with the paired t statistic and 95 % CI (Mirzadeh et al., 2020,
ask exactly this question).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from kdexp.report.errors import ReportError
from kdexp.report.runs import is_student_record
from kdexp.report.stats import paired_summary
from kdexp.report.table import default_better
from kdexp.core.vocabulary import TEST_ACC

CE_ONLY, DIRECT = "CE only", "direct"


def route(record: Mapping[str, Any]) -> str:
    """The record's route: ``CE only``, or the ``route`` the run recorded from its teacher's lineage
    (``direct``, ``via 64→32``); records from before chains existed were all direct."""
    if record.get("job_type") == "baseline":
        return CE_ONLY
    return str(record.get("route") or DIRECT)


def chain_frame(records: Sequence[Mapping[str, Any]], metric: str = TEST_ACC) -> pd.DataFrame:
    """One row per finished student run: width, route, seed, the metric."""
    rows = []
    for record in records:
        if not is_student_record(record) or record.get("status") != "finished":
            continue
        value = (record.get("metrics") or {}).get(metric)
        config = record.get("config") or {}
        if value is None:
            continue
        rows.append({"width": (config.get("student") or {}).get("width"), "route": route(record),
                     "seed": record.get("seed", config.get("seed")), "value": float(value)})
    if not rows:
        raise ReportError(f"no finished student run with {metric} in the sources.")
    return pd.DataFrame(rows)


def _route_order(routes: Sequence[str]) -> list[str]:
    fixed = [r for r in (CE_ONLY, DIRECT) if r in routes]
    return fixed + sorted(r for r in routes if r not in fixed)


def chain_table(records: Sequence[Mapping[str, Any]], metric: str = TEST_ACC) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cells, gains): mean/std/n per (width, route), and paired gains of each assistant route over direct."""
    frame = chain_frame(records, metric)
    duplicated = frame.duplicated(["width", "route", "seed"], keep=False)
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        raise ReportError(f"two runs of width {first.width}, route {first.route}, seed {first.seed}: the sources mix "
                          "runs that differ in something else; report them separately.")
    cells = frame.groupby(["width", "route"]).value.agg(mean="mean", std="std", n="count").reset_index()
    direct = frame[frame.route == DIRECT].set_index(["width", "seed"]).value
    via = frame[frame.route.str.startswith("via ")]
    paired = via.join(direct.rename("direct"), on=["width", "seed"], how="inner")
    paired = paired.assign(diff=paired.value - paired.direct)
    gains = paired_summary(paired, ["width", "route"]) if len(paired) else pd.DataFrame()
    return cells, gains


def render_chain(records: Sequence[Mapping[str, Any]], metric: str = TEST_ACC, better: str = "auto") -> str:
    """The chain view as markdown (percentages for accuracies); ``better``: max, min or auto (by the
    metric's name), which the caption states so the sign of a difference reads the right way."""
    better = default_better(metric) if better == "auto" else better
    improves = "positive" if better == "max" else "negative"
    cells, gains = chain_table(records, metric)
    scale, unit = (100.0, " %") if "acc" in metric else (1.0, "")
    routes = _route_order(list(cells.route.unique()))
    via = [r for r in routes if r.startswith("via ")]
    header = ["final width", *routes, *(f"{r} − direct (paired)" for r in via)]
    lines = [f"{metric}, mean ± std over seeds (n); Δ = route − direct KD, paired over seeds, with 95 % CI; "
             f"{'higher' if better == 'max' else 'lower'} is better (a {improves} Δ: the route beat direct KD)", "",
             "| " + " | ".join(header) + " |", "|---:|" + "---:|" * (len(header) - 1)]
    for width in sorted(cells.width.unique(), key=lambda w: (w is None, w)):
        row = [str(width)]
        for r in routes:
            hit = cells[(cells.width == width) & (cells.route == r)]
            if hit.empty:
                row.append("—")
                continue
            c = hit.iloc[0]
            spread = f" ± {scale * c['std']:.2f}" if c.n > 1 else ""
            row.append(f"{scale * c['mean']:.2f}{spread} ({int(c.n)})")
        for r in via:
            hit = gains[(gains.width == width) & (gains.route == r)] if len(gains) else gains
            if hit.empty:
                row.append("—")
                continue
            g = hit.iloc[0]
            if g.paired_n < 2:
                row.append(f"{scale * g.paired_mean:+.2f} (1)")
                continue
            row.append(f"{scale * g.paired_mean:+.2f} ± {scale * g.paired_std:.2f}, t={g.paired_t:.1f}, "
                       f"CI [{scale * g.paired_ci_low:+.2f}, {scale * g.paired_ci_high:+.2f}] ({int(g.paired_n)})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
