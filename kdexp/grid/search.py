"""A Bayesian search with no server: ``kdexp sweep FILE`` of a ``method: bayes`` sweep file.

W&B runs ``method: bayes`` on its server (``kdexp sweep FILE --wandb``); here Optuna's samplers
(TPE by default, or a Gaussian process) choose each next run from the results so far, in
Optuna's ask-and-tell loop:

- the sweep file gives the space (W&B's parameter grammar, :mod:`kdexp.grid.space`), the metric
  each run is judged by (``metric.name``, ``metric.goal``) and how many trials to run (``run_cap``);
- each trial is an ordinary run, ``python -m kdexp.train`` with the trial's parameters as
  overrides, in ``<sweep dir>/trial-NNN/`` (folder, record, checkpoints, W&B run); its value is
  the metric in its record, and its record's ``search`` field says which trial of which search
  it was (number, sampler, seed, phase, parameters);
- ``--jobs N`` keeps N trials in flight and asks for the next one as soon as one ends (TPE's
  "constant liar" and the GP's batch acquisition keep parallel trials apart);
- the sampler is seeded from ``--sample-seed`` and the trial number, so with one job the same
  command proposes the same trials, also when it continues an interrupted search (with N jobs
  the proposals depend on which trial ends first);
- the records are the search's state: run again, it tells the sampler every finished trial (and
  every failed one, as failed), runs each interrupted trial again in its folder (it resumes from
  its checkpoint) and asks for new ones up to ``run_cap``.

Where this process can fork (:func:`kdexp.core.processes.can_fork`), a trial runs the same
command in a child forked from the search, which has already imported torch and Lightning
(seconds per trial otherwise); elsewhere each trial is a fresh interpreter. A lock on the sweep
folder keeps a second search out while one runs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdexp.core.errors import ConfigError, KdexpError
from kdexp.core.processes import can_fork, die_with_parent
from kdexp.core.records import SEARCH_TRIAL_ENV, read_record
from kdexp.core.sweep_file import SweepSpec, hydra_value
from kdexp.core.tracking import import_wandb
from kdexp.grid.compose import ComposeAhead, GridPoint
from kdexp.grid.space import SearchSpace, search_space
from kdexp.grid.sweep import (
    check_points,
    may_log_to_wandb,
    new_sweep_id,
    start_process_group,
    stop_process_groups,
    worker_env,
)
from kdexp.run.folder import lock_folder

SAMPLERS = ("tpe", "gp")
TRIAL_PREFIX = "trial-"
_TRIAL_NAME = re.compile(rf"^{TRIAL_PREFIX}(\d+)$")
LOCK_BUSY = ("another search is running in {folder} ({owner}): one search per folder at a time. Wait for it to "
             "end, or start this one in another folder with --dir.")


@dataclass(frozen=True)
class SearchPlan:
    """One search, as the command line and the sweep file define it."""

    name: str
    sweep_dir: Path
    space: SearchSpace
    metric: str
    goal: str  # maximize | minimize
    run_cap: int
    sampler: str  # tpe | gp
    seed: int
    startup: int  # trials drawn at random before the sampler models the results
    jobs: int = 1

    def trial_fields(self, number: int, params: dict[str, Any], phase: str) -> dict[str, Any]:
        """The ``search`` field of a trial's record."""
        return {"name": self.name, "trial": number, "sampler": self.sampler, "seed": self.seed, "phase": phase,
                "startup": self.startup, "params": params, "metric": self.metric, "goal": self.goal}


def default_startup(run_cap: int) -> int:
    """Random trials before the sampler takes over: a quarter of ``run_cap``, at least 2, at most 10
    (Optuna's own default, meant for searches of a hundred trials and more)."""
    return max(2, min(10, run_cap // 4))


def plan_search(spec: SweepSpec, overrides: list[str], sweep_dir: Path, *, jobs: int = 1, sampler: str = "tpe",
                seed: int = 0, startup: int | None = None, run_cap: int | None = None) -> SearchPlan:
    """The search ``spec`` (a ``method: bayes`` file, checked by :func:`kdexp.core.sweep_file.load_sweep`) defines."""
    if sampler not in SAMPLERS:
        raise KdexpError(f"--sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}.")
    cap = int(spec.raw["run_cap"]) if run_cap is None else run_cap
    if cap < 1:
        raise KdexpError(f"--run-cap must be >= 1; got {cap}.")
    startup = default_startup(cap) if startup is None else startup
    if startup < 0:
        raise KdexpError(f"--startup-trials must be >= 0; got {startup}.")
    metric = spec.raw["metric"]
    return SearchPlan(spec.name, sweep_dir, search_space(spec, overrides), str(metric["name"]), str(metric["goal"]),
                      cap, sampler, seed, startup, jobs)


def trial_folder(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / f"{TRIAL_PREFIX}{number:03d}"


def recorded_trials(sweep_dir: Path) -> dict[int, dict[str, Any]]:
    """The records of the trials under ``sweep_dir`` (``trial-NNN/run_record.json`` with a ``search``
    field), by trial number. A trial folder without a readable record holds no result: its number is free."""
    found = {}
    for folder in sorted(sweep_dir.glob(f"{TRIAL_PREFIX}*")):
        match = _TRIAL_NAME.match(folder.name)
        record = read_record(folder) if match else None
        if record is not None and isinstance(record.get("search"), dict):
            found[int(match.group(1))] = record
    return found


def trial_numbers_taken(sweep_dir: Path) -> set[int]:
    """The numbers of the trial folders that hold a readable record, whoever wrote it."""
    matches = (_TRIAL_NAME.match(folder.name) for folder in sweep_dir.glob(f"{TRIAL_PREFIX}*"))
    return {int(m.group(1)) for m in matches if m and read_record(sweep_dir / m.group(0)) is not None}


def metric_value(record: dict[str, Any], metric: str) -> float | None:
    """The metric a finished trial's record holds, as a finite number, or None."""
    value = (record.get("metrics") or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def make_sampler(plan: SearchPlan, number: int) -> Any:
    """The sampler that proposes trial ``number``, seeded from the search's seed and the number: what it
    proposes depends only on them and on the results told so far (so a resumed search proposes what an
    uninterrupted one would)."""
    import optuna  # searches only

    seed = (plan.seed * 1_000_003 + number) % 2**32
    if plan.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=plan.startup)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.startup, multivariate=True,
                                      constant_liar=True)


# -- the search's state, from its records -------------------------------------------------
@dataclass
class Trial:
    """A trial to run (or running): its number, parameters, phase and the process that runs it."""

    number: int
    params: dict[str, Any]
    phase: str  # random (startup) | tpe | gp
    folder: Path
    optuna_trial: Any = None
    process: Any = None
    started: float = 0.0


@dataclass
class Past:
    """What the records of an earlier (interrupted) search held, once told to the sampler."""

    finished: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    rerun: list[Trial] = field(default_factory=list)  # interrupted or killed: run again in their folders

    @property
    def done(self) -> int:
        return len(self.finished) + len(self.failed)


def _check_params(plan: SearchPlan, number: int, params: Any) -> dict[str, Any]:
    """A recorded trial's parameters, or why they do not belong to this search's space."""
    where = f"{trial_folder(plan.sweep_dir, number)}"
    if not isinstance(params, dict) or set(params) != set(plan.space.distributions):
        raise ConfigError(
            f"{where} was run with the parameters {sorted(params) if isinstance(params, dict) else params}, but "
            f"this search varies {sorted(plan.space.distributions)}: the sweep file or the overrides changed since "
            "the search started. Continue it with the same ones, or start a new search with --dir.")
    for key, value in params.items():
        dist = plan.space.distributions[key]
        try:
            inside = dist._contains(dist.to_internal_repr(value))
        except (ValueError, TypeError):
            inside = False
        if not inside:
            raise ConfigError(
                f"{where} was run with {key}={value}, outside this search's space ({plan.space.described[key]}): "
                "the sweep file or the overrides changed since the search started. Continue it with the same "
                "ones, or start a new search with --dir.")
    return params


def tell_recorded(study: Any, plan: SearchPlan, records: dict[int, dict[str, Any]]) -> Past:
    """Tell the sampler the trials an earlier run of this search recorded: finished ones with their
    value, failed ones as failed; interrupted ones (or killed: ``running``) are returned to run again."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial  # searches only

    past = Past()
    for number, record in sorted(records.items()):
        search = record["search"]
        params = _check_params(plan, number, search.get("params"))
        # Categorical choices are compared by value: a recorded 64 and a choice 64.0 are one choice
        params = {k: (dist.choices[dist.to_internal_repr(v)] if isinstance(dist, CategoricalDistribution) else v)
                  for k, v in params.items() for dist in [plan.space.distributions[k]]}
        status = record.get("status")
        value = metric_value(record, plan.metric)
        attrs = {"kdexp_trial": number}
        if status == "finished" and value is not None:
            study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params=params,
                                         distributions=plan.space.distributions, user_attrs=attrs))
            past.finished.append(number)
        elif status in ("finished", "failed"):
            study.add_trial(create_trial(state=TrialState.FAIL, params=params,
                                         distributions=plan.space.distributions, user_attrs=attrs))
            past.failed.append(number)
        else:
            past.rerun.append(Trial(number, params, str(search.get("phase", "?")), trial_folder(plan.sweep_dir, number)))
    return past


def ask(study: Any, plan: SearchPlan, number: int, params: dict[str, Any] | None = None,
        phase: str | None = None) -> Trial:
    """The next trial: the sampler's proposal for ``number``, or ``params`` again (an interrupted trial)."""
    from optuna.trial import TrialState  # searches only

    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    study.sampler = make_sampler(plan, number)
    if params is not None:
        study.enqueue_trial(params, user_attrs={"kdexp_trial": number})
    trial = study.ask(plan.space.distributions)
    trial.set_user_attr("kdexp_trial", number)
    phase = phase or ("random" if completed < plan.startup else plan.sampler)  # as the samplers decide it
    return Trial(number, dict(trial.params), phase, trial_folder(plan.sweep_dir, number), trial)


# -- running a trial -----------------------------------------------------------------------
def trial_command(plan: SearchPlan, trial: Trial) -> list[str]:
    """The arguments of ``python -m kdexp.train`` that run ``trial``."""
    return [*plan.space.overrides(trial.params), f"hydra.run.dir={trial.folder}"]


class ForkedRun:
    """``python -m kdexp.train ARGS`` in a child forked from this process, with the waiting interface of
    ``subprocess.Popen`` that :func:`kdexp.grid.sweep.stop_process_groups` uses. The child runs the module as
    ``python -m`` would (:mod:`runpy`), with the modules this process imported already loaded."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        import multiprocessing

        self.process = multiprocessing.get_context("fork").Process(target=_train_forked, args=(args, env),
                                                                   name="kdexp-trial")
        self.process.start()
        self.pid = self.process.pid

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("kdexp trial", timeout or 0)
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode


def _train_forked(args: list[str], env: dict[str, str]) -> None:
    os.setsid()  # its own process group, as a subprocess gets: stop_process_groups signals it
    die_with_parent()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter (the search
    signal.signal(signal.SIGTERM, signal.SIG_DFL)             # turns SIGTERM into KeyboardInterrupt)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["kdexp train", *args]
    # runpy warns that kdexp.train is imported already: it is, on purpose (that is the time saved)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
    runpy.run_module("kdexp.train", run_name="__main__", alter_sys=True)  # ends the process (exit_now)


def import_for_trials(wandb: bool) -> None:
    """What every trial imports, imported once here before the trials are forked: torch, Lightning,
    kdexp's run code (about 7 s on the README's 2-core machines) and, when runs log to W&B, wandb."""
    import pytorch_lightning  # noqa: F401 - about 5 s of it: torchmetrics, lightning_fabric
    import torch
    import torch._dynamo  # noqa: F401 - building a torch optimiser imports it

    import kdexp.run.engine  # noqa: F401 - the run lifecycle and the data modules

    torch.set_num_threads(1)  # the GP sampler's torch runs here: no OpenMP pool for the forked trials to inherit
    if wandb:
        import_wandb()


def start(plan: SearchPlan, trial: Trial, env: dict[str, str], fork: bool) -> None:
    env = {**env, SEARCH_TRIAL_ENV: json.dumps(plan.trial_fields(trial.number, trial.params, trial.phase))}
    args = trial_command(plan, trial)
    trial.process = ForkedRun(args, env) if fork else start_process_group([sys.executable, "-m", "kdexp.train", *args], env)
    trial.started = time.time()


def wait_any(running: dict[int, Trial], poll_s: float = 0.2) -> list[Trial]:
    """The trials whose process has ended (waits until one has)."""
    while True:
        ended = [trial for trial in running.values() if trial.process.poll() is not None]
        if ended:
            return ended
        time.sleep(poll_s)


# -- console -------------------------------------------------------------------------------
def shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else hydra_value(value)


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={shown(v)}" for k, v in params.items())


def _better(plan: SearchPlan, a: float, b: float) -> bool:
    return a > b if plan.goal == "maximize" else a < b


@dataclass
class Progress:
    """The search's results so far, for the console."""

    plan: SearchPlan
    values: dict[int, float] = field(default_factory=dict)  # trial → metric (finished trials)
    phases: dict[int, str] = field(default_factory=dict)
    params: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)
    interrupted: list[int] = field(default_factory=list)

    def best(self) -> int | None:
        best = None
        for number, value in self.values.items():
            if best is None or _better(self.plan, value, self.values[best]):
                best = number
        return best

    def line(self, trial: Trial, status: str, seconds: float) -> str:
        best = self.best()
        value = self.values.get(trial.number)
        done = len(self.values) + len(self.failed)
        result = f"{self.plan.metric} {value:.4f}" if value is not None else status
        best_text = f"best {self.values[best]:.4f} (trial {best})" if best is not None else "no result yet"
        count = f"[{done}/{self.plan.run_cap}]"
        return (f"  trial {trial.number:3d} {status:11s} {result:24s} {best_text:25s} {count:9s} {trial.phase:6s} "
                f"{params_text(trial.params)}  ({seconds:.0f} s)")

    def phase_means(self) -> str:
        groups: dict[str, list[float]] = {}
        for number, value in sorted(self.values.items()):
            groups.setdefault(self.phases.get(number, "?"), []).append(value)
        return ", ".join(f"{phase} phase {sum(v) / len(v):.4f} (mean of {len(v)})" for phase, v in groups.items())


def header(plan: SearchPlan, past: Past, fork: bool) -> str:
    lines = [f"kdexp sweep {plan.name}: Bayesian search, {plan.sampler} sampler (seed {plan.seed}), {plan.run_cap} "
             f"trials, {plan.jobs} at a time → {plan.sweep_dir}",
             f"  {plan.goal} {plan.metric} over: {plan.space.describe()}",
             f"  the first {plan.startup} finished trials are drawn at random, then the {plan.sampler} sampler "
             "proposes each next trial"]
    if plan.space.fixed:
        lines.append("  every trial: " + " ".join(f"{k}={v}" for k, v in plan.space.fixed.items()))
    if past.done or past.rerun:
        lines.append(f"  continuing: {len(past.finished)} finished and {len(past.failed)} failed trial(s) told to "
                     f"the sampler from their records; {len(past.rerun)} interrupted trial(s) run again")
    if not fork:
        lines.append("  each trial starts a fresh interpreter (no fork here)")
    return "\n".join(lines)


def dry_run_text(plan: SearchPlan, past: Past) -> str:
    left = max(0, plan.run_cap - past.done)
    return header(plan, past, True) + (f"\n  {left} trial(s) to run (run_cap {plan.run_cap}, {past.done} recorded), "
                                       f"each in {plan.sweep_dir}/{TRIAL_PREFIX}NNN/")


# -- the search ----------------------------------------------------------------------------
def corner_points(space: SearchSpace) -> list[GridPoint]:
    """The space's corners (every end of every range, every choice) as grid points, composed and validated
    before any trial runs (:func:`kdexp.grid.sweep.check_points`): a value no run would accept stops the
    search at once, with every such value in one message."""
    keep = {k: v for k, v in space.fixed.items() if not k.lstrip("+~").startswith(("hydra.", "hydra/"))}
    return [tuple(sorted([*(f"{k}={v}" for k, v in keep.items()),
                          *(f"{k}={hydra_value(v)}" for k, v in params.items())]))
            for params in space.corners()]


def new_study(plan: SearchPlan) -> Any:
    import optuna  # searches only

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # kdexp prints its own line per trial
    return optuna.create_study(direction=plan.goal, sampler=make_sampler(plan, 0))


def run_search(plan: SearchPlan, dry_run: bool = False) -> int:
    """Run (or continue) the search; returns ``kdexp sweep``'s exit code: 0 when ``run_cap`` trials are
    recorded and some finished (failed trials are listed, as a search expects some), 1 when none
    finished, 130 when interrupted (run the same command again to continue)."""
    points = corner_points(plan.space)
    if dry_run:
        check_points(points)
        print(dry_run_text(plan, tell_recorded(new_study(plan), plan, recorded_trials(plan.sweep_dir))))
        return 0
    lock = lock_folder(plan.sweep_dir, busy=LOCK_BUSY)  # first: a second search is refused in a second
    try:
        return _search(plan, points)
    finally:
        lock.release()


def prepare_trials(points: list[GridPoint]) -> None:
    """Check the space's corners and import what the trials need, while Hydra composes the corners in
    helpers forked before torch is imported here (:class:`kdexp.grid.compose.ComposeAhead`)."""
    ahead = ComposeAhead(points)
    try:
        if can_fork():  # otherwise each trial is a fresh interpreter that imports them itself
            import_for_trials(wandb=may_log_to_wandb(points))
        check_points(points, ahead)
    finally:
        ahead.close()


def _search(plan: SearchPlan, points: list[GridPoint]) -> int:
    from optuna.trial import TrialState  # searches only

    study = new_study(plan)
    records = recorded_trials(plan.sweep_dir)
    past = tell_recorded(study, plan, records)
    to_start = plan.run_cap - past.done
    if to_start > 0:
        prepare_trials(points)
    fork = can_fork()
    print(header(plan, past, fork), flush=True)
    progress = Progress(plan)
    for number, record in records.items():
        progress.phases[number] = str(record["search"].get("phase", "?"))
        progress.params[number] = record["search"].get("params", {})
        value = metric_value(record, plan.metric)
        if number in past.finished and value is not None:
            progress.values[number] = value
        elif number in past.failed:
            progress.failed.append(number)
    taken = trial_numbers_taken(plan.sweep_dir)  # a folder with another run's record is not reused either
    free = (n for n in itertools.count() if n not in taken)
    queue = list(past.rerun)
    if to_start <= 0:
        print(f"  every trial is recorded: nothing to run (run_cap {plan.run_cap}; --run-cap N tries more)", flush=True)
    env = worker_env(plan.jobs, "skip", new_sweep_id())
    running: dict[int, Trial] = {}
    started = time.time()

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    interrupted = False
    problem = None
    try:
        while (to_start > 0 or running) and problem is None:
            while to_start > 0 and len(running) < plan.jobs:
                again = queue.pop(0) if queue else None
                trial = (ask(study, plan, again.number, again.params, again.phase) if again is not None
                         else ask(study, plan, next(free)))
                start(plan, trial, env, fork)
                running[trial.number] = trial
                to_start -= 1
            for trial in wait_any(running):
                del running[trial.number]
                problem = _tell(study, plan, trial, progress, TrialState) or problem
    except KeyboardInterrupt:
        interrupted = True
        print("\nkdexp sweep: interrupted; stopping the running trials (each saves its progress) ...", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if running:
            stop_process_groups([trial.process for trial in running.values()])
            progress.interrupted += list(running)
    if problem is not None:
        raise KdexpError(problem)
    print("\n" + summary(plan, progress, time.time() - started), flush=True)
    if interrupted:
        print("  interrupted: run the same command again to continue the search (finished trials are kept and "
              "told to the sampler; interrupted ones resume)", flush=True)
        return 130
    return 0 if progress.values else 1


def _tell(study: Any, plan: SearchPlan, trial: Trial, progress: Progress, states: Any) -> str | None:
    """Tell the sampler how ``trial`` ended (from its record) and print its line; returns a problem that
    stops the search (the metric is missing from a finished run's record), else None."""
    record = read_record(trial.folder) or {}
    status = record.get("status") or f"no record (exit code {trial.process.poll()})"
    value = metric_value(record, plan.metric) if status == "finished" else None
    progress.phases[trial.number] = trial.phase
    progress.params[trial.number] = trial.params
    problem = None
    if value is not None:
        study.tell(trial.optuna_trial, value)
        progress.values[trial.number] = value
    else:
        study.tell(trial.optuna_trial, state=states.FAIL)
        if status == "finished":
            problem = (f"{trial.folder} finished, but its record has no {plan.metric} (the sweep file's metric.name) "
                       f"as a number; it has {', '.join(sorted(record.get('metrics') or {})) or 'no metrics'}. Fix "
                       "metric.name and run the same command again: finished trials are kept.")
        elif status == "failed":
            progress.failed.append(trial.number)
        else:  # stopped from outside (killed, pre-empted): run again when the search continues
            progress.interrupted.append(trial.number)
    print(progress.line(trial, status, time.time() - trial.started), flush=True)
    if status == "failed":
        error = record.get("error") or {}
        print(f"              {error.get('type')}: {str(error.get('message', ''))[:200]}", flush=True)
    return problem


def summary(plan: SearchPlan, progress: Progress, seconds: float) -> str:
    done = len(progress.values) + len(progress.failed)
    lines = [f"search {plan.sweep_dir}: {done} of {plan.run_cap} trials — {len(progress.values)} finished, "
             f"{len(progress.failed)} failed" + (f", {len(progress.interrupted)} interrupted"
                                                 if progress.interrupted else "")]
    best = progress.best()
    if best is not None:
        lines.append(f"  best: trial {best}, {plan.metric} {progress.values[best]:.4f}  "
                     f"{params_text(progress.params.get(best, {}))}")
        lines.append(f"  {plan.metric} by phase: {progress.phase_means()}")
    lines.append(f"  table and plot: kdexp report {plan.sweep_dir} --plots {plan.sweep_dir / 'report'}")
    lines.append(f"  wall time {seconds:.0f} s")
    return "\n".join(lines)
