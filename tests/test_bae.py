"""Tests for common.pruning.bae: budget-aware extrusion (FedMef §3.3, eq. 2-4). The first test fails on the
public port, whose marks were the pruned zeros and whose penalty and lr boost were therefore 0."""

from __future__ import annotations

import math

import pytest
import torch

from common.pruning.bae import budget_lr, extrusion_penalty, extrusion_prox_, mark_low, marked_norm
from common.pruning.topk import indices_to_mask

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")


def test_marks_are_smallest_active_never_pruned_zeros_and_extrusion_is_live():
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    # Pruned entries hold exact zeros, the smallest |w| in the tensor: the port's marks.
    weight = torch.tensor([[0.5, 0.0, -0.2, 3.0], [0.0, 0.3, -4.0, 0.0]])
    marks = mark_low({"w": weight}, {"w": mask}, {"w": 2})
    assert marks["w"].tolist() == [2, 5]  # |-0.2| at [0, 2] and |0.3| at [1, 1]: the two smallest ACTIVE weights
    assert marks["w"].dtype == torch.int64 and mask.view(-1)[marks["w"]].all()

    penalty = extrusion_penalty({"w": weight}, marks)
    assert penalty.item() == pytest.approx(0.2**2 + 0.3**2)
    norm = marked_norm({"w": weight}, marks)
    assert norm == pytest.approx(math.sqrt(0.13))
    eta_t = 1e-3
    assert budget_lr(eta_t, 1.0, 0, 10, norm) > eta_t


def test_mark_low_caps_skips_absent_layers_and_breaks_ties_by_index():
    masks = {"a": torch.tensor([False, True, True, False, True]), "b": torch.ones(3, dtype=torch.bool)}
    # Every active |w| ties: the lowest active indices win, whatever the signs.
    weights = {"a": torch.tensor([0.0, -1.0, 1.0, 0.0, -1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
    assert mark_low(weights, masks, {"a": 2})["a"].tolist() == [1, 2]
    capped = mark_low(weights, masks, {"a": 99})
    assert capped["a"].tolist() == [1, 2, 4]  # every active position
    assert capped["b"].numel() == 0


def test_mark_low_is_exactly_the_k_smallest_active_on_random_layers():
    mask = torch.rand(16, 8, 3, 3) < 0.2
    weight = torch.randn(16, 8, 3, 3) * mask
    k = 37
    marks = indices_to_mask(mark_low({"w": weight}, {"w": mask}, {"w": k})["w"], mask)
    assert int(marks.sum()) == k and not (marks & ~mask).any()
    assert weight[marks].abs().max() <= weight[mask & ~marks].abs().min()


def test_mark_low_rejects_bad_arguments():
    masks = {"w": torch.ones(4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="without a mask"):
        mark_low({"w": torch.ones(4)}, masks, {"v": 1})
    with pytest.raises(ValueError, match="counts must be >= 0"):
        mark_low({"w": torch.ones(4)}, masks, {"w": -1})
    with pytest.raises(ValueError, match="weights for layer 'w' has shape"):
        mark_low({"w": torch.ones(2, 2)}, masks, {"w": 1})


def test_penalty_is_differentiable_sum_of_squares_over_marks_only():
    w1 = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    w2 = torch.tensor([[4.0, 5.0]], requires_grad=True)
    marks = {"a": torch.tensor([0, 1]), "b": torch.tensor([1])}
    penalty = extrusion_penalty({"a": w1, "b": w2}, marks)
    assert penalty.item() == 1.0 + 4.0 + 25.0
    penalty.backward()
    assert w1.grad.tolist() == [2.0, -4.0, 0.0]
    assert w2.grad.tolist() == [[0.0, 10.0]]
    assert extrusion_penalty({}, {}).item() == 0.0


def test_marked_norm_is_one_norm_over_all_layers():
    weights = {"a": torch.tensor([3.0, 9.0]), "b": torch.tensor([4.0])}
    marks = {"a": torch.tensor([0]), "b": torch.tensor([0])}
    # sqrt(3^2 + 4^2), not the sum of per-layer norms (7).
    assert marked_norm(weights, marks) == pytest.approx(5.0)


@pytest.mark.parametrize("step, total, norm", [(0, 10, 0.7), (3, 10, 2.0), (7, 8, 0.05), (10, 10, 5.0)])
def test_budget_lr_matches_eq_3_and_4(step, total, norm):
    eta0 = 0.8
    sigmoid = 1.0 / (1.0 + math.exp(-norm))
    beta = (2 * total - 2 * step) / (2 * total - step) * (2 * sigmoid - 1) * eta0
    for eta_t in [0.0, beta / 2, beta * 2]:
        assert budget_lr(eta_t, eta0, step, total, norm) == pytest.approx(max(eta_t, beta), rel=1e-12, abs=1e-15)


def test_budget_lr_limits():
    # No marked mass or no budget left: no boost. A huge norm saturates sigma without overflow.
    assert budget_lr(0.01, 1.0, 0, 10, 0.0) == 0.01
    assert budget_lr(0.01, 1.0, 10, 10, 3.0) == 0.01
    assert budget_lr(0.0, 0.5, 0, 10, 1e6) == 0.5


@pytest.mark.parametrize(
    "args, message",
    [
        ((-0.1, 1.0, 0, 10, 1.0), "eta_t must be >= 0"),
        ((0.1, -1.0, 0, 10, 1.0), "eta0 must be >= 0"),
        ((0.1, 1.0, 0, 10, -1.0), "low_norm"),
        ((0.1, 1.0, 11, 10, 1.0), "step must lie in"),
        ((0.1, 1.0, 0, 0, 1.0), "total_steps must be >= 1"),
        ((float("nan"), 1.0, 0, 10, 1.0), "eta_t"),
    ],
)
def test_budget_lr_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        budget_lr(*args)


def test_the_proximal_step_shrinks_only_the_marks_by_one_over_one_plus_two_lambda_mu():
    w = torch.randn(4, 5)
    mask = torch.rand(4, 5) > 0.3
    marks = mark_low({"l": w}, {"l": mask}, {"l": 3})
    marked = indices_to_mask(marks["l"], mask)
    before = w.clone()
    extrusion_prox_({"l": w}, marks, lam=2.0, lr=0.25)
    assert torch.equal(w[~marked], before[~marked])
    assert torch.allclose(w[marked], before[marked] / 2.0)  # 1 / (1 + 2 * 2 * 0.25)
    with pytest.raises(ValueError, match="must be >= 0"):
        extrusion_prox_({"l": w}, marks, lam=-1.0, lr=0.1)


def test_in_the_loss_under_momentum_the_penalty_swings_the_marks_through_zero_the_proximal_step_never():
    # bench.bae_squeeze's model of a client: the penalty alone, SGD with momentum from an empty buffer
    from bench.bae_squeeze import penalty_only_ratio

    plain = [penalty_only_ratio(k, 0.05, 0.05, 0.0, 3.0, 0.0, 1e-3) for k in range(1, 13)]
    assert plain == pytest.approx([0.7**k for k in range(1, 13)])  # no momentum: (1 - 2 lambda mu)^k
    heavy = [penalty_only_ratio(k, 0.05, 0.05, 0.9, 3.0, 0.0, 1e-3) for k in range(1, 13)]
    assert min(heavy) < -0.3 and max(heavy[6:]) > 0.3  # past zero, and back: the client's step count decides


def test_the_proximal_steps_penalty_only_model_shrinks_monotonically_by_one_over_one_plus_two_lambda_mu():
    from bench.bae_squeeze import penalty_only_ratio

    prox = [penalty_only_ratio(k, 0.05, 0.05, 0.9, 3.0, 0.0, 1e-3, proximal=True) for k in range(1, 13)]
    assert prox == pytest.approx([1.3**-k for k in range(1, 13)])  # momentum never sees the penalty


def test_the_l1_penalty_is_the_sum_of_absolute_marks_with_sign_gradients():
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    marks = {"a": torch.tensor([0, 1])}
    penalty = extrusion_penalty({"a": w}, marks, "l1")
    assert penalty.item() == 3.0
    penalty.backward()
    assert w.grad.tolist() == [1.0, -1.0, 0.0]
    with pytest.raises(ValueError, match="unknown BaE penalty 'l0'"):
        extrusion_penalty({"a": w}, marks, "l0")


def test_the_l1_proximal_step_soft_thresholds_the_marks_by_lambda_mu_and_zeroes_the_small_ones():
    w = torch.tensor([0.5, -0.5, 0.01, -0.02, 0.3])
    marks = {"l": torch.tensor([0, 1, 2, 3])}
    extrusion_prox_({"l": w}, marks, lam=0.2, lr=0.25, penalty="l1")  # threshold 0.05
    assert w.tolist() == pytest.approx([0.45, -0.45, 0.0, 0.0, 0.3])
    assert w[2].item() == 0.0 and w[3].item() == 0.0  # exactly zero, never past it
    with pytest.raises(ValueError, match="unknown BaE penalty"):
        extrusion_prox_({"l": w}, marks, lam=0.2, lr=0.25, penalty="l0")


@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_with_centres_the_proximal_step_shrinks_the_marks_towards_their_filters_centre(penalty):
    w = torch.tensor([[1.5, 0.5, 2.0, 9.0]])
    marks = {"l": torch.tensor([0, 1])}
    centres = {"l": torch.tensor([[1.0]])}
    extrusion_prox_({"l": w}, marks, lam=0.2, lr=0.25, penalty=penalty, centres=centres)
    shrunk = [1.5 - 0.05, 0.5 + 0.05] if penalty == "l1" else [1.0 + 0.5 / 1.1, 1.0 - 0.5 / 1.1]
    assert w.tolist() == [pytest.approx(shrunk + [2.0, 9.0])]
    for _ in range(200):
        extrusion_prox_({"l": w}, marks, lam=0.2, lr=0.25, penalty=penalty, centres=centres)
    assert w[0, :2].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)  # at the centre, not at 0


@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_bae_squeeze_predicts_the_squared_penalty_only_and_reads_l1_runs_without_a_prediction(penalty, tmp_path):
    """``python -m bench.bae_squeeze`` on a run file: the penalty-only model (one scalar for every mark)
    holds for the squared penalty only; an L1 run's rows carry the measured ratios and no prediction."""
    import json

    from bench.bae_squeeze import main, squeeze_rows

    config = {"lr": 0.05, "lr-decay": 0.99, "momentum": 0.9, "bae-lambda": 0.1, "weight-decay": 0.0}
    config |= {"bae-step": "proximal", "bae-penalty": penalty}
    clients = [{"bae_marked": 7, "bae_norm_start": 1.0, "bae_norm_end": r, "steps": k} for r, k in ((0.4, 5), (0.9, 3))]
    results = {
        "run": {"config": config},
        "rounds": [{"round": 3, "bae_norm_start": 1.0, "bae_norm_end": 0.5, "clients": clients}],
        "summary": {},
    }
    (row,) = squeeze_rows(results)
    assert row["aggregate_ratio"] == 0.5 and row["clients_halving"] == 1 and row["marked"] == 7
    predictions = [c["penalty_only"] for c in row["clients_by_steps"]]
    assert all(p is None for p in predictions) if penalty == "l1" else all(0 < p < 1 for p in predictions)
    run = tmp_path / "run-s0"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results))
    main([str(run), "-o", str(tmp_path / "squeeze.json")])  # prints its table either way
    assert json.loads((tmp_path / "squeeze.json").read_text())["run-s0"]["rounds"][0]["aggregate_ratio"] == 0.5
