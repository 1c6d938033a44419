"""kdexp from Python: compose a run, train it, run a sweep, load records, build the ablation table.

The ``kdexp`` commands call these same functions (``kdexp sweep`` is :func:`sweep`; a run goes
through :func:`kdexp.train.run` either way; ``kdexp report`` builds its table with the code
:func:`ablation_table` uses), so a notebook gets what the console gets. In a notebook:

    import kdexp

    fast = ["experiment=digits_smoke", "logger=csv", "trainer.max_epochs=2"]
    cfg = kdexp.compose([*fast, "kd.temperature=4"])        # the config `kdexp train` would run
    record = kdexp.train_run([*fast, "kd=none"], output_dir="outputs/api/ce")  # CE-only student
    print(record["status"], record["metrics"]["test/acc"])
    result = kdexp.sweep("sweeps/smoke.yaml", ["logger=csv"], jobs=2)  # result.code 0: all finished
    runs = kdexp.load_records(result.dir)                    # one row per run: status, metrics, config
    runs.groupby("kd.temperature")["test/acc"].mean()
    table = kdexp.ablation_table(runs)                       # the table `kdexp report` prints
    table.frame                                              # one row per cell: mean, std, n, seeds

At the top level the training function is ``kdexp.train_run`` (``kdexp.train`` is the module of the
``python -m kdexp.train`` command); here it is :func:`train`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from hydra import compose as hydra_compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from kdexp.core.config import conf_initialized
from kdexp.core.console import ConsoleFormatter
from kdexp.core.errors import ConfigError, KdexpError
from kdexp.core.vocabulary import TEST_ACC
from kdexp.grid import search, wandb_sweep
from kdexp.grid import sweep as sweeps
from kdexp.grid.compose import ComposeAhead, GridPoint, problem_message, task_config
from kdexp.train import run as run_config

if TYPE_CHECKING:
    import pandas as pd

    from kdexp.report.build import AblationTable

__all__ = ["SweepResult", "ablation_table", "compose", "load_records", "sweep", "train"]

PathLike = str | os.PathLike
# What Hydra's job logging writes to <run folder>/train.log (hydra/job_logging/default.yaml).
LOG_FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
LAUNCHERS = ("local", "slurm")


# -- one run ---------------------------------------------------------------------------
def compose(overrides: Sequence[str] = (), *, output_dir: PathLike | None = None,
            root_dir: PathLike | None = None) -> DictConfig:
    """The config ``kdexp train OVERRIDES`` runs, with the ``choices`` and ``overrides`` its record keeps.

    ``overrides`` are Hydra overrides, as on the command line (``["kd=none", "seed=2"]``).
    ``root_dir``: where outputs, caches and data live (``paths.root_dir``; default the working
    directory). ``output_dir``: the run's folder (default ``<root_dir>/outputs/runs/<date>/<time>``,
    as the command picks it). A bad override raises :class:`kdexp.core.errors.ConfigError` with
    Hydra's message. Composing trains nothing and writes nothing.
    """
    # with_runtime sits beside the run lifecycle, which imports torch (seconds): only when composing
    from kdexp.run.lifecycle import with_runtime

    with _as_hydra_job(_hydra_job(overrides, output_dir, root_dir)) as cfg:
        return with_runtime(cfg)


def train(overrides: Sequence[str] = (), *, output_dir: PathLike | None = None,
          root_dir: PathLike | None = None) -> dict[str, Any]:
    """Train the run ``kdexp train OVERRIDES`` trains, in this process, and return its record.

    The same code runs it (:func:`kdexp.train.run`): same folder rules (a finished folder is
    refused, a killed run resumes), same record, W&B run and ``train.log``, same console lines.
    ``output_dir`` and ``root_dir`` as in :func:`compose`. A problem the command reports as
    ``kdexp: <Error>: <message>`` (exit 2) is raised here as that
    :class:`kdexp.core.errors.KdexpError`; the record of a run that started says ``failed`` too.
    """
    job = _hydra_job(overrides, output_dir, root_dir)
    with _as_hydra_job(job) as cfg, _run_logging(Path(str(cfg.paths.output_dir))):
        return run_config(cfg)


def _override_list(overrides: Sequence[str], what: str = "overrides") -> list[str]:
    """``overrides`` as a list of strings; one string is refused (it would be read letter by letter)."""
    if isinstance(overrides, (str, bytes)) or not all(isinstance(o, str) for o in overrides):
        raise TypeError(f"{what} must be a list of strings such as ['kd=none', 'seed=2'], got {overrides!r}.")
    return list(overrides)


def _hydra_job(overrides: Sequence[str], output_dir: PathLike | None, root_dir: PathLike | None) -> DictConfig:
    """The whole config (``hydra`` node included) that Hydra hands ``kdexp train OVERRIDES``'s job.

    Paths are set in the config itself, not added as overrides: the record's ``overrides``
    (and a sweep, which finds its runs by them) must hold the user's overrides only.
    """
    overrides = _override_list(overrides)
    root = Path(root_dir if root_dir is not None else os.getcwd()).expanduser().resolve()
    try:
        with conf_initialized():
            cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:  # an option or key that does not exist, bad syntax
        raise ConfigError(f"{problem_message(err)} (overrides: {' '.join(overrides) or 'none'})") from None
    with open_dict(cfg):
        # What the command's Hydra sets before its job runs (hydra.core.utils.run_job); the
        # ${now:} in hydra.run.dir is read here, once, as the command reads it at start.
        cfg.paths.root_dir = str(root)
        cfg.hydra.runtime.cwd = str(root)
        cfg.hydra.job.name = "train"
        cfg.hydra.mode = RunMode.RUN
        run_dir = Path(output_dir if output_dir is not None else str(OmegaConf.select(cfg, "hydra.run.dir")))
        run_dir = run_dir.expanduser().resolve()
        cfg.hydra.run.dir = str(run_dir)
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.paths.output_dir = str(run_dir)
    return cfg


@contextmanager
def _as_hydra_job(full: DictConfig) -> Iterator[DictConfig]:
    """The job's config (without ``hydra``), with Hydra's config set for the block, as inside the
    command: the run reads its group choices and overrides from there. The previous one is restored."""
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    hydra_config.set_config(full)
    try:
        yield task_config(full)
    finally:
        hydra_config.cfg = previous


@contextmanager
def _run_logging(output_dir: Path) -> Iterator[None]:
    """The log handlers the command's Hydra sets up, for one run: the run's lines in
    ``<output_dir>/train.log`` and kdexp's on stderr (unless the caller's logging already prints).

    Added and removed around the run, so a notebook's own logging setup stays as it was.
    """
    root, own = logging.getLogger(), logging.getLogger("kdexp")
    level = root.level
    log_file = logging.FileHandler(output_dir / "train.log", delay=True)  # opened once the run owns its folder
    log_file.setFormatter(logging.Formatter(LOG_FILE_FORMAT))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ConsoleFormatter())
    prints = any(type(h) is logging.StreamHandler for h in root.handlers)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(log_file)
    if not prints:
        own.addHandler(console)
    try:
        yield
    finally:
        root.removeHandler(log_file)  # the run may have detached it already (a refused folder)
        own.removeHandler(console)
        log_file.close()
        root.setLevel(level)


# -- a sweep ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepResult:
    """What :func:`sweep` did: ``code`` is the exit code ``kdexp sweep`` returns (0: every run
    finished or was already finished; 1: some failed or are missing; 130: interrupted)."""

    code: int
    dir: Path  # the sweep folder: pass it to load_records
    points: list[GridPoint] = field(default_factory=list)  # each run's overrides

    @property
    def ok(self) -> bool:
        return self.code == 0


def sweep(file: PathLike, overrides: Sequence[str] = (), *, dir: PathLike | None = None, jobs: int = 1,
          pack: int = 0, force: bool = False, dry_run: bool = False, launcher: str = "local",
          sample_seed: int = 0, wandb: bool = False, project: str = "kdexp",
          entity: str | None = None, run_cap: int | None = None, sampler: str = "tpe",
          startup_trials: int | None = None) -> SweepResult:
    """Run a sweep file (W&B sweep format) as ``kdexp sweep FILE OVERRIDES`` does, printing what it prints.

    Every grid point is composed and checked first (one bad point: nothing runs, a
    :class:`kdexp.core.errors.ConfigError` lists them); then the grid runs as one Hydra multirun
    in child processes, skipping finished runs. ``overrides`` apply to every run
    (``key=v1,v2`` replaces the file's values). ``dir``: the sweep folder (default
    ``outputs/sweeps/<name>``); ``jobs``: parallel workers; ``pack``: train up to N points that
    differ only in seed, T and α in one process; ``force``: rerun finished runs (archived first);
    ``dry_run``: only list what would happen; ``launcher="slurm"``: one SLURM job per run;
    ``sample_seed``: the draw of ``method: random``; ``wandb``: check the file and that a W&B server
    answers, create the sweep there (``project``, ``entity``) and print how ``wandb agent`` joins it,
    instead of running it (with ``dry_run``: print the config that would be sent; ``dir``, ``jobs``,
    ``launcher``, ``force``, ``sample_seed``, ``sampler`` and ``startup_trials`` are refused with it;
    ``run_cap`` replaces the file's). Its result's ``dir`` is where the agents' runs land on each machine.

    A ``method: bayes`` file runs as a local search (:mod:`kdexp.grid.search`): ``run_cap`` trials
    (``run_cap`` here replaces the file's, for ``method: random`` too), ``jobs`` at a time, each an
    ordinary run in ``<dir>/trial-NNN``, proposed by ``sampler`` (``tpe`` or ``gp``) seeded with
    ``sample_seed`` after ``startup_trials`` random ones (default: a quarter of ``run_cap``, 2 to 10);
    run again, it continues from its records. Its result's ``points`` is empty.
    """
    overrides = _override_list(overrides)
    if jobs < 1:
        raise KdexpError(f"--jobs must be >= 1, got {jobs}.")
    if pack < 0 or pack == 1:
        raise KdexpError(f"--pack must be >= 2 (students per pack), or 0 for no packing; got {pack}.")
    if launcher not in LAUNCHERS:
        raise KdexpError(f"--launcher must be one of {', '.join(LAUNCHERS)}; got {launcher!r}.")
    if pack and (wandb or launcher != "local"):
        raise KdexpError("--pack trains packs on this machine; it does not combine with --wandb or --launcher "
                         "slurm (there each run is its own job). Drop --pack, or run the sweep locally.")
    if wandb and (run_cap is not None or sampler != "tpe" or startup_trials is not None):
        raise KdexpError("--run-cap, --sampler and --startup-trials set up a local run; with --wandb, W&B's server "
                         "chooses the runs: edit run_cap in the sweep file instead.")
    if wandb:  # checked, then created on W&B's server, whose agents run it: nothing runs here
        wandb_sweep.refuse_options(dir=dir, jobs=jobs, launcher=launcher, force=force, sample_seed=sample_seed,
                                   sampler=sampler, startup_trials=startup_trials)
        points, runs_dir = wandb_sweep.sweep_on_wandb(file, overrides, project, entity, dry_run=dry_run,
                                                      run_cap=run_cap)
        return SweepResult(0, runs_dir, points)
    spec = sweeps.load_sweep(file)
    sweep_dir = (Path(dir) if dir is not None else Path("outputs") / "sweeps" / spec.name).resolve()
    if run_cap is not None:
        if spec.method == "grid":
            raise KdexpError("--run-cap applies to method: random and bayes (how many runs to draw or try); "
                             "a grid runs every point.")
        spec.raw = {**spec.raw, "run_cap": run_cap}
    if spec.method == "bayes":  # a local search: each next run is chosen from the results so far
        if pack or force or launcher != "local":
            raise KdexpError("a local search (method: bayes) runs its trials on this machine one by one as the "
                             "sampler proposes them: --pack, --force and --launcher slurm do not combine with it. "
                             "To start a search over, give it another --dir.")
        plan = search.plan_search(spec, overrides, sweep_dir, jobs=jobs, sampler=sampler, seed=sample_seed,
                                  startup=startup_trials)
        return SweepResult(search.run_search(plan, dry_run=dry_run), sweep_dir, [])
    points = sweeps.grid(spec, overrides, sample_seed=sample_seed)
    # Hydra composes the grid in helper processes while this one imports torch (they are forked
    # before torch is imported here: see kdexp.grid.compose); pack members are composed too.
    packs_run = bool(pack) and not dry_run
    ahead = ComposeAhead(points, sweeps.jobs_to_compose(spec, overrides, points, sweep_dir) if packs_run else None)
    try:
        if pack:
            import torch  # the pack engine's; imported after the helpers are forked

            torch.set_num_threads(1)  # pack workers are forked from this process: no OpenMP pool to inherit
        if packs_run:
            from kdexp.grid.workers import import_for_workers  # torch and W&B: while the helper composes

            import_for_workers(wandb=sweeps.may_log_to_wandb(points))
        cfgs = sweeps.check_points(points, ahead)  # every point composes and validates, or nothing runs
        plan = sweeps.plan_packs(points, cfgs, sweep_dir, pack, force, jobs) if pack else None
        if dry_run:
            print(sweeps.dry_run(points, sweep_dir, force, plan))
            return SweepResult(0, sweep_dir, points)
        code = sweeps.run_local(spec, points, overrides, sweep_dir, jobs=jobs, force=force, launcher=launcher,
                                plan=plan, composed_jobs=ahead.result().jobs)
        return SweepResult(code, sweep_dir, points)
    finally:
        ahead.close()


# -- records and tables ----------------------------------------------------------------
def load_records(*sources: PathLike, group: str | None = None, filters: Iterable[str] = ()) -> pd.DataFrame:
    """The student runs under ``sources`` as a DataFrame, one row per run, read as ``kdexp report`` reads them.

    A source is a folder (every ``run_record.json`` below it; teacher runs and runs archived by a
    rerun are left out) or ``wandb:ENTITY/PROJECT`` (``group`` and ``filters`` as ``kdexp report
    --group/--filter``). Columns: ``run`` (the run's folder), ``status``, ``kind`` (``distill`` or
    ``baseline``), ``teacher_hash``, ``data_fingerprint``, each metric (``test/acc``, ``val/acc_best``,
    …), each config setting by its dotted path (``kd.temperature``, ``choices.kd``, ``seed``), and
    ``record``, the whole record (what :func:`ablation_table` reads: filter the rows, keep that column).
    Notes on skipped files are in ``frame.attrs["notes"]``. No record at all raises
    :class:`kdexp.report.errors.ReportError`.
    """
    # pandas and the report code (about 1.5 s) load only here: `kdexp sweep` imports this module too
    import pandas as pd

    from kdexp.report.runs import runs_frame
    from kdexp.report.sources import load_sources

    if not sources:
        raise TypeError("load_records needs at least one source: a run or sweep folder, or wandb:ENTITY/PROJECT.")
    if isinstance(filters, str):
        raise TypeError(f"filters must be a list of KEY=VALUE strings, got {filters!r}.")
    records, notes = load_sources([os.fspath(s) for s in sources], group=group, filters=list(filters))
    runs = runs_frame(records)
    head = pd.DataFrame({"run": runs["_source"], "status": runs["_status"], "kind": runs["_kind"],
                         "teacher_hash": runs["_teacher_hash"], "data_fingerprint": runs["_data_fingerprint"]})
    metrics = pd.DataFrame.from_records(list(runs["_metrics"]), index=runs.index)
    config = pd.DataFrame.from_records(list(runs["_config"]), index=runs.index)
    config = config.drop(columns=[c for c in config if c in head or c in metrics])  # never two columns of one name
    frame = pd.concat([head, metrics[sorted(metrics.columns)], config], axis=1)
    frame["record"] = records
    frame.attrs["notes"] = notes
    return frame


Records = Union["pd.DataFrame", Sequence[Mapping[str, Any]], PathLike]


def ablation_table(runs: Records, *, rows: Sequence[str] | str | None = None, cols: Sequence[str] | str | None = None,
                   metric: str = TEST_ACC, where: Mapping[str, Any] | Sequence[str] | None = None,
                   ignore: Sequence[str] = (), split: bool = False, mode: str = "raw",
                   better: str = "auto") -> AblationTable:
    """The ablation table of ``runs`` (mean ± sample std over seeds per cell), as ``kdexp report`` makes it.

    ``runs``: the frame :func:`load_records` returns (or some of its rows), a list of records,
    or a folder. The options are ``kdexp report``'s: ``rows``/``cols`` (config paths or group
    names, a list or a comma-separated string; default: student width and the objective's knobs),
    ``metric``, ``where`` (``{"kd.alpha": 0.9}`` or ``["kd.alpha=0.9"]``; a list value means any
    of them), ``ignore``, ``split``, ``mode`` (``raw``, ``delta`` or ``paired``: ``--delta`` /
    ``--paired``) and ``better`` (``auto``, ``max`` or ``min``). Problems raise
    :class:`kdexp.report.errors.ReportError` with the command's message.

    The result has ``.markdown`` (what ``kdexp report`` prints), ``.frame`` (one row per cell, the
    ``--csv`` table), ``.latex``, ``.tables`` and ``.notes``; a notebook displays it as markdown.
    """
    from kdexp.report.build import DEFAULT_COLS, DEFAULT_ROWS, ReportSpec, make_ablation  # pandas: see load_records
    from kdexp.report.values import parse_assignments

    spec = ReportSpec(rows=_axes(rows, DEFAULT_ROWS, "rows"), cols=_axes(cols, DEFAULT_COLS, "cols"),
                      metric=metric, where=tuple(parse_assignments(_where_items(where), "where")),
                      ignore=tuple(_override_list(ignore, "ignore")), split=split, mode=mode, better=better)
    return make_ablation(_records_of(runs), spec)  # what `kdexp report` prints is its .markdown


def _axes(value: Sequence[str] | str | None, default: tuple[str, ...], what: str) -> tuple[str, ...]:
    if value is None:
        return default
    items = value.split(",") if isinstance(value, str) else value
    if not all(isinstance(item, str) for item in items):
        raise TypeError(f"{what} must be config paths such as ['student.width', 'kd.temperature'], got {value!r}.")
    return tuple(item.strip() for item in items if item.strip())


def _where_items(where: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"kd.alpha": [0.5, 0.9]}`` → ``["kd.alpha=0.5,0.9"]`` (``--where`` clauses)."""
    if where is None:
        return []
    if isinstance(where, Mapping):
        return [f"{key}={','.join(map(str, value)) if isinstance(value, (list, tuple, set)) else value}"
                for key, value in where.items()]
    return _override_list(where, "where")


def _records_of(runs: Records) -> list[Mapping[str, Any]]:
    """The records behind ``runs`` (a load_records frame, records, or a folder)."""
    if isinstance(runs, (str, os.PathLike)):
        return list(load_records(runs)["record"])
    if hasattr(runs, "columns"):  # a DataFrame
        if "record" not in runs.columns:
            raise TypeError("ablation_table reads the 'record' column of the frame load_records returns; "
                            "this frame has none (keep that column when selecting columns).")
        return list(runs["record"])
    records = list(runs)
    if not all(isinstance(r, Mapping) for r in records):
        raise TypeError("ablation_table takes the frame load_records returns, a list of run records (dicts) "
                        "or a folder.")
    return records
