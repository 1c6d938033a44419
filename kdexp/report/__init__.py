"""``kdexp report``: many runs → a paper-style ablation table (mean ± std over seeds) and plots.

Modules, one job each:
  sources      run folders (every run_record.json below them) or W&B → records
  wandb_runs   the W&B API fetch, and W&B runs → records
  runs         records → one pandas row per run (flattened config, axes, --where)
  consistency  which runs may be averaged together; --split
  table        runs → cells: mean ± std, n, failed, reference rows, delta, paired, best
  stats        Welch standard error and the paired t test
  formats      markdown, LaTeX (booktabs) and tidy CSV
  plots        T × α heatmaps and metric-vs-width figures (PNG)
  publish      optional upload of the report to W&B
  dashboard    a sweep file or folder → the spec of its W&B dashboard (no W&B import)
  dashboard_wandb  that spec → a wandb_workspaces workspace and report, saved when online
  dashboard_cli    ``kdexp dashboard`` (the spec as JSON when W&B is not online)
  build        the pipeline without I/O (ReportSpec → tables)
  cli          ``kdexp report`` argument parsing and output
"""

from kdexp.report.build import ReportSpec, make_tables
from kdexp.report.errors import ReportError
from kdexp.report.sources import load_sources, records_from_folder
from kdexp.report.table import Table, build_table
from kdexp.report.wandb_runs import records_from_wandb_runs

__all__ = ["ReportError", "ReportSpec", "Table", "build_table", "load_sources", "make_tables",
           "records_from_folder", "records_from_wandb_runs"]
