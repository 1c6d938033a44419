"""Bad input, as a new user types it: every case ends with exit code 2, a message that names
the key, the value and what is valid, no traceback, and no half-written record or cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import PLUGINS, ROOT
from kdexp.records import RECORD_NAME

FAST = ["experiment=digits_smoke", "logger=none", "teacher.max_epochs=1", "trainer.max_epochs=1"]

# (overrides, expected fragment of the message). Each runs on top of FAST unless it names its own data.
CASES: list[tuple[list[str], str]] = [
    (["kd.temperature=abc"], "kd.temperature='abc' is a str, not a number: it must be a number > 0"),
    (["kd.temperature=0"], "kd.temperature=0 is out of range: it must be a number > 0"),
    (["kd.temperature=-1"], "kd.temperature=-1 is out of range"),
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
