"""The ``kdexp`` command: train, demo, sweep, report, dashboard, ..."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdexp.core.errors import KdexpError

USAGE = """kdexp <command> [args]

commands:
  train  [overrides]          run one experiment (same as python -m kdexp.train; try: kdexp train --help)
  demo   [overrides]          teacher → Hinton-KD student and CE-only student on MNIST-1D, with a summary
  sweep  FILE [overrides]     run a sweep file (W&B format) locally (a multirun, or a search), or create it on W&B
  report SOURCE... [options]  ablation table (mean ± std over seeds) and plots from run records or W&B
  dashboard SWEEP [KEY=VALUE]  a W&B workspace and report for one sweep file or folder (a JSON spec offline)
  bench  [overrides] [options] time CE / online KD / cached KD epochs against bare PyTorch loops, and whole runs
  predict --out FILE [overrides]  run the teacher once over the data; student runs read it (teacher.predictions=FILE)
  export RUN --out DIR        a finished student=hf run's student as a Hugging Face model directory
"""


def sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdexp sweep",
        description="Run a sweep definition (W&B sweep format, see sweeps/README.md) as one Hydra multirun. "
                    "Finished runs are skipped, so an interrupted sweep resumes where it stopped. A method: bayes "
                    "file runs as a local search (Optuna), trial after trial, continuing from its records.",
    )
    parser.add_argument("file", help="sweep file, e.g. sweeps/hinton_grid.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides for every run; key=v1,v2 replaces the file's values for key")
    parser.add_argument("--jobs", type=int, default=1, help="parallel local workers (joblib launcher); default 1")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="slurm: one SLURM job per run through submitit (conf/hydra/launcher/slurm.yaml)")
    parser.add_argument("--pack", type=int, default=0, metavar="N",
                        help="train up to N grid points that differ only in seed, T and alpha together in one "
                             "process (MLP students, Hinton KD or CE only); each still gets its own run folder, "
                             "record, checkpoints and W&B run. Other points run as usual (default 0: off)")
    parser.add_argument("--dir", type=Path, default=None, help="sweep folder; default outputs/sweeps/<name>")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and what would happen to each")
    parser.add_argument("--sample-seed", type=int, default=0,
                        help="method: random: the seed that draws run_cap points from the grid; method: bayes: "
                             "the seed of the search's sampler (default 0)")
    parser.add_argument("--run-cap", type=int, default=None, metavar="N",
                        help="method: random and bayes: how many runs to draw or try (replaces the file's run_cap)")
    parser.add_argument("--sampler", choices=["tpe", "gp"], default="tpe",
                        help="method: bayes, run locally: Optuna's TPE (default) or Gaussian-process sampler")
    parser.add_argument("--startup-trials", type=int, default=None, metavar="N",
                        help="method: bayes: trials drawn at random before the sampler models the results "
                             "(default: a quarter of run_cap, 2 to 10)")
    parser.add_argument("--force", action="store_true",
                        help="rerun finished runs too (their files are archived, never deleted)")
    parser.add_argument("--wandb", action="store_true",
                        help="create the sweep on W&B and print the `wandb agent` command for each machine")
    parser.add_argument("--project", default="kdexp", help="W&B project for --wandb (default kdexp)")
    parser.add_argument("--entity", default=None, help="W&B entity for --wandb")
    return parser


def sweep_main(argv: list[str]) -> int:
    """``kdexp sweep``: the arguments, handed to :func:`kdexp.api.sweep` (which prints and returns the exit code)."""
    from kdexp import api

    args = sweep_parser().parse_intermixed_args(argv)
    return api.sweep(args.file, args.overrides, dir=args.dir, jobs=args.jobs, pack=args.pack, force=args.force,
                     dry_run=args.dry_run, launcher=args.launcher, sample_seed=args.sample_seed, wandb=args.wandb,
                     project=args.project, entity=args.entity, run_cap=args.run_cap, sampler=args.sampler,
                     startup_trials=args.startup_trials).code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from kdexp import train

            sys.argv = ["kdexp train", *rest]
            train.main()
            return 0
        if command == "demo":
            from kdexp import demo

            return demo.main(rest)
        if command == "sweep":
            return sweep_main(rest)
        if command == "bench":
            from kdexp import bench

            return bench.main(rest)
        if command == "predict":
            from kdexp.run import predict

            return predict.main(rest)
        if command == "export":
            from kdexp.run import export

            return export.main(rest)
        if command == "report":
            from kdexp.report.cli import main as report_main

            return report_main(rest)
        if command == "dashboard":
            from kdexp.report.dashboard_cli import main as dashboard_main

            return dashboard_main(rest)
    except KdexpError as err:
        print(f"kdexp {command}: error: {err}", file=sys.stderr)
        return 2
    print(f"kdexp: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


def entry() -> None:
    """The ``kdexp`` console command: :func:`main`, then a prompt exit (:mod:`kdexp.core.processes`)."""
    from kdexp.core.processes import run_then_exit

    run_then_exit(main)


if __name__ == "__main__":
    entry()
