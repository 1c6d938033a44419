"""A sweep's grid composed by Hydra in helper processes, while the sweep imports torch.

Before anything runs, a sweep composes every grid point to check it
(:func:`kdexp.grid.sweep.check_points`), and a packed sweep's workers need each member's multirun
job config (:func:`load_sweep_jobs`). Hydra's composition is pure Python,
0.15–0.25 s a point on the 2-core machines of the README's figures, and needs no torch; the
sweep meanwhile imports torch, and for packs what its workers will need (W&B, torch._dynamo):
3–4 s there.

So on Linux (:func:`kdexp.core.processes.can_fork`) the sweep forks, before it imports torch, two
helpers that compose half the points each; the configs come back pickled through a pipe. For
packs each point is composed once, as its multirun job, and checked as that job's task config
(:func:`check_config`). The calls are Hydra's own and the configs are the same; only the
process they are made in differs. If a helper cannot give its result (it died, it was killed),
the sweep composes its share itself.
"""

from __future__ import annotations

import copy
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict, read_write

from kdexp.core.config import conf_initialized
from kdexp.core.processes import can_fork

log = logging.getLogger("kdexp")
GridPoint = tuple[str, ...]  # sorted "key=value" overrides of one run (as in kdexp.grid.sweep)


@dataclass
class JobsToCompose:
    """What the multirun jobs of a packed sweep are composed from."""

    sweep_dir: Path
    overrides: list[list[str]]  # each point's overrides in the order the multirun gives them
    hydra_overrides: list[str]


@dataclass
class ComposedGrid:
    """Each grid point composed for checking (or why it does not compose), and its multirun job config."""

    checks: list[Any]  # per point: a DictConfig, or the message of Hydra's error (a str)
    jobs: list[Any] | None = None  # per point: load_sweep_jobs' config; None when not asked or not composed


def problem_message(err: BaseException) -> str:
    """An error as one line for the sweep's list of points that cannot start (Hydra's search path cut)."""
    return " ".join(str(err).split()).split(" Config search path")[0][:400]


def choices_of(point: GridPoint) -> dict[str, str]:
    """Group choices named in a grid point (``kd=hinton``), for messages that name the group."""
    return {k: v for k, v in (item.split("=", 1) for item in point) if "." not in k}


def compose_for_check(points: list[GridPoint]) -> list[Any]:
    """Each point as a single run composes it (``paths`` pinned to ``.``), with its group choices."""
    from hydra import compose

    out: list[Any] = []
    with conf_initialized():
        for point in points:
            try:
                cfg = compose("train", overrides=[*point, "paths.root_dir=.", "paths.output_dir=."],
                              return_hydra_config=False)
                with open_dict(cfg):
                    cfg.choices = choices_of(point)
                out.append(cfg)
            except Exception as err:  # noqa: BLE001 - Hydra's composition errors, listed by check_points
                out.append(problem_message(err))
    return out


def compose_jobs(jobs: JobsToCompose) -> list[Any] | None:
    """Each point as its multirun job (:func:`load_sweep_jobs`); None when they do not
    compose (each pack worker then composes its own, and reports what fails)."""
    try:
        return load_sweep_jobs(jobs.sweep_dir, jobs.overrides, jobs.hydra_overrides)
    except Exception:  # noqa: BLE001
        log.debug("the grid's multirun jobs did not compose ahead", exc_info=True)
        return None


def task_config(full: DictConfig) -> DictConfig:
    """What Hydra hands a job's task function: the job's config without its ``hydra`` node (a copy)."""
    task = copy.deepcopy(full)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def check_config(point: GridPoint, job: Any) -> Any:
    """The config :func:`compose_for_check` composes for ``point``, taken from its multirun job's config:
    the job's task config (without the ``hydra`` node) with the run's paths pinned to ``.``. Hydra
    composes the same defaults and overrides for both, so they are equal (a test compares them)."""
    task = task_config(job)
    with read_write(task), open_dict(task):
        task.paths.root_dir = "."
        task.paths.output_dir = "."
        task.choices = choices_of(point)
    return task


def compose_grid(points: list[GridPoint], jobs: JobsToCompose | None = None) -> ComposedGrid:
    """Compose ``points`` for checking and, with ``jobs``, as multirun jobs (all of them, or None).

    With ``jobs`` each point is composed once, as its job, and checked as :func:`check_config`;
    if any point does not compose, the points are composed one by one for checking, so that each
    problem is named (and no jobs are given: the sweep stops at the check).
    """
    if jobs is not None:
        loaded = compose_jobs(jobs)
        if loaded is not None:
            return ComposedGrid([check_config(point, job) for point, job in zip(points, loaded)], loaded)
    return ComposedGrid(compose_for_check(points))


def _compose_and_send(points: list[GridPoint], jobs: JobsToCompose | None, conn: Any) -> None:
    # Ctrl-C is the sweep's to handle: it stops this helper itself (ComposeAhead.close), with no
    # second traceback from here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(compose_grid(points, jobs))
    conn.close()


class Helper:
    """:func:`compose_grid` of some points in a forked process; :meth:`get` waits for its result
    (None if it died)."""

    def __init__(self, points: list[GridPoint], jobs: JobsToCompose | None) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.conn, child_end = context.Pipe(duplex=False)
        self.process: Any = context.Process(target=_compose_and_send, args=(points, jobs, child_end),
                                            name="kdexp-compose", daemon=True)
        self.process.start()
        child_end.close()

    def get(self) -> ComposedGrid | None:
        try:
            return self.conn.recv()
        except (EOFError, OSError):  # the helper died before it sent anything
            log.debug("a grid helper gave no result; composing its points here")
            return None
        finally:
            self.close()

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class ComposeAhead:
    """:func:`compose_grid` started now in forked helpers (where :func:`~kdexp.core.processes.can_fork`),
    each composing a share of the points, so that on two cores they take half as long; :meth:`result`
    waits for them. Start it before importing torch: the helpers fork a process that has imported
    no torch, and compose while this one imports. A share whose helper gives nothing is composed here."""

    HELPERS = 2  # the machines this is tuned on have 2 cores; the sweep process imports meanwhile

    def __init__(self, points: list[GridPoint], jobs: JobsToCompose | None = None) -> None:
        self.points, self.jobs = points, jobs
        self._result: ComposedGrid | None = None
        self.shares = split(len(points), self.HELPERS)  # (start, stop) of each helper's points
        self.helpers: list[Helper] = []
        if can_fork():
            self.helpers = [Helper(*self._share(start, stop)) for start, stop in self.shares]

    def _share(self, start: int, stop: int) -> tuple[list[GridPoint], JobsToCompose | None]:
        jobs = self.jobs
        if jobs is not None:
            jobs = JobsToCompose(jobs.sweep_dir, jobs.overrides[start:stop], jobs.hydra_overrides)
        return self.points[start:stop], jobs

    def result(self) -> ComposedGrid:
        """The composed grid: the helpers', or composed here where a helper has none to give."""
        if self._result is not None:
            return self._result
        if not self.helpers:
            self._result = compose_grid(self.points, self.jobs)
            return self._result
        parts = []
        for (start, stop), helper in zip(self.shares, self.helpers):
            part = helper.get()
            parts.append(part if part is not None else compose_grid(*self._share(start, stop)))
        self.close()
        grid = ComposedGrid([cfg for part in parts for cfg in part.checks])
        if self.jobs is not None and not any(isinstance(cfg, str) for cfg in grid.checks):
            if all(part.jobs is not None for part in parts):
                grid.jobs = [job for part in parts for job in part.jobs]
            else:  # a share composed point by point (another share has a bad point): its jobs, here
                grid.jobs = compose_jobs(self.jobs)
        self._result = grid
        return grid

    def close(self) -> None:
        """Stop the helpers (when their result is not needed, e.g. ``--dry-run``) and release the pipes."""
        for helper in self.helpers:
            helper.close()
        self.helpers = []


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``range(n)`` cut into at most ``parts`` contiguous, non-empty shares of near-equal size."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# -- one grid point as Hydra hands it to a multirun job ---------------------------------
@dataclass
class JobConfig:
    """One grid point as Hydra hands it to a multirun job."""

    full: DictConfig  # with the hydra node (for .hydra/hydra.yaml and ${hydra:...})
    task: DictConfig  # without it: what the task function receives
    output_dir: Path


def job_configs(sweep_dir: Path, jobs: list[list[str]], hydra_overrides: list[str] | None = None) -> list[JobConfig]:
    """Compose each job's config as Hydra's multirun does (master config, then one sweep config per job)."""
    return pack_jobs(load_sweep_jobs(sweep_dir, jobs, hydra_overrides))


def load_sweep_jobs(sweep_dir: Path, jobs: list[list[str]], hydra_overrides: list[str] | None = None
                    ) -> list[DictConfig]:
    """Hydra's own composition of each job (``load_sweep_config`` on the multirun's master config): the
    costly part of :func:`job_configs`, about 0.3 s a job, which a sweep does ahead in a helper process."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    with conf_initialized():
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("train", [f"hydra.sweep.dir={sweep_dir}", *(hydra_overrides or [])],
                                           run_mode=RunMode.MULTIRUN)
        return [loader.load_sweep_config(master, list(overrides)) for overrides in jobs]


def pack_jobs(loaded: list[DictConfig]) -> list[JobConfig]:
    """Composed jobs (:func:`load_sweep_jobs`) as the numbered jobs of one pack, each with its output
    folder and its task config, as Hydra's ``run_job`` sets them up. Takes ownership of ``loaded``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode

    setup_globals()  # Hydra's resolvers (${hydra:...}), as its launchers register them before running jobs
    out = []
    for index, full in enumerate(loaded):
        with open_dict(full):
            full.hydra.job.id = index
            full.hydra.job.num = index
            full.hydra.mode = RunMode.MULTIRUN
        HydraConfig.instance().set_config(full)
        output_dir = Path(str(full.hydra.sweep.dir)) / str(full.hydra.sweep.subdir)
        with read_write(full.hydra.runtime), open_dict(full.hydra.runtime):  # as Hydra's run_job sets it
            full.hydra.runtime.output_dir = str(output_dir.resolve())
        HydraConfig.instance().set_config(full)
        out.append(JobConfig(full, task_config(full), output_dir.resolve()))
    return out


@contextmanager
def as_job(job: JobConfig) -> Iterator[None]:
    """Make ``job``'s Hydra config the current one (``${hydra:...}``, HydraConfig.get())."""
    from hydra.core.hydra_config import HydraConfig

    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job.full)
    try:
        yield
    finally:
        if previous is not None:
            HydraConfig.instance().cfg = previous
