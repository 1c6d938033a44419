"""Plain Hydra multiruns, started as a user types them: ``-m``, ``--multirun``, ``kdexp train -m``,
``hydra/launcher=joblib``, ``hydra.sweep.dir=...`` and ``hydra.sweeper.params``.

Each command runs in a fresh working directory (so the default folders land there), with one
teacher cache for the module, ``srun`` on PATH (as on a SLURM login node) and no
``KDEXP_IF_FINISHED``: what is tested is the command line alone, never a value a wrapper sets.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_record, path_with_fake_srun

# Two tiny runs on digits (a 2-epoch CNN teacher (~80 %), 1-epoch MLP students), logged to CSV.
TINY = ["data=digits", "teacher=cnn2d", "teacher.max_epochs=2", "student.width=16", "trainer.max_epochs=1",
        "logger=csv"]
GRID = ["kd.temperature=2,4"]
# The job folders those runs get: named by their overrides (logger is excluded), sorted by key.
FOLDERS = {f"data=digits,kd.temperature={t},student.width=16,teacher.max_epochs=2,teacher=cnn2d,trainer.max_epochs=1"
           for t in (2, 4)}
KDEXP = str(Path(sys.executable).parent / "kdexp")  # the console script, as installed


def start(argv: list[str], cwd: Path, base: Path) -> subprocess.CompletedProcess:
    """``argv`` as a user runs it in ``cwd``: W&B offline, the module's teacher cache, nothing else set."""
    env = {k: v for k, v in os.environ.items() if k != "KDEXP_IF_FINISHED"}
    env.update({"KDEXP_CACHE_DIR": str(base / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "PATH": path_with_fake_srun(base / "bin")})
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def job_records(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: load_record(p.parent) for p in sweep_dir.glob("*/run_record.json")}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multirun")


@pytest.fixture(scope="module")
def default_dir(base):
    """``python -m kdexp.train -m`` with nothing else: the README's outputs/multiruns/<date>/<time>/."""
    proc = start([sys.executable, "-m", "kdexp.train", "-m", *GRID, *TINY], base / "plain", base)
    return base / "plain", proc


@pytest.fixture(scope="module")
def joblib_dir(base, default_dir):
    """``kdexp train --multirun`` in parallel joblib workers, into a folder named on the command line."""
    sweep_dir = base / "joblib" / "sweep"
    proc = start([KDEXP, "train", "--multirun", *GRID, *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                  f"hydra.sweep.dir={sweep_dir}"], base / "joblib", base)
    return sweep_dir, proc


def test_a_plain_multirun_lands_where_the_readme_says(default_dir):
    cwd, proc = default_dir
    sweeps = list((cwd / "outputs" / "multiruns").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    assert re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}", sweeps[0].relative_to(sweeps[0].parents[1]).as_posix())
    records = job_records(sweeps[0])
    assert set(records) == FOLDERS
    assert all(r["status"] == "finished" for r in records.values())
    assert {r["config"]["kd"]["temperature"] for r in records.values()} == {2, 4}
    assert {r["config"]["paths"]["root_dir"] for r in records.values()} == {str(cwd)}  # paths.* resolve in jobs
    assert {r["config"]["if_finished"] for r in records.values()} == {"skip"}  # a multirun's default
    assert "training it now" in proc.stderr  # the module's one teacher
    assert "`srun` command is available" not in proc.stdout + proc.stderr


def test_parallel_joblib_multirun_into_a_named_folder_is_quiet(joblib_dir):
    sweep_dir, proc = joblib_dir
    records = job_records(sweep_dir)
    assert set(records) == FOLDERS and all(r["status"] == "finished" for r in records.values())
    assert "training it now" not in proc.stderr  # the teacher of the first multirun, from the cache
    out = proc.stdout + proc.stderr
    assert out.count("finished: test/acc") == 2  # the joblib workers' result lines reach the console
    assert "Joblib.Parallel(" not in out and "`srun` command is available" not in out
    assert not (sweep_dir.parent / "outputs").exists()  # nothing under the default folder


def test_the_same_multirun_again_skips_finished_runs(base, joblib_dir):
    """The grid of the joblib multirun, now given as hydra.sweeper.params with ``-m``: the same job
    folders, so both runs are skipped, untouched; any other expansion would train new runs."""
    sweep_dir, _ = joblib_dir
    before = {p: p.read_bytes() for p in sweep_dir.glob("*/run_record.json")}
    checkpoints = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/checkpoints/*.ckpt")}
    proc = start([sys.executable, "-m", "kdexp.train", "-m", "+hydra.sweeper.params={kd.temperature:'2,4'}", *TINY,
                  f"hydra.sweep.dir={sweep_dir}"], base / "joblib", base)
    assert proc.stderr.count("it already holds a finished run") == 2, proc.stderr[-3000:]
    assert "Training " not in proc.stderr
    assert {p.name for p in sweep_dir.iterdir() if p.is_dir()} == FOLDERS  # no new job folder
    assert {p: p.read_bytes() for p in sweep_dir.glob("*/run_record.json")} == before
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/checkpoints/*.ckpt")} == checkpoints

