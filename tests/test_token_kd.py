"""Token-level KD (forward KL, reverse KL, generalized JSD) against a reference written here."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from kdexp.errors import ConfigError
from kdexp.objectives import HintonKD
from kdexp.objectives.base import UNLABELLED, ModelOutputs
from kdexp.objectives.token_kd import TokenKD, token_divergence

B, L, V, T = 3, 5, 7, 2.0


def seeded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(B, L, V, generator=g) * 2, torch.randn(B, L, V, generator=g) * 2
    targets = torch.randint(0, V, (B, L), generator=g)
    targets[0, 3:] = UNLABELLED  # right padding
    targets[2, :2] = UNLABELLED  # a prompt
    return s, t, targets


def reference(s: torch.Tensor, t: torch.Tensor, targets: torch.Tensor, divergence: str, beta: float = 0.5) -> float:
    """Position by position with torch.distributions, in probability space."""
    values = []
    for b in range(B):
        for i in range(L):
            if targets[b, i] == UNLABELLED:
                continue
            p, q = (t[b, i] / T).softmax(-1), (s[b, i] / T).softmax(-1)
            if divergence == "forward_kl":
                values.append(kl_divergence(Categorical(p), Categorical(q)))
            elif divergence == "reverse_kl":
                values.append(kl_divergence(Categorical(q), Categorical(p)))
            else:
                m = Categorical(beta * p + (1 - beta) * q)
                values.append(beta * kl_divergence(Categorical(p), m) + (1 - beta) * kl_divergence(Categorical(q), m))
    return float(torch.stack(values).mean())


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                              ("jsd", 0.9)])
def test_each_divergence_equals_the_reference_on_padded_sequences(divergence, beta):
    s, t, targets = seeded()
    got = token_divergence(s, t, targets != UNLABELLED, T, divergence, beta)
    assert got.item() == pytest.approx(reference(s, t, targets, divergence, beta), rel=1e-5)


def test_jsd_limits_are_forward_and_reverse_kl_as_gkd_defines_them():
    s, t, targets = seeded()
    valid = targets != UNLABELLED
    assert token_divergence(s, t, valid, T, "jsd", 0.0) == token_divergence(s, t, valid, T, "forward_kl")
    assert token_divergence(s, t, valid, T, "jsd", 1.0) == token_divergence(s, t, valid, T, "reverse_kl")
    near = [token_divergence(s, t, valid, T, "jsd", b).item() for b in (1e-4, 1 - 1e-4)]
    assert near[0] < 1e-3 and near[1] < 1e-3  # the mixture's own limits: both terms vanish


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_padding_changes_nothing_and_all_padding_gives_zero_not_nan(divergence):
    s, t, targets = seeded()
    objective = TokenKD(temperature=T, alpha=0.5, divergence=divergence)
    before = objective(ModelOutputs(s), ModelOutputs(t), targets)
    noisy_s, noisy_t = s.clone(), t.clone()
    pad = targets == UNLABELLED
    noisy_s[pad] += 50.0 * torch.randn_like(noisy_s[pad])
    noisy_t[pad] -= 30.0
    after = objective(ModelOutputs(noisy_s), ModelOutputs(noisy_t), targets)
    for name in before:
        assert after[name].item() == pytest.approx(before[name].item(), rel=1e-6)
    student = s.clone().requires_grad_()
    terms = objective(ModelOutputs(student), ModelOutputs(t), torch.full((B, L), UNLABELLED))
    total = sum(terms.values())
    total.backward()
    assert total.item() == 0.0 and torch.isfinite(student.grad).all()


def test_cross_entropy_is_averaged_over_valid_tokens_and_weighted_by_alpha():
    s, t, targets = seeded()
    terms = TokenKD(temperature=T, alpha=0.25)(ModelOutputs(s), ModelOutputs(t), targets)
    valid = targets != UNLABELLED
    ce = torch.nn.functional.cross_entropy(s[valid], targets[valid])
    assert terms["loss_ce"].item() == pytest.approx(0.75 * ce.item(), rel=1e-6)
    assert terms["loss_kd"].item() == pytest.approx(0.25 * T**2 * reference(s, t, targets, "forward_kl"), rel=1e-5)


def test_on_class_logits_forward_kl_is_hinton_kd():
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    token = TokenKD(temperature=4.0, alpha=0.9)(ModelOutputs(s), ModelOutputs(t), y)
    hinton = HintonKD(temperature=4.0, alpha=0.9)(ModelOutputs(s), ModelOutputs(t), y)
    for name in ("loss_ce", "loss_kd"):
        assert token[name].item() == pytest.approx(hinton[name].item(), rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [({"divergence": "kl"}, "kd.divergence"), ({"beta": 1.5}, "kd.beta"),
                                             ({"temperature": 0}, "kd.temperature"), ({"alpha": -1}, "kd.alpha")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TokenKD(**kwargs)


def test_hidden_state_kd_projects_and_sends_gradients_to_student_and_projection_only():
    from kdexp.objectives.hidden_state import HiddenStateKD, hidden_distance

    s, t, targets = seeded()
    g = torch.Generator().manual_seed(3)
    h_s = torch.randn(B, L, 6, generator=g).requires_grad_()
    h_t = torch.randn(B, L, 10, generator=g).requires_grad_()
    objective = HiddenStateKD(student_layers=["blocks.1"], teacher_layers=["blocks.3"], gamma=2.0, distance="mse")
    student, teacher = ModelOutputs(s, {"blocks.1": h_s}), ModelOutputs(t, {"blocks.3": h_t})
    objective.bind(student, teacher)
    projection = objective.projections[0]
    assert isinstance(projection, torch.nn.Linear) and projection.weight.shape == (10, 6)
    terms = objective(student, teacher, targets)
    valid = targets != UNLABELLED
    expected = ((projection(h_s) - h_t) ** 2).mean(-1)[valid].mean()
    assert terms["loss_hidden"].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    terms["loss_hidden"].backward()
    assert h_s.grad is not None and projection.weight.grad is not None and h_t.grad is None
    assert h_s.grad[~valid].abs().sum() == 0  # padding positions get no gradient
    same = torch.randn(B, L, 4, generator=g)
    assert hidden_distance(same, same * 3.0, valid, "cosine").item() == pytest.approx(0.0, abs=1e-6)
