"""A sweep's grid composed by Hydra, in a helper process while the sweep imports torch and Lightning.

Before anything runs, a sweep composes every grid point to check it
(:func:`kdexp.sweep.check_points`), and a packed sweep's workers compose each member's multirun
job config (:func:`kdexp.packed_runs.load_sweep_jobs`). Hydra's composition is pure Python, about
0.25 s a point on the 2-core machines of the README's figures, and needs neither torch nor
Lightning; checking the composed points needs both, and importing them takes 7–9 s there.

So on Linux (:func:`kdexp.processes.can_fork`) the sweep forks a helper before it imports torch:
the helper composes the grid on one core while the sweep imports on the other, and the composed
configs come back pickled through a pipe. The calls are Hydra's own and the configs are the same;
only the process they are made in differs. If the helper cannot give its result (it died, it
was killed), the sweep composes the grid itself.
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


def compose_grid(points: list[GridPoint], jobs: JobsToCompose | None = None) -> ComposedGrid:
    """Compose ``points`` for checking and, with ``jobs``, as multirun jobs (all of them, or None)."""
    from kdexp.packed_runs import load_sweep_jobs

    grid = ComposedGrid(compose_for_check(points))
    if jobs is not None and not any(isinstance(cfg, str) for cfg in grid.checks):
        try:
            grid.jobs = load_sweep_jobs(jobs.sweep_dir, jobs.overrides, jobs.hydra_overrides)
        except Exception:  # noqa: BLE001 - each pack worker composes its own jobs, and reports what fails
            log.debug("the grid's multirun jobs did not compose ahead", exc_info=True)
    return grid


def _compose_and_send(points: list[GridPoint], jobs: JobsToCompose | None, conn: Any) -> None:
    # Ctrl-C is the sweep's to handle: it stops this helper itself (ComposeAhead.close), with no
    # second traceback from here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(compose_grid(points, jobs))
    conn.close()


class ComposeAhead:
    """:func:`compose_grid` started now in a forked helper (where :func:`~kdexp.processes.can_fork`);
    :meth:`result` waits for it. Start it before importing torch: the helper forks a process that
    has imported neither torch nor Lightning, and composes while this one imports them."""

    def __init__(self, points: list[GridPoint], jobs: JobsToCompose | None = None) -> None:
        self.points, self.jobs = points, jobs
        self._result: ComposedGrid | None = None
        self.process: Any = None  # the helper (a multiprocessing.Process), None when composing here
        self._conn: Any = None
        if can_fork():
            import multiprocessing

            context = multiprocessing.get_context("fork")
            self._conn, child_end = context.Pipe(duplex=False)
            self.process = context.Process(target=_compose_and_send, args=(points, jobs, child_end),
                                            name="kdexp-compose", daemon=True)
            self.process.start()
            child_end.close()

    def result(self) -> ComposedGrid:
        """The composed grid: the helper's, or composed here if it has none to give."""
        if self._result is None and self._conn is not None:
            try:
                self._result = self._conn.recv()
            except (EOFError, OSError):  # the helper died before it sent anything
                log.debug("the grid's helper gave no result; composing it here")
            finally:
                self.close()
        if self._result is None:
            self._result = compose_grid(self.points, self.jobs)
        return self._result

    def close(self) -> None:
        """Stop the helper (when its result is not needed, e.g. ``--dry-run``) and release the pipe."""
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join()
            self.process = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
