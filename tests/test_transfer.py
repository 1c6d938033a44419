"""Transfer-set distillation: unlabelled inputs learnt from the teacher alone, never a held-out input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config
from kdexp.data import MNIST1DDataModule
from kdexp.core.errors import ConfigError
from kdexp.objectives import HintonKD
from kdexp.objectives.base import UNLABELLED, ModelOutputs, labelled_cross_entropy
from kdexp.objectives.hinton import soft_target_kl
from kdexp.train import run
from kdexp.run.validation import validate_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mnist1d-cache")


def test_transfer_inputs_join_training_unlabelled_and_never_repeat_a_held_out_input(cache):
    dm = MNIST1DDataModule(transfer_set="generated", transfer_size=500, cache_dir=str(cache))
    dm.setup()
    train = dm.splits["train"]
    assert dm.labelled_train_size == 3600 and len(train.x) == 4100
    assert bool((train.y[3600:] == UNLABELLED).all()) and bool((train.y[:3600] >= 0).all())
    held_out = {row.tobytes() for name in ("val", "test") for row in dm.splits[name].x.numpy()}
    assert not any(row.tobytes() in held_out for row in train.x[3600:].numpy())
    labelled = {row.tobytes() for row in train.x[:3600].numpy()}
    assert not any(row.tobytes() in labelled for row in train.x[3600:].numpy())  # new inputs, not copies


def test_a_transfer_set_that_overlaps_the_test_set_is_refused(cache):
    class Leaky(MNIST1DDataModule):
        def transfer_inputs(self, size, seed):
            return self.splits["test"].x[:size].numpy()  # what seed 42 would partly do

    with pytest.raises(ConfigError, match="5 of the 5 transfer inputs equal validation or test inputs"):
        Leaky(transfer_set="generated", transfer_size=5, cache_dir=str(cache)).setup()
    with pytest.raises(ConfigError, match="data set's own generator seed"):
        MNIST1DDataModule(transfer_set="generated", transfer_size=5, transfer_seed=42, cache_dir=str(cache)).setup()


def test_hinton_learns_unlabelled_inputs_from_the_teacher_only():
    torch.manual_seed(0)
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    y = torch.tensor([3, UNLABELLED, 1, UNLABELLED, UNLABELLED, 7])
    terms = HintonKD(temperature=4.0, alpha=0.75)(ModelOutputs(s), ModelOutputs(t), y)
    labelled = y != UNLABELLED
    assert terms["loss_ce"].item() == pytest.approx(0.25 * F.cross_entropy(s[labelled], y[labelled]).item(), rel=1e-6)
    assert terms["loss_kd"].item() == pytest.approx(0.75 * soft_target_kl(s, t, 4.0).item(), rel=1e-6)
    none = labelled_cross_entropy(s.requires_grad_(), torch.full((6,), UNLABELLED))
    none.backward()
    assert none.item() == 0.0 and not torch.isnan(s.grad).any()


def test_a_transfer_run_sees_more_inputs_per_epoch_and_keeps_the_teacher(tmp_path):
    fast = ["student.width=16", "trainer.max_epochs=2", "teacher.max_epochs=2", "logger=none",
            "+teacher.allow_untrained=true"]
    plain = run(compose_config([*fast, f"paths.output_dir={tmp_path / 'plain'}"], tmp_path))
    transfer = run(compose_config([*fast, "data.transfer_set=generated", "data.transfer_size=300",
                                   f"paths.output_dir={tmp_path / 'transfer'}"], tmp_path))
    assert transfer["data_sizes"] == {"train_labelled": 3600, "train_transfer": 300, "val": 400, "test": 1000}
    assert plain["global_steps"] == 2 * 36 and transfer["global_steps"] == 2 * math.ceil(3900 / 100)
    assert transfer["teacher"]["hash"] == plain["teacher"]["hash"]  # the teacher never trains on the transfer set
    assert transfer["teacher_outputs"]["source"] == "cache"


@pytest.mark.parametrize("overrides, message", [
    (["data.transfer_set=generated", "data.transfer_size=0"], "transfer_size"),
    (["data.transfer_set=generated", "kd=none"], "uses no teacher"),
    (["data.transfer_set=generated", "kd=dkd"], "handles_unlabelled"),
    (["data.transfer_set=everything"], "not an option"),
    (["experiment=digits_smoke", "+data.transfer_set=generated", "+data.transfer_size=10"], "cannot generate"),
])
def test_bad_transfer_settings_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg = compose_config(overrides, tmp_path)
        validate_config(cfg)
        from kdexp.core.config import instantiate
        instantiate(cfg.data).setup()


def test_generating_a_transfer_set_reports_progress_and_changes_no_sample(caplog):
    import logging

    from mnist1d.data import get_dataset_args, make_dataset

    from kdexp.data.base import GenerationProgress

    caplog.set_level(logging.INFO, logger="kdexp.data.base")
    counted = MNIST1DDataModule().transfer_inputs(300, seed=3)
    args = get_dataset_args()
    args.seed, args.num_samples, args.train_split = 3, 300, 1.0
    assert np.array_equal(counted, make_dataset(args)["x"].astype(np.float32))  # counting draws nothing
    lines = [r.getMessage() for r in caplog.records if r.name == "kdexp.data.base"]
    assert lines[0] == "Generating 300 MNIST-1D transfer inputs (data.transfer_seed=3) ..."
    assert lines[-1].startswith("Generated 300 MNIST-1D transfer inputs (data.transfer_seed=3) in ")
    caplog.clear()
    progress = GenerationProgress(50_000, "inputs")  # long enough to report every tenth, with the time left
    for _ in range(50_000):
        progress.step()
    lines = [r.getMessage() for r in caplog.records if r.name == "kdexp.data.base"]
    assert [line.split(" of ")[0].strip() for line in lines[1:]] == [f"{n:,}" for n in range(5_000, 50_000, 5_000)]
    assert lines[1].startswith("  5,000 of 50,000 inputs (10 %), about ") and lines[1].endswith(" left")


def test_sigterm_while_a_transfer_set_is_generated_ends_the_record_interrupted(tmp_path):
    """Data preparation is stopped like training is: the record says interrupted (not running), exit 130."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import PLUGINS, ROOT, load_record

    folder = tmp_path / "run"
    env = dict(os.environ, KDEXP_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline", PYTHONPATH=str(PLUGINS))
    proc = subprocess.Popen([sys.executable, "-m", "kdexp.train", "data.transfer_set=generated",
                             "data.transfer_size=200000", "logger=none", f"hydra.run.dir={folder}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log_file, deadline = folder / "train.log", time.time() + 300
        # the run's own log line is the handshake: 200,000 inputs take minutes to generate after it
        while proc.poll() is None and time.time() < deadline and \
                not (log_file.is_file() and "Generating 200,000 MNIST-1D" in log_file.read_text()):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert json.loads((folder / "run_record.json").read_text())["status"] == "running"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    record = load_record(folder)
    assert record["status"] == "interrupted" and record["error"]["type"] == "RunInterrupted"
    assert "stopped by SIGTERM outside training" in record["error"]["message"]
    assert "Traceback" not in err and not list((tmp_path / "cache").rglob("mnist1d-transfer-*.npz"))
