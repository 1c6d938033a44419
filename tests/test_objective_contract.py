"""Every objective in conf/kd/ composes, binds and runs one real training step on a matching
teacher/student pair and real data: MNIST-1D (CNN → MLP), or digits (CNN → CNN) for the
objectives that tap spatial feature maps."""

from __future__ import annotations

import pytest
import torch

from conftest import CONF_DIR, compose_config
from kdexp.core.config import instantiate, objective_node
from kdexp.run.modules import DistillationModule
from kdexp.objectives import DistillationObjective
from kdexp.run.validation import validate_config

KD_OPTIONS = sorted(p.stem for p in (CONF_DIR / "kd").glob("*.yaml"))
SPATIAL = {"attention"}  # attention maps need (B, C, ...) features: image teacher and student
PAIRS = {"mnist1d": ["data=mnist1d", "teacher=cnn1d"], "digits": ["data=digits", "teacher=cnn2d", "teacher.model.width=8"]}
STUDENTS = {"mnist1d": ["student=mlp", "student.width=32"], "digits": ["student=cnn2d", "student.width=4"],
            "linear": ["student=linear"]}  # the SVM objectives train the linear student


def pair_for(option: str) -> list[str]:
    data = "digits" if option in SPATIAL else "mnist1d"
    student = "linear" if option in ("svm", "svm_none") else data
    return [*PAIRS[data], *STUDENTS[student]]


@pytest.mark.parametrize("option", KD_OPTIONS)
def test_every_objective_binds_and_trains_one_real_step(option, tmp_path):
    cfg = compose_config([*pair_for(option), f"kd={option}", "data.batch_size=16"], tmp_path)
    validate_config(cfg)
    torch.manual_seed(0)
    objective: DistillationObjective = instantiate(objective_node(cfg))
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    teacher, student = instantiate(cfg.teacher.model), instantiate(cfg.student)
    module = DistillationModule(model=student, teacher=teacher, objective=objective,
                                optimizer=instantiate(cfg.optimizer), num_classes=int(cfg.data.num_classes))
    x, y, index = next(iter(datamodule.train_dataloader()))
    module.bind_objective(x)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer

    terms = objective(module.student_outputs(x), module.teacher_outputs(x, index) if objective.needs_teacher
                      else None, y)
    assert terms and all(name.startswith("loss_") for name in terms), terms.keys()
    assert len(set(terms)) == len(terms)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())

    before = [p.detach().clone() for p in student.parameters()]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    loss = module.training_step((x, y, index), 0)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # the student learned
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))  # the teacher did not
    assert all(p.grad is None for p in teacher.parameters())
    assert objective.describe().startswith(objective.name)
    assert all(hasattr(objective, knob) for knob in objective.knobs)
