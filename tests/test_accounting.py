"""Tests for common.measure.accounting: per-layer profiles and the FedMef appendix 7.2 / 7.3 estimates."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch import nn

from common.measure.accounting import (
    LayerCost,
    SavedTensorMeter,
    estimate_flops,
    estimate_memory,
    profile_layers,
    sparse_bytes,
)
from common.methods import METHODS
from common.nn.layers import SparseConv2d, SparseLinear
from common.nn.models import build_model
from common.pruning import masks as M

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")


# ----------------------------------------------------------------------------- profile_layers


def test_profile_single_conv_known_macs():
    conv = SparseConv2d(3, 8, 3, padding=1)
    (cost,) = profile_layers(conv, torch.randn(2, 3, 8, 8))
    # (3*3*3 MACs per output) x (2*8*8*8 outputs)
    assert cost.macs == 27648
    assert cost.weight_numel == 216
    assert cost.active_weights == 216
    assert cost.input_numel == 384


def test_profile_strided_depthwise_and_linear_with_mask():
    dw = SparseConv2d(4, 4, 3, stride=2, padding=1, groups=4)
    lin = SparseLinear(16, 3)
    model = nn.Sequential(dw, nn.Flatten(), lin)
    lin.mask[0] = False  # 16 of 48 weights pruned
    costs = profile_layers(model, torch.randn(1, 4, 4, 4))
    assert [c.name for c in costs] == ["0", "2"]
    # depthwise: 9 MACs per output, output 1x4x2x2
    assert costs[0].macs == 144 and costs[0].weight_numel == 36 and costs[0].input_numel == 64
    # linear: 16 MACs per output, 3 outputs; active count from the mask
    assert costs[1].macs == 48 and costs[1].active_weights == 32 and costs[1].input_numel == 16


def test_profile_leaves_no_hooks_and_no_grad():
    conv = SparseConv2d(3, 4, 3)
    profile_layers(conv, torch.randn(1, 3, 5, 5))
    assert not conv._forward_hooks
    assert conv.weight.grad is None


def test_profile_plain_torch_layers_count_as_dense():
    model = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.Flatten(), nn.Linear(4 * 9, 2))
    costs = profile_layers(model, torch.randn(1, 2, 3, 3))
    assert [c.active_weights for c in costs] == [8, 72]
    assert [c.macs for c in costs] == [2 * 36, 36 * 2]


# ----------------------------------------------------------------------------- memory (app. 7.2)


def test_sparse_bytes_uses_paper_formats():
    assert sparse_bytes((1000,), 950) == 4000  # density >= 0.9: dense fp32
    assert sparse_bytes((1000,), 500) == math.ceil((1000 + 500 * 32) / 8)  # bitmap
    assert sparse_bytes((1000,), 100) == math.ceil(100 * (10 + 32) / 8)  # COO, 10-bit offsets


def test_estimate_memory_known_answer():
    """One layer: 1000 weights, 100 active; input of 10 000 elements; s_ta = 0.9."""
    costs = [LayerCost("l", weight_numel=1000, active_weights=100, input_numel=10_000, macs=0)]
    est = estimate_memory(costs, act_sparsity=0.9, adjust_fraction=0.4)
    assert est.dense_params == 4000
    assert est.sparse_params == 525  # COO at density 0.1: 100 * (10 + 32) bits
    assert est.dense_activations == 40_000
    assert est.sparse_activations == 5750  # COO: 1000 * (14 + 32) bits
    assert est.topk == 320  # floor(0.4 * 100) (value, int32 index) pairs
    assert est.footprint(METHODS["fedavg"]) == 2 * 4000 + 2 * 40_000
    assert est.footprint(METHODS["pqsu"]) == 2 * 525 + 2 * 40_000
    assert est.footprint(METHODS["fedtiny"]) == 2 * 525 + 2 * 40_000 + 320
    assert est.footprint(METHODS["feddst"]) == est.footprint(METHODS["fedtiny"])
    assert est.footprint(METHODS["fedmef"]) == 2 * 525 + 5750 + 40_000 + 320
    assert est.footprint(METHODS["fedmef"], sap=False) == est.footprint(METHODS["fedtiny"])


def test_estimate_memory_ordering_on_sparse_sap_model():
    model = build_model("lenet5", "nsconv", 0.9)
    M.load_masks(model, M.random_masks(M.weight_shapes(model), 0.9))
    costs = profile_layers(model, torch.randn(4, 1, 28, 28))
    est = estimate_memory(costs, act_sparsity=0.9)
    fedavg, fedtiny, fedmef, pqsu = (est.footprint(METHODS[m]) for m in ("fedavg", "fedtiny", "fedmef", "pqsu"))
    assert fedavg > fedtiny > fedmef
    assert fedavg > pqsu
    assert est.sparse_activations < 0.2 * est.dense_activations
    assert est.sparse_params < 0.2 * est.dense_params
    assert est.dense_activations == 4 * sum(c.input_numel for c in costs)


# ----------------------------------------------------------------------------- FLOPs (app. 7.3)


def test_estimate_flops_formulas():
    costs = [LayerCost("a", 100, 10, 50, macs=1000), LayerCost("b", 200, 200, 80, macs=3000)]
    est = estimate_flops(costs, param_sparsity=0.7)
    assert est.dense == 2 * 4000
    assert est.sparse == pytest.approx(2 * 1000 * 0.1 + 2 * 3000 * 1.0)
    assert est.overhead == pytest.approx(4 * 0.3 * 300 + 130 * math.log2(130))
    for e in (1, 5, 10):
        assert est.fedavg(e) == 3 * est.dense * e
        assert est.fedtiny(e) == pytest.approx(3 * est.sparse * (e - 1) + est.sparse + 2 * est.dense)
        assert est.fedmef(e) >= est.fedtiny(e)
        assert est.fedmef(e) - est.fedtiny(e) == pytest.approx(est.overhead * (3 * (e - 1) + 1))


def test_estimate_flops_on_model():
    model = build_model("lenet5", "nsconv")
    M.load_masks(model, M.random_masks(M.weight_shapes(model), 0.9))
    costs = profile_layers(model, torch.randn(2, 1, 28, 28))
    est = estimate_flops(costs, 0.9)
    assert 0 < est.sparse < est.dense
    for e in (1, 10):
        assert est.fedmef(e) >= est.fedtiny(e)
        assert est.fedavg(e) == 3 * est.dense * e
    # sparse training is cheaper than dense over a round of 10 iterations
    assert est.fedmef(10) < est.fedavg(10)


# ----------------------------------------------------------------------------- the meter


def test_meter_counts_each_storage_once_and_separates_model_state():
    lin = SparseLinear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with SavedTensorMeter(lin) as meter:
        h = x * 2.0  # saves nothing for x (scalar multiply)
        lin(h)
        lin(h)  # same input storage again: not counted twice
    assert meter.held.activation_bytes == h.nbytes
    assert meter.held.model_bytes == lin.weight.nbytes + lin.mask.nbytes


def test_meter_without_model_counts_everything_as_activation():
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(2, 4, requires_grad=True)
    with SavedTensorMeter() as meter:
        x @ w
    assert meter.held.activation_bytes == x.nbytes + w.nbytes
    assert meter.held.model_bytes == 0
    assert meter.held.tensors == 2


def test_a_metered_forward_frees_its_graph_once_the_output_is_dropped():
    # BatchNorm saves its own outputs (batch mean, inverse std): a meter that kept those as they are
    # closed a cycle (output -> grad_fn -> saved output) that Python's collector cannot see, and the
    # graph kept every activation before it alive: 45 MB per client probe of ResNet18 w8.
    model = build_model("resnet18", norm="batchnorm", act_sparsity=None, num_classes=10, in_channels=3, width=4)
    outputs: list[weakref.ref[torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(weakref.ref(out))) for m in model.modules()]
    with SavedTensorMeter(model) as meter:
        out = model(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    del out
    gc.collect()
    assert meter.held.activation_bytes > 0 and len(outputs) > 20
    assert sum(ref() is not None for ref in outputs) == 0


def test_backward_through_a_metered_forward_gives_the_unmetered_gradient():
    model = build_model("lenet5", norm="batchnorm", act_sparsity=None, num_classes=10, in_channels=1)
    x = torch.randn(4, 1, 28, 28)
    plain = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    with SavedTensorMeter(model):
        out = model(x)
    metered = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(plain, metered, strict=True))
