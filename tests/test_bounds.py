"""server/bounds.py: the round-relative bounds on a reply's influence, as plain functions."""

import math

import pytest
import torch

from server.bounds import beyond_round, others_medians, state_norm, update_distance


def test_the_median_of_the_others_leaves_each_value_out():
    assert others_medians([1.0, 2.0, 30.0]) == [16.0, 15.5, 1.5]
    # with two replies each is compared with the other alone: {honest, 1e30} does not hide the 1e30
    assert others_medians([1.0, 1e30]) == [1e30, 1.0]
    assert others_medians([5.0]) == [None]


def test_a_value_is_beyond_the_round_when_it_exceeds_factor_times_the_others_median():
    assert beyond_round([1.0, 1.2, 0.9, 12.0], 10.0) == [False, False, False, True]
    assert beyond_round([1.0, 1e30], 10.0) == [False, True]
    # a lone reply has nothing to be compared with, and a zero median no scale
    assert beyond_round([1e30], 10.0) == [False]
    assert beyond_round([0.0, 0.0, 3.0], 10.0) == [False, False, False]


def test_update_distance_and_norm_are_l2_over_all_tensors():
    reference = {"a": torch.zeros(2, 2), "b": torch.ones(3)}
    reply = {"a": torch.full((2, 2), 1.0), "b": torch.ones(3) * 3}
    assert update_distance(reply, reference) == pytest.approx(math.sqrt(4 * 1 + 3 * 4))
    assert state_norm(reference) == pytest.approx(math.sqrt(3))
    # float32's largest value squared overflows float32, not the float64 this sums in
    huge = {"a": torch.full((2, 2), torch.finfo(torch.float32).max), "b": torch.ones(3)}
    assert math.isfinite(update_distance(huge, reference))
