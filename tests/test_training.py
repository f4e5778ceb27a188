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
