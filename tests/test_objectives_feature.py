"""Logit-matching and feature KD objectives against numpy written from each paper's formula.

Every reference below is computed from the published formula with explicit loops,
without calling the objectives' own helpers; inputs are seeded, float64, and the
tolerance is rel 1e-10 (they agree to ~1e-15). Values and gradients against the reference
codes are compared in test_objectives_reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config
from torch import nn

from kdexp.core.config import instantiate, objective_node
from kdexp.core.errors import ConfigError
from kdexp.models import FeatureHooks
from kdexp.objectives import ModelOutputs, total_loss
from kdexp.objectives.attention import AttentionTransfer
from kdexp.objectives.fitnets import FitNets
from kdexp.objectives.mse_logits import MSELogitsKD
from kdexp.objectives.pkt import PKT
from kdexp.objectives.rkd import RKD
from kdexp.objectives.similarity import SimilarityPreserving

REL = 1e-10
B, C = 8, 5  # batch and classes; RKD's angle reference loops over B³ triplets


# -- numpy references, one per paper ------------------------------------------------------
def np_ce(s: np.ndarray, y: np.ndarray) -> float:
    total = 0.0
    for b in range(len(y)):
        z = s[b] - s[b].max()
        total += -(z[y[b]] - np.log(np.exp(z).sum()))
    return total / len(y)


def np_logit_mse(s: np.ndarray, t: np.ndarray) -> float:
    """Ba & Caruana: 1/(2B) Σ_b ‖s_b − t_b‖²."""
    return sum(0.5 * np.sum((s[b] - t[b]) ** 2) for b in range(len(s))) / len(s)


def np_block_mean(a: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Average pooling of the trailing dims of ``a`` to ``size`` (sizes divide evenly here)."""
    out = a
    for axis, target in zip(range(a.ndim - len(size), a.ndim), size):
        k = out.shape[axis] // target
        assert k * target == out.shape[axis]
        shape = out.shape[:axis] + (target, k) + out.shape[axis + 1:]
        out = out.reshape(shape).mean(axis=axis + 1)
    return out


def np_fitnets_hint(s: np.ndarray, t: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
    """mean over batch and elements of (W·v_g + b − u_h)², W applied per position (1×1 conv) or to the flat vector."""
    if s.ndim == 2:
        diffs = [weight @ s[b] + bias - t[b] for b in range(len(s))]
    else:
        s = np_block_mean(s, t.shape[2:])
        diffs = []
        for b in range(len(s)):
            for pos in np.ndindex(*t.shape[2:]):
                diffs.append(weight @ s[(b, slice(None)) + pos] + bias - t[(b, slice(None)) + pos])
    return float(np.mean(np.concatenate(diffs) ** 2))


def np_attention(s: np.ndarray, t: np.ndarray, p: float) -> float:
    """Zagoruyko & Komodakis: mean over batch and positions of (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)², Q = Σ_c |A_c|^p,
    the at_loss of the authors' cifar.py (szagoruyko/attention-transfer), which the run weights by beta."""
    q_s = np.sum(np.abs(s) ** p, axis=1)  # the channel sum of the paper; normalisation removes C
    q_t = np.sum(np.abs(t) ** p, axis=1)
    size = tuple(min(a, b) for a, b in zip(q_s.shape[1:], q_t.shape[1:]))
    q_s, q_t = np_block_mean(q_s, size), np_block_mean(q_t, size)
    total, count = 0.0, 0
    for b in range(len(s)):
        u = q_s[b].ravel() / np.linalg.norm(q_s[b].ravel())
        v = q_t[b].ravel() / np.linalg.norm(q_t[b].ravel())
        for k in range(len(u)):
            total += (u[k] - v[k]) ** 2
            count += 1
    return total / count


def np_similarity(s: np.ndarray, t: np.ndarray) -> float:
    """Tung & Mori: 1/b² ‖G_s − G_t‖_F², G = row-normalised Q Qᵀ."""
    def gram(f):
        q = f.reshape(len(f), -1)
        g = np.array([[q[i] @ q[j] for j in range(len(q))] for i in range(len(q))])
        return np.array([row / np.linalg.norm(row) for row in g])

    b = len(s)
    return float(np.sum((gram(s) - gram(t)) ** 2) / b**2)


def np_pkt(s: np.ndarray, t: np.ndarray) -> float:
    """Passalis & Tefas: Σ_i Σ_{j≠i} p_{j|i} log(p_{j|i}/q_{j|i}), kernel (cos + 1)/2."""
    def conditional(f):
        x = f.reshape(len(f), -1)
        n = len(x)
        k = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    k[i, j] = 0.5 * (x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])) + 1.0)
        return k / k.sum(axis=1, keepdims=True)

    p, q = conditional(t), conditional(s)
    total = 0.0
    for i in range(len(p)):
        for j in range(len(p)):
            if i != j:
                total += p[i, j] * np.log(p[i, j] / q[i, j])
    return total


def np_huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def np_rkd(s: np.ndarray, t: np.ndarray) -> tuple[float, float, float, float]:
    """Park et al.: Huber on distance potentials (mean over B² pairs) and angle potentials (mean over B³
    triplets); also the largest |potential difference| of each, to see which Huber branch was used."""
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    n = len(s)

    def potentials_d(x):
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
        mu = np.mean([d[i, j] for i in range(n) for j in range(n) if i != j])
        return d / mu

    def potential_a(x, i, j, k):  # angle at x_j
        if i == j or k == j:
            return 0.0
        e_ij = (x[i] - x[j]) / np.linalg.norm(x[i] - x[j])
        e_kj = (x[k] - x[j]) / np.linalg.norm(x[k] - x[j])
        return float(e_ij @ e_kj)

    ds, dt = potentials_d(s), potentials_d(t)
    d_diffs = [ds[i, j] - dt[i, j] for i in range(n) for j in range(n)]
    a_diffs = [potential_a(s, i, j, k) - potential_a(t, i, j, k) for i in range(n) for j in range(n) for k in range(n)]
    return (float(np.mean([np_huber(d) for d in d_diffs])), float(np.mean([np_huber(a) for a in a_diffs])),
            float(np.max(np.abs(d_diffs))), float(np.max(np.abs(a_diffs))))


# -- inputs ----------------------------------------------------------------------------
@pytest.fixture
def rng():
    return np.random.default_rng(0)


def outputs(logits: np.ndarray, features: dict[str, np.ndarray], grad: bool = False) -> ModelOutputs:
    """Float64 leaves, requiring grad when ``grad`` (to check where gradients go)."""
    as_leaf = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    return ModelOutputs(as_leaf(logits), {k: as_leaf(v) for k, v in features.items()})


def labels(rng) -> torch.Tensor:
    return torch.tensor(rng.integers(0, C, size=B))


def set_identity(regressor: nn.Module) -> None:
    layer = regressor[-1]
    with torch.no_grad():
        layer.weight.zero_()
        n = min(layer.weight.shape[0], layer.weight.shape[1])
        layer.weight.view(layer.weight.shape[0], layer.weight.shape[1], -1)[range(n), range(n), 0] = 1.0
        layer.bias.zero_()


# -- values match the papers' formulas --------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_mse_logits_matches_numpy(rng, alpha):
    s, t, y = rng.normal(size=(B, C)) * 3, rng.normal(size=(B, C)) * 5, labels(rng)
    terms = MSELogitsKD(alpha=alpha)(outputs(s, {}), outputs(t, {}), y)
    assert terms["loss_ce"].item() == pytest.approx((1 - alpha) * np_ce(s, y.numpy()), rel=REL, abs=1e-12)
    assert terms["loss_kd"].item() == pytest.approx(alpha * np_logit_mse(s, t), rel=REL, abs=1e-12)


@pytest.mark.parametrize("s_shape,t_shape", [
    ((B, 16), (B, 32)),              # flat -> flat: a linear map
    ((B, 4, 10), (B, 6, 10)),        # 1-D maps: 1x1 conv
    ((B, 3, 8, 8), (B, 5, 4, 4)),    # 2-D maps, larger student: pooled to 4x4, then 1x1 conv
    ((B, 4, 10), (B, 12)),           # map -> flat: flattened, then linear
])
def test_fitnets_matches_numpy(rng, s_shape, t_shape):
    s_feat, t_feat = rng.normal(size=s_shape), rng.normal(size=t_shape)
    s_logits, t_logits, y = rng.normal(size=(B, C)), rng.normal(size=(B, C)), labels(rng)
    objective = FitNets(beta=7.0, student_layers=["a"], teacher_layers=["b"])
    student, teacher = outputs(s_logits, {"a": s_feat}), outputs(t_logits, {"b": t_feat})
    objective.bind(student, teacher)
    layer = objective.regressors[0][-1]
    weight = layer.weight.detach().numpy().reshape(layer.weight.shape[0], -1)
    bias = layer.bias.detach().numpy()
    s_ref = s_feat.reshape(B, -1) if len(s_shape) != len(t_shape) else s_feat
    t_ref = t_feat.reshape(B, -1) if len(s_shape) != len(t_shape) else t_feat
    terms = objective(student, teacher, y)
    assert terms["loss_ce"].item() == pytest.approx(np_ce(s_logits, y.numpy()), rel=REL)
    assert terms["loss_kd"].item() == pytest.approx(7.0 * np_fitnets_hint(s_ref, t_ref, weight, bias), rel=REL)


@pytest.mark.parametrize("s_shape,t_shape,p", [
    ((B, 4, 10), (B, 6, 10), 2.0),
    ((B, 3, 6, 6), (B, 5, 6, 6), 2.0),
    ((B, 3, 8, 8), (B, 5, 4, 4), 2.0),   # teacher map smaller: the student's attention is pooled
    ((B, 3, 4, 4), (B, 5, 8, 8), 4.0),   # student map smaller: the teacher's attention is pooled
    ((B, 3, 6, 6), (B, 5, 6, 6), 1.0),
])
def test_attention_matches_numpy(rng, s_shape, t_shape, p):
    s1, t1 = rng.normal(size=s_shape), rng.normal(size=t_shape)
    s2, t2 = rng.normal(size=s_shape), rng.normal(size=t_shape)
    s_logits, y = rng.normal(size=(B, C)), labels(rng)
    objective = AttentionTransfer(beta=1000.0, p=p, student_layers=["x", "y"], teacher_layers=["u", "v"])
    terms = objective(outputs(s_logits, {"x": s1, "y": s2}), outputs(s_logits, {"u": t1, "v": t2}), y)
    # The authors' cifar.py: loss + opt.beta * sum(at_loss over tap pairs), --beta 1e+3 (no 1/2).
    expected = 1000.0 * (np_attention(s1, t1, p) + np_attention(s2, t2, p))
    assert terms["loss_kd"].item() == pytest.approx(expected, rel=REL)
    assert terms["loss_ce"].item() == pytest.approx(np_ce(s_logits, y.numpy()), rel=REL)


@pytest.mark.parametrize("s_shape,t_shape", [((B, 16), (B, 32)), ((B, 3, 4, 4), (B, 7)), ((B, 4, 10), (B, 6, 5))])
def test_similarity_matches_numpy(rng, s_shape, t_shape):
    # Post-ReLU-like features, as the paper's activations are.
    s_feat, t_feat = np.maximum(rng.normal(size=s_shape), 0), np.maximum(rng.normal(size=t_shape), 0)
    s_logits, y = rng.normal(size=(B, C)), labels(rng)
    terms = SimilarityPreserving(gamma=3000.0, student_layers=["a"], teacher_layers=["b"])(
        outputs(s_logits, {"a": s_feat}), outputs(s_logits, {"b": t_feat}), y)
    assert terms["loss_kd"].item() == pytest.approx(3000.0 * np_similarity(s_feat, t_feat), rel=REL)
    assert terms["loss_ce"].item() == pytest.approx(np_ce(s_logits, y.numpy()), rel=REL)


@pytest.mark.parametrize("s_shape,t_shape", [((B, 16), (B, 32)), ((B, 3, 4, 4), (B, 7))])
def test_pkt_matches_numpy(rng, s_shape, t_shape):
    s_feat, t_feat = rng.normal(size=s_shape), rng.normal(size=t_shape)
    s_logits, y = rng.normal(size=(B, C)), labels(rng)
    terms = PKT(beta=2.5, student_layers=["a"], teacher_layers=["b"])(
        outputs(s_logits, {"a": s_feat}), outputs(s_logits, {"b": t_feat}), y)
    assert terms["loss_kd"].item() == pytest.approx(2.5 * np_pkt(s_feat, t_feat), rel=REL)
    assert terms["loss_ce"].item() == pytest.approx(np_ce(s_logits, y.numpy()), rel=REL)


@pytest.mark.parametrize("outlier", [False, True])
def test_rkd_matches_numpy(rng, outlier):
    s_feat = rng.normal(size=(B, 2))  # few dimensions: angles spread widely, differences > 1 occur
    if outlier:  # one far student sample: most normalised student distances collapse towards 0
        s_feat[0] += 50.0
    t_feat = rng.normal(size=(B, 3, 1, 1)) + 5.0  # off-centre, flattened
    s_logits, y = rng.normal(size=(B, C)), labels(rng)
    terms = RKD(distance_weight=25.0, angle_weight=50.0, student_layers=["a"], teacher_layers=["b"])(
        outputs(s_logits, {"a": s_feat}), outputs(s_logits, {"b": t_feat}), y)
    distance, angle, max_d, max_a = np_rkd(s_feat, t_feat)
    assert max_d > 1.0 and max_a > 1.0  # Huber's linear branch is exercised (small differences always are)
    assert terms["loss_kd_distance"].item() == pytest.approx(25.0 * distance, rel=REL)
    assert terms["loss_kd_angle"].item() == pytest.approx(50.0 * angle, rel=REL)
    assert terms["loss_ce"].item() == pytest.approx(np_ce(s_logits, y.numpy()), rel=REL)


# -- gradients, finiteness, and zero at agreement ------------------------------------------
def feature_case(name: str, rng) -> tuple[nn.Module, dict, dict]:
    """An objective and numpy (logits, features) for student and teacher, feature shapes it accepts."""
    if name == "mse_logits":
        return MSELogitsKD(alpha=0.5), {}, {}
    if name == "fitnets":
        return FitNets(beta=100.0, student_layers=["a"], teacher_layers=["b"]), \
            {"a": rng.normal(size=(B, 4, 6, 6))}, {"b": rng.normal(size=(B, 4, 6, 6))}
    if name == "attention":
        return AttentionTransfer(student_layers=["a"], teacher_layers=["b"]), \
            {"a": rng.normal(size=(B, 4, 6, 6))}, {"b": rng.normal(size=(B, 8, 6, 6))}
    if name == "similarity":
        return SimilarityPreserving(student_layers=["a"], teacher_layers=["b"]), \
            {"a": rng.normal(size=(B, 16))}, {"b": rng.normal(size=(B, 32))}
    if name == "pkt":
        return PKT(student_layers=["a"], teacher_layers=["b"]), \
            {"a": rng.normal(size=(B, 16))}, {"b": rng.normal(size=(B, 32))}
    if name == "rkd":
        return RKD(student_layers=["a"], teacher_layers=["b"]), \
            {"a": rng.normal(size=(B, 16))}, {"b": rng.normal(size=(B, 32))}
    raise AssertionError(name)


OBJECTIVES = ["mse_logits", "fitnets", "attention", "similarity", "pkt", "rkd"]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_gradients_reach_the_student_and_adapters_never_the_teacher(rng, name):
    objective, s_feats, t_feats = feature_case(name, rng)
    student = outputs(rng.normal(size=(B, C)), s_feats, grad=True)
    teacher = outputs(rng.normal(size=(B, C)), t_feats, grad=True)  # leaves that *could* receive grads
    objective.double()
    objective.bind(student, teacher)
    terms = objective(student, teacher, labels(rng))
    assert all(torch.isfinite(term) for term in terms.values()), terms
    kd_terms = [v for k, v in terms.items() if k != "loss_ce"]
    assert all(term.item() > 0 for term in kd_terms), terms
    total_loss(terms).backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
    for path, feature in student.features.items():
        assert feature.grad is not None and feature.grad.abs().sum() > 0, path
        assert torch.isfinite(feature.grad).all()
    assert teacher.logits.grad is None
    assert all(feature.grad is None for feature in teacher.features.values())
    for pname, param in objective.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["mse_logits", "attention", "similarity", "pkt", "rkd"])
def test_kd_terms_vanish_when_student_equals_teacher(rng, name):
    objective, s_feats, _ = feature_case(name, rng)
    logits = rng.normal(size=(B, C))
    t_feats = {"b": s_feats["a"]} if s_feats else {}
    terms = objective(outputs(logits, s_feats), outputs(logits, t_feats), labels(rng))
    for key, term in terms.items():
        if key != "loss_ce":
            assert abs(term.item()) < 1e-10, (key, term)


@pytest.mark.parametrize("shape", [(B, 16), (B, 4, 10), (B, 3, 6, 6)])
def test_fitnets_vanishes_with_an_identity_regressor(rng, shape):
    feature = rng.normal(size=shape)
    logits = rng.normal(size=(B, C))
    objective = FitNets(student_layers=["a"], teacher_layers=["b"])
    student, teacher = outputs(logits, {"a": feature}), outputs(logits, {"b": feature.copy()})
    objective.bind(student, teacher)
    objective.double()
    set_identity(objective.regressors[0])
    assert objective(student, teacher, labels(rng))["loss_kd"].item() == 0.0


def test_relational_terms_are_invariant_to_the_teacher_scale(rng):
    # SP, PKT and RKD compare relations, so scaling the teacher's features changes nothing.
    s, t = rng.normal(size=(B, 16)), rng.normal(size=(B, 32))
    logits, y = rng.normal(size=(B, C)), labels(rng)
    for objective in (SimilarityPreserving(student_layers=["a"], teacher_layers=["b"]),
                      PKT(student_layers=["a"], teacher_layers=["b"]),
                      RKD(student_layers=["a"], teacher_layers=["b"])):
        base = objective(outputs(logits, {"a": s}), outputs(logits, {"b": t}), y)
        scaled = objective(outputs(logits, {"a": s}), outputs(logits, {"b": 7.0 * t}), y)
        for key in base:
            assert scaled[key].item() == pytest.approx(base[key].item(), rel=1e-9), (objective.name, key)


def test_relational_objectives_survive_tiny_and_degenerate_batches():
    # A last batch of one sample, or repeated samples, must not produce NaN.
    for n in (1, 2):
        feats = torch.ones(n, 6, dtype=torch.float64, requires_grad=True)
        logits = torch.zeros(n, C, dtype=torch.float64, requires_grad=True)
        y = torch.zeros(n, dtype=torch.long)
        for objective in (SimilarityPreserving(student_layers=["a"], teacher_layers=["b"]),
                          PKT(student_layers=["a"], teacher_layers=["b"]),
                          RKD(student_layers=["a"], teacher_layers=["b"])):
            terms = objective(ModelOutputs(logits, {"a": feats}),
                              ModelOutputs(logits.detach(), {"b": feats.detach() * 2}), y)
            total = total_loss(terms)
            assert torch.isfinite(total), (objective.name, n, terms)
            total.backward()
            assert torch.isfinite(feats.grad).all(), (objective.name, n)
            feats.grad = None


# -- bind sizes the FitNets regressor ------------------------------------------------------
def test_fitnets_bind_sizes_the_regressor_from_probe_features(rng):
    objective = FitNets(student_layers=["stage2", "pre_logits"], teacher_layers=["stage2", "stage3"])
    assert list(objective.parameters()) == []
    student = outputs(rng.normal(size=(B, C)), {"stage2": rng.normal(size=(B, 16)),
                                                "pre_logits": rng.normal(size=(B, 8, 6, 6))})
    teacher = outputs(rng.normal(size=(B, C)), {"stage2": rng.normal(size=(B, 32)),
                                                "stage3": rng.normal(size=(B, 12, 3, 3))})
    objective.bind(student, teacher)
    linear, conv = objective.regressors[0][-1], objective.regressors[1][-1]
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (16, 32)
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 12, (1, 1))
    assert isinstance(objective.regressors[1][0], nn.AdaptiveAvgPool2d)
    assert linear.weight.dtype == torch.float64  # follows the probe's precision
    params = {id(p) for p in objective.parameters()}
    assert {id(linear.weight), id(linear.bias), id(conv.weight), id(conv.bias)} <= params
    assert any(k.startswith("regressors.0.") for k in objective.state_dict())  # in every checkpoint
    # A second bind with the same shapes (a resumed run) keeps the trained regressors.
    objective.bind(student, teacher)
    assert objective.regressors[0][-1] is linear


def test_fitnets_forward_before_bind_is_an_error(rng):
    objective = FitNets(student_layers=["a"], teacher_layers=["b"])
    with pytest.raises(RuntimeError, match="bind"):
        objective(outputs(rng.normal(size=(B, C)), {"a": rng.normal(size=(B, 4))}),
                  outputs(rng.normal(size=(B, C)), {"b": rng.normal(size=(B, 4))}), labels(rng))


# -- bad arguments --------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,match", [
    (MSELogitsKD, {"alpha": 1.5}, r"kd.alpha must lie in \[0, 1\], got 1.5"),
    (MSELogitsKD, {"alpha": -0.1}, r"kd.alpha must lie in \[0, 1\], got -0.1"),
    (FitNets, {"beta": -1}, "kd.beta must be >= 0, got -1"),
    (AttentionTransfer, {"beta": -1}, "kd.beta must be >= 0, got -1"),
    (AttentionTransfer, {"p": 0.5}, "kd.p must be >= 1, got 0.5"),
    (SimilarityPreserving, {"gamma": -3}, "kd.gamma must be >= 0, got -3"),
    (PKT, {"beta": -1}, "kd.beta must be >= 0, got -1"),
    (RKD, {"distance_weight": -1}, "kd.distance_weight must be >= 0, got -1"),
    (RKD, {"angle_weight": -2}, "kd.angle_weight must be >= 0, got -2"),
    (FitNets, {"student_layers": []}, r"kd.student_layers must name at least one student layer, got \[\]"),
    (PKT, {"student_layers": ["a", "b"], "teacher_layers": ["c"]}, "kd.teacher_layers must pair one teacher layer"),
    (RKD, {"student_layers": ["a"], "teacher_layers": []}, "kd.teacher_layers must pair one teacher layer"),
])
def test_bad_arguments_are_rejected(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


def test_a_single_layer_string_is_one_tap():
    objective = SimilarityPreserving(student_layers="stage2")
    assert objective.student_features == ("stage2",) and objective.teacher_features == ("stage2",)


def test_attention_rejects_flat_features_naming_the_tap(rng):
    objective = AttentionTransfer(student_layers=["pre_logits"], teacher_layers=["stage2"])
    student = outputs(rng.normal(size=(B, C)), {"pre_logits": rng.normal(size=(B, 16))})
    teacher = outputs(rng.normal(size=(B, C)), {"stage2": rng.normal(size=(B, 4, 10))})
    with pytest.raises(ConfigError, match=r"kd=attention needs spatial feature maps.*student tap 'pre_logits'"):
        objective.bind(student, teacher)
    with pytest.raises(ConfigError, match="student tap 'pre_logits'"):
        objective(student, teacher, labels(rng))


def test_fitnets_rejects_a_student_map_smaller_than_the_teacher(rng):
    objective = FitNets(student_layers=["s3"], teacher_layers=["t1"])
    student = outputs(rng.normal(size=(B, C)), {"s3": rng.normal(size=(B, 4, 2, 2))})
    teacher = outputs(rng.normal(size=(B, C)), {"t1": rng.normal(size=(B, 4, 8, 8))})
    with pytest.raises(ConfigError, match=r"kd=fitnets: student tap 's3' has spatial size \[2, 2\], smaller"):
        objective.bind(student, teacher)


# -- configs compose, instantiate, and run one step on the zoo models -------------------------
YAMLS = {
    "mse_logits": (MSELogitsKD, {"kd.alpha": 1.0}),
    "fitnets": (FitNets, {"kd.beta": 100.0}),
    "attention": (AttentionTransfer, {"kd.beta": 1000.0}),
    "similarity": (SimilarityPreserving, {"kd.gamma": 3000.0}),
    "pkt": (PKT, {"kd.beta": 1.0}),
    "rkd": (RKD, {"kd.distance_weight": 25.0, "kd.angle_weight": 50.0}),
}


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_yaml_composes_and_one_step_runs_on_the_zoo(tmp_path, name):
    cls, knobs = YAMLS[name]
    # Attention needs feature maps, so its student is the CNN; the others use the default MLP student.
    overrides = [f"kd={name}"] + (["student=cnn1d"] if name == "attention" else [])
    cfg = compose_config(overrides, tmp_path)
    objective = instantiate(objective_node(cfg))
    assert type(objective) is cls
    assert objective.knob_values() == knobs
    assert objective.identity()["name"] == objective.name

    torch.manual_seed(0)
    student_model, teacher_model = instantiate(cfg.student), instantiate(cfg.teacher.model).eval()
    s_hooks = FeatureHooks(student_model, objective.student_features)
    t_hooks = FeatureHooks(teacher_model, objective.teacher_features)
    x = torch.randn(16, *cfg.data.input_shape)
    y = torch.randint(0, cfg.data.num_classes, (16,))
    with torch.no_grad():
        objective.bind(ModelOutputs(student_model(x), s_hooks.pop()), ModelOutputs(teacher_model(x), t_hooks.pop()))
        teacher = ModelOutputs(teacher_model(x), t_hooks.pop())
    terms = objective(ModelOutputs(student_model(x), s_hooks.pop()), teacher, y)
    total_loss(terms).backward()
    assert all(torch.isfinite(v) for v in terms.values()), terms
    assert all(p.grad is not None for p in student_model.parameters())
    assert all(p.grad is not None for p in objective.parameters())


def test_attention_with_the_default_mlp_student_says_what_to_tap(tmp_path):
    # depth=3 so the MLP has stage1..stage3 to tap, all flat (B, width).
    cfg = compose_config(["kd=attention", "student.depth=3"], tmp_path)
    objective = instantiate(objective_node(cfg))
    student_model, teacher_model = instantiate(cfg.student), instantiate(cfg.teacher.model)
    s_hooks = FeatureHooks(student_model, objective.student_features)
    t_hooks = FeatureHooks(teacher_model, objective.teacher_features)
    x = torch.randn(4, *cfg.data.input_shape)
    with torch.no_grad(), pytest.raises(ConfigError, match="student tap 'stage1' gives shape"):
        objective.bind(ModelOutputs(student_model(x), s_hooks.pop()), ModelOutputs(teacher_model(x), t_hooks.pop()))
