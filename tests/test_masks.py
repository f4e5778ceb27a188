"""Tests for common.pruning.masks: ERK densities, random / magnitude masks, loading masks, keeping pruned
weights at exactly zero through optimiser steps (FedMef Alg. 1: "pruned weights stay exactly 0")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.nn.layers import ReLU, SparseConv2d, SparseLinear
from common.nn.nsconv import NSConv2d
from common.pruning import masks as M

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")

SHAPES = {
    "conv1.weight": (16, 3, 3, 3),
    "conv2.weight": (32, 16, 3, 3),
    "conv3.weight": (64, 32, 3, 3),
    "fc.weight": (10, 64),
}


def _numel(shape):
    return math.prod(shape)


def _weighted_density(shapes, densities):
    total = sum(_numel(s) for s in shapes.values())
    return sum(densities[n] * _numel(s) for n, s in shapes.items()) / total


# ----------------------------------------------------------------------------- ERK / uniform


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.5, 0.8])
def test_erk_weighted_mean_is_exact_and_capped(density):
    d = M.erk_densities(SHAPES, density)
    assert set(d) == set(SHAPES)
    assert _weighted_density(SHAPES, d) == pytest.approx(density, abs=1e-9)
    assert all(0.0 <= v <= 1.0 for v in d.values()), d


def test_erk_bigger_layers_get_lower_density():
    d = M.erk_densities(SHAPES, 0.1)
    # (sum of dims)/(product of dims) shrinks from conv1 to conv3, and so must the density.
    assert d["conv1.weight"] > d["conv2.weight"] > d["conv3.weight"]
    # Unclamped layers keep ERK's ratio exactly: density proportional to sum/prod of the dims.
    raw = {n: sum(s) / _numel(s) for n, s in SHAPES.items()}
    assert d["conv2.weight"] / d["conv3.weight"] == pytest.approx(raw["conv2.weight"] / raw["conv3.weight"], rel=1e-12)


def test_erk_clamps_overfull_layer_to_dense_and_resolves_rest():
    # At density 0.1 the raw ERK share of the small fc layer exceeds 1: it must become dense and the
    # remaining budget be re-spread, still hitting the target exactly.
    d = M.erk_densities(SHAPES, 0.1)
    assert d["fc.weight"] == 1.0
    assert max(v for n, v in d.items() if n != "fc.weight") < 1.0
    assert _weighted_density(SHAPES, d) == pytest.approx(0.1, abs=1e-9)


def test_erk_on_real_model_shapes():
    from common.nn.models import build_model

    shapes = M.weight_shapes(build_model("resnet18", "nsconv"))
    for density in (0.05, 0.1, 0.2):
        d = M.erk_densities(shapes, density)
        assert _weighted_density(shapes, d) == pytest.approx(density, abs=1e-9)
        assert max(d.values()) <= 1.0


def test_erk_endpoints():
    assert all(v == 1.0 for v in M.erk_densities(SHAPES, 1.0).values())
    assert all(v == 0.0 for v in M.erk_densities(SHAPES, 0.0).values())


def test_layer_densities_uniform_and_erk():
    u = M.layer_densities(SHAPES, 0.9, "uniform")
    assert all(v == pytest.approx(0.1) for v in u.values())
    e = M.layer_densities(SHAPES, 0.9, "erk")
    assert e == pytest.approx(M.erk_densities(SHAPES, 0.1), rel=1e-12)
    with pytest.raises(ValueError, match="distribution"):
        M.layer_densities(SHAPES, 0.9, "gaussian")


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_sparsity_raises(bad):
    with pytest.raises(ValueError):
        M.layer_densities(SHAPES, bad)
    with pytest.raises(ValueError):
        M.random_masks(SHAPES, bad)
    with pytest.raises(ValueError):
        M.magnitude_masks({n: torch.randn(s) for n, s in SHAPES.items()}, bad)
    with pytest.raises(ValueError):
        M.erk_densities(SHAPES, bad)
    with pytest.raises(ValueError):
        M.uniform_densities(SHAPES, bad)


# ----------------------------------------------------------------------------- random / magnitude masks


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
def test_random_masks_exact_counts(distribution, sparsity):
    dens = M.layer_densities(SHAPES, sparsity, distribution)
    masks = M.random_masks(SHAPES, sparsity, distribution, generator=torch.Generator().manual_seed(0))
    assert set(masks) == set(SHAPES)
    for name, shape in SHAPES.items():
        m = masks[name]
        assert m.dtype == torch.bool and tuple(m.shape) == shape
        assert int(m.sum()) == round(dens[name] * _numel(shape)), name
    # overall sparsity close to the target (rounding per layer only)
    assert M.sparsity(masks) == pytest.approx(sparsity, abs=len(SHAPES) / sum(map(_numel, SHAPES.values())))


def test_random_masks_reproducible_with_seeded_generator():
    a = M.random_masks(SHAPES, 0.9, generator=torch.Generator().manual_seed(7))
    b = M.random_masks(SHAPES, 0.9, generator=torch.Generator().manual_seed(7))
    c = M.random_masks(SHAPES, 0.9, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[n], b[n]) for n in SHAPES)
    assert any(not torch.equal(a[n], c[n]) for n in SHAPES)


def test_random_masks_keep_at_least_one_weight_per_layer():
    masks = M.random_masks(SHAPES, 1.0)
    assert all(int(m.sum()) == 1 for m in masks.values())


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_magnitude_masks_keep_largest(distribution):
    g = torch.Generator().manual_seed(3)
    weights = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    dens = M.layer_densities(SHAPES, 0.8, distribution)
    masks = M.magnitude_masks(weights, 0.8, distribution)
    for name, w in weights.items():
        m = masks[name]
        assert int(m.sum()) == round(dens[name] * w.numel())
        if int(m.sum()) < w.numel():
            assert w[m].abs().min() >= w[~m].abs().max(), name


def test_magnitude_masks_known_answer():
    w = {"w": torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])}
    m = M.magnitude_masks(w, 4 / 6, "uniform")  # keep 2 of 6
    assert torch.equal(m["w"], torch.tensor([[False, True, False], [True, False, False]]))


# ----------------------------------------------------------------------------- model plumbing


class _Small(nn.Module):
    def __init__(self, ns: bool = False):
        super().__init__()
        conv = NSConv2d if ns else SparseConv2d
        self.conv1 = conv(3, 8, 3, padding=1)
        self.act = ReLU()
        self.conv2 = conv(8, 8, 3, padding=1)
        self.fc = SparseLinear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = F.avg_pool2d(self.act(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_prunable_weights_and_model_masks_cover_every_conv_and_linear():
    model = _Small()
    names = {"conv1.weight", "conv2.weight", "fc.weight"}
    assert set(M.prunable_weights(model)) == names
    assert M.weight_shapes(model) == {"conv1.weight": (8, 3, 3, 3), "conv2.weight": (8, 8, 3, 3), "fc.weight": (5, 128)}
    mm = M.model_masks(model)
    assert set(mm) == names and all(bool(m.all()) for m in mm.values())
    # model_masks returns copies: editing them must not touch the model
    mm["fc.weight"].zero_()
    assert bool(model.fc.mask.all())


def test_model_masks_for_plain_layers_are_all_ones():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Flatten(), nn.Linear(3, 2))
    mm = M.model_masks(model)
    assert set(mm) == {"0.weight", "2.weight"}
    assert all(m.dtype == torch.bool and bool(m.all()) for m in mm.values())


def test_load_masks_sets_buffers_and_zeros_pruned_weights():
    model = _Small(ns=True)
    masks = M.random_masks(M.weight_shapes(model), 0.7, generator=torch.Generator().manual_seed(1))
    M.load_masks(model, masks)
    back = M.model_masks(model)
    for name, w in M.prunable_weights(model).items():
        assert torch.equal(back[name], masks[name])
        assert torch.equal(w.detach()[~masks[name]], torch.zeros(int((~masks[name]).sum())))
        assert bool((w.detach()[masks[name]] != 0).all())
    # NSConv's effective weights honour the loaded mask
    assert torch.equal(
        model.conv1.effective_weight()[~masks["conv1.weight"]], torch.zeros(int((~masks["conv1.weight"]).sum()))
    )


def test_load_masks_rejects_wrong_shape():
    model = _Small()
    with pytest.raises(ValueError, match=r"conv1\.weight.*shape"):
        M.load_masks(model, {"conv1.weight": torch.ones(8, 3, 3, dtype=torch.bool)})


def test_load_masks_rejects_unknown_name():
    model = _Small()
    with pytest.raises(KeyError, match="conv9.weight"):
        M.load_masks(model, {"conv9.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool)})


def test_load_masks_rejects_layer_without_mask_buffer():
    model = nn.Sequential(nn.Conv2d(2, 3, 1))
    with pytest.raises(TypeError, match="mask buffer"):
        M.load_masks(model, {"0.weight": torch.ones(3, 2, 1, 1, dtype=torch.bool)})


def test_load_masks_failure_leaves_model_unchanged():
    model = _Small()
    good = torch.zeros(8, 3, 3, 3, dtype=torch.bool)
    bad = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError):
        M.load_masks(model, {"conv1.weight": good, "conv2.weight": bad})
    assert bool(model.conv1.mask.all())


def test_apply_and_mask_gradients():
    model = _Small()
    masks = M.random_masks(M.weight_shapes(model), 0.5)
    for w in M.prunable_weights(model).values():
        w.grad = torch.ones_like(w)
    M.mask_gradients_(model, masks)
    M.apply_masks_(model, masks)
    for name, w in M.prunable_weights(model).items():
        assert torch.equal(w.grad, masks[name].float())
        assert torch.equal(w.detach() != 0, masks[name])


# ----------------------------------------------------------------------------- pruned weights stay 0


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g)
        y = torch.randint(0, 5, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _pruned_values(model, masks):
    return torch.cat([w.detach()[~masks[n]] for n, w in M.prunable_weights(model).items()])


def _active_values(model, masks):
    return torch.cat([w.detach()[masks[n]] for n, w in M.prunable_weights(model).items()])


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=5e-2),
}


@pytest.mark.parametrize("ns", [False, True], ids=["sparseconv", "nsconv"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("hooked", [True, False], ids=["hooks", "control"])
def test_pruned_weights_stay_exactly_zero(opt_name, ns, hooked):
    """Optimiser state built before the mask (momentum, Adam moments, decoupled decay) would move
    pruned weights; keep_pruned_at_zero must hold them at exactly 0. The control (no hooks) shows
    the set-up really does move them, so the hooked case can fail."""
    model = _Small(ns=ns)
    opt = OPTIMIZERS[opt_name](model.parameters())
    _train(model, opt, 3, seed=1)  # dense warm-up: optimiser state everywhere
    masks = M.random_masks(M.weight_shapes(model), 0.8, generator=torch.Generator().manual_seed(5))
    M.load_masks(model, masks)
    if hooked:
        handles = M.keep_pruned_at_zero(opt, model, masks)
    before = _active_values(model, masks).clone()
    _train(model, opt, 20, seed=2)
    pruned = _pruned_values(model, masks)
    if hooked:
        assert torch.equal(pruned, torch.zeros_like(pruned))
        assert not torch.equal(_active_values(model, masks), before)  # training did happen
        for h in handles:
            h.remove()
        _train(model, opt, 2, seed=3)  # handles really undo the hooks
        assert bool((_pruned_values(model, masks) != 0).any())
    else:
        assert bool((pruned != 0).any())


def test_pruned_weights_stay_zero_from_fresh_optimizer():
    """The usual client case: masks loaded first, 20 SGD steps with momentum and weight decay."""
    model = _Small()
    masks = M.random_masks(M.weight_shapes(model), 0.9, generator=torch.Generator().manual_seed(2))
    M.load_masks(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    M.keep_pruned_at_zero(opt, model, masks)
    _train(model, opt, 20)
    pruned = _pruned_values(model, masks)
    assert torch.equal(pruned, torch.zeros_like(pruned))
    assert M.weight_sparsity(M.prunable_weights(model).values()) == pytest.approx(M.sparsity(masks))


def test_masks_from_the_wire_hold_pruned_weights_at_zero_on_any_device(device):
    """A client loads the CPU masks it decoded into a model on its device, then trains there."""
    model = _Small(ns=True).to(device)
    masks = M.random_masks(M.weight_shapes(model), 0.8, generator=torch.Generator().manual_seed(2))
    M.load_masks(model, masks)
    assert all(m.device.type == device.type for m in M.model_masks(model).values())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    on_device = {name: m.to(device) for name, m in masks.items()}
    M.keep_pruned_at_zero(opt, model, on_device)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        opt.zero_grad()
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
    pruned = _pruned_values(model, on_device)
    assert torch.equal(pruned, torch.zeros_like(pruned)) and bool((_active_values(model, on_device) != 0).all())


# ----------------------------------------------------------------------------- counting


def test_count_active_and_sparsity_values():
    masks = {
        "a": torch.tensor([[True, False], [False, False]]),
        "b": torch.tensor([True, True, True, False]),
    }
    assert M.count_active(masks) == (4, 8)
    assert M.sparsity(masks) == 0.5
    assert M.layer_sparsity(masks) == {"a": 0.75, "b": 0.25}
    assert M.sparsity({}) == 0.0
    assert M.count_active({}) == (0, 0)


def test_weight_sparsity_counts_exact_zeros():
    ws = [torch.tensor([0.0, 1.0, -0.0, 2.0]), torch.tensor([[0.0, 1e-30]])]
    assert M.weight_sparsity(ws) == pytest.approx(3 / 6)
    assert M.weight_sparsity([]) == 0.0
