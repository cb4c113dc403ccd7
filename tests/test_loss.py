"""The masked-diffusion loss against a hand computation, and the masking rate against 1 - α(t)."""

from __future__ import annotations

import math

import pytest
import torch

from dmtp.errors import DmtpError
from dmtp.loss import (
    IGNORE_INDEX,
    loss_weights,
    masked_diffusion_loss,
    noised_input_ids,
    sample_masking,
)
from dmtp.schedules import get_schedule


def _hand_weight(name: str, t: float, weight_type: str) -> float:
    if weight_type == "ones":
        return 1.0
    if name == "linear":
        return 1.0 / t
    if name == "kappa":
        return 2.0 / t
    x = math.pi * t / 2
    return (math.pi / 2) * math.sin(x) / (1.0 - math.cos(x))


@pytest.mark.parametrize("weight_type", ["scheduler", "ones"])
@pytest.mark.parametrize("name", ["linear", "kappa", "cosine"])
def test_loss_matches_a_hand_computation(name, weight_type):
    logits = torch.tensor(
        [
            [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 3.0, 1.0]],
            [[1.0, 1.0, 1.0], [0.0, -2.0, 2.0], [4.0, 0.0, 0.0]],
        ]
    )
    labels = torch.tensor([[0, 2, 1], [1, 2, IGNORE_INDEX]])
    masked = torch.tensor([[True, True, False], [False, True, True]])
    t = torch.tensor([0.3, 0.8])
    schedule = get_schedule(name, kappa=2.0)

    loss = masked_diffusion_loss(logits, labels, masked, loss_weights(schedule, t, weight_type))

    def nll(row: list[float], label: int) -> float:
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    # counted: (0,0) label 0, (0,1) label 2, (1,1) label 2; (1,2) is masked but past the end.
    total = _hand_weight(name, 0.3, weight_type) * (
        nll([2.0, 0.0, -1.0], 0) + nll([0.5, 0.5, 0.0], 2)
    ) + _hand_weight(name, 0.8, weight_type) * nll([0.0, -2.0, 2.0], 2)
    label_positions = 5
    assert loss.item() == pytest.approx(total / label_positions, rel=1e-6)


def test_loss_is_zero_when_nothing_is_masked_and_has_gradient_otherwise():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 4))
    weights = torch.ones(2)
    assert (
        masked_diffusion_loss(logits, labels, torch.zeros(2, 4, dtype=torch.bool), weights).item()
        == 0
    )
    loss = masked_diffusion_loss(logits, labels, torch.ones(2, 4, dtype=torch.bool), weights)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_all_labels_ignored_gives_zero_not_nan():
    labels = torch.full((2, 3), IGNORE_INDEX)
    loss = masked_diffusion_loss(
        torch.randn(2, 3, 5), labels, torch.ones(2, 3, dtype=torch.bool), torch.ones(2)
    )
    assert loss.item() == 0.0


@pytest.mark.parametrize("name", ["linear", "kappa", "cosine"])
def test_masking_rate_matches_one_minus_alpha(name):
    schedule = get_schedule(name, kappa=2.0)
    generator = torch.Generator().manual_seed(1234)
    labels = torch.zeros(40_000, 8, dtype=torch.long)
    t, masked = sample_masking(labels, schedule, time_epsilon=0.05, generator=generator)

    assert t.min() >= 0.05 and t.max() < 1.0
    # Per bin of t, the masked fraction is a mean of many Bernoulli(1 - α(t)) draws.
    edges = torch.linspace(0.05, 1.0, 11)
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (t >= low) & (t < high)
        observed = masked[in_bin].float().mean().item()
        expected = schedule.mask_probability(t[in_bin]).mean().item()
        draws = in_bin.sum().item() * labels.shape[1]
        sigma = math.sqrt(max(expected * (1 - expected), 1e-4) / draws)
        assert abs(observed - expected) < 5 * sigma + 1e-3, (low.item(), observed, expected)


def test_masking_is_reproducible_from_the_generator_seed():
    labels = torch.zeros(16, 4, dtype=torch.long)
    schedule = get_schedule("linear")
    a = sample_masking(labels, schedule, 1e-3, torch.Generator().manual_seed(7))
    b = sample_masking(labels, schedule, 1e-3, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_noised_inputs_hide_masked_and_past_end_positions():
    labels = torch.tensor([[5, 6, IGNORE_INDEX]])
    masked = torch.tensor([[False, True, False]])
    assert noised_input_ids(labels, masked, mask_token_id=99).tolist() == [[5, 99, 99]]


def test_bad_time_epsilon_and_weight_type_are_user_errors():
    labels = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(DmtpError, match="time_epsilon"):
        sample_masking(labels, get_schedule("linear"), 1.0)
    with pytest.raises(DmtpError, match="loss_weight_type"):
        loss_weights(get_schedule("linear"), torch.ones(2), "uniform")
