"""Tests for common.pruning.schedules: FedMef's adjustment rounds, cosine adjustment rate and counts, the
per-round learning rate and REX factor (eq. 3), FedDIP's sparsity ramp and lambda stages."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from common.pruning.schedules import (
    adjust_counts,
    adjust_fraction,
    feddip_lambda,
    feddip_sparsity,
    is_adjustment_round,
    rex_factor,
    round_learning_rate,
)


@pytest.mark.parametrize(
    "server_round, expected",
    [(1, False), (9, False), (10, True), (11, False), (290, True), (300, True), (301, False), (310, False)],
)
def test_adjustment_rounds_paper_setting(server_round, expected):
    assert is_adjustment_round(server_round, 10, 300) is expected


def test_adjustment_round_every_round_and_never():
    assert [is_adjustment_round(r, 1, 3) for r in range(1, 6)] == [True, True, True, False, False]
    assert not any(is_adjustment_round(r, 2, 0) for r in range(1, 10))


@pytest.mark.parametrize(
    "args, message",
    [((0, 10, 300), "1-based"), ((10, 0, 300), "delta_r"), ((10, 10, -1), "r_stop")],
)
def test_adjustment_round_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        is_adjustment_round(*args)


def test_adjust_fraction_cosine_in_local_epochs():
    # Paper: E = 10, R_stop = 300, alpha = 0.2; t counts epochs done at the end of the round.
    assert adjust_fraction(10, 10, 300) == pytest.approx(0.2 * (1 + math.cos(math.pi * 100 / 3000)))
    assert adjust_fraction(150, 10, 300) == pytest.approx(0.2)
    assert adjust_fraction(75, 4, 300, alpha=0.1) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert adjust_fraction(300, 10, 300) == 0.0
    assert adjust_fraction(301, 10, 300) == 0.0
    assert adjust_fraction(1, 10, 0) == 0.0
    values = [adjust_fraction(r, 10, 300) for r in range(1, 300)]
    assert all(a > b for a, b in pairwise(values))


@pytest.mark.parametrize(
    "args, message",
    [((0, 10, 300), "1-based"), ((1, 0, 300), "local_epochs"), ((1, 10, -5), "r_stop"), ((1, 10, 300, 0.6), "alpha")],
)
def test_adjust_fraction_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        adjust_fraction(*args)


def test_adjust_counts_floor_and_caps():
    masks = {
        "half": torch.tensor([True] * 10 + [False] * 10),  # 10 active, 10 pruned
        "dense_ish": torch.tensor([True] * 10 + [False] * 2),  # 10 active, only 2 pruned
        "sparse": torch.tensor([True] * 3 + [False] * 97),
        "empty": torch.zeros(5, dtype=torch.bool),
    }
    # floor, not round: 0.35 * 10 = 3.5 -> 3 and 0.35 * 3 = 1.05 -> 1.
    assert adjust_counts(masks, 0.35) == {"half": 3, "dense_ish": 2, "sparse": 1, "empty": 0}
    assert adjust_counts(masks, 1.0) == {"half": 10, "dense_ish": 2, "sparse": 3, "empty": 0}
    assert adjust_counts(masks, 0.0) == {"half": 0, "dense_ish": 0, "sparse": 0, "empty": 0}
    with pytest.raises(ValueError, match="fraction must lie in"):
        adjust_counts(masks, 1.5)


def test_round_learning_rate_decays_per_round_from_round_one():
    assert round_learning_rate(1.0, 0.95, 1) == 1.0
    assert round_learning_rate(1.0, 0.95, 3) == pytest.approx(0.9025)
    assert round_learning_rate(0.1, 0.5, 5) == pytest.approx(0.1 / 16)
    with pytest.raises(ValueError, match="1-based"):
        round_learning_rate(1.0, 0.95, 0)
    with pytest.raises(ValueError, match="decay"):
        round_learning_rate(1.0, 1.5, 2)
    with pytest.raises(ValueError, match="eta0"):
        round_learning_rate(-1.0, 0.95, 2)


def test_rex_factor_eq_3():
    assert rex_factor(0, 10) == 1.0
    assert rex_factor(5, 10) == pytest.approx(10 / 15)
    assert rex_factor(9, 10) == pytest.approx(2 / 11)
    assert rex_factor(10, 10) == 0.0
    with pytest.raises(ValueError, match="step must lie in"):
        rex_factor(11, 10)
    with pytest.raises(ValueError, match="step must lie in"):
        rex_factor(-1, 10)
    with pytest.raises(ValueError, match="total_steps"):
        rex_factor(0, 0)


def test_feddip_sparsity_cubic_ramp():
    assert feddip_sparsity(0, 100, 0.5, 0.9) == pytest.approx(0.5)
    assert feddip_sparsity(50, 100, 0.5, 0.9) == pytest.approx(0.9 - 0.4 / 8)
    assert feddip_sparsity(25, 100, 0.5, 0.9) == pytest.approx(0.9 - 0.4 * 0.75**3)
    assert feddip_sparsity(100, 100, 0.5, 0.9) == pytest.approx(0.9)
    # Clipped to [0, T].
    assert feddip_sparsity(250, 100, 0.5, 0.9) == pytest.approx(0.9)
    assert feddip_sparsity(-3, 100, 0.5, 0.9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="s_target"):
        feddip_sparsity(1, 100, 0.5, 1.2)
    with pytest.raises(ValueError, match="total_rounds"):
        feddip_sparsity(1, 0, 0.5, 0.9)


def test_feddip_lambda_official_stages():
    lam = [feddip_lambda(r, 100, 1e-3) for r in range(0, 101)]
    assert lam[:5] == [0.0] * 5
    assert lam[5] == pytest.approx(5e-4)
    assert lam[10] == pytest.approx(5e-4 + 5e-4 / 18)
    assert lam[94] == pytest.approx(5e-4 + 5e-4 * 17 / 18)
    assert lam[95:] == [1e-3] * 6
    assert len(set(lam)) == 20
    assert all(a <= b for a, b in pairwise(lam))
    assert feddip_lambda(400, 100, 1e-3) == 1e-3


def test_feddip_lambda_custom_first_and_two_steps():
    assert feddip_lambda(50, 100, 1e-3, steps=5, first_nonzero=0.0) == pytest.approx(1e-3 * 1 / 3)
    assert feddip_lambda(19, 100, 2.0, steps=5, first_nonzero=0.5) == 0.0
    assert feddip_lambda(20, 100, 2.0, steps=5, first_nonzero=0.5) == 0.5
    assert [feddip_lambda(r, 10, 1.0, steps=2) for r in (4, 5, 10)] == [0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 1}, "steps must be >= 2"),
        ({"first_nonzero": 2e-3}, "first_nonzero"),
        ({"first_nonzero": -1e-4}, "first_nonzero"),
        ({"lambda_max": -1.0}, "lambda_max"),
        ({"total_rounds": 0}, "total_rounds"),
    ],
)
def test_feddip_lambda_rejects_bad_arguments(kwargs, message):
    args = {"server_round": 5, "total_rounds": 100, "lambda_max": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=message):
        feddip_lambda(**args)
