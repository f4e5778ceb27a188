"""Tests for common.pruning.adjustment: summing top-K gradients, server/FedDST prune-and-grow (FedMef Alg. 1,
lines 26-34), FedDST's masked average and re-prune, FedDIP's global magnitude masks. Includes the
two bugs of FedDST's official code: growing over all weights and applying the adjust rate twice."""

from __future__ import annotations

import pytest
import torch

from common.nn.nsconv import standardize_filters
from common.pruning.adjustment import (
    global_magnitude_masks,
    magnitude_masks_within,
    masked_average,
    prune_and_grow,
    sum_topk_gradients,
)
from common.pruning.bae import mark_low
from common.pruning.masks import _keep_count, deviations, filter_centres
from common.pruning.topk import indices_to_mask, topk_pruned_gradients

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")


# ----------------------------------------------------------------------------- sum_topk_gradients


def test_sum_topk_gradients_weighted_sum_absent_is_zero():
    shapes = {"a": (2, 3), "b": (4,)}
    replies = [
        (0.25, {"a": (torch.tensor([0, 4]), torch.tensor([8.0, -4.0]))}),
        (0.75, {"a": (torch.tensor([4, 5], dtype=torch.int32), torch.tensor([4.0, 2.0], dtype=torch.float64))}),
    ]
    out = sum_topk_gradients(replies, shapes)
    assert out["a"].dtype == torch.float32 and out["a"].shape == (2, 3)
    assert out["a"].tolist() == [[2.0, 0.0, 0.0], [0.0, -1.0 + 3.0, 1.5]]
    assert out["b"].tolist() == [0.0] * 4


def test_sum_topk_gradients_round_trip_from_clients():
    masks = {"w": torch.rand(6, 5) < 0.3}
    grads = [torch.randn(6, 5), torch.randn(6, 5)]
    entries = [topk_pruned_gradients({"w": g}, masks, {"w": 4}) for g in grads]
    out = sum_topk_gradients([(0.4, entries[0]), (0.6, entries[1])], {"w": (6, 5)})["w"]
    expected = torch.zeros(30)
    for weight, entry in zip((0.4, 0.6), entries, strict=True):
        idx, val = entry["w"]
        expected[idx] += weight * val
    assert torch.allclose(out.reshape(-1), expected)
    assert not (out != 0)[masks["w"]].any()


@pytest.mark.parametrize(
    "entry, message",
    [
        ((torch.tensor([0, 6]), torch.tensor([1.0, 2.0])), r"layer 'a'.*\[0, 6\)"),
        ((torch.tensor([-1]), torch.tensor([1.0])), r"layer 'a'.*\[0, 6\)"),
        ((torch.tensor([0, 1]), torch.tensor([1.0])), "layer 'a' sent 2 indices but 1 values"),
        ((torch.tensor([2, 2]), torch.tensor([1.0, 1.0])), "layer 'a' repeat"),
        ((torch.tensor([0.0]), torch.tensor([1.0])), "layer 'a' must be int32 or int64"),
        ((torch.tensor([[0]]), torch.tensor([[1.0]])), "layer 'a' must be 1-D"),
        ((torch.tensor([1]), torch.tensor([float("nan")])), "layer 'a' must be finite"),
    ],
)
def test_sum_topk_gradients_rejects_bad_entries(entry, message):
    with pytest.raises(ValueError, match=message):
        sum_topk_gradients([(1.0, {"a": entry})], {"a": (2, 3)})


def test_sum_topk_gradients_rejects_unknown_layer_and_bad_weight():
    entry = (torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="unknown layer 'x'"):
        sum_topk_gradients([(1.0, {"x": entry})], {"a": (3,)})
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        sum_topk_gradients([(-0.5, {"a": entry})], {"a": (3,)})


# ----------------------------------------------------------------------------- prune_and_grow


def test_prune_and_grow_by_hand():
    mask = torch.tensor([True, True, True, False, False, False, True, False])
    weight = torch.tensor([0.1, -5.0, -0.2, 0.0, 0.0, 0.0, 3.0, 0.0])
    # Largest |score| overall sits on active entries (1, and dropped 0): neither may be "grown".
    # Among the old pruned positions 3, 4, 5, 7 the largest |score| are at 7 and 4.
    score = torch.tensor([90.0, 100.0, 1.0, 0.5, -7.0, 0.1, 50.0, 8.0])
    new_masks, new_weights = prune_and_grow({"w": weight}, {"w": mask}, {"w": score}, {"w": 2})
    assert new_masks["w"].tolist() == [False, True, False, False, True, False, True, True]
    assert new_weights["w"].tolist() == [0.0, -5.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0]


def test_prune_and_grow_invariants_on_random_layers():
    shapes = {"conv": (8, 4, 3, 3), "fc": (10, 32), "frozen": (5, 5)}
    masks = {name: torch.rand(shape) < 0.25 for name, shape in shapes.items()}
    # Pruned weights carry junk here: the result must still hold exact zeros at grown entries.
    weights = {name: torch.randn(shape) for name, shape in shapes.items()}
    scores = {name: torch.randn(shape) for name, shape in shapes.items()}
    counts = {"conv": 17, "fc": 9}
    originals = {name: w.clone() for name, w in weights.items()}
    new_masks, new_weights = prune_and_grow(weights, masks, scores, counts)
    for name, old in masks.items():
        new, k = new_masks[name], counts.get(name, 0)
        w, s = weights[name], scores[name]
        assert torch.equal(w, originals[name])
        assert int(new.sum()) == int(old.sum())  # exact target sparsity
        assert int((new != old).sum()) == 2 * k  # the count applied once, not twice
        dropped, grown, kept = old & ~new, new & ~old, old & new
        assert int(dropped.sum()) == int(grown.sum()) == k
        if k:
            assert w[dropped].abs().max() <= w[kept].abs().min()  # dropped = smallest active |w|
            assert s[grown].abs().min() >= s[~old & ~grown].abs().max()  # grown = largest pruned |g|
        assert torch.equal(new_weights[name], torch.where(kept, w, torch.zeros_like(w)))
        assert (new_weights[name][grown] == 0).all()
    assert torch.equal(new_masks["frozen"], masks["frozen"])


@pytest.mark.parametrize(
    "counts, message",
    [
        ({"w": 3}, r"count 3 for layer 'w'.*2 pruned"),
        ({"w": -1}, "counts must be >= 0"),
        ({"v": 1}, "without a mask"),
    ],
)
def test_prune_and_grow_rejects_impossible_counts(counts, message):
    mask = torch.tensor([True, True, True, False, False])
    with pytest.raises(ValueError, match=message):
        prune_and_grow({"w": torch.ones(5)}, {"w": mask}, {"w": torch.ones(5)}, counts)


def test_prune_and_grow_rejects_more_than_active_and_bad_shapes():
    mask = torch.tensor([True, False, False, False])
    w = torch.ones(4)
    with pytest.raises(ValueError, match=r"count 2 for layer 'w'.*1 active"):
        prune_and_grow({"w": w}, {"w": mask}, {"w": w}, {"w": 2})
    with pytest.raises(ValueError, match="weights for layer 'w' has shape"):
        prune_and_grow({"w": torch.ones(2, 2)}, {"w": mask}, {"w": w}, {"w": 1})
    with pytest.raises(ValueError, match="scores for layer 'w' has shape"):
        prune_and_grow({"w": w}, {"w": mask}, {"w": torch.ones(5)}, {"w": 1})
    with pytest.raises(ValueError, match="scores has no entry for layer 'w'"):
        prune_and_grow({"w": w}, {"w": mask}, {}, {"w": 1})


# ----------------------------------------------------------------------------- FedDST aggregation


def test_masked_average_by_hand():
    a = (1.0, {"w": torch.tensor([1.0, 2.0, 100.0, 100.0])}, {"w": torch.tensor([True, True, False, False])})
    b = (3.0, {"w": torch.tensor([5.0, 200.0, 7.0, 200.0])}, {"w": torch.tensor([True, False, True, False])})
    values, union = masked_average([a, b])
    # Position 0: (1*1 + 3*5) / 4; 1: only a keeps it; 2: only b; 3: nobody. Unkept values ignored.
    assert values["w"].tolist() == [4.0, 2.0, 7.0, 0.0]
    assert union["w"].tolist() == [True, True, True, False]


def test_masked_average_rejects_bad_contributions():
    m = {"w": torch.ones(2, dtype=torch.bool)}
    v = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="at least one"):
        masked_average([])
    with pytest.raises(ValueError, match="same layers"):
        masked_average([(1.0, v, m), (1.0, v, {"x": torch.ones(2, dtype=torch.bool)})])
    with pytest.raises(ValueError, match="values for layer 'w' has shape"):
        masked_average([(1.0, {"w": torch.ones(3)}, m)])
    with pytest.raises(ValueError, match="finite and >= 0"):
        masked_average([(float("inf"), v, m)])


def test_magnitude_masks_within_allowed_only():
    weights = {"w": torch.tensor([9.0, -1.0, 3.0, -8.0, 2.0, 0.5])}
    allowed = {"w": torch.tensor([False, True, True, False, True, True])}
    masks = magnitude_masks_within(weights, allowed, {"w": 2})
    # 9 and -8 are larger but not allowed.
    assert masks["w"].tolist() == [False, False, True, False, True, False]
    with pytest.raises(ValueError, match=r"keep 5 for layer 'w' exceeds its 4 allowed"):
        magnitude_masks_within(weights, allowed, {"w": 5})
    with pytest.raises(ValueError, match=r"no count for layers \['w'\]"):
        magnitude_masks_within(weights, allowed, {})


# ----------------------------------------------------------------------------- FedDIP


def test_global_magnitude_prefers_large_weights_across_layers():
    weights = {"small": torch.tensor([[0.1, -0.2], [0.3, 0.4]]), "big": torch.tensor([5.0, -6.0, 0.05, 7.0, -0.35])}
    masks = global_magnitude_masks(weights, 4 / 9)  # keep round(5/9 * 9) = 5
    assert masks["big"].tolist() == [True, True, False, True, True]
    assert masks["small"].tolist() == [[False, False], [False, True]]
    # Sparse enough, a whole layer goes.
    assert not global_magnitude_masks(weights, 0.7)["small"].any()  # keep 3: 7, -6, 5


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.95, 1.0])
def test_global_magnitude_keeps_exact_count(sparsity):
    weights = {"a": torch.randn(8, 3, 3, 3), "b": torch.randn(10, 40), "c": torch.randn(7)}
    masks = global_magnitude_masks(weights, sparsity)
    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in masks.values()) == _keep_count(1.0 - sparsity, total)
    kept = torch.cat([w[m].abs() for w, m in zip(weights.values(), masks.values(), strict=True)])
    dropped = torch.cat([w[~m].abs() for w, m in zip(weights.values(), masks.values(), strict=True)])
    if kept.numel() and dropped.numel():
        assert kept.min() >= dropped.max()
    assert all(masks[n].shape == w.shape and masks[n].dtype == torch.bool for n, w in weights.items())


def test_global_magnitude_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sparsity must lie in"):
        global_magnitude_masks({"a": torch.ones(3)}, 1.5)
    with pytest.raises(ValueError, match="at least one"):
        global_magnitude_masks({}, 0.5)


# ----------------------------------------------------------------------------- prune-centre = filter-mean


def test_filter_centres_are_the_means_of_each_filters_active_weights_for_convolutions_only():
    conv = torch.arange(16.0).view(2, 2, 2, 2)
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, :] = True  # filter 0: entries 0 and 1, mean 0.5; filter 1: none, centre 0
    centres = filter_centres(
        {"conv": conv, "fc": torch.ones(3, 4)}, {"conv": mask, "fc": torch.ones(3, 4, dtype=torch.bool)}
    )
    assert set(centres) == {"conv"} and centres["conv"].shape == (2, 1, 1, 1)
    assert centres["conv"].flatten().tolist() == [0.5, 0.0]
    moved = deviations({"conv": conv, "fc": torch.ones(3, 4)}, centres)
    assert torch.equal(moved["conv"][0], conv[0] - 0.5) and torch.equal(moved["fc"], torch.ones(3, 4))
    assert deviations({"fc": conv}, None)["fc"] is conv


def test_centred_prune_and_grow_ranks_by_distance_from_the_centre_and_grows_at_it():
    w = torch.tensor([1.0, 1.1, 3.0, 0.05, 0.0, 0.0]).view(1, 1, 1, 6)
    mask = (w != 0).clone()
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 1.0]).view(1, 1, 1, 6)
    centres = filter_centres({"c": w}, {"c": mask})  # mean of 1.0, 1.1, 3.0, 0.05 = 1.2875
    masks, weights = prune_and_grow({"c": w}, {"c": mask}, {"c": scores}, {"c": 1}, centres)
    # by |w|, 0.05 would go; by |w - 1.2875|, 1.1 (0.19 away) does
    assert masks["c"].flatten().tolist() == [True, False, True, True, True, False]
    assert weights["c"].flatten().tolist() == pytest.approx([1.0, 0.0, 3.0, 0.05, 1.2875, 0.0])
    plain_masks, plain = prune_and_grow({"c": w}, {"c": mask}, {"c": scores}, {"c": 1})
    assert plain_masks["c"].flatten().tolist() == [True, True, True, False, True, False] and plain["c"][0, 0, 0, 4] == 0


def test_pruning_marks_at_their_filters_mean_and_growing_at_it_leaves_an_nsconv_layer_unchanged():
    """The property the centre is for. BaE's centred pull takes the marks to their filter's mean, which
    they leave where it is once they sit at the mean of the filter's unmarked weights. From there a
    centred prune/grow changes no standardised weight, however many entries each filter loses or
    gains; the paper's prune/grow at 0 does (tests/test_nsconv.py)."""
    torch.manual_seed(3)
    mask = torch.rand(4, 3, 3, 3) < 0.5
    w = torch.randn(4, 3, 3, 3) * mask
    counts = {"c": 9}
    marks = mark_low(deviations({"c": w}, filter_centres({"c": w}, {"c": mask})), {"c": mask}, counts)["c"]
    marks = indices_to_mask(marks, mask)
    unmarked_means = filter_centres({"c": w}, {"c": mask & ~marks})["c"]
    squeezed = torch.where(marks, unmarked_means.expand_as(w), w)
    torch.testing.assert_close(filter_centres({"c": squeezed}, {"c": mask})["c"], unmarked_means)
    scores = torch.rand(4, 3, 3, 3)
    before = standardize_filters(squeezed, mask, eps=0.0)
    centres = filter_centres({"c": squeezed}, {"c": mask})
    new_masks, new = prune_and_grow({"c": squeezed}, {"c": mask}, {"c": scores}, counts, centres)
    assert not torch.equal(new_masks["c"], mask)
    torch.testing.assert_close(standardize_filters(new["c"], new_masks["c"], eps=0.0), before)
    zero_masks, at_zero = prune_and_grow({"c": squeezed}, {"c": mask}, {"c": scores}, counts)
    assert not torch.allclose(standardize_filters(at_zero["c"], zero_masks["c"], eps=0.0), before, atol=1e-3)
