"""Device report and the memory-budget plan of a SuperNode's client."""

import psutil
import pytest
import torch

from client.device import MemoryBudgetError, device_report, plan_batch_size, training_bytes
from common.nn.models import build_model


def test_device_report_has_the_basics():
    report = device_report()
    assert report["arch"] and report["cores"] >= 1
    assert 0 < report["memory-available-mb"] <= report["memory-total-mb"]
    assert report["sap-kernels"] in ("native", "torch") and report["allocator"] in ("thp", "glibc")


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
