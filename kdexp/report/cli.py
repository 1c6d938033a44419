"""``kdexp report SOURCE... [options]``: the ablation table on stdout, LaTeX/CSV/PNG on request."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdexp.report.build import DEFAULT_COLS, DEFAULT_ROWS, ReportSpec, make_ablation
from kdexp.report.errors import ReportError
from kdexp.report.formats import render_csv, tidy_frame, write_text
from kdexp.report.search import is_search, plot_search, render_search, search_csv, search_tables
from kdexp.report.sources import load_sources
from kdexp.report.table import Table
from kdexp.core.vocabulary import TEST_ACC
from kdexp.report.values import parse_assignments
from kdexp.report.wandb_runs import WANDB_PREFIX, wandb_path

PROG = "kdexp report"

DESCRIPTION = """\
Turn many runs into a paper-style ablation table: mean ± sample std over seeds per
cell, with n, the CE-only baseline and the teacher as reference rows, the best cell
of each row in bold, and failed runs counted (never averaged).

SOURCE is a folder (every run_record.json below it is one run; teacher records are
skipped), e.g. outputs/sweeps/<name> or outputs/multiruns/<date>, or
wandb:ENTITY/PROJECT (with --group and --filter).

Runs that differ in anything other than the table's axes and the seed (data set,
teacher, trainer.max_epochs, optimizer.lr, ...) are never averaged together: the
report stops and names the settings; use --rows/--cols, --where, --split or --ignore.
"""

EPILOG = """\
axes and keys:
  a dotted config path (student.width, kd.temperature, kd.alpha, trainer.max_epochs,
  optimizer.lr, seed), a group name meaning the chosen option (kd, student, data,
  teacher, optimizer), or teacher_hash / data_fingerprint.

examples:
  kdexp report outputs/sweeps/hinton_grid
  kdexp report outputs/sweeps/hinton_grid --delta --latex table.tex --csv cells.csv --plots figs/
  kdexp report outputs/measure --rows student.width --cols kd --paired
  kdexp report outputs/ --split --metric test/acc_last
  kdexp report outputs/ --where data=mnist1d --where trainer.max_epochs=100
  kdexp report wandb:my-team/kdexp --group mnist1d-cnn1d --filter kd.alpha=0.9
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="run/sweep folder or wandb:ENTITY/PROJECT")
    table = parser.add_argument_group("table")
    table.add_argument("--chain", action="store_true",
                       help="the chain view: rows = final student width, columns = route (CE only, direct, via "
                            "each set of assistants), with each route's seed-paired gain over direct KD")
    table.add_argument("--rows", default=",".join(DEFAULT_ROWS), metavar="KEYS",
                       help="comma-separated row axes (default: %(default)s)")
    table.add_argument("--cols", default=",".join(DEFAULT_COLS), metavar="KEYS",
                       help="comma-separated column axes, '' for one column (default: %(default)s)")
    table.add_argument("--metric", default=TEST_ACC,
                       help="metric to tabulate: test/acc (test at the best-val checkpoint; default), test/acc_last, "
                            "val/acc_best, test/agreement, test/ece, ... Accuracies are shown in %%")
    table.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                       help="keep runs whose KEY equals VALUE (repeatable; VALUE may be v1,v2). A kd.* key selects "
                            "among KD runs only, so the CE-only baseline stays")
    table.add_argument("--split", action="store_true",
                       help="one table per combination of the settings the runs differ in, instead of refusing")
    table.add_argument("--ignore", action="append", default=[], metavar="KEY",
                       help="a setting (or group prefix) that may differ between averaged runs, "
                            "e.g. trainer.accelerator")
    table.add_argument("--delta", action="store_true",
                       help="KD cells show mean(KD) − mean(CE only) of the same student, ± its standard error")
    table.add_argument("--paired", action="store_true",
                       help="KD cells show the paired difference KD − CE only over seeds run with both (mean ± std, "
                            "t, 95%% CI); its sign reads like the metric (--best)")
    table.add_argument("--best", choices=("auto", "max", "min"), default="auto",
                       help="which cell of a row is best, and which way a difference improves (auto: min for "
                            "ece/loss/kl/nll/bpb/ppl/err metrics, else max)")
    out = parser.add_argument_group("output")
    out.add_argument("--latex", metavar="PATH", help="write a booktabs LaTeX tabular ('-' = stdout)")
    out.add_argument("--csv", metavar="PATH", help="write a tidy CSV, one line per cell, in the metric's own units "
                                                   "(fractions for accuracies) ('-' = stdout)")
    out.add_argument("--plots", metavar="DIR", help="write PNG figures: T × α heatmap per width and metric vs width")
    out.add_argument("--kd-at", metavar="temperature=T,alpha=A",
                     help="the KD setting the width plot shows (default: per width, the (T, α) with the best val/acc_best)")
    out.add_argument("--no-wandb", action="store_true",
                     help="do not log the plots and table to W&B even when online")
    wb = parser.add_argument_group("W&B sources")
    wb.add_argument("--group", help="only runs of this W&B group")
    wb.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                    help="W&B API filter (repeatable), e.g. config.kd.alpha=0.9 (config. is added when missing)")
    return parser


def main(argv: list[str]) -> int:
    """Run ``kdexp report`` with ``argv`` (without the command words); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return int(exit_.code or 0)
    try:
        return _run(args)
    except ReportError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.latex == "-" and args.csv == "-":
        raise ReportError("only one of --latex and --csv can go to stdout ('-'); write the other to a file.")
    spec = ReportSpec(rows=_keys(args.rows), cols=_keys(args.cols), metric=args.metric,
                      where=tuple(parse_assignments(args.where, "--where")), ignore=tuple(args.ignore),
                      split=args.split, mode="paired" if args.paired else "delta" if args.delta else "raw",
                      better=args.best)
    kd_at = _kd_at(args.kd_at)
    records, notes = load_sources(args.sources, group=args.group, filters=args.filter)
    if args.chain:
        from kdexp.report.chain import render_chain
        from kdexp.report.runs import apply_where, known_paths, runs_frame

        if spec.where:  # --where keeps the runs it matches (the CE-only runs stay, as in the other tables)
            runs = runs_frame(records)
            records = [records[i] for i in apply_where(runs, spec.where, known_paths(runs)).index]
        print(render_chain(records, args.metric, args.best), end="")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        return 0
    if is_search(records) and _search_view(args):  # a local search's trials: one row each, not averaged cells
        return _search_report(records, notes, args)
    report = make_ablation(records, spec)  # what the Python API's ablation_table returns
    tables, markdown = report.tables, report.markdown
    stdout_taken = "-" in (args.latex, args.csv)
    print(markdown, end="", file=sys.stderr if stdout_taken else sys.stdout)  # keep stdout parseable
    for note in notes + report.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.latex:
        _emit(report.latex, args.latex, "LaTeX")
    if args.csv:
        _emit(render_csv(tables), args.csv, "CSV")
    if args.plots:
        _plots(tables, Path(args.plots), kd_at, args, markdown)
    return 0


def _search_view(args: argparse.Namespace) -> bool:
    """A search's records get the search table unless an option asks for the ablation table."""
    return (args.rows, args.cols) == (",".join(DEFAULT_ROWS), ",".join(DEFAULT_COLS)) and not (
        args.where or args.split or args.delta or args.paired)


def _search_report(records: list[dict], notes: list[str], args: argparse.Namespace) -> int:
    """``kdexp report`` of a search's folder: the trial table, ``--csv`` and ``--plots`` (the metric per trial)."""
    if args.latex:
        raise ReportError("--latex writes ablation tables; a search's trial table is markdown (stdout) or --csv. "
                          "For an ablation table of its trials pass --rows/--cols.")
    tables = search_tables(records, other=args.metric)
    markdown = render_search(tables)
    print(markdown, end="", file=sys.stderr if args.csv == "-" else sys.stdout)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.csv:
        _emit(search_csv(tables), args.csv, "CSV")
    if args.plots:
        files = [plot_search(table, Path(args.plots)) for table in tables]
        for path in files:
            print(f"plot written to {path}", file=sys.stderr)
        if not args.no_wandb:
            from kdexp.report.publish import publish_report

            print(publish_report(files, {t.name: t.frame for t in tables}, markdown, group=args.group,
                                 config={"sources": args.sources, "search": [t.name for t in tables]}),
                  file=sys.stderr)
    return 0


def _keys(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _kd_at(text: str | None) -> dict[str, str]:
    """``temperature=8,alpha=0.9`` → ``{"kd.temperature": "8", "kd.alpha": "0.9"}``."""
    if not text:
        return {}
    pairs = parse_assignments(text.split(","), "--kd-at")
    return {key if key.startswith("kd.") else f"kd.{key}": value for key, value in pairs}


def _emit(text: str, path: str, what: str) -> None:
    if path == "-":
        sys.stdout.write(text)
    else:
        print(f"{what} written to {write_text(text, path)}", file=sys.stderr)


def _plots(tables: list[Table], out_dir: Path, kd_at: dict[str, str], args: argparse.Namespace, markdown: str) -> None:
    from kdexp.report.plots import plot_table, slug  # matplotlib only when figures are asked for

    files = []
    for table in tables:
        folder = out_dir / slug(table.heading) if table.heading and len(tables) > 1 else out_dir
        written, skipped = plot_table(table, folder, kd_at=kd_at)
        files += written
        for note in skipped:
            print(f"note: {note}", file=sys.stderr)
    for path in files:
        print(f"plot written to {path}", file=sys.stderr)
    if args.no_wandb:
        return
    from kdexp.report.publish import publish_report

    frames = {slug(t.heading) if t.heading else "": tidy_frame([t]) for t in tables}
    project = next((wandb_path(s) for s in args.sources if s.startswith(WANDB_PREFIX)), None)
    entity, _, name = (project or "").rpartition("/")
    print(publish_report(files, frames, markdown, project=name or "kdexp", entity=entity or None, group=args.group,
                         config={"sources": args.sources, "metric": args.metric, "rows": args.rows,
                                 "cols": args.cols}), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
