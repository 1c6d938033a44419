"""KD loss math against an independent numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdexp.core.errors import ConfigError
from kdexp.objectives import CrossEntropyOnly, HintonKD, ModelOutputs, soft_target_kl, total_loss


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_hinton(s: np.ndarray, t: np.ndarray, y: np.ndarray, T: float, alpha: float) -> tuple[float, float]:
    """(weighted CE, weighted KD) written out from the formula in Hinton et al. (2015)."""
    ce = -np_log_softmax(s)[np.arange(len(y)), y].mean()
    p_t = np.exp(np_log_softmax(t / T))
    kl = (p_t * (np_log_softmax(t / T) - np_log_softmax(s / T))).sum(axis=1).mean()
    return (1 - alpha) * ce, alpha * T * T * kl


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(16, 10)) * 3
    t = rng.normal(size=(16, 10)) * 5
    y = rng.integers(0, 10, size=16)
    return s, t, y


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.9), (8.0, 0.3), (20.0, 1.0)])
def test_hinton_matches_numpy(logits, T, alpha):
    s, t, y = logits
    terms = HintonKD(temperature=T, alpha=alpha)(
        ModelOutputs(torch.tensor(s)), ModelOutputs(torch.tensor(t)), torch.tensor(y)
    )
    ce, kd = np_hinton(s, t, y, T, alpha)
    assert terms["loss_ce"].item() == pytest.approx(ce, rel=1e-9, abs=1e-12)
    assert terms["loss_kd"].item() == pytest.approx(kd, rel=1e-9)
    assert total_loss(terms).item() == pytest.approx(ce + kd, rel=1e-9)


def test_alpha_zero_is_cross_entropy(logits):
    s, t, y = logits
    terms = HintonKD(temperature=4.0, alpha=0.0)(ModelOutputs(torch.tensor(s)), ModelOutputs(torch.tensor(t)), torch.tensor(y))
    expected = -np_log_softmax(s)[np.arange(len(y)), y].mean()
    assert total_loss(terms).item() == pytest.approx(expected, rel=1e-9)
    baseline = CrossEntropyOnly()(ModelOutputs(torch.tensor(s)), None, torch.tensor(y))
    assert total_loss(baseline).item() == pytest.approx(expected, rel=1e-9)


def test_identical_logits_give_zero_kd(logits):
    s, _, y = logits
    z = torch.tensor(s)
    terms = HintonKD(temperature=4.0, alpha=0.9)(ModelOutputs(z), ModelOutputs(z.clone()), torch.tensor(y))
    assert terms["loss_kd"].abs().item() < 1e-12
    assert soft_target_kl(z, z, 7.0).abs().item() < 1e-12


def test_gradient_flows_to_student_logits_only(logits):
    s, t, y = logits
    student = torch.tensor(s, requires_grad=True)
    teacher = torch.tensor(t)  # teacher outputs are produced under no_grad in the module
    total_loss(HintonKD()(ModelOutputs(student), ModelOutputs(teacher), torch.tensor(y))).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    # The soft-target gradient is (softmax(s/T) - softmax(t/T)) * T / B per element (times alpha).
    T, alpha = 4.0, 0.9
    student.grad = None
    soft = soft_target_kl(student, teacher, T) * alpha
    soft.backward()
    expected = (F.softmax(student.detach() / T, -1) - F.softmax(teacher / T, -1)) * T / len(y) * alpha
    torch.testing.assert_close(student.grad, expected)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "kd.temperature must be > 0"),
    ({"temperature": -2.0}, "kd.temperature must be > 0"),
    ({"alpha": 1.5}, r"kd.alpha must lie in \[0, 1\]"),
    ({"alpha": -0.1}, r"kd.alpha must lie in \[0, 1\]"),
])
def test_invalid_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HintonKD(**kwargs)


def test_describe_is_readable():
    assert HintonKD(temperature=8, alpha=0.5).describe() == "hinton-T8-a0.5"
    assert CrossEntropyOnly().describe() == "ce"
