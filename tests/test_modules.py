"""LightningModules with real Trainers: a frozen teacher, the optimiser's parameters, learning."""

from __future__ import annotations

import copy
import functools

import pytorch_lightning as pl
import pytest
import torch

from kdexp.data import DigitsDataModule
from kdexp.data.lightning import for_trainer
from kdexp.core.errors import NonFiniteLossError
from kdexp.models import CNN2D, MLP
from kdexp.run.modules import DistillationModule, SupervisedModule
from kdexp.objectives import CrossEntropyOnly, HintonKD
from kdexp.teachers.quality import evaluate_accuracy

ADAM = functools.partial(torch.optim.Adam, lr=3e-3)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return for_trainer(dm)  # a Trainer takes kdexp's data modules wrapped


@pytest.fixture(scope="module")
def teacher(digits):
    """A real (briefly trained) CNN teacher with BatchNorm, whose running stats must not move."""
    pl.seed_everything(0, verbose=False)
    net = CNN2D((1, 8, 8), 10, width=8)
    trainer(max_epochs=3).fit(SupervisedModule(net, optimizer=ADAM, num_classes=10), datamodule=digits)
    return net


def test_teacher_stays_frozen_and_in_eval_mode(digits, teacher):
    before = copy.deepcopy(teacher.state_dict())
    student = MLP((1, 8, 8), 10, width=32)
    module = DistillationModule(model=student, teacher=teacher, objective=HintonKD(), optimizer=ADAM, num_classes=10)
    seen_modes = []

    class RecordTeacherMode(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen_modes.append((pl_module.training, pl_module.teacher.training, pl_module.model.training))

    trainer(max_epochs=1, callbacks=[RecordTeacherMode()]).fit(module, datamodule=digits)
    assert seen_modes and all(m == (True, False, True) for m in seen_modes)
    after = teacher.state_dict()
    for name, value in before.items():  # weights and BatchNorm running statistics
        assert torch.equal(value, after[name]), name
    assert all(not p.requires_grad for p in teacher.parameters())
    optimised = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert optimised == {id(p) for p in student.parameters()}
    assert not optimised & {id(p) for p in teacher.parameters()}


def test_training_step_sends_gradients_to_the_student_only(digits, teacher):
    student = MLP((1, 8, 8), 10, width=32)
    module = DistillationModule(model=student, teacher=teacher, objective=HintonKD(), optimizer=ADAM, num_classes=10)
    x, y, idx = next(iter(digits.train_dataloader()))
    module.check_finite_every_n_steps = 0  # no Trainer attached here
    module.training_step((x, y, idx), 0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_improves_the_student_and_agreement(digits, teacher):
    pl.seed_everything(1, verbose=False)
    student = MLP((1, 8, 8), 10, width=32)
    before = evaluate_accuracy(student, digits.eval_batches("val"))
    module = DistillationModule(model=student, teacher=teacher, objective=HintonKD(), optimizer=ADAM, num_classes=10)
    t = trainer(max_epochs=6)
    t.fit(module, datamodule=digits)
    assert t.callback_metrics["val/acc_best"] >= t.callback_metrics["val/acc"]
    assert {"train/loss", "train/loss_ce", "train/loss_kd"} <= set(t.callback_metrics)
    metrics = t.test(module, datamodule=digits, verbose=False)[0]
    after = evaluate_accuracy(student, digits.eval_batches("val"))
    assert before < 0.3 and after > 0.7
    assert metrics["test/agreement"] > 0.7 and 0 <= metrics["test/ece"] <= 1
    # Independent check of the logged test accuracy.
    assert metrics["test/acc"] == pytest.approx(evaluate_accuracy(student, digits.eval_batches("test")), abs=1e-6)


def test_ce_baseline_never_runs_the_teacher_in_training(digits, teacher):
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(teacher.training))
    module = DistillationModule(model=MLP((1, 8, 8), 10, width=16), teacher=teacher, objective=CrossEntropyOnly(),
                                optimizer=ADAM, num_classes=10)
    t = trainer(max_epochs=1, limit_val_batches=0)
    t.fit(module, datamodule=digits)
    assert calls == []  # no teacher forward pass during CE-only training
    t.test(module, datamodule=digits, verbose=False)
    handle.remove()
    assert calls and not any(calls)  # used, in eval mode, only to measure agreement


def test_nan_loss_stops_training_and_names_the_step(digits):
    class NaNAfterTwoSteps(CrossEntropyOnly):
        calls = 0

        def forward(self, student, teacher, targets):
            terms = super().forward(student, teacher, targets)
            NaNAfterTwoSteps.calls += 1
            return {"loss_ce": terms["loss_ce"] * (float("inf") if NaNAfterTwoSteps.calls > 2 else 1.0)}

    module = SupervisedModule(MLP((1, 8, 8), 10, width=8), optimizer=ADAM, num_classes=10, objective=NaNAfterTwoSteps())
    with pytest.raises(NonFiniteLossError, match=r"became inf at global step 2 \(epoch 0, batch 2\)"):
        trainer(max_epochs=1).fit(module, datamodule=digits)
