"""Run a sweep file (W&B sweep format) locally as one Hydra multirun (on W&B: :mod:`kdexp.grid.wandb_sweep`).

A sweep file is what ``wandb sweep`` reads: ``method``, ``metric``, ``parameters``
(dotted Hydra config paths with ``value`` or ``values``) and a ``command`` that hands
the parameters to ``kdexp/train.py`` as ``${args_no_hyphens}``. Locally the same grid
becomes ``python -m kdexp.train --multirun key=v1,v2 ...`` with one folder per grid
point under ``outputs/sweeps/<name>/``; finished points are skipped on a re-run.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdexp.core.distributed import ddp_launch_problem
from kdexp.core.errors import ConfigError, KdexpError
from kdexp.core.files import atomic_write_text
from kdexp.core.processes import can_fork, die_with_parent
from kdexp.core.records import RECORD_NAME, SELECTION_ENV, SWEEP_ID_ENV, read_record
from kdexp.core.sweep_file import (  # noqa: F401
    LOCAL_METHODS,
    SweepSpec,
    hydra_value,
    load_sweep,
    parse_overrides,
    read_yaml,
    sweep_axes,
)
from kdexp.core.tracking import import_wandb, logs_to_wandb
from kdexp.grid.compose import ComposeAhead, GridPoint, JobsToCompose, compose_grid, problem_message
from kdexp.run.folder import LAST_CHECKPOINT, RESUMABLE_STATUSES


def grid(spec: SweepSpec, overrides: list[str] | None = None, sample_seed: int = 0) -> list[GridPoint]:
    """Every run of the sweep, as W&B expands it: the cartesian product of the axes for
    ``method: grid``; for ``method: random``, ``run_cap`` distinct points of that product,
    drawn with ``sample_seed`` (the same seed, the same runs). ``method: bayes`` has no grid: its runs
    are chosen one by one from the results so far (:mod:`kdexp.grid.search`)."""
    if spec.method == "bayes":
        raise ConfigError(f"{spec.name}: method: bayes has no grid to list; its runs are chosen as the search goes "
                          "(kdexp sweep runs it as a search, kdexp.grid.search).")
    # hydra.* settings (launcher, partition) shape how runs are executed, not which runs exist.
    axes = {k: vs for k, vs in sweep_axes(spec, overrides).items()
            if not k.lstrip("+~").startswith(("hydra.", "hydra/"))}
    keys = list(axes)
    points = [tuple(sorted(f"{k}={v}" for k, v in zip(keys, combo))) for combo in itertools.product(*axes.values())]
    if spec.raw.get("method") == "random":
        rng = random.Random(sample_seed)
        chosen = sorted(rng.sample(range(len(points)), min(int(spec.raw["run_cap"]), len(points))))
        points = [points[i] for i in chosen]
    return points


def may_log_to_wandb(points: list[GridPoint]) -> bool:
    """Whether some point logs to W&B (the default logger), as far as the overrides tell."""
    return not all(any(item.startswith("logger=") and item != "logger=wandb" for item in point) for point in points)


def check_points(points: list[GridPoint], ahead: ComposeAhead | None = None) -> list[Any]:
    """Compose and validate every grid point before anything runs; one message lists all that fail.
    Returns the composed configs, in the order of ``points``.

    Catches what would otherwise abort the multirun at its first bad job (an option
    that does not exist, ``kd: hintn``) or fail each run on its own (``kd.temperature=-1``).
    A point from :func:`grid` holds every override of the run (command-line ones included).
    ``ahead``: the grid, being composed in a helper process (:mod:`kdexp.grid.compose`).
    """
    import kdexp.data  # noqa: F401 - torch and the data classes, which validation needs: imported while the helper composes
    from kdexp.run.validation import validate_config

    composed = (ahead.result() if ahead is not None else compose_grid(points)).checks
    problems: dict[str, list[GridPoint]] = {}  # message → the points that hit it
    for point, cfg in zip(points, composed):
        try:
            if isinstance(cfg, str):  # Hydra could not compose it
                problems.setdefault(cfg, []).append(point)
                continue
            validate_config(cfg)
            ddp_problem = ddp_launch_problem(cfg.trainer, in_sweep=True, from_command_line=True)
            if ddp_problem:
                raise ConfigError(ddp_problem)
        except Exception as err:  # kdexp's ConfigError, and what instantiating a bad value raises
            problems.setdefault(problem_message(err), []).append(point)
    if problems:
        failing = sum(len(v) for v in problems.values())
        lines = [f"  {message}\n    {len(hit)} run{'s' * (len(hit) > 1)}, e.g. {' '.join(hit[0])}"
                 for message, hit in problems.items()]
        raise ConfigError(f"{failing} of {len(points)} runs cannot start; nothing was run. Fix the sweep file or "
                          "the overrides:\n" + "\n".join(lines))
    return composed


# --launcher / --jobs → the Hydra launcher plugin they need, and how to install it.
_LAUNCHER_PLUGINS = {
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "--launcher slurm needs hydra-submitit-launcher"),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "--jobs N needs hydra-joblib-launcher"),
}


def _require_launcher_plugin(launcher: str) -> None:
    module, message = _LAUNCHER_PLUGINS[launcher]
    if importlib.util.find_spec(module) is None:
        raise KdexpError(f"{message}: pip install -e '.[launchers]'.")


def multirun_command(spec: SweepSpec, sweep_dir: Path, overrides: list[str], jobs: int,
                     launcher: str = "local") -> list[str]:
    """The ``python -m kdexp.train --multirun`` command that runs the whole grid."""
    command = [sys.executable, "-m", "kdexp.train", "--multirun"]
    command += [f"{k}={','.join(vs)}" for k, vs in sweep_axes(spec, overrides).items()]
    command.append(f"hydra.sweep.dir={sweep_dir}")
    if launcher == "slurm":
        _require_launcher_plugin("slurm")
        command.append("hydra/launcher=slurm")
    elif jobs > 1:
        _require_launcher_plugin("joblib")
        command += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    return command


def worker_env(jobs: int, if_finished: str, sweep_id: str | None = None) -> dict[str, str]:
    """Environment for the sweep.

    Each run pins torch to ``num_threads`` (default 1), so N workers use N cores and
    results do not depend on N; BLAS libraries outside torch get cores / N threads.
    ``sweep_id`` goes into the record of every run the sweep starts (see :func:`summarize`).
    """
    threads = str(max(1, (os.cpu_count() or 1) // max(jobs, 1)))
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "KDEXP_IF_FINISHED": if_finished})
    if sweep_id:
        env[SWEEP_ID_ENV] = sweep_id
    return env


def new_sweep_id() -> str:
    """One invocation of ``kdexp sweep``: host, process and start time (two sweeps never share one)."""
    return f"{socket.gethostname()}-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S')}"


def collect(sweep_dir: Path) -> dict[GridPoint, tuple[Path, dict[str, Any]]]:
    """Records under ``sweep_dir`` keyed by their grid point (the run's sorted overrides)."""
    found = {}
    for record_path in sorted(sweep_dir.glob(f"*/{RECORD_NAME}")):
        record = read_record(record_path.parent)
        if record is not None:
            found[tuple(sorted(record.get("overrides", [])))] = (record_path.parent, record)
    return found


def unreadable_records(sweep_dir: Path) -> list[Path]:
    """Run records under ``sweep_dir`` that exist but cannot be read (cut short, edited by hand)."""
    return [path for path in sorted(sweep_dir.glob(f"*/{RECORD_NAME}")) if read_record(path.parent) is None]


def finished_points(sweep_dir: Path) -> set[GridPoint]:
    """The grid points whose record under ``sweep_dir`` says finished."""
    return {point for point, (_, record) in collect(sweep_dir).items() if record.get("status") == "finished"}


def summarize(points: list[GridPoint], sweep_dir: Path, skipped: set[GridPoint],
              sweep_id: str | None = None) -> tuple[str, dict[str, int]]:
    """Finished / skipped / failed / missing / refused counts for ``points``, and failures with their errors.

    ``skipped``: the points that were already finished before the sweep ran and were not rerun.
    ``sweep_id``: this sweep's (:func:`new_sweep_id`). A point whose record another process wrote
    while this sweep ran (another sweep into the same ``--dir`` held its folder, or finished it
    first) was refused here, not run: it counts as refused, whatever its status.
    """
    records = collect(sweep_dir)
    counts = {"finished": 0, "skipped": 0, "failed": 0, "missing": 0, "refused": 0, "refused_unfinished": 0}
    failures = []
    for point in points:
        folder, record = records.get(point, (None, {}))
        status = record.get("status")
        if record and point not in skipped and sweep_id is not None and record.get("sweep_id") != sweep_id:
            counts["refused"] += 1
            counts["refused_unfinished"] += status != "finished"
            holder = "in use by another run" if status == "running" else f"{status} by another run"
            failures.append(f"  refused   {' '.join(point)}\n            {holder} ({folder})")
        elif status == "failed":
            counts["failed"] += 1
            error = record.get("error", {})
            failures.append(f"  failed    {' '.join(point)}\n            {error.get('type')}: "
                            f"{str(error.get('message', ''))[:300]}  ({folder})")
        elif status != "finished":
            counts["missing"] += 1
            why = f" ({status}: run the sweep again to resume it)" if status in ("interrupted", "running") else ""
            failures.append(f"  missing   {' '.join(point)}{why}")
        elif point in skipped:
            counts["skipped"] += 1
        else:
            counts["finished"] += 1
    head = (f"sweep {sweep_dir}: {len(points)} runs — {counts['finished']} finished, {counts['skipped']} skipped "
            f"(already finished), {counts['failed']} failed, {counts['missing']} missing")
    if counts["refused"]:
        head += f", {counts['refused']} refused (another process ran or holds them, not this sweep)"
    return "\n".join([head, *failures]), counts


def dry_run(points: list[GridPoint], sweep_dir: Path, force: bool, plan: PackPlan | None = None) -> str:
    """One line per run: what a real invocation would do with it (with ``--pack``: in which pack)."""
    finished = finished_points(sweep_dir)
    where = plan.where() if plan is not None else {}
    lines = []
    for i, point in enumerate(points):
        action = "run" if point not in finished else "rerun (archive finished)" if force else "skip (finished)"
        if action != "skip (finished)" and plan is not None:
            action += f", {where.get(i, 'alone')}"
        lines.append(f"{i:4d}  {action:34s} {' '.join(point)}")
    tail = [plan.summary()] if plan is not None else []
    return "\n".join(lines + tail + [f"{len(points)} runs in {sweep_dir}"])


def stop_process_groups(procs: list[subprocess.Popen], grace_s: float = 60.0) -> None:
    """SIGTERM each child's process group (runs save last.ckpt and record ``interrupted``), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                continue
        if all(proc.poll() is not None for proc in procs):
            return


def start_process_group(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A child in its own process group, which gets SIGTERM if this process dies."""
    return subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_parent)


def _wait_all(procs: list[subprocess.Popen], stopping: str = "stopping the runs (each saves its progress)") -> int:
    """The largest exit code of ``procs``; on Ctrl-C (or SIGTERM here) all of them are stopped first."""
    try:
        return max([proc.wait() for proc in procs], default=0)
    except KeyboardInterrupt:
        print(f"\nkdexp sweep: interrupted; {stopping} ...", flush=True)
        stop_process_groups(procs)
        raise


def run_local(spec: SweepSpec, points: list[GridPoint], overrides: list[str], sweep_dir: Path, jobs: int = 1,
              force: bool = False, launcher: str = "local", plan: PackPlan | None = None,
              composed_jobs: list[Any] | None = None) -> int:
    """Run the grid (``points``, from :func:`grid`) as one Hydra multirun; returns 0 when every run finished.

    With a ``plan`` (``--pack N``), its packs train first in ``jobs`` worker processes, and the
    multirun then trains only the points that run alone (or that no pack trained). ``composed_jobs``:
    each point's multirun job config, composed ahead (:mod:`kdexp.grid.compose`), for the pack workers.
    The children run in their own process groups, and Ctrl-C, SIGTERM or the death of
    this process stop all of them: no run keeps training after its sweep is gone.
    Interrupted runs record ``interrupted`` and resume when the sweep is run again.
    """
    command = multirun_command(spec, sweep_dir, overrides, jobs, launcher)
    print(f"kdexp sweep {spec.name}: {len(points)} runs, {jobs} worker(s) → {sweep_dir}", flush=True)
    if plan is not None:
        print(plan.summary(), flush=True)
    print("  " + " ".join(command[1:]), flush=True)
    for path in unreadable_records(sweep_dir):
        print(f"  unreadable record {path}: that run is run again (its old files are archived first)", flush=True)
    skipped = set() if force else finished_points(sweep_dir)
    started = time.time()
    sweep_id = new_sweep_id()

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    interrupted = False
    returncode = 0
    try:
        env = worker_env(jobs, "rerun" if force else "skip", sweep_id)
        if not force and set(points) <= skipped:  # a multirun would only start jobs that skip themselves
            print("  every run is already finished: nothing to run (--force runs them again)", flush=True)
        elif plan is not None and plan.packs:
            returncode = run_packs(spec, overrides, points, plan, sweep_dir, jobs, force, composed_jobs, sweep_id)
            records = collect(sweep_dir)
            left = [points[i] for i in plan.alone] + [
                points[i] for pack in plan.packs for i in pack
                if records.get(points[i], (None, {}))[1].get("status") not in ("finished", "failed")]
            if left:

                selection = sweep_dir / f".selection-{os.getpid()}.json"
                atomic_write_text(selection, json.dumps([list(point) for point in left]), what="sweep selection")
                env[SELECTION_ENV] = str(selection)
                print(f"  {len(left)} run(s) outside the packs: one Hydra multirun", flush=True)
                try:
                    returncode = max(returncode, _wait_all([start_process_group(command, env)]))
                finally:
                    selection.unlink(missing_ok=True)
        elif launcher == "slurm":  # the multirun's launcher cancels its SLURM jobs when it is stopped
            returncode = _wait_all([start_process_group(command, env)], "cancelling the SLURM jobs it submitted")
        else:
            returncode = _wait_all([start_process_group(command, env)])
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    text, counts = summarize(points, sweep_dir, skipped, sweep_id)
    print(f"\n{text}\n  wall time {time.time() - started:.0f} s", flush=True)
    if interrupted:
        print("  interrupted: run the same command again to finish the grid (unfinished runs resume)", flush=True)
        return 130
    if returncode != 0:
        print(f"  the multirun itself exited with code {returncode}", flush=True)
    return 0 if returncode == 0 and counts["failed"] == counts["missing"] == counts["refused_unfinished"] == 0 else 1


# -- packed grids: --pack N ------------------------------------------------------------
@dataclass
class PackPlan:
    """Which grid points (by index) train together, and which run alone and why."""

    size: int
    packs: list[list[int]] = field(default_factory=list)
    alone: dict[int, str] = field(default_factory=dict)
    wandb: bool = False  # some packed run logs to W&B

    def where(self) -> dict[int, str]:
        out = {i: f"pack {k + 1} of {len(self.packs)}" for k, pack in enumerate(self.packs) for i in pack}
        out.update({i: "alone" for i in self.alone})
        return out

    def summary(self) -> str:
        packed = sum(len(pack) for pack in self.packs)
        lines = [f"  --pack {self.size}: {packed} run(s) in {len(self.packs)} pack(s), {len(self.alone)} alone"]
        for why, n in Counter(self.alone.values()).items():
            lines.append(f"    alone ({n}): {why}")
        return "\n".join(lines)


def plan_packs(points: list[GridPoint], cfgs: list[Any], sweep_dir: Path, size: int, force: bool,
               workers: int = 1) -> PackPlan:
    """Group the points that still have to run into packs of up to ``size`` (see
    :func:`kdexp.grid.pack.pack_groups`); a killed single run resumes alone, and a point with no
    partner runs alone (a pack of one shares nothing)."""
    from kdexp.grid.pack import pack_groups  # torch: after the fork of the composing helper (kdexp.grid.compose)

    records = collect(sweep_dir)
    plan = PackPlan(size)
    todo = []
    for i, point in enumerate(points):
        folder, record = records.get(point, (None, {}))
        status = record.get("status")
        if status == "finished" and not force:
            continue
        if status in RESUMABLE_STATUSES and folder is not None and (folder / LAST_CHECKPOINT).is_file():
            plan.alone[i] = "a killed run resumes from its checkpoint"
            continue
        todo.append(i)
    groups, alone = pack_groups([cfgs[i] for i in todo], size, workers)
    plan.alone.update({todo[j]: why for j, why in alone.items()})
    for group in groups:
        if len(group) == 1:
            plan.alone[todo[group[0]]] = "no other point shares its settings"
        else:
            plan.packs.append([todo[j] for j in group])
    plan.wandb = any(logs_to_wandb(cfgs[i]) for pack in plan.packs for i in pack)
    return plan


def job_overrides(spec: SweepSpec, overrides: list[str], point: GridPoint) -> list[str]:
    """The point's overrides in the order the multirun hands them to its job (the axes' order)."""
    values = dict(item.split("=", 1) for item in point)
    return [f"{key}={values[key]}" for key in sweep_axes(spec, overrides) if key in values]


def pack_hydra_overrides(spec: SweepSpec, overrides: list[str]) -> list[str]:
    """The sweep's fixed ``hydra.*`` settings, which every multirun job (and pack member) is composed with."""
    return [f"{key}={values[0]}" for key, values in sweep_axes(spec, overrides).items()
            if key.startswith("hydra.") and not key.startswith("hydra.launcher") and len(values) == 1]


def jobs_to_compose(spec: SweepSpec, overrides: list[str], points: list[GridPoint], sweep_dir: Path
                    ) -> JobsToCompose:
    """What composes each point as the multirun job a pack member is written as."""
    return JobsToCompose(sweep_dir, [job_overrides(spec, overrides, point) for point in points],
                         pack_hydra_overrides(spec, overrides))


def run_packs(spec: SweepSpec, overrides: list[str], points: list[GridPoint], plan: PackPlan, sweep_dir: Path,
              jobs: int, force: bool, composed_jobs: list[Any] | None = None, sweep_id: str | None = None) -> int:
    """Queue the plan's packs and train them in ``jobs`` worker processes (:class:`ForkedWorker`, which
    is handed the members' configs composed ahead, or ``python -m kdexp.grid.workers`` where this
    process cannot fork)."""
    import shutil

    from kdexp.grid.workers import write_queue  # torch and the pack engine: only a packed sweep loads them

    queue = sweep_dir / f".packs-{os.getpid()}"
    paths = write_queue(queue, [{"sweep_dir": str(sweep_dir), "if_finished": "rerun" if force else "skip",
                                 "hydra_overrides": pack_hydra_overrides(spec, overrides),
                                 "jobs": [job_overrides(spec, overrides, points[i]) for i in pack]}
                                for pack in plan.packs])
    workers = min(jobs, len(plan.packs))
    env = worker_env(jobs, "skip", sweep_id)
    try:
        if can_fork():
            if plan.wandb:
                import_wandb()  # once here, not once in each forked worker
            composed = None if composed_jobs is None else \
                {path.name: [composed_jobs[i] for i in pack] for path, pack in zip(paths, plan.packs)}
            return _wait_all([ForkedWorker(queue, env, composed) for _ in range(workers)])
        return _wait_all([start_process_group([sys.executable, "-m", "kdexp.grid.workers", str(queue)], env)
                          for _ in range(workers)])
    finally:
        shutil.rmtree(queue, ignore_errors=True)


class ForkedWorker:
    """A pack worker (:func:`kdexp.grid.workers.work`) forked from this process, in its own process
    group, with the waiting interface of ``subprocess.Popen`` that :func:`_wait_all` and
    :func:`stop_process_groups` use.

    Why a fork: this process has already imported what a worker needs (torch, ``torch._dynamo``,
    W&B, Hydra; :func:`kdexp.grid.workers.import_for_workers`), and a fresh interpreter spends
    3–4 s importing them again, a quarter of a 12-run packed sweep. The sweep's own torch never ran
    a multi-threaded region before the fork (``kdexp sweep --pack`` sets one thread before it
    checks the grid), so no OpenMP pool is inherited half-alive.
    """

    def __init__(self, queue: Path, env: dict[str, str], composed: dict[str, list[Any]] | None = None) -> None:
        import multiprocessing

        self.process = multiprocessing.get_context("fork").Process(target=_forked_work,
                                                                   args=(str(queue), env, composed))
        self.process.start()
        self.pid = self.process.pid

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("kdexp pack worker", timeout or 0)
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode


def _forked_work(queue: str, env: dict[str, str], composed: dict[str, list[Any]] | None) -> None:
    os.setsid()  # its own process group, as start_process_group gives a subprocess: stop_process_groups signals it
    die_with_parent()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
    os.environ.clear()
    os.environ.update(env)
    from kdexp.grid.workers import work  # in the forked worker: torch was imported by the sweep before the fork

    try:
        sys.exit(work(Path(queue), composed))
    finally:
        # a forked process ends without running atexit hooks, where W&B stops its service
        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()

