"""Noise schedules: closed forms against DESIGN §4 and against w(t) = -α'(t) / (1 - α(t))."""

from __future__ import annotations

import math

import pytest
import torch

from dmtp.errors import DmtpError
from dmtp.schedules import SCHEDULES, CosineSchedule, KappaSchedule, LinearSchedule, get_schedule

ALL = [LinearSchedule(), KappaSchedule(2.0), KappaSchedule(3.5), CosineSchedule()]


def test_registry_names_match_the_cli_choices():
    assert set(SCHEDULES) == {"linear", "kappa", "cosine"}
    assert isinstance(get_schedule("kappa", kappa=3.0), KappaSchedule)
    assert get_schedule("kappa", kappa=3.0).kappa == 3.0
    with pytest.raises(DmtpError, match="unknown scheduler_type 'sqrt'"):
        get_schedule("sqrt")


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_alpha_goes_from_clean_to_fully_masked(schedule):
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    alpha = schedule.alpha(t)
    assert alpha[0] == pytest.approx(1.0)
    assert alpha[-1] == pytest.approx(0.0, abs=1e-12)
    assert torch.all(alpha[1:] < alpha[:-1])


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_weight_is_minus_alpha_derivative_over_masking_probability(schedule):
    t = torch.linspace(1e-3, 0.999, 200, dtype=torch.float64, requires_grad=True)
    alpha = schedule.alpha(t)
    (derivative,) = torch.autograd.grad(alpha.sum(), t)
    expected = -derivative / (1.0 - alpha)
    # rtol 1e-5, not tighter: at t = 1e-3, 1 - α = t^3.5 loses digits in the autograd reference.
    torch.testing.assert_close(schedule.weight(t.detach()), expected.detach(), rtol=1e-5, atol=0)


def test_closed_forms_of_design_section_4():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for value, expected in zip(LinearSchedule().weight(t), [10.0, 2.0, 1 / 0.9], strict=True):
        assert value.item() == pytest.approx(expected)
    for value, tv in zip(KappaSchedule(2.0).alpha(t), t.tolist(), strict=True):
        assert value.item() == pytest.approx(1 - tv**2)
    for value, tv in zip(KappaSchedule(2.0).weight(t), t.tolist(), strict=True):
        assert value.item() == pytest.approx(2.0 / tv)
    for value, tv in zip(CosineSchedule().weight(t), t.tolist(), strict=True):
        x = math.pi * tv / 2
        assert value.item() == pytest.approx((math.pi / 2) * math.sin(x) / (1 - math.cos(x)))


def test_cosine_weight_is_finite_where_one_minus_cos_cancels():
    t = torch.tensor([1e-6], dtype=torch.float32)
    weight = CosineSchedule().weight(t)
    # (π/2)·sin(x)/(1-cos x) -> 2/t as t -> 0
    assert weight.item() == pytest.approx(2.0 / 1e-6, rel=1e-3)


def test_kappa_must_be_positive():
    with pytest.raises(DmtpError, match="kappa must be > 0"):
        KappaSchedule(0.0)
