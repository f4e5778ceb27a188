"""Tests for common.nn.nsconv: normalized sparse convolution (FedMef §3.4, eq. 7, Theorem 1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.nn.layers import ReLU, SparseConv2d
from common.nn.nsconv import RELU_GAMMA, NSConv2d, standardize_filters

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")

C_IN, C_OUT, K = 16, 8, 3
GAMMA = 1.5


def _random_mask(shape, density, seed):
    # offset: a mask drawn from the same stream as torch's default init would select correlated weights
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.rand(shape, generator=g) < density


def _theorem_layers(filter_mean: float = 0.1):
    """An NSConv (gain off, no padding, density ~0.2) and a plain SparseConv2d sharing its weights.

    The raw filters have a clearly positive mean (as trained filters often do, paper App. 6.1), so
    the plain layer shifts the output mean when its input has one.
    """
    g = torch.Generator().manual_seed(11)
    theta = filter_mean + 0.05 * torch.randn(C_OUT, C_IN, K, K, generator=g)
    mask = _random_mask(theta.shape, 0.2, seed=12)
    ns = NSConv2d(C_IN, C_OUT, K, padding=0, bias=False, gain=False, gamma=GAMMA)
    plain = SparseConv2d(C_IN, C_OUT, K, padding=0, bias=False)
    for layer in (ns, plain):
        with torch.no_grad():
            layer.weight.copy_(theta * mask)
            layer.mask.copy_(mask)
    return ns, plain


def _channel_stats(y):
    flat = y.detach().transpose(0, 1).reshape(y.shape[1], -1)
    return flat.mean(1), flat.var(1)


# ----------------------------------------------------------------------------- Theorem 1


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_theorem1_centred_input(sigma):
    ns, _ = _theorem_layers()
    x = sigma * torch.randn(96, C_IN, 20, 20, generator=torch.Generator().manual_seed(1))
    mean, var = _channel_stats(ns(x))
    target = GAMMA**2 * sigma**2
    assert (mean.abs() < 0.05 * math.sqrt(target)).all(), mean
    torch.testing.assert_close(var, torch.full_like(var, target), rtol=0.05, atol=0)


def test_theorem1_input_with_mean_one():
    """mean 0 whatever the input mean; the plain sparse conv with the same weights is shifted.

    Theorem 1 states variance γ²(σ_f² + μ_f²), the variance over random weights as well as data.
    For one fixed filter whose active weights sum to exactly 0 (what eq. 7 produces), the μ_f part
    of every output is μ_f·Σw = 0, so the measured per-channel variance is γ²σ_f² (module docstring);
    with μ = σ = 1 the theorem's value would be twice as large, so this distinguishes the two.
    """
    ns, plain = _theorem_layers()
    sigma, mu = 1.0, 1.0
    x = mu + sigma * torch.randn(96, C_IN, 20, 20, generator=torch.Generator().manual_seed(2))
    mean, var = _channel_stats(ns(x))
    target = GAMMA**2 * sigma**2
    assert (mean.abs() < 0.05 * math.sqrt(target)).all(), mean
    torch.testing.assert_close(var, torch.full_like(var, target), rtol=0.05, atol=0)

    plain_mean, _ = _channel_stats(plain(x))
    # Σθ over ~29 active weights of mean 0.1 → an output mean near 2.9 in every channel
    assert (plain_mean.abs() > 1.0).all(), plain_mean


def test_theorem1_relu_input_with_relu_gamma_gives_unit_variance():
    """Behind a ReLU of N(0,1) (μ_f = 1/√(2π), σ_f² = 1/2 − 1/(2π)), γ = RELU_GAMMA keeps unit variance."""
    ns, plain = _theorem_layers()
    ns.gamma = RELU_GAMMA
    x = F.relu(torch.randn(96, C_IN, 20, 20, generator=torch.Generator().manual_seed(3)))
    sigma_f2 = 0.5 - 0.5 / math.pi
    assert float(x.var()) == pytest.approx(sigma_f2, rel=0.02)  # sanity of the input statistics
    mean, var = _channel_stats(ns(x))
    assert RELU_GAMMA**2 * sigma_f2 == pytest.approx(1.0, rel=1e-12)
    assert (mean.abs() < 0.05).all(), mean
    torch.testing.assert_close(var, torch.ones_like(var), rtol=0.05, atol=0)
    plain_mean, _ = _channel_stats(plain(x))
    assert (plain_mean.abs() > 0.5).all(), plain_mean


def test_relu_gamma_value():
    assert RELU_GAMMA == pytest.approx((0.5 - 0.5 / math.pi) ** -0.5, rel=1e-12)
    # (the module comment's "≈ 1.7139" is NF-Nets' empirical constant; the closed form gives 1.71286)
    assert RELU_GAMMA == pytest.approx(1.7128585504, abs=1e-9)


# ----------------------------------------------------------------------------- effective weights


@pytest.mark.parametrize("with_gain", [False, True])
def test_effective_weight_structure(with_gain):
    conv = NSConv2d(C_IN, C_OUT, K, padding=1, gain=with_gain, gamma=GAMMA)
    mask = _random_mask(conv.weight.shape, 0.2, seed=4)
    conv.mask.copy_(mask)
    with torch.no_grad():  # weight spread well above eps = 1e-6, so Σw² = γ² to ~1e-4
        conv.weight.copy_(0.05 * torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(99)))
    gain = None
    if with_gain:
        gain = torch.linspace(0.5, 2.0, C_OUT)
        with torch.no_grad():
            conv.gain.copy_(gain)
    w = conv.effective_weight().detach()
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    sums = w.sum((1, 2, 3))
    squares = w.square().sum((1, 2, 3))
    expected_sq = torch.full((C_OUT,), GAMMA**2) * (gain**2 if gain is not None else 1.0)
    assert (sums.abs() < 1e-5).all(), sums
    torch.testing.assert_close(squares, expected_sq, rtol=2e-3, atol=0)


def test_effective_weight_ignores_pruned_raw_values():
    """Standardisation uses ACTIVE weights only: changing pruned raw values changes nothing."""
    theta = torch.randn(4, 3, 3, 3)
    mask = _random_mask(theta.shape, 0.5, seed=5)
    a = standardize_filters(theta, mask, gamma=2.0)
    b = standardize_filters(torch.where(mask, theta, torch.full_like(theta, 100.0)), mask, gamma=2.0)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _swap(
    theta: torch.Tensor, mask: torch.Tensor, drop: int, grow: int, value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter 0 with active entry ``drop`` pruned and pruned entry ``grow`` grown; both set to ``value``
    first, as if extruded to it and grown at it."""
    theta, mask = theta.clone(), mask.clone()
    theta[0, drop] = theta[0, grow] = value
    mask[0, drop], mask[0, grow] = False, True
    return theta, mask


def test_a_weight_at_zero_is_not_neutral_under_nsconv():
    """Why BaE's squeeze to 0 does not make pruning free here (README, post-prune drop): an active
    weight at 0 is standardised to -γ·μ/σ/sqrt(n), not 0, so pruning it and growing an entry at 0
    elsewhere moves that value to another input instead of changing nothing."""
    theta = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.7]])
    mask = torch.tensor([[True, True, True, True, False]])
    before = standardize_filters(theta, mask, eps=0.0)
    assert before[0, 0] < -0.5  # mean 1.5 of the active entries
    after = standardize_filters(*_swap(theta, mask, drop=0, grow=4, value=0.0), eps=0.0)
    assert after[0, 4] == before[0, 0] and after[0, 0] == 0.0 and not torch.equal(after, before)


def test_a_weight_at_its_filters_mean_is_neutral_under_nsconv():
    """The neutral value of an NSConv filter is the mean of its other active weights: an entry there
    standardises to 0, and pruning it while growing one at that mean leaves the filter as it was."""
    theta = torch.tensor([[2.0, 1.0, 2.0, 3.0, 0.7]])  # entry 0 at the mean of entries 1-3
    mask = torch.tensor([[True, True, True, True, False]])
    before = standardize_filters(theta, mask, eps=0.0)
    assert before[0, 0] == 0.0
    torch.testing.assert_close(standardize_filters(*_swap(theta, mask, drop=0, grow=4, value=2.0), eps=0.0), before)


def test_standardize_known_answer():
    theta = torch.tensor([[1.0, 2.0, 3.0, 40.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = standardize_filters(theta, mask, gamma=1.0, eps=0.0)
    # active mean 2, variance 2/3 → (θ−2)/sqrt(2/3)/sqrt(3) = (θ−2)/sqrt(2)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]) / math.sqrt(2.0))


def test_empty_and_single_entry_filters_are_zero_without_nan():
    conv = NSConv2d(3, 4, 3, padding=1, gain=True, gamma=GAMMA)
    mask = torch.ones_like(conv.mask)
    mask[0] = False  # empty filter
    mask[1] = False
    mask[1, 1, 1, 1] = True  # single entry
    conv.mask.copy_(mask)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.25, -0.5, 0.0, 0.0]))
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w = conv.effective_weight()
    assert torch.equal(w[:2].detach(), torch.zeros_like(w[:2]))
    y = conv(x)
    assert torch.equal(y[:, 0].detach(), torch.full_like(y[:, 0], 0.25))
    assert torch.equal(y[:, 1].detach(), torch.full_like(y[:, 1], -0.5))
    (y.square().sum()).backward()
    for t in (x.grad, conv.weight.grad, conv.gain.grad, conv.bias.grad):
        assert torch.isfinite(t).all()
    assert torch.equal(conv.weight.grad[:2], torch.zeros_like(conv.weight.grad[:2]))
    assert torch.equal(conv.gain.grad[:2], torch.zeros(2))
    # the healthy filters still learn
    assert conv.weight.grad[2:].abs().sum() > 0


def test_standardize_empty_filter_gradient_is_finite():
    theta = torch.randn(2, 5, requires_grad=True)
    gain = torch.ones(2, requires_grad=True)
    mask = torch.tensor([[False] * 5, [False, True, False, False, False]])
    w = standardize_filters(theta, mask, gain, gamma=1.0)
    w.sum().backward()
    assert torch.equal(w.detach(), torch.zeros(2, 5))
    assert torch.isfinite(theta.grad).all() and torch.isfinite(gain.grad).all()
    assert torch.equal(theta.grad, torch.zeros(2, 5))


# ----------------------------------------------------------------------------- gradients


class _Net(nn.Module):
    def __init__(self, act_sparsity=None):
        super().__init__()
        self.c1 = NSConv2d(3, 8, 3, padding=1, gamma=1.0, act_sparsity=act_sparsity)
        self.r = ReLU()
        self.c2 = NSConv2d(8, 8, 3, stride=2, padding=1, groups=2, gamma=RELU_GAMMA, act_sparsity=act_sparsity)

    def forward(self, x):
        return self.c2(self.r(self.c1(x)))


def _reference_forward(net, x):
    """Plain autograd: F.conv2d with the effective weights built by autograd."""
    h = F.conv2d(
        x, net.c1.effective_weight(), net.c1.bias, net.c1.stride, net.c1.padding, net.c1.dilation, net.c1.groups
    )
    h = F.relu(h)
    return F.conv2d(
        h, net.c2.effective_weight(), net.c2.bias, net.c2.stride, net.c2.padding, net.c2.dilation, net.c2.groups
    )


def test_fused_gradients_match_autograd_reference():
    net = _Net()
    for i, conv in enumerate((net.c1, net.c2)):
        conv.mask.copy_(_random_mask(conv.weight.shape, 0.4, seed=20 + i))
        with torch.no_grad():
            conv.gain.copy_(torch.rand(conv.out_channels) + 0.5)
            conv.bias.copy_(torch.randn(conv.out_channels) * 0.1)
    x = torch.randn(2, 3, 8, 8)
    target = torch.randn(2, 8, 4, 4)

    def run(fn):
        xx = x.clone().requires_grad_(True)
        net.zero_grad()
        out = fn(xx)
        ((out - target) ** 2).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        return out.detach(), xx.grad.clone(), grads

    out, gx, grads = run(net)
    ref_out, ref_gx, ref_grads = run(lambda t: _reference_forward(net, t))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5)
    assert set(grads) == {"c1.weight", "c1.bias", "c1.gain", "c2.weight", "c2.bias", "c2.gain"}
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    # pruned raw weights get exactly zero gradient
    for conv, prefix in ((net.c1, "c1"), (net.c2, "c2")):
        g = grads[f"{prefix}.weight"]
        assert torch.equal(g[~conv.mask], torch.zeros(int((~conv.mask).sum())))


def test_gradcheck_float64():
    """Finite differences on a tiny NSConv in double precision (weight, gain, bias, input)."""
    conv = NSConv2d(2, 3, 3, padding=1, gamma=1.3).double()
    conv.mask.copy_(_random_mask(conv.weight.shape, 0.6, seed=30))
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(inp, w, g, b):
        from common.nn.sap import ConvOp, masked_layer

        return masked_layer(
            inp,
            w,
            conv.mask,
            g,
            b,
            conv.weight_fn(),
            ConvOp(conv.stride, conv.padding, conv.dilation, conv.groups),
            None,
        )

    params = (
        conv.weight.detach().clone().requires_grad_(True),
        conv.gain.detach().clone().requires_grad_(True),
        conv.bias.detach().clone().requires_grad_(True),
    )
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def test_nsconv_model_has_no_batchnorm_and_state_dict_carries_mask():
    conv = NSConv2d(3, 4, 3)
    sd = conv.state_dict()
    assert {"weight", "bias", "gain", "mask"} <= set(sd)
    assert sd["mask"].dtype == torch.bool
    assert "gamma=" in repr(conv)
