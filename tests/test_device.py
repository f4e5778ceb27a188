"""Device report and the memory-budget plan of a SuperNode's client."""

import psutil
import pytest
import torch
from flwr.app import Context, RecordDict
from test_protocol import BASE

from client.client_app import _fit_memory_budget
from client.data import ClientData
from client.device import MemoryBudgetError, device_report, plan_batch_size, training_bytes
from common.data.datasets import STANDARDISATIONS, DataError, Split
from common.nn.models import build_model


def test_device_report_has_the_basics():
    report = device_report(torch.device("cpu"))
    assert report["arch"] and report["cores"] >= 1 and report["torch-device"] == "cpu"
    assert 0 < report["memory-available-mb"] <= report["memory-total-mb"]
    assert report["sap-kernels"] in ("native", "torch") and report["allocator"] in ("thp+mmap", "thp", "glibc")


def test_training_bytes_grow_with_the_batch_and_shrink_with_sap():
    example = torch.zeros(1, 1, 28, 28)
    dense = build_model("lenet5", norm="nsconv", num_classes=10, in_channels=1)
    sap = build_model("lenet5", norm="nsconv", act_sparsity=0.9, num_classes=10, in_channels=1)
    assert training_bytes(dense, example, 64) > training_bytes(dense, example, 8)
    assert training_bytes(sap, example, 64) < training_bytes(dense, example, 64)


def test_batch_size_is_halved_until_the_step_fits_and_refused_when_nothing_fits():
    model = build_model("resnet18", norm="batchnorm")  # a step of some size, so RSS noise does not matter
    example = torch.zeros(1, 3, 32, 32)
    step16 = training_bytes(model, example, 16) / 2**20
    roomy = plan_batch_size(model, example, 16, 500 + step16 + 1, baseline_mb=500)
    assert roomy.batch_size == 16 and not roomy.adapted
    tight = plan_batch_size(model, example, 16, 500 + step16 / 2, baseline_mb=500)
    assert tight.adapted and tight.batch_size < 16
    assert tight.baseline_mb + tight.needed_mb <= tight.budget_mb
    with pytest.raises(MemoryBudgetError, match="memory-budget-mb"):
        plan_batch_size(model, example, 16, 450, baseline_mb=500)
    assert plan_batch_size(model, example, 8, 10**6).baseline_mb == pytest.approx(
        psutil.Process().memory_info().rss / 2**20, rel=0.2
    )


@pytest.mark.parametrize("budget", ["abc", "-5", -5, 0, "nan", "inf", ""])
def test_a_memory_budget_that_is_no_positive_number_of_mb_says_how_to_fix_the_node_config(budget):
    model = build_model("lenet5", norm="nsconv", num_classes=10, in_channels=1)
    split = Split(
        torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
        torch.zeros(2, dtype=torch.int64),
        STANDARDISATIONS["fashion-mnist"],
    )
    data = ClientData(split, split, 10, 1, 0, "fashion-mnist")

    def fit(budget):
        context = Context(1, 1, {"memory-budget-mb": budget}, RecordDict(), {})
        return _fit_memory_budget(model, data, BASE, context)

    assert fit("1e6") == BASE  # a quoted number is a number: plenty, nothing to change
    says = f"memory-budget-mb must be a number of MB above 0, got {budget!r}: fix the SuperNode's --node-config"
    with pytest.raises(DataError, match=says):
        fit(budget)
