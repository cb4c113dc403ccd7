"""The objective (DESIGN §4): masks per objective and schedule, the weight cap, the loss by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dmtp.errors import DmtpError
from dmtp.loss import (
    IGNORE_INDEX,
    LOSS_WEIGHT_CAP,
    block_loss,
    loss_weights,
    noised_input_ids,
    position_weights,
    sample_masking,
)
from dmtp.schedules import get_schedule

SCHEDULES = ["linear", "kappa", "cosine"]


class LogitsAreStates(torch.nn.Module):
    """A stand-in head whose LM head is the identity: `states` are the logits, so a test can set them."""

    def compute_logits(self, states: torch.Tensor) -> torch.Tensor:
        return states

    draft_logits = compute_logits  # no draft vocabulary: every token may be drafted

    def draft_token_ids(self, device=None) -> None:
        return None

    def to_draft_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels


def _nll(row: list[float], label: int) -> float:
    return -(row[label] - math.log(sum(math.exp(v) for v in row)))


def _hand_weight(name: str, t: float, weight_type: str) -> float:
    if weight_type == "ones":
        return 1.0
    if name == "linear":
        return 1.0 / t
    if name == "kappa":
        return 2.0 / t
    x = math.pi * t / 2
    return (math.pi / 2) * math.sin(x) / (1.0 - math.cos(x))


# ----------------------------------------------------------------------------------------------
# the loss against a hand computation

LOGITS = [
    [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 3.0, 1.0]],
    [[1.0, 1.0, 1.0], [0.0, -2.0, 2.0], [4.0, 0.0, 0.0]],
]
LABELS = [[0, 2, 1], [1, 2, IGNORE_INDEX]]
MASKED = [[True, True, False], [False, True, True]]


@pytest.mark.parametrize("weight_type", ["scheduler", "ones"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_seed_loss_matches_a_hand_computation(name, weight_type):
    """The guide's objective: Σ w(t)·CE over masked label positions / #label positions (uncapped)."""
    schedule = get_schedule(name, kappa=2.0)
    t = torch.tensor([0.3, 0.8])
    weights = loss_weights(schedule, t, weight_type, "seed")
    loss = block_loss(
        LogitsAreStates(), torch.tensor(LOGITS), torch.tensor(LABELS), torch.tensor(MASKED),
        weights, objective="seed",
    )  # fmt: skip
    # counted: (0,0) label 0, (0,1) label 2, (1,1) label 2; (1,2) is masked but past the end.
    total = _hand_weight(name, 0.3, weight_type) * (
        _nll(LOGITS[0][0], 0) + _nll(LOGITS[0][1], 2)
    ) + _hand_weight(name, 0.8, weight_type) * _nll(LOGITS[1][1], 2)
    assert loss.item() == pytest.approx(total / 5, rel=1e-6)  # 5 label positions


@pytest.mark.parametrize("decay", [0.0, 2.0])
def test_decode_loss_is_the_weighted_mean_with_position_decay(decay):
    """decode: Σ w(t)·γ_k·CE / Σ w(t)·γ_k over the counted positions, with w capped."""
    t = torch.tensor([0.05, 0.5])  # w = 20 -> capped at 10, and 2
    weights = loss_weights(get_schedule("linear"), t, "scheduler", "decode")
    assert weights.tolist() == pytest.approx([LOSS_WEIGHT_CAP, 2.0])
    masked = torch.tensor([[False, True, True], [False, True, True]])
    loss = block_loss(
        LogitsAreStates(), torch.tensor(LOGITS), torch.tensor(LABELS), masked, weights,
        objective="decode", position_decay=decay,
    )  # fmt: skip
    gamma = [1.0, 1.0, math.exp(-1 / decay) if decay else 1.0]  # position k >= 1: exp(-(k-1)/γ)
    # counted: (0,1), (0,2), (1,1); (1,2) is past the end.
    terms = [
        (LOSS_WEIGHT_CAP * gamma[1], _nll(LOGITS[0][1], 2)),
        (LOSS_WEIGHT_CAP * gamma[2], _nll(LOGITS[0][2], 1)),
        (2.0 * gamma[1], _nll(LOGITS[1][1], 2)),
    ]
    expected = sum(w * ce for w, ce in terms) / sum(w for w, _ in terms)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_position_weights():
    assert position_weights(4, 0.0).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert position_weights(4, 2.0).tolist() == pytest.approx(
        [1.0, 1.0, math.exp(-0.5), math.exp(-1.0)]
    )


@pytest.mark.parametrize("objective", ["decode", "decode_all", "seed"])
def test_nothing_counted_gives_a_zero_that_keeps_the_graph(objective):
    states = torch.randn(2, 3, 5, requires_grad=True)
    for labels, masked in (
        (torch.randint(0, 5, (2, 3)), torch.zeros(2, 3, dtype=torch.bool)),
        (torch.full((2, 3), IGNORE_INDEX), torch.ones(2, 3, dtype=torch.bool)),
    ):
        loss = block_loss(
            LogitsAreStates(), states, labels, masked, torch.ones(2), objective=objective
        )
        assert loss.item() == 0.0 and not torch.isnan(loss)
        loss.backward()  # a rank whose batch has nothing masked still joins the gradient sync
    loss = block_loss(
        LogitsAreStates(), states, torch.randint(0, 5, (2, 3)), torch.ones(2, 3, dtype=torch.bool),
        torch.ones(2), objective=objective,
    )  # fmt: skip
    loss.backward()
    assert states.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# position 0 under the decode objectives


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("objective", ["decode", "decode_all"])
def test_position_zero_is_never_masked_and_never_in_the_loss(name, objective):
    schedule = get_schedule(name, kappa=2.0)
    labels = torch.randint(0, 7, (2000, 4), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    t, masked = sample_masking(labels, schedule, 1e-3, generator, objective)
    assert not masked[:, 0].any()
    assert masked[:, 1:].any()

    states = torch.randn(2000, 4, 7, generator=generator)
    weights = loss_weights(schedule, t, "scheduler", objective)

    def loss_of(s: torch.Tensor) -> torch.Tensor:
        return block_loss(LogitsAreStates(), s, labels, masked, weights, objective=objective)

    changed = states.clone()
    changed[:, 0] = torch.randn(2000, 7, generator=generator) * 10
    assert torch.equal(loss_of(states), loss_of(changed))
    # ... while a later position does count (the test above could fail)
    changed = states.clone()
    changed[:, 1] += torch.randn(2000, 7, generator=generator) * 10
    assert not torch.equal(loss_of(states), loss_of(changed))


def test_seed_objective_masks_and_counts_position_zero():
    schedule = get_schedule("linear")
    labels = torch.zeros(20_000, 4, dtype=torch.long)
    t, masked = sample_masking(labels, schedule, 1e-3, torch.Generator().manual_seed(2), "seed")
    # position 0 is masked at the same rate as any other: E[1 - α(t)] = E[t] ≈ 1/2
    rate = masked[:, 0].float().mean().item()
    assert abs(rate - 0.5) < 5 * math.sqrt(0.25 / len(labels))
    states = torch.zeros(20_000, 4, 3)
    changed = states.clone()
    changed[:, 0, 0] = 5.0
    weights = loss_weights(schedule, t, "scheduler", "seed")
    a = block_loss(LogitsAreStates(), states, labels, masked, weights, objective="seed")
    b = block_loss(LogitsAreStates(), changed, labels, masked, weights, objective="seed")
    assert b < a  # the label 0 got more likely at the masked position 0s


def test_decode_all_masks_every_draft_position_with_unit_weight():
    labels = torch.zeros(500, 5, dtype=torch.long)
    t, masked = sample_masking(
        labels, get_schedule("linear"), 1e-3, torch.Generator().manual_seed(3), "decode_all"
    )
    assert masked[:, 1:].all() and not masked[:, 0].any()
    assert torch.equal(t, torch.ones(500))
    assert torch.equal(loss_weights(get_schedule("linear"), t, "scheduler", "decode_all"), t)


# ----------------------------------------------------------------------------------------------
# how many of the draft positions are masked: the schedule's distribution


def _masked_count_distribution(schedule, n: int, epsilon: float) -> list[float]:
    """P(k of n positions masked) = E_t[C(n,k) p^k (1-p)^(n-k)], p = 1 - α(t), t ~ U[ε, 1)."""
    grid = 200_000
    t = epsilon + (1 - epsilon) * (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    p = schedule.mask_probability(t)
    return [(math.comb(n, k) * p**k * (1 - p) ** (n - k)).mean().item() for k in range(n + 1)]


@pytest.mark.parametrize("name", SCHEDULES)
def test_masked_count_per_block_follows_the_schedule(name):
    """Positions are masked independently given one t per block: the count of masked draft
    positions is a mixture of binomials, not the binomial of the mean rate."""
    schedule = get_schedule(name, kappa=2.0)
    blocks, length, epsilon = 40_000, 4, 0.0
    labels = torch.zeros(blocks, length, dtype=torch.long)
    t, masked = sample_masking(
        labels, schedule, epsilon, torch.Generator().manual_seed(4), "decode"
    )
    counts = torch.bincount(masked[:, 1:].sum(dim=1), minlength=length).double() / blocks
    expected = _masked_count_distribution(schedule, length - 1, epsilon)
    for k, (observed, p) in enumerate(zip(counts.tolist(), expected, strict=True)):
        sigma = math.sqrt(p * (1 - p) / blocks)
        assert abs(observed - p) < 5 * sigma, (k, observed, p)
    all_masked = counts[-1].item()
    # closed forms of P(positions 1..3 all masked) = E[(1 - α(t))^3] with t ~ U[0, 1):
    closed = {"linear": 1 / 4, "kappa": 1 / 7}  # E[t^3], E[t^6]
    if name in closed:
        assert expected[-1] == pytest.approx(closed[name], rel=1e-6)
        assert abs(all_masked - closed[name]) < 5 * math.sqrt(closed[name] / blocks)


@pytest.mark.parametrize("name", SCHEDULES)
def test_masking_rate_matches_one_minus_alpha_at_each_t(name):
    schedule = get_schedule(name, kappa=2.0)
    generator = torch.Generator().manual_seed(1234)
    labels = torch.zeros(40_000, 8, dtype=torch.long)
    t, masked = sample_masking(labels, schedule, 0.05, generator, "decode")

    assert t.min() >= 0.05 and t.max() < 1.0
    # Per bin of t, the masked fraction of positions 1..L-1 is a mean of Bernoulli(1 - α(t)).
    edges = torch.linspace(0.05, 1.0, 11)
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (t >= low) & (t < high)
        observed = masked[in_bin][:, 1:].float().mean().item()
        expected = schedule.mask_probability(t[in_bin]).mean().item()
        draws = in_bin.sum().item() * (labels.shape[1] - 1)
        sigma = math.sqrt(max(expected * (1 - expected), 1e-4) / draws)
        assert abs(observed - expected) < 5 * sigma + 1e-3, (low.item(), observed, expected)


# ----------------------------------------------------------------------------------------------
# the w(t) cap: one block near t = ε cannot own the batch


def _weight_shares(loss: torch.Tensor, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d loss / d CE of each block: with uniform logits, |∂loss/∂logit[label]| = share · (1 - 1/V)."""
    (grad,) = torch.autograd.grad(loss, states)
    vocab = states.shape[-1]
    at_label = grad.gather(-1, labels.clamp(min=0)[..., None])[..., 0].abs()
    return at_label.sum(dim=1) / (1 - 1 / vocab)


@pytest.mark.parametrize("name", SCHEDULES)
def test_weight_cap_bounds_any_single_blocks_share_of_the_batch(name):
    schedule = get_schedule(name, kappa=2.0)
    blocks, length, vocab = 32, 4, 5
    labels = torch.randint(0, vocab, (blocks, length), generator=torch.Generator().manual_seed(5))
    t = torch.full((blocks,), 0.999)
    t[0] = 1e-3  # w(1e-3) is ~1000 (linear) or more: uncapped, this block would dominate
    masked = torch.zeros(blocks, length, dtype=torch.bool)
    masked[:, 1] = True  # one counted position per block
    masked[0, 1:] = True
    states = torch.zeros(blocks, length, vocab, requires_grad=True)

    weights = loss_weights(schedule, t, "scheduler", "decode")
    assert weights.max().item() <= LOSS_WEIGHT_CAP
    loss = block_loss(LogitsAreStates(), states, labels, masked, weights, objective="decode")
    shares = _weight_shares(loss, states, labels)
    assert shares.sum().item() == pytest.approx(1.0, rel=1e-5)  # a weighted mean
    smallest = schedule.weight(torch.tensor([0.999])).item()
    counted = length - 1
    bound = LOSS_WEIGHT_CAP * counted / (LOSS_WEIGHT_CAP * counted + (blocks - 1) * smallest)
    assert shares[0].item() <= bound + 1e-6
    assert shares[0].item() < 0.5

    # the same batch under the uncapped seed weights: that one block takes most of the gradient
    seed_weights = loss_weights(schedule, t, "scheduler", "seed")
    seed_loss = block_loss(
        LogitsAreStates(), states, labels, masked, seed_weights, objective="seed"
    )
    seed_shares = _weight_shares(seed_loss, states, labels)
    assert seed_shares[0] / seed_shares.sum() > 0.5


def test_decode_loss_does_not_depend_on_the_scale_of_the_weights():
    """Normalised by Σ w, not by the batch size: only relative weights matter."""
    labels = torch.randint(0, 6, (8, 4), generator=torch.Generator().manual_seed(6))
    states = torch.randn(8, 4, 6, generator=torch.Generator().manual_seed(7))
    masked = torch.rand(8, 4, generator=torch.Generator().manual_seed(8)) < 0.7
    masked[:, 0] = False
    masked[:, 1] = True
    weights = torch.rand(8, generator=torch.Generator().manual_seed(9)) + 0.1
    a = block_loss(LogitsAreStates(), states, labels, masked, weights, objective="decode")
    b = block_loss(LogitsAreStates(), states, labels, masked, weights * 37.0, objective="decode")
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# small pieces


def test_masking_is_reproducible_from_the_generator_seed():
    labels = torch.zeros(16, 4, dtype=torch.long)
    schedule = get_schedule("linear")
    for objective in ("decode", "seed"):
        a = sample_masking(labels, schedule, 1e-3, torch.Generator().manual_seed(7), objective)
        b = sample_masking(labels, schedule, 1e-3, torch.Generator().manual_seed(7), objective)
        c = sample_masking(labels, schedule, 1e-3, torch.Generator().manual_seed(8), objective)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])


def test_noised_inputs_hide_masked_and_past_end_positions():
    labels = torch.tensor([[5, 6, IGNORE_INDEX]])
    masked = torch.tensor([[False, True, False]])
    assert noised_input_ids(labels, masked, mask_token_id=99).tolist() == [[5, 99, 99]]


def test_bad_settings_are_user_errors():
    labels = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(DmtpError, match="time_epsilon"):
        sample_masking(labels, get_schedule("linear"), 1.0)
    with pytest.raises(DmtpError, match="unknown objective 'greedy'"):
        sample_masking(labels, get_schedule("linear"), 0.0, objective="greedy")
    with pytest.raises(DmtpError, match="loss_weight_type"):
        loss_weights(get_schedule("linear"), torch.ones(2), "uniform")


# ----------------------------------------------------------------------------------------------
# distillation from the base model's distribution


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_distilled_loss_mixes_the_token_and_the_base_distribution_by_hand(alpha):
    """A counted position costs (1 − α)·CE(token) + α·Σ_v p_base(v)·(−log q(v)); p_base is the
    softmax of the base LM head on the stored final state (here: the states are the logits)."""
    teacher = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [1.0, -1.0, 3.0], [0.0, 2.0, 0.0]],
            [[0.0, 0.0, 0.0], [-1.0, 0.0, 4.0], [9.0, 9.0, 9.0]],
        ]
    )
    masked = torch.tensor([[False, True, True], [False, True, True]])
    loss = block_loss(
        LogitsAreStates(), torch.tensor(LOGITS), torch.tensor(LABELS), masked, torch.ones(2),
        objective="decode_all", teacher_states=teacher, distill_weight=alpha,
    )  # fmt: skip

    def soft(student: list[float], base: list[float]) -> float:
        z = sum(math.exp(v) for v in base)
        return sum(math.exp(b) / z * _nll(student, v) for v, b in enumerate(base))

    counted = [(0, 1), (0, 2), (1, 1)]  # (1, 2) is past the sequence end
    terms = [
        (1 - alpha) * _nll(LOGITS[n][k], LABELS[n][k]) + alpha * soft(LOGITS[n][k], teacher[n][k].tolist())
        for n, k in counted
    ]  # fmt: skip
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_the_distilled_loss_is_smallest_where_the_head_matches_the_base_distribution():
    """Gradient of the soft term vanishes at q = p_base: the head learns the distribution, not
    only its argmax."""
    base = torch.tensor([[[0.0, 0.0, 0.0], [0.3, 1.2, -0.5], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 1, IGNORE_INDEX]])
    masked = torch.tensor([[False, True, False]])
    student = base.clone().requires_grad_(True)
    loss = block_loss(
        LogitsAreStates(), student, labels, masked, torch.ones(1), objective="decode_all",
        teacher_states=base, distill_weight=1.0,
    )  # fmt: skip
    loss.backward()
    assert student.grad.abs().max().item() < 1e-6
