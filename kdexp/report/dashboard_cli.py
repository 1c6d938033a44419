"""``kdexp dashboard SWEEP_FILE_OR_FOLDER [KEY=VALUE ...]``: a W&B workspace (and report) for one sweep.

Online (credentials and a reachable server, decided as runs decide it: never a wait) it saves the
workspace and the report and prints their URLs; otherwise it writes the specification to
``<sweep folder>/wandb_dashboard.json`` and prints the command that creates them later.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from pathlib import Path

from kdexp.core.errors import KdexpError
from kdexp.core.files import atomic_write_text
from kdexp.core.tracking import resolve_wandb_mode
from kdexp.report.dashboard import SPEC_FILE, DashboardSpec, dashboard_spec, default_output
from kdexp.report.dashboard_wandb import save_dashboard

PROG = "kdexp dashboard"

DESCRIPTION = f"""\
Make a W&B dashboard for one sweep: a workspace view of the runs of the sweep's W&B group
(teacher runs left out) with
  1. a parallel-coordinates plot over the swept settings, ending in the selection metric
     (the sweep's metric.name, default val/acc_best) and test/acc;
  2. test/acc against each swept setting (the report: one run set per combination of the others);
  3. val/acc per epoch grouped by student.width, the CE-only runs (kd=none) as reference;
  4. a runs table: swept settings, seed, teacher hash, data fingerprint, status, metrics;
and a W&B report with the same views (and, from a folder, the table `kdexp report` prints).

SOURCE is a sweep file (what `kdexp sweep FILE KEY=VALUE ...` runs; KEY=VALUE replaces the
file's values for KEY, as there) or a sweep folder such as outputs/sweeps/<name> (what its
runs' records say they ran).

Without W&B online (no credentials, WANDB_MODE=offline, or no server answering within 2 s)
nothing waits: the specification is written to <sweep folder>/{SPEC_FILE} (a sweep file's
folder is outputs/sweeps/<name>), and the same command creates the dashboard once W&B is online.
"""

EPILOG = """\
examples:
  kdexp dashboard sweeps/hinton_grid.yaml
  kdexp dashboard sweeps/smoke.yaml seed=1 kd.alpha=0.9 --project my-kd --entity my-team
  kdexp dashboard outputs/sweeps/hinton_grid --metric val/acc_best --out dashboard.json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SWEEP_FILE_OR_FOLDER", help="a sweep file or a sweep folder")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="sweep-file overrides, as for kdexp sweep (key=v1,v2 replaces the file's values)")
    parser.add_argument("--project", help="W&B project (default: the one the runs log to; kdexp)")
    parser.add_argument("--entity", help="W&B entity (default: the runs' logger.entity, else your default entity)")
    parser.add_argument("--metric", help="selection metric (default: the sweep's metric.name, else val/acc_best)")
    parser.add_argument("--out", type=Path, help=f"where the specification goes (default: <sweep folder>/{SPEC_FILE})")
    return parser


def main(argv: list[str]) -> int:
    """Run ``kdexp dashboard`` with ``argv`` (without the command word); returns the exit code."""
    try:
        args = build_parser().parse_intermixed_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return int(exit_.code or 0)
    try:
        spec = dashboard_spec(args.source, args.overrides, project=args.project, entity=args.entity,
                              metric=args.metric)
        out = args.out or default_output(args.source, spec)
        atomic_write_text(out, spec.to_json(), what="dashboard specification")
    except KdexpError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(summary(spec, out))
    mode, reason = resolve_wandb_mode("auto")
    again = shlex.join(["kdexp", "dashboard", *argv])
    if mode != "online":
        print(f"W&B is {mode} ({reason}): nothing was created on W&B; with W&B online (`wandb login`), "
              f"`{again}` creates the workspace and report.")
        return 0
    try:
        urls = save_dashboard(spec, args.entity)
    except Exception as err:  # noqa: BLE001 - a W&B problem leaves the spec on disk; say what failed
        print(f"{PROG}: W&B did not save the dashboard ({type(err).__name__}: {err}); the specification is in "
              f"{out}; run `{again}` again to retry.", file=sys.stderr)
        return 1
    for what, url in urls.items():
        print(f"W&B {what}: {url}")
    return 0


def summary(spec: DashboardSpec, out: Path) -> str:
    """What the dashboard holds, in a few lines."""
    axes = ", ".join(a.path for a in spec.axes) or "none (seeds only)"
    lines = [f"dashboard of sweep {spec.name}: W&B group {', '.join(spec.groups) or '—'} in project {spec.project}; "
             f"swept {axes}; seeds {', '.join(map(str, spec.seeds)) or '—'}; selection metric {spec.metric}",
             f"  panels: {', '.join(f'{n} × {kind}' for kind, n in Counter(p.kind for p in spec.panels).items())}",
             f"  specification written to {out}"]
    return "\n".join(lines + [f"  note: {n}" for n in spec.notes])
