"""Multi-teacher KD: the averaged soft target against numpy, one teacher = Hinton, and a real
run with two teachers each provisioned and cached like a single one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DIGITS_FAST, load_record, run_cli
from kdexp.core.errors import ConfigError
from kdexp.models.ensemble import TeacherEnsemble, average_probability_logits
from kdexp.objectives import HintonKD, ModelOutputs
from kdexp.objectives.multi_teacher import MultiTeacherKD


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_multi_teacher_matches_numpy():
    rng = np.random.default_rng(3)
    s, ts, y = rng.normal(size=(8, 5)) * 2, [rng.normal(size=(8, 5)) * 4 for _ in range(3)], rng.integers(0, 5, 8)
    T, alpha = 3.0, 0.7
    p_bar = np.mean([np_softmax(t / T) for t in ts], axis=0)
    p_s = np_softmax(s / T)
    kl = (p_bar * (np.log(p_bar) - np.log(p_s))).sum(axis=1).mean()
    ce = -np.log(np_softmax(s)[np.arange(8), y]).mean()
    teacher = ModelOutputs(torch.tensor(ts[0]), members=[torch.tensor(t) for t in ts])
    terms = MultiTeacherKD(temperature=T, alpha=alpha)(ModelOutputs(torch.tensor(s)), teacher, torch.tensor(y))
    assert terms["loss_kd"].item() == pytest.approx(alpha * T * T * kl, rel=1e-9)
    assert terms["loss_ce"].item() == pytest.approx((1 - alpha) * ce, rel=1e-9)


def test_a_batch_without_labels_gives_zero_cross_entropy_not_nan():
    """A transfer-set batch (every target UNLABELLED): only the soft-target term, as HintonKD; the KD term is
    the averaged-soft-target KL written in numpy above."""
    from kdexp.objectives.base import UNLABELLED

    rng = np.random.default_rng(4)
    s, ts = rng.normal(size=(6, 5)) * 2, [rng.normal(size=(6, 5)) * 4 for _ in range(2)]
    T, alpha = 2.0, 0.5
    assert MultiTeacherKD.handles_unlabelled
    student = torch.tensor(s, requires_grad=True)
    teacher = ModelOutputs(torch.tensor(ts[0]), members=[torch.tensor(t) for t in ts])
    terms = MultiTeacherKD(temperature=T, alpha=alpha)(ModelOutputs(student), teacher, torch.full((6,), UNLABELLED))
    assert terms["loss_ce"].item() == 0.0
    p_bar = np.mean([np_softmax(t / T) for t in ts], axis=0)
    kl = (p_bar * (np.log(p_bar) - np.log(np_softmax(s / T)))).sum(axis=1).mean()
    assert terms["loss_kd"].item() == pytest.approx(alpha * T * T * kl, rel=1e-10)
    sum(terms.values()).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_one_teacher_is_hinton_and_the_ensemble_logits_average_probabilities():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    multi = MultiTeacherKD(temperature=4, alpha=0.9)(ModelOutputs(s), ModelOutputs(t, members=[t]), y)
    hinton = HintonKD(temperature=4, alpha=0.9)(ModelOutputs(s), ModelOutputs(t), y)
    assert all(torch.allclose(multi[k], hinton[k]) for k in hinton)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    avg = average_probability_logits([a, b]).softmax(-1)
    assert torch.allclose(avg, (a.softmax(-1) + b.softmax(-1)) / 2, atol=1e-6)
    ensemble = TeacherEnsemble([torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)])
    assert ensemble(torch.randn(2, 3)).shape == (2, 4)


def test_a_run_with_two_teachers_caches_each_and_records_them(tmp_path):
    second = ("+teachers=[{model: {_target_: kdexp.models.CNN2D, in_shape: [1, 8, 8], num_classes: 10, width: 8}, "
              "checkpoint: null, max_epochs: 2, seed: 1, optimizer: {_target_: torch.optim.Adam, _partial_: true, "
              "lr: 0.001}}]")
    proc = run_cli([*DIGITS_FAST, "kd=multi_teacher", second, "logger=none", f"hydra.run.dir={tmp_path / 'r'}"],
                   tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = load_record(tmp_path / "r")
    members = record["teachers"]
    assert len(members) == 2 and members[0]["hash"] != members[1]["hash"]
    assert {m["source"] for m in members} == {"trained"}
    assert len(list((tmp_path / "cache" / "teachers").glob("*/teacher.pt"))) == 2
    assert record["teacher"]["source"] == "ensemble" and record["objective"]["name"] == "multi_teacher"
    assert 0.5 < record["teacher"]["test_acc"] <= 1.0 and record["status"] == "finished"


def test_extra_teachers_need_an_objective_that_reads_them(tmp_path):
    from conftest import compose_config
    from kdexp.run.validation import validate_config

    cfg = compose_config(["experiment=mnist1d_multi_teacher", "kd=hinton"], tmp_path)
    with pytest.raises(ConfigError, match="reads one teacher; use kd=multi_teacher"):
        validate_config(cfg)
    validate_config(compose_config(["experiment=mnist1d_multi_teacher"], tmp_path))
