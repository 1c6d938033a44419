"""Token-level KD (forward KL, reverse KL, generalized JSD) against a reference written here."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from kdexp.core.errors import ConfigError
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


def test_jsd_at_and_near_the_ends_as_trl_defines_it():
    """β = 0 is forward KL and β = 1 reverse KL (TRL ≥ 0.16's end cases); just inside the ends the mixture
    formula shrinks to β·KL(p ‖ q) and (1 − β)·KL(q ‖ p), as token_kd's docstring says (β = 0.001 gives a
    loss about a thousand times smaller than β = 0). References: the torch.distributions KLs above."""
    s, t, targets = (x.double() if x.is_floating_point() else x for x in seeded())
    valid = targets != UNLABELLED
    forward, reverse = reference(s, t, targets, "forward_kl"), reference(s, t, targets, "reverse_kl")
    assert token_divergence(s, t, valid, T, "jsd", 0.0).item() == pytest.approx(forward, rel=1e-12)
    assert token_divergence(s, t, valid, T, "jsd", 1.0).item() == pytest.approx(reverse, rel=1e-12)
    eps = 1e-6
    assert token_divergence(s, t, valid, T, "jsd", eps).item() / eps == pytest.approx(forward, rel=1e-3)
    assert token_divergence(s, t, valid, T, "jsd", 1 - eps).item() / eps == pytest.approx(reverse, rel=1e-3)
    assert token_divergence(s, t, valid, T, "jsd", 1e-3).item() < 1e-2 * forward  # a scale, not a direction


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


@pytest.mark.parametrize("dtype, computed", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_sixteen_bit_inputs_are_computed_in_float32_and_float64_stays_float64(dtype, computed):
    from kdexp.objectives.hidden_state import hidden_distance

    s, t, targets = seeded()
    s, t = s.to(dtype), t.to(dtype)  # the rounded inputs are what both sides compute on
    terms = TokenKD(temperature=T, alpha=0.5)(ModelOutputs(s), ModelOutputs(t), targets)
    assert all(term.dtype == computed for term in terms.values())
    # Reference in float64 on the same rounded inputs: float32 arithmetic agrees to ~1e-6, float64 to ~1e-15.
    rel = 1e-5 if computed == torch.float32 else 1e-12
    expected = reference(s.double(), t.double(), targets, "forward_kl")
    assert terms["loss_kd"].item() == pytest.approx(0.5 * T**2 * expected, rel=rel)
    valid = targets != UNLABELLED
    h_s, h_t = s[..., :4], t[..., :4]
    distance = hidden_distance(h_s, h_t, valid, "mse")
    assert distance.dtype == computed
    assert distance.item() == pytest.approx(((h_s.double() - h_t.double()) ** 2).mean(-1)[valid].mean().item(), rel=rel)


def test_hidden_state_projection_follows_the_probe_precision_and_a_second_bind_keeps_it():
    from kdexp.objectives.hidden_state import HiddenStateKD

    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(B, L, V, dtype=torch.float64, generator=g), torch.randn(B, L, V, dtype=torch.float64, generator=g)
    student = ModelOutputs(s, {"a": torch.randn(B, L, 3, dtype=torch.float64, generator=g)})
    teacher = ModelOutputs(t, {"b": torch.randn(B, L, 5, dtype=torch.float64, generator=g)})
    objective = HiddenStateKD(student_layers=["a"], teacher_layers=["b"], distance="mse")
    objective.bind(student, teacher)
    projection = objective.projections[0]
    assert projection.weight.dtype == torch.float64  # a float64 run stays float64
    objective.bind(student, teacher)  # e.g. a resumed run: the trained projection is kept, not doubled
    assert len(objective.projections) == 1 and objective.projections[0] is projection
    assert objective(student, teacher, torch.zeros(B, L, dtype=torch.long))["loss_hidden"].dtype == torch.float64


@pytest.mark.parametrize("dtype, computed", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float64, torch.float64)])
def test_projected_hidden_states_of_any_precision_are_compared_in_at_least_float32(dtype, computed):
    """A student tap of width 3 against a teacher tap of width 5 goes through the learned projection; 16-bit
    states are upcast before it (not refused by a float32 Linear), float64 states stay float64."""
    from kdexp.objectives.hidden_state import HiddenStateKD

    s, t, targets = seeded()
    g = torch.Generator().manual_seed(5)
    h_s, h_t = torch.randn(B, L, 3, generator=g).to(dtype), torch.randn(B, L, 5, generator=g).to(dtype)
    student, teacher = ModelOutputs(s.to(dtype), {"a": h_s}), ModelOutputs(t.to(dtype), {"b": h_t})
    objective = HiddenStateKD(student_layers=["a"], teacher_layers=["b"], distance="mse", gamma=1.0)
    objective.bind(student, teacher)
    weight = objective.projections[0].weight
    loss = objective(student, teacher, targets)["loss_hidden"]
    assert loss.dtype == computed and weight.dtype == computed
    valid = targets != UNLABELLED  # reference in float64 on the same rounded inputs and the same weight
    expected = ((h_s.double() @ weight.double().T - h_t.double()) ** 2).mean(-1)[valid].mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-5 if computed == torch.float32 else 1e-12)


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
