"""A sweep's grid composed by Hydra in helper processes, while the sweep imports torch.

Before anything runs, a sweep composes every grid point to check it
(:func:`kdexp.sweep.check_points`), and a packed sweep's workers need each member's multirun
job config (:func:`kdexp.packed_runs.load_sweep_jobs`). Hydra's composition is pure Python,
0.15–0.25 s a point on the 2-core machines of the README's figures, and needs no torch; the
sweep meanwhile imports torch, and for packs what its workers will need (W&B, torch._dynamo):
3–4 s there.

So on Linux (:func:`kdexp.processes.can_fork`) the sweep forks, before it imports torch, one
helper that composes the points for checking and, for packs, another that composes them as
multirun jobs; the configs come back pickled through a pipe. The calls are Hydra's own and the
configs are the same; only the process they are made in differs. If a helper cannot give its
result (it died, it was killed), the sweep composes that part itself.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import open_dict

from kdexp.processes import can_fork

log = logging.getLogger("kdexp")
GridPoint = tuple[str, ...]  # sorted "key=value" overrides of one run (as in kdexp.sweep)


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
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kdexp.train import CONF_DIR

    out: list[Any] = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            for point in points:
                try:
                    cfg = compose("train", overrides=[*point, "paths.root_dir=.", "paths.output_dir=."],
                                  return_hydra_config=False)
                    with open_dict(cfg):
                        cfg.choices = choices_of(point)
                    out.append(cfg)
                except Exception as err:  # noqa: BLE001 - Hydra's composition errors, listed by check_points
                    out.append(problem_message(err))
    finally:
        GlobalHydra.instance().clear()
    return out


def compose_jobs(jobs: JobsToCompose) -> list[Any] | None:
    """Each point as its multirun job (:func:`kdexp.packed_runs.load_sweep_jobs`); None when they do not
    compose (each pack worker then composes its own, and reports what fails)."""
    from kdexp.packed_runs import load_sweep_jobs

    try:
        return load_sweep_jobs(jobs.sweep_dir, jobs.overrides, jobs.hydra_overrides)
    except Exception:  # noqa: BLE001
        log.debug("the grid's multirun jobs did not compose ahead", exc_info=True)
        return None


def compose_grid(points: list[GridPoint], jobs: JobsToCompose | None = None) -> ComposedGrid:
    """Compose ``points`` for checking and, with ``jobs``, as multirun jobs (all of them, or None)."""
    grid = ComposedGrid(compose_for_check(points))
    if jobs is not None and not any(isinstance(cfg, str) for cfg in grid.checks):
        grid.jobs = compose_jobs(jobs)
    return grid


def _compose_and_send(compose: Any, argument: Any, conn: Any) -> None:
    # Ctrl-C is the sweep's to handle: it stops this helper itself (ComposeAhead.close), with no
    # second traceback from here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(compose(argument))
    conn.close()


class Helper:
    """``compose(argument)`` in a forked process; :meth:`get` waits for its result (None if it died)."""

    def __init__(self, compose: Any, argument: Any) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.conn, child_end = context.Pipe(duplex=False)
        self.process: Any = context.Process(target=_compose_and_send, args=(compose, argument, child_end),
                                            name="kdexp-compose", daemon=True)
        self.process.start()
        child_end.close()

    def get(self) -> Any:
        try:
            return self.conn.recv()
        except (EOFError, OSError):  # the helper died before it sent anything
            log.debug("a grid helper gave no result; composing its part here")
            return None
        finally:
            self.close()

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class ComposeAhead:
    """:func:`compose_grid` started now in forked helpers (where :func:`~kdexp.processes.can_fork`):
    one composes the points for checking, another (with ``jobs``) the multirun jobs, so that on two
    cores they take half as long; :meth:`result` waits for them. Start it before importing torch: the
    helpers fork a process that has imported neither torch nor Lightning, and compose while this one
    imports. A part whose helper gives nothing is composed here."""

    def __init__(self, points: list[GridPoint], jobs: JobsToCompose | None = None) -> None:
        self.points, self.jobs = points, jobs
        self._result: ComposedGrid | None = None
        self.helpers: dict[str, Helper] = {}  # "checks", "jobs": the parts being composed elsewhere
        if can_fork():
            self.helpers["checks"] = Helper(compose_for_check, points)
            if jobs is not None:
                self.helpers["jobs"] = Helper(compose_jobs, jobs)

    def result(self) -> ComposedGrid:
        """The composed grid: the helpers', or composed here where a helper has none to give."""
        if self._result is not None:
            return self._result
        checks_helper, jobs_helper = self.helpers.pop("checks", None), self.helpers.pop("jobs", None)
        checks = checks_helper.get() if checks_helper is not None else None
        grid = ComposedGrid(checks if checks is not None else compose_for_check(self.points))
        if self.jobs is not None and not any(isinstance(cfg, str) for cfg in grid.checks):
            jobs = jobs_helper.get() if jobs_helper is not None else None
            grid.jobs = jobs if jobs is not None else compose_jobs(self.jobs)
        self.close()
        self._result = grid
        return grid

    def close(self) -> None:
        """Stop the helpers (when their result is not needed, e.g. ``--dry-run``) and release the pipes."""
        for helper in self.helpers.values():
            helper.close()
        self.helpers = {}
