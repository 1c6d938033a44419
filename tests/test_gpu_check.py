"""scripts/gpu_check.py --cpu-smoke: the GPU check's own code path on the CPU at tiny sizes.

It trains a CIFAR-100-shaped KD pair (resnet32x4 -> resnet8x4, eighth width, synthetic CIFAR-format
files the script writes) through ``kdexp train`` and compares cached with online teacher outputs
under bf16; the JSON file it writes is what a GPU machine's run reports. What it cannot check here
(bf16-mixed on CUDA, DDP over GPUs, the GPU-marked tests) is skipped in the file, and says so.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_the_cpu_smoke_run_writes_every_check_and_passes(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--cpu-smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "not CIFAR-100" in proc.stdout and "mechanics, not accuracy" in proc.stdout
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu_smoke" and result["ok"] is True and result["failed"] == []
    checks = result["checks"]
    assert set(checks) == {"pytest_gpu", "kd_gpu", "kd_ddp", "teacher_outputs"}
    assert checks["pytest_gpu"]["ok"] is None and "cpu-smoke" in checks["pytest_gpu"]["skipped"]
    assert checks["kd_ddp"]["ok"] is None and checks["kd_ddp"]["skipped"]

    kd = checks["kd_gpu"]
    assert kd["ok"] is True and kd["status"] == "finished" and kd["trainer"] == "cpu"
    assert "experiment=cifar100_crd_kd" in kd["command"]
    losses = kd["train_loss_per_epoch"]
    assert len(losses) == 2 and losses[-1] < losses[0] and kd["loss_decreased"] is True
    assert kd["images_per_s"] > 0 and kd["train_images"] > 0

    outputs = checks["teacher_outputs"]
    assert outputs["ok"] is True and outputs["teacher"].endswith("teacher.pt")  # b's trained teacher
    assert set(outputs["tolerance"]) >= {"atol", "rtol", "kd_loss_rel", "argmax_agreement_min"}
    assert outputs["fraction_within_tolerance"] == 1.0
    assert outputs["kd_loss_rel_diff"] <= outputs["tolerance"]["kd_loss_rel"]
    assert 0 < outputs["max_abs_diff"] <= outputs["max_abs_logit"]  # bf16 rounding shows, within tolerance


def test_without_cuda_the_gpu_mode_fails_and_says_so(tmp_path):
    """Without --cpu-smoke on a machine with no GPU: exit 1, and the file names the reason."""
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("a CUDA device is present: the GPU mode would run for real")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    result = json.loads(out.read_text())
    assert result["failed"] == ["cuda"] and "no CUDA device" in result["checks"]["cuda"]["reason"]
