"""DKD, DIST, the multiclass hinge losses and the linear student.

Every loss is checked against a numpy reference written here from the paper's formula
(loops over samples, not the objectives' helpers), plus the properties the papers
rely on: DKD's decomposition of Hinton's KL, DIST's indifference to a linear relation,
the hinge's zero region.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import compose_config
from kdexp.core.config import instantiate, objective_node
from kdexp.core.errors import ConfigError
from kdexp.models.features import FeatureHooks
from kdexp.models.linear import Linear
from kdexp.objectives import ModelOutputs, total_loss
from kdexp.objectives.dist import DIST
from kdexp.objectives.dkd import DKD
from kdexp.objectives.svm import HingeKD, MulticlassHinge

REL = 1e-9  # float64 throughout; the brief's bound is 1e-6


# -- independent references ------------------------------------------------------------

def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p ‖ q) for two probability vectors."""
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def np_dkd_parts(s: np.ndarray, t: np.ndarray, y: int, T: float) -> tuple[float, float, float, float]:
    """(TCKD, NCKD, KD, p_t^T) of one sample at temperature T, unscaled (no T²), from eq. 1–3 of Zhao et al."""
    p_s, p_t = np_softmax(s / T), np_softmax(t / T)
    b_s = np.array([p_s[y], 1 - p_s[y]])
    b_t = np.array([p_t[y], 1 - p_t[y]])
    others = [j for j in range(len(s)) if j != y]
    hat_s = p_s[others] / p_s[others].sum()  # renormalised among the non-target classes
    hat_t = p_t[others] / p_t[others].sum()
    return np_kl(b_t, b_s), np_kl(hat_t, hat_s), np_kl(p_t, p_s), float(p_t[y])


def np_dkd(s, t, y, ce_weight, alpha, beta, T, ramp) -> tuple[float, float, float]:
    ce = np.mean([-math.log(np_softmax(s[i])[y[i]]) for i in range(len(y))])
    parts = [np_dkd_parts(s[i], t[i], y[i], T) for i in range(len(y))]
    tckd = np.mean([p[0] for p in parts]) * T * T
    nckd = np.mean([p[1] for p in parts]) * T * T
    return ce_weight * ce, ramp * alpha * tckd, ramp * beta * nckd


def np_pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def np_dist(s, t, y, ce_weight, beta, gamma, tau) -> tuple[float, float, float]:
    """(weighted CE, inter, intra) from Huang et al.: 1 − mean Pearson over rows / over columns."""
    ce = np.mean([-math.log(np_softmax(s[i])[y[i]]) for i in range(len(y))])
    p_s = np.stack([np_softmax(row / tau) for row in s])
    p_t = np.stack([np_softmax(row / tau) for row in t])
    inter = 1 - np.mean([np_pearson(p_s[i], p_t[i]) for i in range(p_s.shape[0])])
    intra = 1 - np.mean([np_pearson(p_s[:, c], p_t[:, c]) for c in range(p_s.shape[1])])
    return ce_weight * ce, beta * tau**2 * inter, gamma * tau**2 * intra


def np_hinge(s: np.ndarray, y: np.ndarray) -> float:
    """Crammer–Singer: mean over samples of max(0, 1 + max_{j≠y} s_j − s_y)."""
    losses = []
    for i in range(len(y)):
        rival = max(s[i, j] for j in range(s.shape[1]) if j != y[i])
        losses.append(max(0.0, 1.0 + rival - s[i, y[i]]))
    return float(np.mean(losses))


def run(objective, s, t, y) -> dict[str, torch.Tensor]:
    teacher = None if t is None else ModelOutputs(torch.as_tensor(t))
    return objective(ModelOutputs(torch.as_tensor(s)), teacher, torch.as_tensor(y))


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(16, 10)) * 3
    t = rng.normal(size=(16, 10)) * 5
    y = rng.integers(0, 10, size=16)
    return s, t, y


# -- DKD ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ce_weight,alpha,beta,T", [(1.0, 1.0, 8.0, 4.0), (0.5, 2.0, 0.5, 1.0), (1.0, 0.0, 3.0, 10.0)])
def test_dkd_matches_numpy(logits, ce_weight, alpha, beta, T):
    s, t, y = logits
    objective = DKD(ce_weight=ce_weight, alpha=alpha, beta=beta, temperature=T, warmup_epochs=0)
    terms = run(objective, s, t, y)
    ce, tckd, nckd = np_dkd(s, t, y, ce_weight, alpha, beta, T, ramp=1.0)
    assert set(terms) == {"loss_ce", "loss_tckd", "loss_nckd"}
    assert terms["loss_ce"].item() == pytest.approx(ce, rel=REL)
    assert terms["loss_tckd"].item() == pytest.approx(tckd, rel=REL, abs=1e-15)
    assert terms["loss_nckd"].item() == pytest.approx(nckd, rel=REL)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_parts_recompose_hinton_kl(logits, T):
    """KD = TCKD + (1 − p_t^T) · NCKD per sample (eq. 3 of the paper), KD computed independently."""
    s, t, y = logits
    objective = DKD(ce_weight=0.0, alpha=1.0, beta=1.0, temperature=T, warmup_epochs=0)
    for i in range(len(y)):
        terms = run(objective, s[i:i + 1], t[i:i + 1], y[i:i + 1])
        _, _, kd, p_target = np_dkd_parts(s[i], t[i], y[i], T)
        recomposed = (terms["loss_tckd"].item() + (1 - p_target) * terms["loss_nckd"].item()) / T**2
        assert recomposed == pytest.approx(kd, rel=REL)


@pytest.mark.parametrize("epoch,factor", [(0, 0.0), (10, 0.5), (20, 1.0), (40, 1.0)])
def test_dkd_warmup_scales_only_the_kd_part(logits, epoch, factor):
    """mdistiller's min(epoch / warmup, 1) on the KD part only, against the numpy reference."""
    s, t, y = logits
    objective = DKD(warmup_epochs=20)
    assert objective.epoch == 0
    objective.epoch = epoch  # what the training loop does at the start of each epoch
    ramped = run(objective, s, t, y)
    ce, tckd, nckd = np_dkd(s, t, y, 1.0, 1.0, 8.0, 4.0, ramp=factor)
    assert ramped["loss_ce"].item() == pytest.approx(ce, rel=REL)
    assert ramped["loss_tckd"].item() == pytest.approx(tckd, rel=REL, abs=1e-15)
    assert ramped["loss_nckd"].item() == pytest.approx(nckd, rel=REL, abs=1e-15)


def test_dkd_is_zero_for_a_student_equal_to_the_teacher(logits):
    _, t, y = logits
    terms = run(DKD(warmup_epochs=0), t, t.copy(), y)
    assert abs(terms["loss_tckd"].item()) < 1e-12 and abs(terms["loss_nckd"].item()) < 1e-12


def test_dkd_masking_survives_logits_far_beyond_the_papers_offset():
    """A target logit thousands above the rest: the masked class must still get probability 0."""
    s = np.array([[5000.0, 1.0, 2.0, 3.0]])
    t = np.array([[4000.0, 3.0, 1.0, 2.0]])
    y = np.array([0])
    terms = run(DKD(ce_weight=0.0, alpha=1.0, beta=1.0, temperature=1.0, warmup_epochs=0), s, t, y)
    # p_j / (1 − p_t) underflows here, so renormalise in logit space: a softmax over the others.
    nckd = np_kl(np_softmax(t[0, 1:]), np_softmax(s[0, 1:]))
    assert nckd > 0.1 and terms["loss_nckd"].item() == pytest.approx(nckd, rel=REL)
    assert all(torch.isfinite(v) for v in terms.values())


# -- DIST --------------------------------------------------------------------------------

@pytest.mark.parametrize("ce_weight,beta,gamma,tau", [(1.0, 1.0, 1.0, 1.0), (0.5, 2.0, 2.0, 4.0), (1.0, 0.0, 3.0, 2.0)])
def test_dist_matches_numpy(logits, ce_weight, beta, gamma, tau):
    s, t, y = logits
    terms = run(DIST(ce_weight=ce_weight, beta=beta, gamma=gamma, temperature=tau), s, t, y)
    ce, inter, intra = np_dist(s, t, y, ce_weight, beta, gamma, tau)
    assert set(terms) == {"loss_ce", "loss_inter", "loss_intra"}
    assert terms["loss_ce"].item() == pytest.approx(ce, rel=REL)
    assert terms["loss_inter"].item() == pytest.approx(inter, rel=REL, abs=1e-15)
    assert terms["loss_intra"].item() == pytest.approx(intra, rel=REL)


def test_dist_is_zero_for_a_student_equal_to_the_teacher(logits):
    _, t, y = logits
    terms = run(DIST(temperature=4.0), t, t.copy(), y)
    assert abs(terms["loss_inter"].item()) < 1e-12 and abs(terms["loss_intra"].item()) < 1e-12


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_needs_only_a_linear_relation_where_kl_needs_a_match(logits, tau):
    """Student probabilities = λ·teacher + (1 − λ)/C: a positive affine map of every row and every
    column, so both Pearson terms vanish (the paper's relaxed match), while the KL does not."""
    _, t, y = logits
    C, lam = t.shape[1], 0.3
    p_t = np.stack([np_softmax(row / tau) for row in t])
    p_s = lam * p_t + (1 - lam) / C
    s = tau * np.log(p_s)  # softmax(s / tau) == p_s, since p_s sums to 1
    terms = run(DIST(temperature=tau), s, t, y)
    assert abs(terms["loss_inter"].item()) < 1e-12 and abs(terms["loss_intra"].item()) < 1e-12
    assert np.mean([np_kl(p_t[i], p_s[i]) for i in range(len(y))]) > 0.05


def test_dist_ignores_a_per_sample_logit_shift(logits):
    """Softmax ignores adding one constant to a row of logits, so every term does."""
    s, t, y = logits
    shift = np.random.default_rng(1).normal(size=(len(y), 1)) * 10
    base = run(DIST(temperature=2.0), s, t, y)
    shifted = run(DIST(temperature=2.0), s + shift, t - shift, y)
    for key in base:
        assert shifted[key].item() == pytest.approx(base[key].item(), rel=1e-9)


def test_dist_terms_stay_within_their_bounds(logits):
    """1 − ρ lies in [0, 2] (unit weights); an anti-correlated student approaches the top."""
    s, t, y = logits
    unit = DIST(beta=1.0, gamma=1.0, temperature=1.0)
    for student in (s, -t):
        terms = run(unit, student, t, y)
        for key in ("loss_inter", "loss_intra"):
            assert 0.0 <= terms[key].item() <= 2.0
    assert run(unit, -t, t, y)["loss_inter"].item() > 1.0


# -- hinge --------------------------------------------------------------------------------

def test_hinge_matches_numpy(logits):
    s, _, y = logits
    terms = run(MulticlassHinge(), s, None, y)
    assert set(terms) == {"loss_hinge"}
    assert terms["loss_hinge"].item() == pytest.approx(np_hinge(s, y), rel=REL)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_hinge_kd_matches_numpy(logits, alpha):
    s, t, y = logits
    y_teacher = t.argmax(axis=1)
    assert (y_teacher != y).any()  # otherwise the two terms could not be told apart
    terms = run(HingeKD(alpha=alpha, temperature=None), s, t, y)  # hard teacher labels
    assert set(terms) == {"loss_hinge", "loss_kd"}
    assert terms["loss_hinge"].item() == pytest.approx((1 - alpha) * np_hinge(s, y), rel=REL, abs=1e-15)
    assert terms["loss_kd"].item() == pytest.approx(alpha * np_hinge(s, y_teacher), rel=REL, abs=1e-15)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_soft_hinge_kd_is_the_hinge_expected_under_the_teacher_soft_labels(logits, T):
    """Σ_j softmax(t/T)_j · max(0, 1 + max_{k≠j} s_k − s_j), written out sample by sample."""
    s, t, y = logits
    expected = 0.0
    for i in range(len(s)):
        z = t[i] / T
        p = np.exp(z - z.max())
        p /= p.sum()
        for j in range(s.shape[1]):
            rival = max(s[i, k] for k in range(s.shape[1]) if k != j)
            expected += p[j] * max(0.0, 1.0 + rival - s[i, j])
    expected /= len(s)
    terms = run(HingeKD(alpha=0.6, temperature=T), s, t, y)
    assert terms["loss_kd"].item() == pytest.approx(0.6 * expected, rel=REL)
    assert terms["loss_hinge"].item() == pytest.approx(0.4 * np_hinge(s, y), rel=REL)


def test_hinge_is_zero_once_every_margin_reaches_one():
    y = np.array([0, 2, 1])
    s = np.array([[3.0, 2.0, -1.0],    # margin exactly 1: on the boundary, still zero
                  [0.0, 1.0, 4.0],     # margin 3
                  [-5.0, 10.0, 8.5]])  # margin 1.5
    assert run(MulticlassHinge(), s, None, y)["loss_hinge"].item() == 0.0
    assert total_loss(run(HingeKD(alpha=0.5, temperature=None), s, s, y)).item() == 0.0  # teacher = labels
    s[0, 1] = 2.5  # margin 0.5 on the first sample: 0.5 / 3 on average
    assert run(MulticlassHinge(), s, None, y)["loss_hinge"].item() == pytest.approx(0.5 / 3, rel=REL)


# -- shared properties ---------------------------------------------------------------------

OBJECTIVES = [
    pytest.param(lambda: DKD(warmup_epochs=0), id="dkd"),
    pytest.param(lambda: DIST(temperature=4.0), id="dist"),
    pytest.param(lambda: HingeKD(alpha=0.5), id="hinge_kd"),
    pytest.param(MulticlassHinge, id="hinge"),
]


@pytest.mark.parametrize("make", OBJECTIVES)
def test_gradients_reach_the_student_and_never_the_teacher(logits, make):
    s, t, y = logits
    student = torch.tensor(s, requires_grad=True)
    teacher = torch.tensor(t, requires_grad=True)  # even a teacher output that carries a graph
    total_loss(make()(ModelOutputs(student), ModelOutputs(teacher), torch.tensor(y))).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert torch.isfinite(student.grad).all()
    assert teacher.grad is None


@pytest.mark.parametrize("make", OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_terms_and_gradients_are_finite_for_extreme_logits(make, dtype):
    rng = np.random.default_rng(2)
    s = torch.tensor(rng.normal(size=(8, 5)) * 300, dtype=dtype, requires_grad=True)
    t = torch.tensor(rng.normal(size=(8, 5)) * 3000, dtype=dtype)  # a one-hot-confident teacher
    y = torch.tensor(rng.integers(0, 5, size=8))
    terms = make()(ModelOutputs(s), ModelOutputs(t), y)
    assert all(torch.isfinite(v) for v in terms.values()), terms
    total_loss(terms).backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("cls,kwargs,key", [
    (DKD, {"temperature": 0.0}, "kd.temperature"),
    (DKD, {"alpha": -1.0}, "kd.alpha"),
    (DKD, {"beta": -0.5}, "kd.beta"),
    (DKD, {"ce_weight": -1.0}, "kd.ce_weight"),
    (DKD, {"warmup_epochs": -1}, "kd.warmup_epochs"),
    (DIST, {"temperature": -1.0}, "kd.temperature"),
    (DIST, {"beta": -1.0}, "kd.beta"),
    (DIST, {"gamma": -1.0}, "kd.gamma"),
    (DIST, {"ce_weight": -0.1}, "kd.ce_weight"),
    (HingeKD, {"alpha": 1.5}, "kd.alpha"),
    (HingeKD, {"alpha": -0.1}, "kd.alpha"),
])
def test_bad_arguments_name_the_config_key(cls, kwargs, key):
    value = next(iter(kwargs.values()))
    with pytest.raises(ConfigError, match=rf"{key} must .*got {value}"):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [DKD, DIST, HingeKD])
def test_objectives_that_need_a_teacher_say_so(logits, cls):
    s, _, y = logits
    assert cls.needs_teacher
    with pytest.raises(ValueError, match="teacher"):
        run(cls(), s, None, y)


# -- configs -----------------------------------------------------------------------------

@pytest.mark.parametrize("option,cls,name,label,knobs", [
    ("dkd", DKD, "dkd", "dkd-beta8-T4", {"kd.beta": 8.0, "kd.temperature": 4.0}),
    ("dist", DIST, "dist", "dist-beta2-gamma2-T1", {"kd.beta": 2.0, "kd.gamma": 2.0, "kd.temperature": 1.0}),
    ("svm", HingeKD, "hinge_kd", "hinge_kd-a0.5-T4", {"kd.alpha": 0.5, "kd.temperature": 4.0}),
    ("svm_none", MulticlassHinge, "hinge", "hinge", {}),
])
def test_kd_configs_compose_and_run(tmp_path, logits, option, cls, name, label, knobs):
    objective = instantiate(objective_node(compose_config([f"kd={option}"], tmp_path)))
    assert type(objective) is cls and objective.name == name
    assert objective.describe() == label and objective.knob_values() == knobs
    s, t, y = logits
    terms = run(objective, s, t if objective.needs_teacher else None, y)
    assert torch.isfinite(total_loss(terms))


def test_dist_config_weights_dist_twice_against_ce_as_the_official_code(tmp_path, logits):
    """The official code trains with CE · 1 + DIST(beta=1, gamma=1) · 2: the YAML and the class defaults
    must both give that, checked against the numpy reference with the official weights."""
    s, t, y = logits
    for objective in (instantiate(objective_node(compose_config(["kd=dist"], tmp_path))), DIST()):
        terms = run(objective, s, t, y)
        ce, inter, intra = np_dist(s, t, y, ce_weight=1.0, beta=1.0, gamma=1.0, tau=1.0)
        assert total_loss(terms).item() == pytest.approx(ce + 2.0 * (inter + intra), rel=REL)


def test_dkd_config_holds_the_papers_cifar_settings(tmp_path):
    objective = instantiate(objective_node(compose_config(["kd=dkd"], tmp_path)))
    assert (objective.ce_weight, objective.alpha, objective.beta, objective.temperature,
            objective.warmup_epochs, objective.epoch) == (1.0, 1.0, 8.0, 4.0, 20, 0)
    assert not MulticlassHinge.needs_teacher and HingeKD.needs_teacher


def test_a_bad_kd_override_is_reported_with_its_key(tmp_path):
    with pytest.raises(ConfigError, match="kd.beta must be >= 0, got -1"):
        instantiate(objective_node(compose_config(["kd=dkd", "kd.beta=-1"], tmp_path)))


# -- linear student ----------------------------------------------------------------------

@pytest.mark.parametrize("data", ["mnist1d", "digits"])
def test_linear_student_config_builds_one_linear_layer(tmp_path, data):
    cfg = compose_config(["student=linear", f"data={data}"], tmp_path)
    model = instantiate(cfg.student)
    in_shape, C = list(cfg.data.input_shape), cfg.data.num_classes
    assert isinstance(model, Linear)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1
    assert sum(p.numel() for p in model.parameters()) == math.prod(in_shape) * C + C
    hooks = FeatureHooks(model, ["pre_logits"])  # the stage name taps resolve against
    out = model(torch.zeros(3, *in_shape))
    assert out.shape == (3, C)
    assert hooks.pop()["pre_logits"].shape == (3, math.prod(in_shape))
    hooks.remove()


def test_linear_student_is_affine():
    model = Linear(in_shape=[2, 3], num_classes=4).double()
    a, b = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    zero = model(torch.zeros(1, 2, 3, dtype=torch.float64))
    torch.testing.assert_close(model(a + b) - zero, (model(a) - zero) + (model(b) - zero))


@pytest.mark.parametrize("kwargs,match", [
    ({"in_shape": [40], "num_classes": 1}, "num_classes must be >= 2, got 1"),
    ({"in_shape": [0, 8], "num_classes": 10}, r"in_shape must be .*got \[0, 8\]"),
    ({"in_shape": [], "num_classes": 10}, r"in_shape must be .*got \[\]"),
])
def test_linear_student_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Linear(**kwargs)
