"""Transfer-set distillation: unlabelled inputs learnt from the teacher alone, never a held-out input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config
from kdexp.data import MNIST1DDataModule
from kdexp.errors import ConfigError
from kdexp.objectives import HintonKD
from kdexp.objectives.base import UNLABELLED, ModelOutputs, labelled_cross_entropy
from kdexp.objectives.hinton import soft_target_kl
from kdexp.train import run
from kdexp.validation import validate_config


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
        from kdexp.config import instantiate
        instantiate(cfg.data).setup()
