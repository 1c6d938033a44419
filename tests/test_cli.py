"""The real command line, end to end on scikit-learn digits: records, W&B offline, the teacher cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import DIGITS_FAST, ROOT, load_record, run_cli

RESULT_KEYS = ("test/acc", "test/acc_last", "val/acc", "val/acc_best", "train/loss", "train/loss_kd", "test/agreement")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real runs sharing one teacher cache: A trains the teacher, B and C reuse it."""
    base = tmp_path_factory.mktemp("cli")
    cache = base / "cache"
    results = {}
    for name, extra in (("A", ["seed=1"]), ("B", ["seed=2"]), ("C", ["seed=1", "logger=csv"])):
        folder = base / name
        proc = run_cli([*DIGITS_FAST, *extra, f"hydra.run.dir={folder}"], cache, extra_env={"WANDB_DIR": str(base)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = (folder, proc)
    return base, cache, results


def test_a_run_leaves_record_checkpoint_and_wandb_offline_run(runs):
    _, _, results = runs
    folder, _ = results["A"]
    record = load_record(folder)
    assert record["status"] == "finished" and record["job_type"] == "distill"
    assert record["choices"]["kd"] == "hinton" and record["config"]["kd"]["temperature"] == 4.0
    assert record["overrides"][:1] == ["experiment=digits_smoke"]
    assert (folder / "checkpoints" / "best.ckpt").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    offline_runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and record["wandb"]["mode"] == "offline"
    assert any(offline_runs[0].glob("*.wandb"))  # the run's data file, ready for `wandb sync`
    assert record["teacher"]["source"] == "trained" and len(record["teacher"]["hash"]) == 16
    assert record["data_fingerprint"] and record["versions"]["torch"] and record["wall_time_s"] > 0


def test_training_beats_the_untrained_student(runs):
    metrics = load_record(runs[2]["A"][0])["metrics"]
    assert metrics["val/acc_init"] < 0.3
    assert metrics["val/acc_best"] > metrics["val/acc_init"] + 0.4
    assert metrics["test/acc"] > 0.6 and metrics["teacher/test_acc"] > 0.9


def test_second_run_reuses_the_cached_teacher(runs):
    _, cache, results = runs
    first, second = load_record(results["A"][0]), load_record(results["B"][0])
    assert second["teacher"]["source"] == "cache"
    assert second["teacher"]["hash"] == first["teacher"]["hash"]
    assert second["metrics"]["teacher/test_acc"] == first["metrics"]["teacher/test_acc"]
    assert len(list((cache / "teachers").iterdir())) == 1
    assert "training it now" not in results["B"][1].stderr


def test_same_seed_gives_identical_metrics(runs):
    """A trained the teacher and logged to W&B; C loaded the cached teacher and logged to CSV."""
    a, c = (load_record(runs[2][k][0])["metrics"] for k in ("A", "C"))
    assert {k: a[k] for k in RESULT_KEYS} == {k: c[k] for k in RESULT_KEYS}
    b = load_record(runs[2]["B"][0])["metrics"]
    assert b["train/loss"] != a["train/loss"]  # another seed is another run


def test_a_finished_folder_is_never_overwritten(runs):
    _, cache, results = runs
    folder, _ = results["A"]
    before = (folder / "run_record.json").read_bytes()
    ckpt = (folder / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    proc = run_cli([*DIGITS_FAST, "seed=1", f"hydra.run.dir={folder}"], cache)
    assert proc.returncode == 2
    assert "already holds a finished run" in proc.stderr + proc.stdout
    assert (folder / "run_record.json").read_bytes() == before
    assert (folder / "checkpoints" / "best.ckpt").stat().st_mtime_ns == ckpt
    skipped = run_cli([*DIGITS_FAST, "seed=1", "if_finished=skip", f"hydra.run.dir={folder}"], cache)
    assert skipped.returncode == 0 and (folder / "run_record.json").read_bytes() == before


def test_invalid_temperature_fails_clearly_and_is_recorded(tmp_path):
    proc = run_cli([*DIGITS_FAST, "kd.temperature=0", f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path / "cache")
    assert proc.returncode == 2
    assert "kd.temperature=0 is out of range: it must be a number in [0.05, 100]" in proc.stderr
    assert "Traceback" not in proc.stderr
    record = load_record(tmp_path / "bad")
    assert record["status"] == "failed" and record["error"]["type"] == "ConfigError"
    assert not (tmp_path / "cache" / "teachers").exists()  # rejected before any teacher training


def test_missing_teacher_checkpoint_fails_clearly(tmp_path):
    proc = run_cli([*DIGITS_FAST, f"teacher.checkpoint={tmp_path}/nope.pt", f"hydra.run.dir={tmp_path / 'run'}"],
                   tmp_path / "cache")
    assert proc.returncode == 2
    assert "teacher checkpoint not found" in proc.stderr and "teacher.checkpoint=null" in proc.stderr
    assert load_record(tmp_path / "run")["status"] == "failed"


def test_a_checkpoint_from_a_kdexp_run_can_be_the_teacher(runs, tmp_path):
    """The best checkpoint of a CE run of the image CNN serves as teacher.checkpoint."""
    _, cache, results = runs
    teacher_folder = next((cache / "teachers").iterdir())
    ckpt = teacher_folder / "checkpoints" / "best.ckpt"
    proc = run_cli([*DIGITS_FAST, f"teacher.checkpoint={ckpt}", "logger=none", f"hydra.run.dir={tmp_path / 'r'}"],
                   tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = load_record(tmp_path / "r")
    assert record["teacher"]["source"] == "checkpoint"
    assert record["teacher"]["hash"] == load_record(results["A"][0])["teacher"]["hash"]


def test_nan_loss_stops_the_run_and_names_the_step(runs, tmp_path):
    _, cache, _ = runs
    proc = run_cli([*DIGITS_FAST, "kd._target_=kdexp_test_plugins.ExplodingKD", "+kd.explode_after=3",
                    "logger=none", f"hydra.run.dir={tmp_path / 'nan'}"], cache)
    assert proc.returncode == 2
    assert "training loss became nan at global step 3" in proc.stderr
    record = load_record(tmp_path / "nan")
    assert record["status"] == "failed" and record["error"]["type"] == "NonFiniteLossError"


def test_help_and_composed_config_through_both_entry_points():
    help_text = subprocess.run([sys.executable, "-m", "kdexp.train", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
    assert help_text.returncode == 0 and "kd: attention, dist, dkd, fitnets, hidden_kd, hinton, mse_logits" in help_text.stdout
    kdexp = shutil.which("kdexp") or os.path.join(os.path.dirname(sys.executable), "kdexp")
    job = subprocess.run([kdexp, "train", "--cfg", "job", "kd.temperature=8", "student.width=512"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    assert "temperature: 8" in job.stdout and "width: 512" in job.stdout


@pytest.mark.parametrize("module, args", [("kdexp.cli", ["--help"]), ("kdexp.cli", ["train", "--help"]),
                                          ("kdexp.train", ["--help"]), ("kdexp.cli", ["report", "SWEEP"]),
                                          ("kdexp.report", ["SWEEP"])])
def test_a_reader_that_has_gone_ends_the_command_quietly(module, args, tmp_path):
    """`kdexp ... | head`: once head has exited, the command's stdout is a pipe with no reader.
    It ends as a program that SIGPIPE stopped does (status 141), without a BrokenPipeError traceback."""
    if "SWEEP" in args:
        from test_report import write_grid

        write_grid(tmp_path / "sweep")
        args = [str(tmp_path / "sweep") if a == "SWEEP" else a for a in args]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: no race with the writer
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141
