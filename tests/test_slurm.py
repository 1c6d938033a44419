"""`kdexp sweep --launcher slurm` on a real SLURM cluster: the grid runs as a job array and gives the
local sweep's records and report, a job that can never start is reported with its fix and cancelled,
and a stopped sweep leaves nothing queued or running.

The tests marked ``slurm`` need a cluster with an idle node: ``sudo scripts/local_slurm.sh start``
makes one on this machine (``.ci/run`` does). Without one they are skipped, saying so; with
``KDEXP_REQUIRE_SLURM=1`` (CI) they fail instead. The other tests need no cluster.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PLUGINS, ROOT, records_in, run_cli
from kdexp.core.console import SUBMITIT_LOGGER, quiet_submitit
from kdexp.core.records import RECORD_NAME, slurm_fields
from kdexp.core.vocabulary import run_identity

SMOKE = ROOT / "sweeps" / "smoke.yaml"
GRID = [str(SMOKE), "seed=1", "kd.temperature=4", "kd.alpha=0.9"]  # 2 runs: student.width 16 and 64
LIVE_STATES = "PENDING,RUNNING,COMPLETING,CONFIGURING,SUSPENDED,REQUEUED,RESIZING"


def slurm_problem() -> str | None:
    """Why no SLURM job can run here, or None when a node is idle."""
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        return "hydra-submitit-launcher is not installed (pip install -e '.[launchers]')"
    if shutil.which("sinfo") is None:
        return "there is no `sinfo` (no SLURM client installed)"
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"`sinfo` fails ({(proc.stderr.strip().splitlines() or ['no output'])[-1]})"
    if not any(state.rstrip("*~#") in ("idle", "mix") for state in proc.stdout.split()):
        return f"no SLURM node is idle (sinfo: {' '.join(proc.stdout.split()) or 'no nodes'})"
    return None


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    """The cluster's default partition, its node and that node's CPU count; skip (or, in CI, fail) without one."""
    problem = slurm_problem()
    if problem:
        message = f"no usable SLURM cluster: {problem}. Start one on this machine: sudo scripts/local_slurm.sh start"
        if os.environ.get("KDEXP_REQUIRE_SLURM") == "1":
            pytest.fail(f"{message} (KDEXP_REQUIRE_SLURM=1: a cluster is required here)")
        pytest.skip(message)
    rows = subprocess.run(["sinfo", "-h", "-N", "-o", "%P %N %c"], capture_output=True, text=True).stdout.split("\n")
    default = next(row.split() for row in rows if row.split() and row.split()[0].endswith("*"))
    return {"partition": default[0].rstrip("*"), "node": default[1], "cpus": default[2]}


def sweep_cli(args: list[str], cache: Path, **kw) -> subprocess.CompletedProcess:
    return run_cli(["sweep", *args], cache, module="kdexp.cli", **kw)


def submitted_array(text: str) -> str:
    found = re.search(r"Submitted SLURM job (\d+)", text)
    assert found, f"no 'Submitted SLURM job' line in:\n{text[-3000:]}"
    return found.group(1)


def live_tasks(array: str) -> list[str]:
    """The array's tasks that are still queued or running."""
    proc = subprocess.run(["squeue", "-h", "-r", "-j", array, "-t", LIVE_STATES, "-o", "%i %T"],
                          capture_output=True, text=True, timeout=30)
    return proc.stdout.split("\n")[:-1] if proc.returncode == 0 else []


@pytest.fixture(scope="module")
def swept(cluster, tmp_path_factory):
    """The 2-run grid as SLURM jobs (W&B offline), then the same grid locally (CSV logger: quicker, and a
    setting that changes no result). One teacher cache: a SLURM job trains the teacher, the local runs load it."""
    base = tmp_path_factory.mktemp("slurm")
    started = time.time()
    on_slurm = sweep_cli([*GRID, "--launcher", "slurm", "--dir", str(base / "slurm")], base / "cache")
    slurm_s = time.time() - started
    local = sweep_cli([*GRID, "logger=csv", "--dir", str(base / "local")], base / "cache")  # the logger is bookkeeping
    print(f"SLURM sweep {slurm_s:.0f} s, local sweep {time.time() - started - slurm_s:.0f} s")
    return base, on_slurm, local


@pytest.mark.slurm
def test_the_grid_runs_as_one_slurm_job_array(swept, cluster):
    base, proc, _ = swept
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "2 runs — 2 finished, 0 skipped (already finished), 0 failed, 0 missing" in proc.stdout
    array = submitted_array(out)
    records = records_in(base / "slurm")
    assert [r["status"] for r in records] == ["finished", "finished"]
    slurm = [r["slurm"] for r in records]
    assert {s["array_job_id"] for s in slurm} == {array}
    assert sorted(s["array_task_id"] for s in slurm) == ["0", "1"]
    assert len({s["job_id"] for s in slurm}) == 2
    assert {(s["node"], s["partition"]) for s in slurm} == {(cluster["node"], cluster["partition"])}
    assert live_tasks(array) == []
    # squeue is watched, sacct never polled: no warning of submitit's and no sacct error on the console
    assert "Bypassing sacct error" not in out and "accounting storage is disabled" not in out


@pytest.mark.slurm
def test_slurm_runs_equal_the_same_runs_launched_locally(swept):
    base, _, local = swept
    assert local.returncode == 0, local.stderr[-3000:]
    def point(record: dict) -> tuple[str, ...]:
        return tuple(o for o in record["overrides"] if not o.startswith("logger="))

    on_slurm = {point(r): r for r in records_in(base / "slurm")}
    here = {point(r): r for r in records_in(base / "local")}
    assert on_slurm.keys() == here.keys() and len(here) == 2
    for point, record in here.items():
        assert "slurm" not in record
        twin = on_slurm[point]
        assert twin["metrics"] == record["metrics"]  # same machine, same thread count: bit for bit
        assert run_identity(twin["config"]) == run_identity(record["config"])
        assert twin["teacher"]["hash"] == record["teacher"]["hash"]  # trained by a SLURM job, loaded here
        assert twin["epochs"] == record["epochs"] and twin["data_fingerprint"] == record["data_fingerprint"]


@pytest.mark.slurm
def test_the_report_over_the_slurm_sweep_is_the_local_one(swept):
    base, _, _ = swept
    reports = {}
    for name in ("slurm", "local"):
        proc = run_cli(["report", str(base / name)], base / "cache", module="kdexp.cli")
        assert proc.returncode == 0, proc.stderr[-2000:]
        reports[name] = proc.stdout.replace(str(base / name), "<dir>")
    assert "| 16 | 4 |" in reports["local"]
    assert reports["slurm"] == reports["local"]


@pytest.mark.slurm
def test_the_wandb_config_names_the_slurm_job(swept):
    from wandb_file import records as wandb_records

    base, _, _ = swept

    def logged_slurm(folder: Path) -> dict | None:
        run_file = next((folder / "wandb").glob("offline-run-*/*.wandb"))
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
            for item in items:
                if item.key == "slurm":
                    return json.loads(item.value_json)
        return None

    for record in records_in(base / "slurm"):
        assert logged_slurm(Path(record["output_dir"])) == record["slurm"]


@pytest.mark.slurm
def test_a_job_that_can_never_start_is_reported_with_its_fix_and_cancelled(cluster, tmp_path):
    """More CPUs per job than the node has: pending (PartitionConfig) forever, unless the sweep says so."""
    cpus = int(cluster["cpus"])
    started = time.time()
    proc = sweep_cli([*GRID, "--launcher", "slurm", f"hydra.launcher.cpus_per_task={cpus + 1}",
                      "--dir", str(tmp_path / "sweep")], tmp_path / "cache", timeout=120)
    took = time.time() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert took < 60, f"the stuck job was reported after {took:.0f} s"
    array = submitted_array(out)
    assert f"SLURM job {array}_0 cannot start: it stays pending with reason PartitionConfig." in out \
        or f"SLURM job {array}_1 cannot start: it stays pending with reason PartitionConfig." in out
    assert f"each job asks {cpus + 1} CPUs" in out and f"has {cpus} CPU" in out
    assert f"Fix: add  hydra.launcher.cpus_per_task={cpus}" in out
    assert f"Cancelled SLURM job {array} (scancel): no job of this sweep is queued or running." in out
    assert "0 finished" in out and "Traceback" not in out
    assert live_tasks(array) == []


@pytest.mark.slurm
def test_a_submission_slurm_refuses_is_explained(cluster, tmp_path):
    proc = sweep_cli([*GRID, "--launcher", "slurm", "hydra.launcher.partition=no_such_partition",
                      "--dir", str(tmp_path / "sweep")], tmp_path / "cache", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "SLURM refused the jobs, nothing was submitted: invalid partition specified: no_such_partition" in out
    assert "the cluster has no partition 'no_such_partition'" in out
    assert f"hydra.launcher.partition={cluster['partition']}" in out and "Traceback" not in out


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["sigterm_while_one_runs", "ctrl_c_while_queued"])
def test_a_stopped_sweep_leaves_no_job_queued_or_running(cluster, tmp_path, how):
    """SIGTERM while one job runs and the other waits its turn (array_parallelism=1); Ctrl-C (SIGINT)
    while the whole array waits for its begin time."""
    env = dict(os.environ, KDEXP_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONPATH=f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if how == "sigterm_while_one_runs":  # MNIST-1D and 30 epochs: long enough to be stopped mid-run
        extra = ["data=mnist1d", "teacher=cnn1d", "teacher.max_epochs=30", "trainer.max_epochs=30",
                 "logger=csv", "hydra.launcher.array_parallelism=1"]
        wanted, sig = "RUNNING", signal.SIGTERM
    else:
        extra = ["logger=csv", "+hydra.launcher.additional_parameters.begin=now+1hour"]
        wanted, sig = "PENDING", signal.SIGINT
    log_path = tmp_path / "console.txt"
    with log_path.open("w") as console:
        sweep = subprocess.Popen([sys.executable, "-m", "kdexp.cli", "sweep", *GRID, *extra, "--launcher", "slurm",
                                  "--dir", str(tmp_path / "sweep")], cwd=ROOT, env=env, stdout=console,
                                 stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 60
            while "Submitted SLURM job" not in log_path.read_text() and time.time() < deadline:
                assert sweep.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.2)
            array = submitted_array(log_path.read_text())
            while not any(wanted in task for task in live_tasks(array)) and time.time() < deadline:
                time.sleep(0.2)
            assert any(wanted in task for task in live_tasks(array)), live_tasks(array)
            if how == "sigterm_while_one_runs":  # stop it once its run has a record (it is training)
                assert wait_for(lambda: any((tmp_path / "sweep").glob(f"*/{RECORD_NAME}")), 60)
            sweep.send_signal(sig)
            code = sweep.wait(timeout=90)
        finally:
            if sweep.poll() is None:
                sweep.kill()
    out = log_path.read_text()
    assert code == 130, out[-3000:]
    assert live_tasks(array) == [], f"left in the queue after the sweep stopped: {live_tasks(array)}"
    assert "kdexp sweep: interrupted; cancelling the SLURM jobs it submitted" in out
    assert f"Cancelled SLURM job {array} (scancel): no job of this sweep is queued or running." in out
    if how == "sigterm_while_one_runs":  # the job that ran was stopped, not killed: its run can resume
        assert [r["status"] for r in records_in(tmp_path / "sweep")] == ["interrupted"]


def wait_for(condition, timeout_s: float, poll_s: float = 0.5) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` has passed (False)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return bool(condition())


def release_requeued(array: str) -> None:
    """SLURM holds a requeued job until a begin time a little later (BeginTime); start it now."""
    for task in live_tasks(array):
        job_id, state = task.split()
        if state == "PENDING":
            subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], capture_output=True, timeout=30)


def requeued_point(cluster, tmp_path: Path, extra: list[str], preempt: bool, timeout_s: float) -> tuple[dict, dict, str]:
    """One grid point (student.width=16) swept on SLURM, stopped by pre-emption (``preempt``: ``scancel
    --signal=USR2`` once ``last.ckpt`` exists) or by its time limit (in ``extra``), then launched locally
    uninterrupted. Returns (the SLURM run's record, the local run's record, the sweep's console)."""
    point = [*GRID, "student.width=16", *extra]
    env = dict(os.environ, KDEXP_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONPATH=f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    log_path = tmp_path / "console.txt"
    with log_path.open("w") as console:
        sweep = subprocess.Popen([sys.executable, "-m", "kdexp.cli", "sweep", *point, "--launcher", "slurm",
                                  "--dir", str(tmp_path / "slurm")], cwd=ROOT, env=env, stdout=console,
                                 stderr=subprocess.STDOUT)
        try:
            assert wait_for(lambda: "Submitted SLURM job" in log_path.read_text() or sweep.poll() is not None, 60)
            array = submitted_array(log_path.read_text())
            if preempt:
                assert wait_for(lambda: any((tmp_path / "slurm").glob("*/checkpoints/last.ckpt")), 120), \
                    log_path.read_text()[-3000:]
                [task] = live_tasks(array)  # one run: an array of one task, or a plain job
                subprocess.run(["scancel", "--signal=USR2", task.split()[0]], check=True, timeout=30)
            deadline = time.time() + timeout_s
            while sweep.poll() is None and time.time() < deadline:
                release_requeued(array)
                time.sleep(1)
        finally:
            if sweep.poll() is None:
                sweep.kill()
                subprocess.run(["scancel", array], capture_output=True, timeout=30)
    out = log_path.read_text()
    assert sweep.returncode == 0, out[-3000:]
    here_too = [o for o in point if not o.startswith("hydra.launcher.")]  # settings of the SLURM jobs only
    local = sweep_cli([*here_too, "logger=csv", "--dir", str(tmp_path / "local")], tmp_path / "cache")
    assert local.returncode == 0, local.stderr[-3000:]
    [on_slurm], [here] = records_in(tmp_path / "slurm"), records_in(tmp_path / "local")
    return on_slurm, here, out


def assert_resumed_to_the_uninterrupted_result(on_slurm: dict, here: dict) -> None:
    assert on_slurm["status"] == "finished", on_slurm.get("error")
    assert on_slurm["metrics"] == here["metrics"]  # bit for bit: same machine, the resume restores everything
    assert on_slurm["epochs"] == here["epochs"]
    resumes = on_slurm["resumed"]
    assert resumes and all(r["previous_status"] == "interrupted" for r in resumes)
    assert all(r["slurm"]["job_id"] == on_slurm["slurm"]["job_id"] for r in resumes)  # the same job, requeued
    counts = [int(r["slurm"]["restart_count"]) for r in resumes]
    assert counts == sorted(set(counts)) and counts[0] >= 1 and counts[-1] == int(on_slurm["slurm"]["restart_count"])
    folder = Path(on_slurm["output_dir"])
    segments = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(segments) == len(resumes) + 1  # one W&B segment per start of the job...
    assert {s.name.rsplit("-", 1)[1] for s in segments} == {on_slurm["wandb"]["id"]}  # ...all one W&B run


@pytest.mark.slurm
def test_a_preempted_job_is_requeued_and_ends_as_the_uninterrupted_run(cluster, tmp_path):
    """SIGUSR2 is what SLURM sends through submitit on pre-emption (and before a time limit): the run
    stops after its batch, the job is requeued, the run resumes to the uninterrupted run's result."""
    on_slurm, here, out = requeued_point(cluster, tmp_path, ["trainer.max_epochs=60", "logger=wandb"],
                                         preempt=True, timeout_s=400)
    assert_resumed_to_the_uninterrupted_result(on_slurm, here)
    assert len(on_slurm["resumed"]) == 1 and on_slurm["resumed"][0]["slurm"]["restart_count"] == "1"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_past_its_time_limit_is_requeued_until_the_run_is_done(cluster, tmp_path):
    """A one-minute time limit (SLURM's smallest) and a run of several minutes: a larger grid point
    (1200 epochs, ~2 min here), no sleeps. SIGUSR2 comes 20 s before each limit; the job is requeued
    until the run is done."""
    extra = ["trainer.max_epochs=1200", "logger=wandb", "hydra.launcher.timeout_min=1",
             "hydra.launcher.signal_delay_s=20"]
    on_slurm, here, out = requeued_point(cluster, tmp_path, extra, preempt=False, timeout_s=900)
    assert_resumed_to_the_uninterrupted_result(on_slurm, here)
    print(f"requeued {len(on_slurm['resumed'])} times")


# -- no cluster needed ---------------------------------------------------------------------------------
def test_a_record_names_the_slurm_job_it_ran_in(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME", "SLURM_JOB_PARTITION"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_fields() == {}
    monkeypatch.setenv("SLURM_JOB_ID", "15")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "14")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURMD_NODENAME", "node7")
    monkeypatch.setenv("SLURM_JOB_PARTITION", "cpu")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert slurm_fields() == {"slurm": {"job_id": "15", "array_job_id": "14", "array_task_id": "1", "node": "node7",
                                        "partition": "cpu", "restart_count": "0"}}
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the job's third start, after two requeues
    assert slurm_fields()["slurm"]["restart_count"] == "2"


@pytest.mark.parametrize("verbose", [False, True])
def test_submitits_sacct_warning_is_shown_only_when_verbose(verbose, capfd):
    """submitit prints its warnings through handlers of its own: the filter sits on its logger."""
    import submitit  # noqa: F401 - configures submitit's logger and handlers, as in a sweep

    quiet_submitit(verbose)
    try:
        logging.getLogger(SUBMITIT_LOGGER).warning("Call #1 - Bypassing sacct error boom, status may be inaccurate.")
        logging.getLogger(SUBMITIT_LOGGER).warning("another submitit warning")
        out, err = capfd.readouterr()
        assert ("Bypassing sacct error" in out + err) is verbose
        assert "another submitit warning" in out + err
    finally:
        quiet_submitit(False)


def test_what_slurm_says_becomes_the_override_that_fixes_it():
    """Against a two-partition cluster as ``sinfo`` describes it (kdexp.grid.slurm.partitions reads the same)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from kdexp.grid.slurm import Partition, Request, diagnose, is_stuck, minutes

    parts = {"cpu": Partition("cpu", default=True, cpus=8, mem_mb=64000, nodes=4, usable_nodes=4, max_time_min=1440),
             "gpu": Partition("gpu", cpus=32, mem_mb=256000, gpus=4, nodes=2, usable_nodes=2)}
    big = Request(cpus_per_task=16, mem_gb=100, timeout_min=2000)
    assert diagnose("PartitionConfig", big, parts).fixes == [
        "hydra.launcher.cpus_per_task=8", "hydra.launcher.mem_gb=62", "hydra.launcher.timeout_min=1440"]
    assert diagnose("ReqNodeNotAvail, UnavailableNodes:c[1-4]", Request(), parts).fixes == \
        ["hydra.launcher.partition=gpu"]
    refused = diagnose("invalid partition specified: gpus; Batch job submission failed: Invalid partition name "
                       "specified", Request(partition="gpus"), parts)
    assert "no partition 'gpus'" in refused.why and refused.any_of
    assert diagnose("Invalid generic resource (gres) specification", Request(gpus_per_node=1), parts).fixes == \
        ["hydra.launcher.gpus_per_node=null"]
    assert diagnose("QOSMaxCpuPerJobLimit", big, parts).fixes == ["hydra.launcher.cpus_per_task=<less>"]
    assert all(is_stuck(r) for r in ("PartitionConfig", "ReqNodeNotAvail, UnavailableNodes:vm", "InvalidAccount",
                                       "QOSMaxMemoryPerJob", "JobHeldAdmin"))
    assert not any(is_stuck(r) for r in ("Priority", "Resources", "JobArrayTaskLimit", "BeginTime", "None",
                                          "QOSGrpCpuLimit", "AssocGrpJobsLimit"))
    assert [minutes(t) for t in ("infinite", "30:00", "2:00:00", "1-00:00:00", "45")] == [None, 30, 120, 1440, 45]
