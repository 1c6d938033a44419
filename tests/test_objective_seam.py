"""The objective seam: bind after the models exist, stable taps, declared knobs, the objective's
own name in records and reports, and per-epoch schedules of any setting."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import DIGITS_FAST, compose_config, load_record, run_cli
from kdexp.core.config import instantiate
from kdexp.core.errors import ConfigError
from kdexp.run.modules import DistillationModule
from kdexp.schedules import Constant, Cosine, Linear, Step
from kdexp.run.validation import validate_config
from kdexp_test_plugins import ProjectedFeatureKD


# -- schedules -----------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, expected", [
    (Constant(0.7), {0: 0.7, 50: 0.7, 99: 0.7}),
    (Linear(0.0, 0.9, epochs=20), {0: 0.0, 10: 0.45, 20: 0.9, 99: 0.9}),
    (Linear(1.0, 0.0, epochs=None), {0: 1.0, 25: 0.75, 50: 0.5, 99: 0.01}),
    (Linear(0.0, 1.0, epochs=10, delay=5), {0: 0.0, 5: 0.0, 10: 0.5, 15: 1.0}),
    (Cosine(8.0, 1.0, epochs=None), {0: 8.0, 50: 4.5, 100: 1.0}),
    (Cosine(8.0, 1.0, epochs=10), {0: 8.0, 5: 4.5, 10: 1.0, 60: 1.0}),
    (Step([0.1, 0.5, 0.9], [10, 20]), {0: 0.1, 9: 0.1, 10: 0.5, 19: 0.5, 20: 0.9, 99: 0.9}),
])
def test_schedules_give_the_documented_values(schedule, expected):
    for epoch, value in expected.items():
        assert schedule.value(epoch, 100) == pytest.approx(value, abs=1e-12), epoch


def test_bad_schedules_are_refused():
    with pytest.raises(ConfigError, match="one more value than milestones"):
        Step([0.1, 0.5], [10, 20])
    with pytest.raises(ConfigError, match="increasing milestones"):
        Step([0.1, 0.5, 0.9], [20, 10])
    with pytest.raises(ConfigError, match="epochs >= 1"):
        Linear(0, 1, epochs=0)


@pytest.mark.parametrize("option", ["none", "alpha_warmup", "temperature_cosine"])
def test_every_schedule_config_composes_and_validates(option, tmp_path):
    validate_config(compose_config([f"schedule={option}"], tmp_path))


def test_schedules_that_cannot_apply_are_explained_before_training(tmp_path):
    cfg = compose_config(["schedule=alpha_warmup", "kd=none"], tmp_path)
    with pytest.raises(ConfigError, match="schedule.alpha: the objective .* has no setting 'alpha'"):
        validate_config(cfg)
    cfg = compose_config(["schedule=alpha_warmup", "schedule.alpha.end=1.5"], tmp_path)
    with pytest.raises(ConfigError, match=r"schedule.alpha.end=1.5 is out of range: like kd.alpha, it must be a number in \[0, 1\]"):
        validate_config(cfg)


def test_a_scheduled_run_uses_and_logs_the_values_in_force(tmp_path):
    folder = tmp_path / "r"
    proc = run_cli([*DIGITS_FAST, "logger=csv", "schedule=alpha_warmup", "schedule.alpha.epochs=2",
                    f"hydra.run.dir={folder}"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in csv.DictReader(open(folder / "csv" / "metrics.csv")) if r.get("train/alpha")]
    alphas = [float(r["train/alpha"]) for r in rows]
    assert alphas == pytest.approx([0.0, 0.45, 0.9])
    assert float(rows[0]["train/loss_kd"]) == 0.0 and float(rows[1]["train/loss_kd"]) > 0  # α = 0: no KD term
    record = load_record(folder)
    assert record["run_name"] == "distill-mlp64-hinton-T4-a0.9-alpha~lin0-0.9e2-s1"
    assert record["objective"]["label"] == "hinton-T4-a0.9-alpha~lin0-0.9e2"
    assert record["config"]["schedule"]["alpha"]["epochs"] == 2


# -- bind, knobs, names ----------------------------------------------------------------------
def test_bind_sizes_adapters_from_the_probe_batch_before_the_optimiser(tmp_path):
    cfg = compose_config(["experiment=digits_smoke", "teacher.checkpoint=null"], tmp_path)
    teacher = instantiate(cfg.teacher.model)
    student = instantiate(cfg.student)  # MLP width 64 → teacher CNN2D pre_logits of 4·32 = 128
    objective = ProjectedFeatureKD(beta=2.0)
    module = DistillationModule(model=student, teacher=teacher, objective=objective,
                                optimizer=instantiate(cfg.optimizer), num_classes=10)
    x = torch.randn(8, 1, 8, 8)
    module.bind_objective(x)
    assert (objective.projection.in_features, objective.projection.out_features) == (64, 128)
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in objective.projection.parameters())
    assert not any(id(p) in in_optimizer for p in teacher.parameters())
    loss = module.training_step((x, torch.randint(0, 10, (8,)), torch.arange(8)), 0)
    loss.backward()
    assert objective.projection.weight.grad is not None and objective.projection.weight.grad.abs().sum() > 0


def test_a_plug_in_objective_is_named_as_itself_everywhere(tmp_path):
    folder = tmp_path / "r"
    proc = run_cli([*DIGITS_FAST, "kd._target_=kdexp_test_plugins.ProjectedFeatureKD", "+kd.beta=0.5",
                    "logger=wandb", f"hydra.run.dir={folder}"], tmp_path / "cache",
                   extra_env={"WANDB_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = load_record(folder)
    assert record["run_name"] == "distill-mlp64-projected-T4-a0.9-beta0.5-s1"  # not "hinton"
    assert record["objective"] == {"name": "projected", "label": "projected-T4-a0.9-beta0.5",
                                   "target": "kdexp_test_plugins.ProjectedFeatureKD",
                                   "knobs": ["kd.temperature", "kd.alpha", "kd.beta"]}
    assert "loss_feat" in " ".join(record["metrics"])
    report = run_cli(["report", str(folder)], tmp_path / "cache", module="kdexp.cli")
    assert report.returncode == 0, report.stderr[-2000:]
    assert "kd=projected" in report.stdout and "kd=hinton" not in report.stdout


def test_taps_are_config_arguments_and_wrong_ones_list_the_valid_names(tmp_path):
    cfg = compose_config(["experiment=digits_smoke", "kd._target_=kdexp_test_plugins.ProjectedFeatureKD",
                          "+kd.student_layers=[stage9]"], tmp_path)
    with pytest.raises(ConfigError, match="taps 'stage9' in the student .* valid paths: .*pre_logits, stage1, stage1.0"):
        validate_config(cfg)
