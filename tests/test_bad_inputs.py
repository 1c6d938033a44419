"""Bad input, as a new user types it: every case ends with exit code 2, a message that names
the key, the value and what is valid, no traceback, and no half-written record or cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import PLUGINS, ROOT
from kdexp.core.records import RECORD_NAME

FAST = ["experiment=digits_smoke", "logger=none", "teacher.max_epochs=1", "trainer.max_epochs=1"]

# (overrides, expected fragment of the message). Each runs on top of FAST unless it names its own data.
CASES: list[tuple[list[str], str]] = [
    (["kd.temperature=abc"], "kd.temperature='abc' is a str, not a number: it must be a number in [0.05, 100]"),
    (["kd.temperature=0"], "kd.temperature=0 is out of range: it must be a number in [0.05, 100]"),
    (["kd.temperature=-1"], "kd.temperature=-1 is out of range"),
    # a T that would silently turn KD off (T² · KL underflows to 0), and one past the high-T limit
    (["kd.temperature=1e-30"], "kd.temperature=1e-30 is out of range: it must be a number in [0.05, 100] "
                               "(e.g. kd.temperature=4); below 0.05 the soft targets are the teacher's one-hot"),
    (["kd.temperature=1000"], "kd.temperature=1000 is out of range"),
    (["schedule=temperature_cosine", "schedule.temperature.end=1e-30"],
     "schedule.temperature.end=1e-30 is out of range: like kd.temperature, it must be a number in [0.05, 100]"),
    # a transfer set that cannot fit in memory: refused up front with the estimate and the size that fits
    (["data=mnist1d", "teacher=cnn1d", "student=mlp", "data.transfer_set=generated",
      "data.transfer_size=1000000000000"], "data.transfer_size=1000000000000 would need about 2240.0 TB of memory "
                                           "to generate (2.2 KB per input of shape [40], measured)"),
    (["kd.alpha=1.5"], "kd.alpha=1.5 is out of range: it must be a number in [0, 1]"),
    (["kd.alpha=-0.1"], "kd.alpha=-0.1 is out of range"),
    (["student.width=2.5"], "student.width=2.5 is not a whole number: it must be an integer >= 1"),
    (["student.width=0"], "student.width=0 is out of range: it must be an integer >= 1"),
    (["student.width=wide"], "student.width='wide' is a str, not a number"),
    (["student.depth=0"], "student.depth=0 is out of range"),
    (["teacher.model.width=0"], "teacher.model.width=0 is out of range"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 is out of range: it must be a number > 0"),
    (["optimizer.lr=0"], "optimizer.lr=0 is out of range"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1 is out of range: it must be a number >= 0"),
    (["seed=-1"], "seed=-1 is out of range: it must be an integer in [0, 4.29497e+09]"),
    (["seed=1.5"], "seed=1.5 is not a whole number"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 is out of range: it must be an integer >= 1"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs=-1 is out of range"),
    (["teacher.max_epochs=0"], "teacher.max_epochs=0 means \"use the teacher as it is\", which needs a pretrained"),
    (["data.batch_size=0"], "data.batch_size=0 is out of range"),
    (["data.val_fraction=1.0"], "data.val_fraction=1.0 is out of range: it must be a number in (0, 1)"),
    (["data.val_fraction=0"], "data.val_fraction=0 is out of range"),
    (["num_threads=0"], "num_threads=0 is out of range: it must be an integer >= 1 or null"),
    (["scheduler=cosine", "scheduler.T_max=0"], "scheduler.T_max=0 is out of range"),
    (["if_finished=maybe"], "if_finished='maybe' is not an option: it must be one of error, skip, rerun"),
    (["resume=sometimes"], "resume='sometimes' is not an option: it must be one of true, false"),
    (["logger=wandb", "logger.mode=loud"], "logger.mode='loud' is not an option"),
    (["kd.temperature=0", "kd.alpha=2"], "invalid config values:"),  # every bad value at once
    # data / teacher / student that do not fit: the message names the group that is wrong
    (["teacher=cnn1d"], "teacher=cnn1d does not fit data=digits: CNN1D expects 1-D signals"),
    (["student=cnn1d"], "student=cnn1d does not fit data=digits"),
    (["data=mnist1d", "teacher=cnn1d", "student=cnn2d"], "student=cnn2d does not fit data=mnist1d"),
    # user objectives: the real cause, not Hydra's "set HYDRA_FULL_ERROR=1"
    (["kd._target_=no_such_pkg.Loss"], "kd._target_=no_such_pkg.Loss cannot be imported: ModuleNotFoundError"),
    (["kd._target_=kdexp_test_plugins.BrokenInit", "~kd.temperature", "~kd.alpha"],
     "raised while being built: ValueError: my objective is not ready yet (at "),
    (["+kd.weight=0.5"], "unexpected keyword argument 'weight'"),
    (["kd._target_=kdexp_test_plugins.TapsAMissingLayer"], "taps 'no_such_layer' in the student"),
    # Hydra's own errors exit 2 as well
    (["kd=hintn"], "Could not find 'kd/hintn'"),
    (["student.widht=3"], "Could not override 'student.widht'"),
    # files
    (["teacher.checkpoint=/nonexistent/teacher.pt"], "teacher checkpoint not found: /nonexistent/teacher.pt"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    cases = [[*FAST, *overrides, f"hydra.run.dir={base / f'case{i}'}"] for i, (overrides, _) in enumerate(CASES)]
    (base / "cases.json").write_text(json.dumps(cases))
    # ROOT too: the script runs from tests/, and must import this checkout's kdexp, not whichever is installed
    env = {"PYTHONPATH": f"{PLUGINS}{os.pathsep}{ROOT}", "KDEXP_CACHE_DIR": str(base / "cache"),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(base)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_cases.py"), str(base / "cases.json"),
                           str(base / "results.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, json.loads((base / "results.json").read_text())


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_explained_with_exit_code_2(results, i):
    base, found = results
    _, fragment = CASES[i]
    result = found[i]
    assert result["code"] == 2, result["stderr"][-2000:]
    assert fragment in result["stderr"], result["stderr"][-2000:]
    assert "Traceback" not in result["stderr"]
    folder = base / f"case{i}"
    if (folder / RECORD_NAME).exists():  # a record, if any, is whole and says failed
        record = json.loads((folder / RECORD_NAME).read_text())
        assert record["status"] == "failed" and record["error"]["message"]


def test_config_errors_are_caught_before_any_teacher_is_trained(results):
    base, _ = results
    assert not (base / "cache" / "teachers").exists() or not any((base / "cache" / "teachers").rglob("teacher.pt"))


def test_top_k_teacher_outputs_on_a_classifier_are_said_to_be_an_approximation(tmp_path):
    """kd.cache_topk changes a classifier's soft targets: the run warns at its start and its record says so."""
    from conftest import load_record, run_cli

    folder = tmp_path / "topk"
    proc = run_cli(["experiment=digits_smoke", "logger=none", "teacher.max_epochs=3", "trainer.max_epochs=1",
                    "kd.cache_topk=3", f"hydra.run.dir={folder}"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: kd.cache_topk=3 on a 10-class classifier: the soft targets are an approximation" in proc.stderr
    assert "Top-k is meant for language models" in proc.stderr
    record = load_record(folder)
    assert record["teacher_outputs"]["topk"] == 3
    assert record["teacher_outputs"]["approximation"] == ("the teacher's 3 largest of 10 logits per input; the other "
                                                          "7 share the remaining probability evenly")


class _RunsCode:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_plugin_loading_a_pickle_that_runs_code_never_passes_on_torchs_unsafe_advice(tmp_path):
    """A user's model (any ``_target_``) that reads a file with ``torch.load``: torch's refusal
    advises ``weights_only=False``; kdexp says the file would run code and was not loaded."""
    import torch

    from kdexp.core.config import instantiate
    from kdexp.core.errors import CheckpointError

    marker = tmp_path / "code-ran"
    torch.save({"w": _RunsCode(marker)}, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError) as refused:
        instantiate({"_target_": "torch.load", "f": str(tmp_path / "weights.pt"), "weights_only": True},
                    what="student")
    assert "loading it would run code" in str(refused.value) and "weights_only=False" not in str(refused.value)
    assert not marker.exists()
