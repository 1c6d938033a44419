"""The README's main job (`kdexp demo`) end to end, from a fresh working directory."""

from __future__ import annotations

import subprocess

import pytest

from conftest import records_in, run_cli


def run_demo(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """``kdexp demo`` from a fresh working directory, as on a new machine."""
    return run_cli(["demo", *overrides], tmp_path / "cache", module="kdexp.cli", cwd=tmp_path, timeout=900)


def demo_records(tmp_path) -> dict[str, dict]:
    (sweep,) = (tmp_path / "outputs" / "demo").iterdir()
    return {record["choices"]["kd"]: record for record in records_in(sweep)}


def test_short_demo_trains_teacher_kd_and_baseline_and_summarizes(tmp_path):
    proc = run_demo(tmp_path, "trainer.max_epochs=3", "teacher.max_epochs=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = demo_records(tmp_path)
    assert set(records) == {"hinton", "none"}
    assert records["hinton"]["teacher"]["source"] == "trained" and records["none"]["teacher"]["source"] == "cache"
    kd, ce = records["hinton"]["metrics"], records["none"]["metrics"]
    out = proc.stdout
    assert f"{100 * records['hinton']['teacher']['test_acc']:6.2f} %" in out
    assert f"{100 * kd['test/acc']:6.2f} %" in out and f"{100 * ce['test/acc']:6.2f} %" in out
    assert f"{100 * kd['test/agreement']:6.2f} %" in out
    assert f"KD gain: {100 * (kd['test/acc'] - ce['test/acc']):+.2f} points" in out
    assert "wandb sync" in out and "teacher.pt" in out


@pytest.mark.slow
def test_full_demo_reaches_the_reference_accuracies(tmp_path):
    """The real main job: MNIST-1D CNN teacher, MLP-128 students, 100 epochs (a few minutes)."""
    proc = run_demo(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = demo_records(tmp_path)
    assert records["hinton"]["teacher"]["test_acc"] > 0.88
    for kd in ("hinton", "none"):
        assert 0.55 < records[kd]["metrics"]["test/acc"] < 0.75
