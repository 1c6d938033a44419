"""A :class:`~kdexp.report.dashboard.DashboardSpec` as W&B objects: a ``wandb_workspaces`` workspace
(the sweep's saved view) and report.

Building them needs no server; only ``save()`` does. ``wandb_workspaces`` is imported inside each
function: ``kdexp report`` and ``kdexp dashboard`` offline never load it.

A workspace has one run set for all its panels, so its panels show the runs of the sweep's
group as W&B groups a panel itself: a scatter per axis with its mean line, the curves grouped by
width and by objective. The report has a run set per panel grid, so there "grouped by the other
axes" and "the CE-only runs as reference" are run sets of their own (one colour each).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from kdexp.core.vocabulary import NO_KD, TEST_ACC
from kdexp.report.dashboard import (
    CURVES,
    KD,
    PARALLEL,
    RUNS_TABLE,
    SCATTER,
    WIDTH,
    Axis,
    DashboardSpec,
    Field,
    Panel,
    config_field,
)

MAX_RUNSETS = 12  # a scatter's groups in the report: beyond this one run set (a legend of 12 is already long)


def _metric(f: Field) -> Any:
    """A spec field as the ``wandb_workspaces`` metric object that names it."""
    import wandb_workspaces.reports.v2 as wr  # W&B's workspace library: only when a dashboard is built
    from wandb_workspaces import expr

    if f.source == "config":
        return wr.Config(f.key)
    if f.source == "summary":
        return wr.SummaryMetric(f.key)
    if f.source == "run":
        return wr.Metric(expr.to_frontend_name(f.key))
    return f.key  # a history key, as line plots name it


def _filter_key(f: Field) -> Any:
    """A spec field as the ``expr`` object a run-set filter compares."""
    from wandb_workspaces import expr

    if f.source == "config":
        return expr.Config(f.key)
    if f.source == "summary":
        return expr.Summary(f.key)
    return expr.Metric(expr.to_frontend_name(f.key))


def run_filters(spec: DashboardSpec, *extra: Any) -> list[Any]:
    """The sweep's runs: its W&B groups, minus teacher (and report) runs, plus ``extra`` conditions."""
    from wandb_workspaces import expr

    return [expr.Metric("Group").isin(list(spec.groups)), expr.Metric("JobType").notin(list(spec.exclude_job_types)),
            *extra]


def wb_panel(panel: Panel, *, grouped: Field | None = None) -> Any:
    """One spec panel as a ``wandb_workspaces`` panel (the runs table is the run set's own)."""
    import wandb_workspaces.reports.v2 as wr  # W&B's workspace library: only when a dashboard is built

    if panel.kind == PARALLEL:
        return wr.ParallelCoordinatesPlot(title=panel.title, columns=[
            wr.ParallelCoordinatesPlotColumn(metric=_metric(c), display_name=c.label) for c in panel.columns])
    if panel.kind == SCATTER:
        return wr.ScatterPlot(title=panel.title, x=_metric(panel.x), y=_metric(panel.y[0]), running_ymean=True)
    if panel.kind == CURVES:
        group = grouped or panel.group_by[0]
        return wr.LinePlot(title=panel.title if grouped is None else f"{panel.y[0].key} per {panel.x.key} by "
                           f"{group.label}", x=panel.x.key, y=[f.key for f in panel.y], groupby=_metric(group),
                           groupby_aggfunc="mean", groupby_rangefunc="stddev", title_x=panel.x.label,
                           title_y=panel.y[0].label)
    raise ValueError(f"no W&B panel for a {panel.kind} panel")


def build_workspace(spec: DashboardSpec, entity: str) -> Any:
    """The sweep's W&B workspace view (not saved): overview, one scatter per axis, curves, runs table."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws  # W&B's workspace library: only when a dashboard is built

    curves = spec.panel(CURVES)[0]
    sections = [
        ws.Section(name="sweep overview", is_open=True, panels=[wb_panel(p) for p in spec.panel(PARALLEL)]),
        ws.Section(name=f"{TEST_ACC} per swept setting", is_open=True,
                   panels=[wb_panel(p) for p in spec.panel(SCATTER)]),
        # one run set for the whole workspace: the CE-only reference is a group of its own in a second plot
        ws.Section(name="learning curves", is_open=True,
                   panels=[wb_panel(curves), wb_panel(curves, grouped=curves.reference[0])]),
        ws.Section(name="runs", is_open=True, panels=[wr.RunComparer(diff_only="split")]),
    ]
    table = spec.panel(RUNS_TABLE)[0]
    return ws.Workspace(
        entity=entity, project=spec.project, name=f"kdexp sweep {spec.name}",
        sections=[s for s in sections if s.panels],  # a sweep of seeds only has no scatter
        settings=ws.WorkspaceSettings(x_axis=curves.x.key, max_runs=_max_runs(spec)),
        runset_settings=ws.RunsetSettings(filters=run_filters(spec), pinned_columns=[c.column for c in table.columns]),
    )


def _max_runs(spec: DashboardSpec) -> int:
    """Runs a panel shows: the sweep's, with as many again for the group's other runs (its CE-only baseline)."""
    return max(10, min(1000, 2 * spec.expected_runs))


def build_report(spec: DashboardSpec, entity: str) -> Any:
    """The sweep's W&B report (not saved): what it holds, its ablation table (from a folder's records),
    test/acc per axis with a run set per combination of the other axes, and the val/acc curves per
    student width with the CE-only runs as run sets of their own."""
    import wandb_workspaces.reports.v2 as wr  # W&B's workspace library: only when a dashboard is built

    blocks: list[Any] = [wr.MarkdownBlock(text=describe(spec))]
    if spec.ablation_markdown:
        blocks += [wr.H2(text="ablation table (kdexp report)"), wr.MarkdownBlock(text=spec.ablation_markdown)]
    by_path = {a.field.key: a for a in spec.axes}
    for panel in spec.panel(SCATTER):
        others = [by_path[f.key] for f in panel.group_by if f.key in by_path]
        blocks += [wr.H2(text=panel.title), wr.PanelGrid(runsets=_runsets(spec, entity, others),
                                                         panels=[wb_panel(panel)])]
    curves = spec.panel(CURVES)[0]
    blocks += [wr.H2(text=curves.title), wr.PanelGrid(runsets=_curve_runsets(spec, entity, curves), panels=[
        wr.LinePlot(title=curves.title, x=curves.x.key, y=[f.key for f in curves.y], title_x=curves.x.label,
                    title_y=curves.y[0].label)])]
    return wr.Report(entity=entity, project=spec.project, title=f"kdexp sweep {spec.name}",
                     description=f"W&B group {', '.join(spec.groups)}", blocks=blocks)


def _runsets(spec: DashboardSpec, entity: str, axes: Sequence[Axis]) -> list[Any]:
    """One run set per combination of ``axes``' values (one for all runs when there are too many)."""
    import wandb_workspaces.reports.v2 as wr  # W&B's workspace library: only when a dashboard is built

    listed = [a for a in axes if a.values]
    combos = list(itertools.product(*(a.values for a in listed)))
    if not listed or len(combos) > MAX_RUNSETS:
        return [wr.Runset(entity=entity, project=spec.project, name=f"sweep {spec.name}",
                          filters=run_filters(spec))]
    return [wr.Runset(entity=entity, project=spec.project,
                      name=" ".join(f"{a.path}={v}" for a, v in zip(listed, combo)),
                      filters=run_filters(spec, *(_filter_key(a.field) == v for a, v in zip(listed, combo))))
            for combo in combos]


def _curve_runsets(spec: DashboardSpec, entity: str, curves: Panel) -> list[Any]:
    """Per student width (when swept), a run set of the KD runs and one of the CE-only runs (the reference)."""
    import wandb_workspaces.reports.v2 as wr  # W&B's workspace library: only when a dashboard is built

    ref_field, ref_value = curves.reference
    width = next((a for a in spec.axes if a.path == WIDTH), None)
    widths: list[Any] = list(width.values) if width is not None and width.values else [None]
    out = []
    for value in widths:
        at = [_filter_key(config_field(WIDTH)) == value] if value is not None else []
        label = f" {WIDTH}={value}" if value is not None else ""
        out += [wr.Runset(entity=entity, project=spec.project, name=f"KD{label}",
                          filters=run_filters(spec, _filter_key(ref_field) != ref_value, *at)),
                wr.Runset(entity=entity, project=spec.project, name=f"CE only ({KD}={NO_KD}){label}",
                          filters=run_filters(spec, _filter_key(ref_field) == ref_value, *at))]
    return out


def describe(spec: DashboardSpec) -> str:
    """The spec in a few markdown lines (the report's first block; the CLI prints the same facts)."""
    axes = ", ".join(f"`{a.path}` ({', '.join(map(str, a.values)) if a.values else f'{a.range[0]}…{a.range[1]}'})"
                     for a in spec.axes) or "none"
    lines = [f"Runs of W&B group {', '.join(f'`{g}`' for g in spec.groups)} (job types other than "
             f"{', '.join(spec.exclude_job_types)}), from `{spec.source}`.",
             f"Swept: {axes}; seeds {', '.join(map(str, spec.seeds)) or '—'}.",
             f"Selection metric `{spec.metric}` ({spec.goal}); the figures show `{TEST_ACC}` (at the best-val "
             "checkpoint)."]
    return "\n\n".join(lines + [f"Note: {n}" for n in spec.notes])


def save_dashboard(spec: DashboardSpec, entity: str | None) -> dict[str, str]:
    """Save the workspace and the report on W&B; their URLs. Needs credentials and a reachable server."""
    import wandb

    entity = entity or spec.entity or wandb.Api(timeout=30).default_entity
    if not entity:
        raise RuntimeError("no W&B entity: pass --entity (your user or team name)")
    workspace = build_workspace(spec, entity).save()
    report = build_report(spec, entity).save()
    return {"workspace": workspace.url, "report": report.url}
