"""Runs that survive and never lie: resume after SIGKILL or SIGTERM, one writer per folder,
a refused run that touches nothing, checkpoints that are what their names say."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import PLUGINS, ROOT, load_record, run_cli

# 6 epochs of 21 batches on digits; StopAt is inert unless KDEXP_TEST_STOP_AT is set.
RUN = ["experiment=digits_smoke", "teacher.max_epochs=3", "trainer.max_epochs=6",
       "+callbacks.stop._target_=kdexp_test_plugins.StopAt"]
COMPARED = ("test/acc", "test/acc_last", "val/acc", "val/acc_best", "train/loss", "test/agreement", "best_val_score")


def files_of(folder):
    """Every file under ``folder`` with its bytes and mtime (what "untouched" means)."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    proc = run_cli([*RUN, f"hydra.run.dir={base / 'whole'}"], base / "cache", extra_env={"WANDB_DIR": str(base)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, load_record(base / "whole")


@pytest.fixture
def parent_wandb_service():
    """A W&B service started by this (the parent) process; W&B hands it to child processes through
    ``WANDB_SERVICE``, as it does under a notebook or any launcher that logged a run itself."""
    import wandb

    wandb.setup()
    assert os.environ.get("WANDB_SERVICE"), "W&B no longer hands its service to children through WANDB_SERVICE"
    yield
    wandb.teardown()
    os.environ.pop("WANDB_SERVICE", None)


@pytest.mark.parametrize("stop, exit_code, status", [
    ("SIGKILL", -9, "running"), ("SIGTERM", 130, "interrupted"),
    pytest.param("SIGUSR1", 130, "interrupted", marks=pytest.mark.slow),  # the SIGTERM path, entered by SIGUSR1
])
def test_a_killed_run_resumes_to_the_same_result(uninterrupted, stop, exit_code, status, request):
    base, whole = uninterrupted
    if stop == "SIGKILL":  # killed under a parent's W&B service, which outlives the killed run's W&B run
        request.getfixturevalue("parent_wandb_service")
    folder = base / stop
    args = [*RUN, f"hydra.run.dir={folder}"]
    killed = run_cli(args, base / "cache", extra_env={"KDEXP_TEST_STOP_AT": f"2:5:{stop}"})
    assert killed.returncode == exit_code, killed.stderr[-2000:]
    first = load_record(folder)
    assert first["status"] == status
    if stop != "SIGKILL":  # a graceful stop after the batch: last.ckpt is written mid-epoch
        assert "Run the same command again to continue" in killed.stderr
        assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * 21 + 6

    resumed = run_cli(args, base / "cache")  # the same command
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    record = load_record(folder)
    assert record["status"] == "finished"
    assert record["resumed"][0]["previous_status"] == status
    assert (record["epochs"], record["global_steps"]) == (whole["epochs"], whole["global_steps"]) == (6, 126)
    assert record["wandb"]["id"] == first["wandb"]["id"]  # the same W&B run, continued
    assert {p.name.rsplit("-", 1)[-1] for p in (folder / "wandb").glob("offline-run-*")} == {record["wandb"]["id"]}
    assert {k: record["metrics"][k] for k in COMPARED} == {k: whole["metrics"][k] for k in COMPARED}
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no -v1


def test_last_ckpt_holds_the_last_epoch_and_best_ckpt_the_best(uninterrupted):
    base, whole = uninterrupted
    last = torch.load(base / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    best = torch.load(base / "whole" / "checkpoints" / "best.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (5, 126)  # epochs count from 0
    scores = last["callbacks"]
    best_score = next(v["best_model_score"] for k, v in scores.items() if "monitor': 'val/acc'" in k)
    assert float(best_score) == pytest.approx(whole["metrics"]["val/acc_best"])
    assert best["epoch"] <= last["epoch"]
    # best.ckpt is only evaluated (and used as a teacher), never resumed: weights, no optimiser state.
    assert "optimizer_states" in last and "optimizer_states" not in best
    assert not any(k.startswith("teacher.") for k in [*best["state_dict"], *last["state_dict"]])  # never saved
    assert best["state_dict"].keys() == last["state_dict"].keys()


def test_ctrl_c_records_interrupted(uninterrupted):
    base, _ = uninterrupted
    proc = run_cli([*RUN, f"hydra.run.dir={base / 'ctrlc'}"], base / "cache",
                   extra_env={"KDEXP_TEST_STOP_AT": "1:3:SIGINT"})
    assert proc.returncode == 130, proc.stderr[-2000:]
    record = load_record(base / "ctrlc")
    assert record["status"] == "interrupted" and record["error"]["type"] == "RunInterrupted"
    assert "Ctrl-C" in record["error"]["message"]


def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_is_intact(uninterrupted, tmp_path):
    base, whole = uninterrupted
    folder = base / "busy"
    env = dict(os.environ, KDEXP_CACHE_DIR=str(base / "cache"), WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONPATH=str(PLUGINS))
    slow = "+callbacks.slow._target_=kdexp_test_plugins.SlowDown"  # ~1 s per epoch
    pause = tmp_path / "first-is-training"  # made by the first run after a batch; it waits until the file is gone
    first = subprocess.Popen([sys.executable, "-m", "kdexp.train", *RUN, slow, f"+callbacks.slow.pause_file={pause}",
                              "trainer.max_epochs=12", "logger=none", f"hydra.run.dir={folder}"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not pause.exists() and first.poll() is None and time.time() < deadline:  # the first is training
            time.sleep(0.2)
        assert pause.exists(), f"the first run never started training (exit code {first.poll()})"
        second = run_cli([*RUN, "seed=2", "logger=none", f"hydra.run.dir={folder}"], base / "cache")
    finally:
        pause.unlink(missing_ok=True)  # the first run goes on
    assert second.returncode == 2
    assert "is in use by another run (pid" in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    record = load_record(folder)
    assert record["status"] == "finished" and record["seed"] == 1 and record["epochs"] == 12


def test_a_refused_run_leaves_a_finished_folder_byte_for_byte(uninterrupted):
    base, _ = uninterrupted
    folder = base / "whole"
    before = files_of(folder)
    proc = run_cli([*RUN, "seed=7", "kd.temperature=8", f"hydra.run.dir={folder}"], base / "cache")
    assert proc.returncode == 2 and "already holds a finished run" in proc.stderr
    assert files_of(folder) == before  # .hydra/overrides.yaml and train.log included


def test_rerun_archives_everything_of_the_old_run_and_logs_to_the_new_folder(uninterrupted, tmp_path):
    base, _ = uninterrupted
    folder = tmp_path / "again"
    args = [*RUN, "trainer.max_epochs=2", "logger=none", f"hydra.run.dir={folder}"]
    assert run_cli(args, base / "cache").returncode == 0
    old_log = (folder / "train.log").read_text()
    proc = run_cli([*args, "if_finished=rerun", "seed=3"], base / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    archived = next((folder / "archive").iterdir())
    assert sorted(p.name for p in archived.iterdir()) == [".hydra", "checkpoints", "run_record.json", "train.log"]
    assert (archived / "train.log").read_text() == old_log  # the new run wrote nothing into the archive
    assert "seed=3" in (folder / ".hydra" / "overrides.yaml").read_text()
    assert "seed=3" not in (archived / ".hydra" / "overrides.yaml").read_text()
    assert "distill-mlp64-hinton-T4-a0.9-s3 finished" in (folder / "train.log").read_text()
    assert load_record(folder)["seed"] == 3 and load_record(archived)["seed"] == 1


def test_an_unfinished_run_of_another_config_is_archived_not_resumed(uninterrupted, tmp_path):
    base, _ = uninterrupted
    folder = tmp_path / "changed"
    killed = run_cli([*RUN, "logger=none", f"hydra.run.dir={folder}"], base / "cache",
                     extra_env={"KDEXP_TEST_STOP_AT": "1:0:SIGKILL"})
    assert killed.returncode == -9
    proc = run_cli([*RUN, "logger=none", "kd.temperature=2", f"hydra.run.dir={folder}"], base / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = load_record(folder)
    assert "resumed" not in record and record["config"]["kd"]["temperature"] == 2
    archived = next((folder / "archive").iterdir())
    assert archived.name.startswith("running-") and load_record(archived)["status"] == "running"


def test_an_objective_with_parameters_is_seeded(uninterrupted, tmp_path):
    """Built after seeding: two identical runs of a learnable objective agree; another seed differs."""
    base, _ = uninterrupted
    args = [*RUN, "trainer.max_epochs=2", "logger=none", "kd._target_=kdexp_test_plugins.ParametricKD"]
    metrics = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        proc = run_cli([*args, f"seed={seed}", f"hydra.run.dir={tmp_path / name}"], base / "cache")
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics.append(load_record(tmp_path / name)["metrics"])
    assert metrics[0]["train/loss"] == metrics[1]["train/loss"] and metrics[0]["test/acc"] == metrics[1]["test/acc"]
    assert metrics[0]["train/loss"] != metrics[2]["train/loss"]


def test_sweep_killed_takes_its_runs_with_it_and_resumes(uninterrupted, tmp_path):
    """SIGTERM to `kdexp sweep`: no run goes on training; the same command finishes the grid."""
    base, _ = uninterrupted
    sweep_file = ROOT / "sweeps" / "smoke.yaml"
    args = ["sweep", str(sweep_file), "logger=csv", "trainer.max_epochs=15", "kd.temperature=2", "kd.alpha=0.5",
            "student.width=16", "--dir", str(tmp_path / "s")]
    env = dict(os.environ, KDEXP_CACHE_DIR=str(base / "cache"), WANDB_MODE="offline", PYTHONPATH=str(PLUGINS))
    proc = subprocess.Popen([sys.executable, "-m", "kdexp.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "s").glob("*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted" in out
    time.sleep(1.0)
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "s")], capture_output=True, text=True).stdout.split()
    assert leftovers == []  # no orphaned multirun child keeps training
    again = run_cli(args, base / "cache", module="kdexp.cli")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    records = [load_record(p.parent) for p in (tmp_path / "s").glob("*/run_record.json")]
    assert len(records) == 2 and all(r["status"] == "finished" for r in records)
    assert any(r.get("resumed") for r in records)


@pytest.mark.slow  # end to end: a killed run and a retrained teacher (minutes in all)
def test_a_run_is_never_resumed_with_another_teacher(uninterrupted, tmp_path):
    import json

    base, _ = uninterrupted
    folder = tmp_path / "other-teacher"
    args = [*RUN, "logger=none", f"hydra.run.dir={folder}"]
    assert run_cli(args, base / "cache", extra_env={"KDEXP_TEST_STOP_AT": "1:0:SIGKILL"}).returncode == -9
    record = load_record(folder)
    record["teacher"]["hash"] = "0123456789abcdef"  # as if the cache had been cleared and retrained differently
    (folder / "run_record.json").write_text(json.dumps(record))
    proc = run_cli(args, base / "cache")
    assert proc.returncode == 2 and "its teacher (weights hash) is" in proc.stderr and "resume=false" in proc.stderr
    assert load_record(folder)["status"] == "failed"
    fresh = run_cli([*args, "resume=false"], base / "cache")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "resumed" not in load_record(folder)


def test_if_finished_skip_touches_nothing_in_the_finished_folder(uninterrupted):
    base, _ = uninterrupted
    folder = base / "whole"
    before = files_of(folder)
    proc = run_cli([*RUN, "if_finished=skip", f"hydra.run.dir={folder}"], base / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Skipping {folder}: it already holds a finished run." in proc.stderr  # said on the console only
    assert files_of(folder) == before  # train.log included: not even the skip line is appended


@pytest.mark.slow  # end to end; a resume with another logger (minutes in all)
def test_a_run_resumed_with_logger_csv_still_points_at_its_wandb_run(uninterrupted, tmp_path):
    """The W&B run holds the epochs before the interruption: the record keeps it, and says where it ends."""
    base, _ = uninterrupted
    folder = tmp_path / "to-csv"
    args = [*RUN, "trainer.max_epochs=3", f"hydra.run.dir={folder}"]
    killed = run_cli(args, base / "cache", extra_env={"KDEXP_TEST_STOP_AT": "1:3:SIGTERM"})
    assert killed.returncode == 130, killed.stderr[-2000:]
    first = load_record(folder)["wandb"]
    assert first["id"] and first["mode"] == "offline"
    resumed = run_cli([*args, "logger=csv"], base / "cache")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    record = load_record(folder)
    assert record["status"] == "finished" and record["config"]["logger"]["_target_"].endswith("csv_logger")
    assert {k: record["wandb"][k] for k in first} == first  # the same W&B run, not null
    assert record["wandb"]["history_until"] == record["resumed"][0]["at"]  # its history ends at the resume
    assert (folder / "csv" / "metrics.csv").is_file()  # the epochs after it


class RunsCode:
    """Pickled, it asks the loader to call ``os.system(touch MARKER)``: a weights-only load refuses it."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_checkpoint_is_refused_before_resuming_and_nothing_is_lost(uninterrupted, tmp_path):
    import shutil

    base, _ = uninterrupted
    killed = tmp_path / "killed"
    assert run_cli([*RUN, "logger=none", f"hydra.run.dir={killed}"], base / "cache",
                   extra_env={"KDEXP_TEST_STOP_AT": "1:0:SIGKILL"}).returncode == -9
    marker = tmp_path / "code-ran"
    # best.ckpt is read only at the test after the remaining epochs; every checkpoint is checked up front.
    for name, damage in (("best.ckpt", "code"), ("last.ckpt", "truncate"), ("epoch=0-step=21.ckpt", "code")):
        folder = tmp_path / name.split(".")[0].replace("=", "-")
        shutil.copytree(killed, folder)
        target = folder / "checkpoints" / name
        if damage == "code":
            torch.save({"state_dict": RunsCode(marker)}, target)
        else:
            target.write_bytes(target.read_bytes()[:4096])
        args = [*RUN, "logger=none", f"hydra.run.dir={folder}"]
        before = {p: v for p, v in files_of(folder).items() if p.name != ".kdexp.owner"}  # (the lock holder's note)
        proc = run_cli(args, base / "cache")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert not marker.exists()  # the pickle never ran
        assert f"its checkpoint checkpoints/{name}" in proc.stderr and "resume=false" in proc.stderr
        assert ("would run code" if damage == "code" else "truncated or damaged") in proc.stderr
        assert "weights_only=False" not in proc.stderr and "Traceback" not in proc.stderr
        assert {p: v for p, v in files_of(folder).items() if p.name != ".kdexp.owner"} == before  # nothing lost
        assert load_record(folder)["status"] == "running"  # still resumable once the file is put back
    fresh = run_cli([*args, "resume=false"], base / "cache")  # the way out the message names
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    archived = next((folder / "archive").iterdir())  # the tampered run, kept
    assert (archived / "checkpoints" / name).read_bytes() == before[target.relative_to(folder)][0]
    assert load_record(folder)["status"] == "finished" and not marker.exists()
