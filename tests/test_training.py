"""A short real training run: sparse NSConv + SAP LeNet-5 on Fashion-MNIST must learn."""

import os

import pytest

from bench.train import run
from common.data.datasets import DataError, load_fashion_mnist


@pytest.fixture(scope="module")
def fashion_mnist_available():
    try:
        load_fashion_mnist()
    except DataError as exc:
        if os.environ.get("REQUIRE_DATA"):
            raise
        pytest.skip(str(exc))


def test_sparse_sap_lenet_learns_fashion_mnist(fashion_mnist_available):
    result = run(steps=200, log_every=50, test_limit=2000)
    losses = [p["train_loss"] for p in result["curve"]]
    assert losses[-1] < 0.6 * losses[0], losses
    assert result["test_accuracy"] > 0.6, result["test_accuracy"]  # chance is 0.1
    assert result["param_sparsity"] == pytest.approx(0.9, abs=0.01)


def test_a_run_does_not_depend_on_the_runs_before_it_in_the_process(fashion_mnist_available):
    """The SAP threshold samples restart from the run's seed (the SAP accuracy bench runs many in one process)."""
    first = run(steps=3, log_every=1, test_limit=200, sap_format="int8")
    run(steps=2, log_every=1, test_limit=10, seed=1)
    again = run(steps=3, log_every=1, test_limit=200, sap_format="int8")
    assert again["curve"] == first["curve"]
    assert again["test_accuracy"] == first["test_accuracy"]
    assert first["sap_format"] == "int8"


def test_the_cosine_schedule_halves_the_rate_midway_and_ends_at_zero(fashion_mnist_available):
    cosine = run(steps=4, log_every=1, test_limit=10, schedule="cosine")
    constant = run(steps=4, log_every=1, test_limit=10)
    # the rate each step leaves for the next: 0.05 (1 + cos(pi k / 4)) / 2 after step k
    assert [p["lr"] for p in cosine["curve"]] == pytest.approx([0.04268, 0.025, 0.00732, 0.0], abs=1e-5)
    assert [p["lr"] for p in constant["curve"]] == [0.05] * 4
    assert cosine["schedule"] == "cosine"
    with pytest.raises(ValueError, match="schedule must be one of constant, cosine"):
        run(steps=1, schedule="linear")


def test_another_threshold_seed_perturbs_a_run_and_its_own_seed_is_the_default(fashion_mnist_available):
    own = run(steps=20, log_every=20, test_limit=500)
    same = run(steps=20, log_every=20, test_limit=500, threshold_seed=0)
    other = run(steps=20, log_every=20, test_limit=500, threshold_seed=1000)
    assert same["curve"] == own["curve"] and same["test_loss"] == own["test_loss"]
    assert same["threshold_seed"] == own["threshold_seed"] == 0 and other["threshold_seed"] == 1000
    assert other["test_loss"] != own["test_loss"]  # other thresholds, other kept entries, other weights
    assert other["test_loss"] == pytest.approx(own["test_loss"], rel=1e-3)  # and nothing else changed


def test_sap_accuracy_prices_a_format_against_fp32_sap_paired_by_seed():
    from bench.sap_accuracy import REFERENCE, summary_table

    def runs(*accs):
        return [{"seed": seed, "test_accuracy": acc, "train_seconds": 1.0} for seed, acc in enumerate(accs)]

    table = summary_table({REFERENCE: runs(0.50, 0.60), "nsconv+sap-conv-int8": runs(0.49, 0.62)}, "t")
    row = next(line for line in table.splitlines() if line.startswith("| nsconv+sap-conv-int8 "))
    assert "| 55.50 ± 9.19 |" in row  # the accuracies themselves
    assert "| +0.50 ± 2.12 | - | 1 of 2 |" in row  # -1 and +2 points against fp32 SAP's seeds; no interval from 2


def test_sap_accuracy_bounds_a_paired_cost_by_the_t_interval_of_its_mean():
    from bench.sap_accuracy import REFERENCE, mean_interval, summary_table, t_quantile

    for p, df, exact, tolerance in [(0.975, 3, 3.1824, 5e-3), (0.975, 5, 2.5706, 5e-4), (0.975, 49, 2.0096, 5e-4)]:
        assert t_quantile(p, df) == pytest.approx(exact, abs=tolerance)
    assert t_quantile(0.95, 49) == pytest.approx(1.6766, abs=5e-4)
    lo, hi = mean_interval([-1.0, 0.0, 1.0, 2.0])  # mean 0.5, std 1.291, t(0.975, 3) 3.182
    assert (lo, hi) == pytest.approx((0.5 - 2.054, 0.5 + 2.054), abs=5e-3)

    def runs(*accs):
        return [{"seed": seed, "test_accuracy": acc, "train_seconds": 1.0} for seed, acc in enumerate(accs)]

    table = summary_table({REFERENCE: runs(0.5, 0.5, 0.5, 0.5), "x": runs(0.49, 0.50, 0.51, 0.52)}, "t")
    row = next(line for line in table.splitlines() if line.startswith("| x "))
    assert "| +0.50 ± 1.29 | [-1.55, +2.55] | 1 of 4 |" in row


def test_sap_accuracy_gradients_put_the_lossy_formats_far_closer_to_fp32_than_sap_is_to_exact(tmp_path):
    import numpy as np

    from bench.sap_accuracy import gradient_fidelity

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "cifar10.npz",
        x_train=rng.integers(0, 256, (64, 3072), dtype=np.uint8),
        y_train=rng.integers(0, 10, 64),
        x_test=rng.integers(0, 256, (2, 3072), dtype=np.uint8),
        y_test=np.array([0, 1]),
    )
    pairs = gradient_fidelity(str(tmp_path), width=4, n_batches=1)
    error = {pair: v["relative_error_mean"] for pair, v in pairs.items()}
    assert set(error) == {"fp32 SAP vs exact", "fp16 vs fp32 SAP", "bf16 vs fp32 SAP", "int8 vs fp32 SAP"}
    assert 0 < error["fp16 vs fp32 SAP"] < error["bf16 vs fp32 SAP"] < error["int8 vs fp32 SAP"]
    assert error["int8 vs fp32 SAP"] < error["fp32 SAP vs exact"] / 10  # SAP's own dropping dwarfs int8's rounding
