"""How a sweep forks its Hydra helper, and how kdexp's commands end (kdexp.grid.compose, kdexp.core.processes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from kdexp.grid.compose import ComposeAhead, JobsToCompose, compose_for_check, compose_grid, split
from kdexp.grid.compose import job_configs, pack_jobs
from kdexp.core.processes import can_fork

BASE = ["data=mnist1d", "student=mlp", "kd=hinton", "trainer.max_epochs=1"]
POINTS = [tuple(sorted([*BASE, f"kd.temperature={t}", f"seed={s}"])) for t in (2, 4) for s in (1, 2)]


def as_yaml(configs) -> list[str]:
    return [cfg if isinstance(cfg, str) else OmegaConf.to_yaml(cfg) for cfg in configs]


def jobs_of(tmp_path, points) -> JobsToCompose:
    return JobsToCompose(tmp_path / "sweep", [list(point) for point in points], ["hydra.job.chdir=false"])


@pytest.mark.skipif(not can_fork(), reason="the helper is forked on Linux only")
def test_the_grid_composed_in_a_helper_equals_the_grid_composed_here(tmp_path):
    """Hydra's own compose, in another process: the checked configs, the multirun jobs a pack's members
    are written as (folder, task config, Hydra config) and the pickled round trip lose nothing."""
    jobs = jobs_of(tmp_path, POINTS)
    ahead = ComposeAhead(POINTS, jobs)
    assert len(ahead.helpers) == 2 and ahead.shares == [(0, 2), (2, 4)]  # two forked helpers, half each
    assert all(helper.process.pid not in (None, 0) for helper in ahead.helpers)
    mine = ahead.result()
    here = compose_grid(POINTS, jobs)
    assert as_yaml(mine.checks) == as_yaml(here.checks) == as_yaml(compose_for_check(POINTS))
    assert len({yaml for yaml in as_yaml(mine.checks)}) == 4  # four different points, not one repeated
    assert [(c.choices.kd, c.choices.seed) for c in mine.checks] == [("hinton", str(s)) for s in (1, 2, 1, 2)]
    helper_jobs, direct = pack_jobs(mine.jobs), job_configs(jobs.sweep_dir, jobs.overrides, jobs.hydra_overrides)
    assert [j.output_dir for j in helper_jobs] == [j.output_dir for j in direct]
    assert len({j.output_dir for j in helper_jobs}) == 4 and all(j.output_dir.parent == jobs.sweep_dir
                                                                 for j in helper_jobs)
    assert as_yaml(j.task for j in helper_jobs) == as_yaml(j.task for j in direct)
    assert as_yaml(j.full for j in helper_jobs) == as_yaml(j.full for j in direct)
    assert ahead.helpers == []  # the helpers are gone once their results are in


def test_a_point_that_does_not_compose_is_named_and_no_job_is_composed(tmp_path):
    points = [*POINTS[:2], tuple(sorted(["data=mnist1d", "student=mlp", "kd=hintn", "seed=1"]))]
    grid = ComposeAhead(points, jobs_of(tmp_path, points)).result()
    assert not isinstance(grid.checks[0], str) and not isinstance(grid.checks[1], str)
    assert "Could not find 'kd/hintn'" in grid.checks[2] and "Config search path" not in grid.checks[2]
    assert grid.jobs is None  # the sweep stops at the check: no pack worker needs them


@pytest.mark.skipif(not can_fork(), reason="the helper is forked on Linux only")
@pytest.mark.parametrize("share", [0, 1])
def test_a_helper_that_dies_is_replaced_by_composing_here(tmp_path, share):
    ahead = ComposeAhead(POINTS, jobs_of(tmp_path, POINTS))
    ahead.helpers[share].process.kill()
    grid = ahead.result()
    assert as_yaml(grid.checks) == as_yaml(compose_grid(POINTS).checks) and len(grid.jobs) == 4


def test_a_points_check_config_taken_from_its_job_is_the_config_a_single_run_composes(tmp_path):
    """A packed sweep composes each point once, as its multirun job, and checks the job's task config with
    its paths pinned: equal to composing the point for checking, also across groups and added keys."""
    points = [*POINTS[:2], tuple(sorted(["data=digits", "student=mlp", "kd=none", "seed=3", "+tags=[a]"])),
              tuple(sorted(["data=mnist1d", "student=mlp", "kd=dkd", "kd.beta=2.0", "optimizer=sgd"]))]
    derived = compose_grid(points, jobs_of(tmp_path, points))
    assert len(derived.jobs) == 4
    assert as_yaml(derived.checks) == as_yaml(compose_for_check(points))
    assert [dict(cfg.choices) for cfg in derived.checks] == [dict(cfg.choices) for cfg in compose_for_check(points)]


def test_split_gives_contiguous_near_equal_shares():
    assert split(12, 2) == [(0, 6), (6, 12)] and split(5, 2) == [(0, 2), (2, 5)]
    assert split(1, 2) == [(0, 1)] and split(0, 2) == [(0, 0)]


def test_kdexp_fork_0_composes_in_this_process(monkeypatch, tmp_path):
    monkeypatch.setenv("KDEXP_FORK", "0")
    ahead = ComposeAhead(POINTS, jobs_of(tmp_path, POINTS))
    assert ahead.helpers == []
    assert as_yaml(ahead.result().checks) == as_yaml(compose_grid(POINTS).checks) and len(ahead.result().jobs) == 4


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_exit_now_runs_what_an_exit_runs_then_ends_with_the_code():
    """Threads are joined and atexit handlers run (W&B's teardown, logging's flush are such handlers),
    in that order, as at a normal exit; buffered output is not lost."""
    done = run_python("""
        import atexit, sys, threading, time
        from kdexp.core.processes import exit_now
        atexit.register(lambda: print("atexit handler ran", flush=True))
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished", flush=True))).start()
        sys.stdout.write("unflushed output")
        exit_now(3)
    """)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "unflushed outputthread finished\natexit handler ran\n"


@pytest.mark.parametrize("code, status, stderr", [(None, 0, ""), (0, 0, ""), (2, 2, ""),
                                                  ("kdexp: a message", 1, "kdexp: a message\n")])
def test_exit_now_reads_its_code_as_sys_exit_does(code, status, stderr):
    done = run_python(f"from kdexp.core.processes import exit_now; exit_now({code!r})")
    assert (done.returncode, done.stderr) == (status, stderr)


def test_the_kdexp_command_ends_with_its_exit_code(tmp_path):
    """The console entry (kdexp.cli.entry): 0 for help, 2 for a usage error, as before the prompt exit."""
    ok = subprocess.run([sys.executable, "-m", "kdexp.cli", "--help"], capture_output=True, text=True)
    bad = subprocess.run([sys.executable, "-m", "kdexp.cli", "sweep", str(tmp_path / "none.yaml")],
                         capture_output=True, text=True)
    assert ok.returncode == 0 and "commands:" in ok.stdout
    assert bad.returncode == 2 and "sweep file not found" in bad.stderr
