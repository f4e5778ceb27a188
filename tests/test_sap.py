"""Tests for common.nn.sap: scaled activation pruning (FedMef §3.4) and the 1-bit ReLU cache, with
memory measured through saved-tensor hooks (common.measure.accounting.SavedTensorMeter)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.measure.accounting import SavedTensorMeter
from common.nn import sap
from common.nn.layers import ReLU, SparseConv2d, SparseLinear, set_activation_sparsity
from common.nn.models import build_model
from common.nn.models.factory import LayerFactory
from common.nn.nsconv import RELU_GAMMA, NSConv2d
from common.nn.sap import bitmask_relu, compress_activation, keep_mask, relu_pass_bits
from common.sparse.bits import pack_bits
from common.sparse.codec import decode
from common.sparse.sizes import SparseFormat

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")


def _reset_sampler():
    sap._sampler.manual_seed(0x5A9)


def _masked_random(layer: nn.Module, density: float = 0.5, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(10_000 + seed)
    layer.mask.copy_(torch.rand(layer.mask.shape, generator=g) < density)
    with torch.no_grad():
        layer.weight.mul_(layer.mask)
        if getattr(layer, "gain", None) is not None:
            layer.gain.copy_(torch.rand(layer.gain.shape, generator=g) + 0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


def _run(layer: nn.Module, x: torch.Tensor, s_ta, grad_seed: int = 7):
    """Forward + backward with a fixed upstream gradient; returns output, input grad, param grads."""
    layer.act_sparsity = s_ta
    layer.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    y = layer(xx)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)))
    return y.detach(), xx.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}


LAYERS = {
    "sparseconv": lambda: (_masked_random(SparseConv2d(6, 8, 3, padding=1, bias=True)), (2, 6, 9, 9)),
    "sparseconv_nobias": lambda: (_masked_random(SparseConv2d(6, 8, 3, padding=1, bias=False)), (2, 6, 9, 9)),
    "nsconv": lambda: (_masked_random(NSConv2d(6, 8, 3, padding=1, gamma=RELU_GAMMA)), (2, 6, 9, 9)),
    "nsconv_depthwise_s2": lambda: (_masked_random(NSConv2d(8, 8, 3, stride=2, padding=1, groups=8)), (2, 8, 11, 11)),
    "nsconv_grouped_1x1": lambda: (_masked_random(NSConv2d(8, 12, 1, groups=4)), (2, 8, 5, 5)),
    "linear": lambda: (_masked_random(SparseLinear(20, 7)), (5, 20)),
    "linear_3d": lambda: (_masked_random(SparseLinear(20, 7)), (3, 4, 20)),
}


# ----------------------------------------------------------------------------- s_ta = 0 is exact


@pytest.mark.parametrize("kind", list(LAYERS))
def test_zero_activation_sparsity_is_bitwise_identical(kind):
    layer, shape = LAYERS[kind]()
    x = torch.randn(shape)
    y0, gx0, gp0 = _run(layer, x, None)
    y1, gx1, gp1 = _run(layer, x, 0.0)
    assert torch.equal(y0, y1)
    assert torch.equal(gx0, gx1)
    assert set(gp0) == set(gp1) and len(gp0) >= 1
    for name in gp0:
        assert torch.equal(gp0[name], gp1[name]), name


@pytest.mark.parametrize("kind", list(LAYERS))
def test_plain_path_matches_autograd(kind):
    layer, shape = LAYERS[kind]()
    x = torch.randn(shape)
    y, gx, gp = _run(layer, x, None)

    layer.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    w = layer.effective_weight()
    if isinstance(layer, nn.Conv2d):
        ref = F.conv2d(xx, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        ref = F.linear(xx, w, layer.bias)
    ref.backward(torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(y, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, xx.grad, rtol=1e-5, atol=1e-6)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(gp[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("frozen", ["weight", "gain", "bias"])
def test_partially_frozen_parameters(frozen):
    """Each needs_input_grad combination returns the right gradient to the right parameter."""
    layer = _masked_random(NSConv2d(4, 6, 3, padding=1), seed=3)
    x = torch.randn(2, 4, 6, 6)
    _, _, full = _run(layer, x, 0.9)
    getattr(layer, frozen).requires_grad_(False)
    _, gx, part = _run(layer, x, 0.9)
    assert frozen not in part
    assert set(part) == {"weight", "gain", "bias"} - {frozen}
    for name in part:
        assert torch.equal(part[name], full[name]), name
    assert gx is not None


# ----------------------------------------------------------------------------- keep mask / compression


def test_sampled_threshold_keeps_ten_percent_of_4m():
    x = torch.randn(4, 16, 256, 256, generator=torch.Generator().manual_seed(1))
    assert x.numel() > sap.THRESHOLD_SAMPLE
    keep = keep_mask(x, 0.9)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    frac = keep.float().mean().item()
    assert abs(frac - 0.1) <= 0.01, frac
    enc = compress_activation(x, 0.9)
    assert abs(enc.nnz / x.numel() - 0.1) <= 0.01
    assert enc.fmt == SparseFormat.BITMAP
    # a (sampled) threshold: every kept magnitude beats every dropped one
    assert x[keep].abs().min() > x[~keep].abs().max()
    assert x[keep].abs().min() > 1.5  # the 90 % quantile of |N(0,1)| is 1.645


@pytest.mark.parametrize("n", [1000, 12345, sap.THRESHOLD_SAMPLE])
@pytest.mark.parametrize("s_ta", [0.5, 0.9, 0.99])
def test_exact_threshold_keeps_round_count_and_largest(n, s_ta):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    keep = keep_mask(x, s_ta)
    assert int(keep.sum()) == round((1 - s_ta) * n)
    assert x[keep].abs().min() >= x[~keep].abs().max()


def test_exact_path_on_4d_tensor():
    x = torch.randn(2, 8, 10, 10)
    keep = keep_mask(x, 0.9)
    assert keep.shape == x.shape
    assert int(keep.sum()) == round(0.1 * x.numel())
    assert x[keep].abs().min() >= x[~keep].abs().max()


def test_all_zero_tensor_keeps_nothing():
    for shape in [(4, 10), (2, 8, 130, 130)]:  # exact and sampled paths
        x = torch.zeros(shape)
        assert not keep_mask(x, 0.9).any()
        enc = compress_activation(x, 0.9)
        assert enc.nnz == 0 and enc.values.numel() == 0
        assert torch.equal(decode(enc), x)


@pytest.mark.parametrize("shape", [(4, 16, 30, 30), (4, 16, 80, 80)], ids=["exact", "sampled"])
def test_mostly_dead_relu_output_keeps_only_nonzeros(shape):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(shape, generator=g)
    x = F.relu(z) * (torch.rand(shape, generator=g) < 0.1)  # ~95 % exact zeros
    zero_frac = (x == 0).float().mean().item()
    assert 0.93 < zero_frac < 0.97
    keep = keep_mask(x, 0.9)
    assert not keep[x == 0].any()
    assert torch.equal(keep, x != 0)  # every non-zero is among the top 10 %


@pytest.mark.parametrize("s_ta", [0.0, 0.3, 0.9, 1.0])
def test_compress_roundtrip_is_x_times_keep(s_ta):
    x = torch.randn(3, 5, 7, 7)
    keep = keep_mask(x, s_ta)
    enc = compress_activation(x, s_ta)
    assert torch.equal(decode(enc), x * keep)
    assert enc.nnz == int(keep.sum())


def test_compress_formats():
    x = torch.randn(2, 4, 16, 16)
    assert compress_activation(x, 0.0).fmt == SparseFormat.DENSE
    enc = compress_activation(x, 0.9)
    assert enc.fmt == SparseFormat.BITMAP
    n = x.numel()
    assert enc.positions.nbytes == math.ceil(n / 8)
    assert enc.values.nbytes == 4 * round(0.1 * n)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_activation_sparsity_raises(bad):
    x = torch.randn(10)
    with pytest.raises(ValueError):
        keep_mask(x, bad)
    with pytest.raises(ValueError):
        compress_activation(x, bad)
    layer = SparseLinear(10, 2, act_sparsity=bad)
    with pytest.raises(ValueError):
        layer(x[None])
    with pytest.raises(ValueError):
        set_activation_sparsity(nn.Sequential(SparseLinear(3, 2)), bad)
    with pytest.raises(ValueError):
        LayerFactory("nsconv", bad)


# ----------------------------------------------------------------------------- SAP prunes the cache only


@pytest.mark.parametrize("kind", ["sparseconv", "nsconv", "nsconv_depthwise_s2", "linear"])
def test_sap_gradient_equals_gradient_of_pruned_input(kind):
    layer, shape = LAYERS[kind]()
    x = torch.randn(shape)
    assert x.numel() <= sap.THRESHOLD_SAMPLE  # exact, deterministic keep mask
    keep = keep_mask(x, 0.9)

    y_none, gx_none, gp_none = _run(layer, x, None)
    y_sap, gx_sap, gp_sap = _run(layer, x, 0.9)
    _, _, gp_pruned = _run(layer, x * keep, None)

    # forward output and input gradient do not depend on the cache
    assert torch.equal(y_sap, y_none)
    assert torch.equal(gx_sap, gx_none)
    # the weight-side gradients are those of the explicitly pruned input ...
    for name in gp_sap:
        assert torch.equal(gp_sap[name], gp_pruned[name]), name
    # ... and differ from the dense ones (so the cache really was pruned)
    assert not torch.equal(gp_sap["weight"], gp_none["weight"])
    if "bias" in gp_sap:  # the bias gradient needs no activation
        assert torch.equal(gp_sap["bias"], gp_none["bias"])


def test_full_activation_sparsity_gives_zero_weight_gradient():
    layer, shape = LAYERS["sparseconv"]()
    x = torch.randn(shape)
    _, gx_none, _ = _run(layer, x, None)
    _, gx, gp = _run(layer, x, 1.0)
    assert torch.equal(gp["weight"], torch.zeros_like(gp["weight"]))
    assert torch.equal(gx, gx_none)


def test_sap_without_input_grad():
    """A SAP layer reading a tensor that needs no gradient (e.g. a frozen prefix)."""
    layer, shape = LAYERS["nsconv"]()
    layer.act_sparsity = 0.9
    x = torch.randn(shape)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


# ----------------------------------------------------------------------------- 1-bit ReLU


@pytest.mark.parametrize("upper", [None, 6.0])
def test_bitmask_relu_equals_torch_exactly(upper):
    x = torch.cat([torch.randn(997) * 5, torch.tensor([0.0, -0.0, 6.0, -6.0, 5.999999, 6.000001, 1e-30, -1e-30])])
    ref_fn = F.relu if upper is None else F.relu6
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    ya, yb = ref_fn(a), bitmask_relu(b, upper)
    assert torch.equal(ya, yb)
    g = torch.randn(x.shape)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("upper", [None, 6.0])
def test_relu_module_bitmask_switch(upper):
    x = torch.randn(2, 3, 5, 5) * 4
    plain, bit = ReLU(upper, bitmask=False), ReLU(upper, bitmask=True)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(a), bit(b)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("n", [8 * 125, 1001])
def test_bitmask_relu_holds_one_bit_per_element(n):
    x = torch.randn(n, requires_grad=True)
    with SavedTensorMeter() as meter:
        bitmask_relu(x * 1.0)
    assert meter.held.activation_bytes == math.ceil(n / 8)
    with SavedTensorMeter() as meter:
        F.relu(x * 1.0)
    assert meter.held.activation_bytes == 4 * n  # what it replaces


# ----------------------------------------------------------------------------- measured memory


class _SaveRecorder:
    """Records every distinct storage autograd saves (size, shape, dtype)."""

    def __init__(self, model: nn.Module):
        self.model_ptrs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.saved: dict[int, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self.model_ptrs:
            self.saved.setdefault(st.data_ptr(), (st.nbytes(), tuple(t.shape), t.dtype))
        return t

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


@pytest.mark.parametrize("shape", [(2, 6, 10, 10), (2, 8, 90, 90)], ids=["exact", "sampled"])
@pytest.mark.parametrize("ns", [False, True], ids=["sparseconv", "nsconv"])
def test_single_sap_layer_holds_exactly_its_cache(shape, ns):
    c_in = shape[1]
    layer = NSConv2d(c_in, 4, 3, padding=1) if ns else SparseConv2d(c_in, 4, 3, padding=1)
    layer = _masked_random(layer, seed=5)
    layer.act_sparsity = 0.9
    x = torch.randn(shape, requires_grad=True)
    _reset_sampler()
    enc = compress_activation(x.detach(), 0.9)
    _reset_sampler()
    with SavedTensorMeter(layer) as meter:
        y = layer(x)
    assert meter.held.activation_bytes == enc.values.nbytes + enc.positions.nbytes
    assert meter.held.activation_bytes < 0.15 * x.nbytes
    # the weights and mask (and the gain) are held by the model anyway; nothing weight-sized extra
    model_bytes = layer.weight.nbytes + layer.mask.nbytes + (layer.gain.nbytes if ns else 0)
    assert meter.held.model_bytes == model_bytes
    # (saved-tensor hooks do not nest, so record the individual storages in a second pass)
    with _SaveRecorder(layer) as rec:
        layer(x)
    assert x.untyped_storage().data_ptr() not in rec.saved
    assert len(rec.saved) == 2  # values and bitmap, nothing else
    assert all(size < 0.15 * x.nbytes for size, _, _ in rec.saved.values())
    y.sum().backward()
    assert x.grad is not None


def test_plain_layer_holds_its_input():
    """Control for the test above: without SAP the whole input is held (so the meter can tell)."""
    layer = _masked_random(SparseConv2d(6, 4, 3, padding=1), seed=5)
    x = torch.randn(2, 6, 10, 10, requires_grad=True)
    with SavedTensorMeter(layer) as meter:
        layer(x)
    assert meter.held.activation_bytes == x.nbytes


def _conv_net(act_sparsity, sap_linear=False):
    f = LayerFactory("nsconv", act_sparsity, sap_linear=sap_linear)
    return nn.Sequential(
        f.conv(3, 32, 3, after_relu=False, stem=True),
        f.relu(),
        f.conv(32, 32, 3),
        f.relu(),
        f.conv(32, 32, 3),
        f.relu(),
        f.conv(32, 32, 3),
        f.relu(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        f.linear(32, 10),
    )


def test_sap_conv_net_holds_under_a_fifth_of_the_activation_bytes():
    x = torch.randn(2, 3, 16, 16)
    held = {}
    for s in (None, 0.9):
        torch.manual_seed(0)
        net = _conv_net(s)
        with SavedTensorMeter(net) as meter:
            out = net(x)
        out.sum().backward()  # the cache really is enough for backward
        held[s] = meter.held.activation_bytes
    full_layer = 2 * 32 * 16 * 16 * 4
    assert held[None] >= 4 * full_layer  # three conv inputs and the pool input, each held in full
    assert held[0.9] < held[None] / 5, held


def test_sap_conv_net_keeps_no_full_activation():
    net = _conv_net(0.9)
    x = torch.randn(2, 3, 16, 16)
    with _SaveRecorder(net) as rec:
        net(x)
    full_layer = 2 * 32 * 16 * 16 * 4
    # the network input is held by the training loop anyway (the stem never uses SAP) ...
    assert rec.saved.pop(x.untyped_storage().data_ptr()) == (x.nbytes, tuple(x.shape), torch.float32)
    # ... and every other saved storage is a small part of one activation
    assert rec.saved and all(size < 0.15 * full_layer for size, _, _ in rec.saved.values()), rec.saved


@pytest.mark.parametrize("sap_linear", [False, True])
def test_set_activation_sparsity_switches_layers_but_not_stem(sap_linear):
    net = _conv_net(None, sap_linear)
    set_activation_sparsity(net, 0.9)
    convs = [m for m in net if isinstance(m, SparseConv2d)]
    assert convs[0].act_sparsity is None
    assert all(c.act_sparsity == 0.9 for c in convs[1:])
    assert net[-1].act_sparsity == (0.9 if sap_linear else None)  # the head only where SAP covers linears
    assert all(m.bitmask for m in net if isinstance(m, ReLU))
    set_activation_sparsity(net, None)
    assert all(c.act_sparsity is None for c in convs) and net[-1].act_sparsity is None
    assert not any(m.bitmask for m in net if isinstance(m, ReLU))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 9, 7)])
def test_lean_pooling_matches_autograd_and_keeps_less(shape):
    from common.measure.accounting import SavedTensorMeter
    from common.nn.sap import lean_avg_pool2d, lean_max_pool2d

    for lean, plain in ((lean_max_pool2d, F.max_pool2d), (lean_avg_pool2d, F.avg_pool2d)):
        x = torch.randn(*shape, requires_grad=True)
        y = plain(x, 2)
        g = torch.randn_like(y)
        (ref,) = torch.autograd.grad(y, x, g)
        with SavedTensorMeter() as meter:
            y_lean = lean(x, 2)
        (got,) = torch.autograd.grad(y_lean, x, g)
        assert torch.equal(y_lean, y) and torch.equal(got, ref)
        # at most one byte per pooled output: never the fp32 input
        assert meter.held.activation_bytes <= y.numel()


# ----------------------------------------------------------------------------- lean pooling


# ----------------------------------------------------------------------------- positions relative to a ReLU mask


def test_a_bitmask_relu_output_carries_its_mask_and_nothing_derived_from_it_does():
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    out = bitmask_relu(x, 6.0)
    mask = relu_pass_bits(out)
    assert mask is not None and torch.equal(mask, pack_bits(((x > 0) & (x < 6)).reshape(-1)))
    for derived in (out.view(-1), out[:1], out + 0, out * 0.2, out.detach(), F.relu(x)):
        assert relu_pass_bits(derived) is None


def _references(model: nn.Module) -> dict[str, bool]:
    """Per SAP layer, whether its input in one forward pass came with a ReLU's mask."""
    seen: dict[str, bool] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            seen[name] = relu_pass_bits(inputs[0]) is not None

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name))
        for name, module in model.named_modules()
        if getattr(module, "act_sparsity", None) is not None
    ]
    model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    return seen


def test_every_resnet18_sap_conv_reads_a_relu_output_and_mobilenetv2_expansions_do_not():
    """ResNet18: each block's convolutions and shortcut read the previous ReLU's output (the residual
    sum goes through a ReLU first). MobileNetV2: its depthwise and projection convolutions read a
    ReLU6's output, its expansions and head the linear bottleneck (a residual sum or a projection)."""
    torch.manual_seed(0)
    assert all(_references(build_model("resnet18", act_sparsity=0.9, width=8)).values())
    mobilenet = _references(build_model("mobilenetv2", act_sparsity=0.9))
    without = sorted(name for name, has in mobilenet.items() if not has)
    assert without == sorted([f"blocks.{i}.body.0" for i in range(1, 17)] + ["head.0"]), without


@pytest.mark.parametrize("upper", [None, 6.0])
def test_a_conv_after_a_relu_holds_the_relu_mask_once_and_a_bit_per_passing_entry(upper):
    torch.manual_seed(2)
    conv = NSConv2d(8, 8, 3, padding=1, act_sparsity=0.9, gamma=RELU_GAMMA)
    x = (torch.randn(4, 8, 16, 16) * 2).requires_grad_(True)
    with SavedTensorMeter(conv) as meter:
        out = bitmask_relu(x, upper)
        conv(out)
    n, kept = x.numel(), round(0.1 * x.numel())
    passing = int(((x > 0) if upper is None else (x > 0) & (x < upper)).sum())
    saturated = int((x >= 6).sum()) if upper else 0
    assert meter.held.activation_bytes == -(-n // 8) + -(-passing // 8) + 4 * kept + 8 * saturated


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_relative_positions_change_no_gradient(name):
    x, y = torch.randn(2, 3, 32, 32), torch.randint(10, (2,))
    grads = []
    for relative in (True, False):
        torch.manual_seed(0)
        model = build_model(
            name, act_sparsity=0.9, sap_relative=relative, **({"width": 8} if name == "resnet18" else {})
        )
        sap._sampler.manual_seed(3)
        F.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


class _FreshDecodes:
    """Stands in for the decode scratch: every decode into its own NaN-filled tensor."""

    def take(self, shape, dtype, device):
        return torch.full((math.prod(shape),), float("nan"), dtype=dtype, device=device)

    def release(self):
        pass


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
@pytest.mark.parametrize("value_format", ["fp32", "int8"])
def test_decoding_every_layer_into_one_reused_buffer_changes_no_gradient(name, value_format, monkeypatch):
    x, y = torch.randn(2, 3, 32, 32), torch.randint(10, (2,))
    grads = []
    for fresh in (False, True):
        if fresh:
            monkeypatch.setattr(sap, "_decode_scratch", _FreshDecodes())
        torch.manual_seed(0)
        model = build_model(
            name, act_sparsity=0.9, sap_format=value_format, **({"width": 8} if name == "resnet18" else {})
        )
        step = []
        for _ in range(2):  # the second backward decodes into the buffer the first one left
            sap._sampler.manual_seed(3)
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            step.append({n: p.grad for n, p in model.named_parameters()})
        grads.append(step)
    for n in grads[0][0]:
        assert torch.equal(grads[0][0][n], grads[1][0][n]), n
        assert torch.equal(grads[0][1][n], grads[1][1][n]), n


def test_the_decode_buffer_outlives_backward_only_until_the_next_forward():
    model = build_model("resnet18", act_sparsity=0.9, width=8)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(10, (2,))
    F.cross_entropy(model(x), y).backward()
    largest = max(2 * 8 * 32 * 32, 2 * 64 * 4 * 4)  # the widest SAP input of ResNet18 at width 8
    assert sap._decode_scratch.buffer is not None and sap._decode_scratch.buffer.numel() == largest
    with torch.no_grad():
        model(x)
    assert sap._decode_scratch.buffer is None


def test_two_sap_layers_reading_one_relu_output_hold_its_cache_once():
    """A ResNet block's first convolution and its projection shortcut read the same tensor."""
    torch.manual_seed(5)
    conv, shortcut = NSConv2d(8, 8, 3, padding=1, act_sparsity=0.9), NSConv2d(8, 8, 1, act_sparsity=0.9)
    x = (torch.randn(4, 8, 16, 16) * 2).requires_grad_(True)
    held = []
    for layers in ((conv,), (conv, shortcut)):
        with SavedTensorMeter(nn.ModuleList(layers)) as meter:
            out = bitmask_relu(x)
            ys = [layer(out) for layer in layers]
        held.append(meter.held.activation_bytes)
        sum(y.square().sum() for y in ys).backward()
    assert held[0] == held[1]


def test_a_shared_cache_follows_in_place_changes_and_settings():
    x = torch.randn(2, 4, 8, 8).relu()
    first = sap.shared_cache(x, 0.9, "fp32", True)
    assert sap.shared_cache(x, 0.9, "fp32", True) is first
    assert sap.shared_cache(x, 0.5, "fp32", True) is not first
    assert sap.shared_cache(x, 0.5, "int8", True).value_format == "int8"
    again = sap.shared_cache(x, 0.9, "fp32", True)
    x.mul_(2)
    changed = sap.shared_cache(x, 0.9, "fp32", True)
    assert changed is not again
    assert torch.equal(sap.decode_cache(changed), 2 * sap.decode_cache(again))


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_evaluation_without_grad_caches_nothing(name):
    model = build_model(name, act_sparsity=0.9, **({"width": 8} if name == "resnet18" else {}))
    with torch.no_grad(), SavedTensorMeter(model) as meter:
        model(torch.randn(2, 3, 32, 32))
    assert meter.held.activation_bytes == 0


def test_s_ta_zero_behind_a_relu_gives_exactly_the_unpruned_gradients():
    x = torch.randn(2, 6, 9, 9)
    results = []
    for s_ta in (None, 0.0):
        torch.manual_seed(4)
        conv = NSConv2d(6, 8, 3, padding=1, act_sparsity=s_ta)
        xx = x.clone().requires_grad_(True)
        conv(bitmask_relu(xx)).square().sum().backward()
        results.append((xx.grad, {n: p.grad for n, p in conv.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for n in results[0][1]:
        assert torch.equal(results[0][1][n], results[1][1][n]), n


from common.nn.layers import Pool2d  # noqa: E402
from common.nn.sap import lean_avg_pool2d, lean_max_pool2d  # noqa: E402


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape,k", [((2, 3, 8, 8), 2), ((2, 3, 7, 9), 2), ((2, 3, 7, 9), 3), ((1, 1, 5, 5), 3)])
def test_lean_pool_equals_torch_exactly(kind, shape, k):
    """Forward and backward bit for bit, odd sizes (floor mode) and ties included: a ReLU output
    has many all-zero windows, where max-pooling must route the gradient to the same element."""
    x = F.relu(torch.randn(shape))
    lean, ref = (lean_max_pool2d, F.max_pool2d) if kind == "max" else (lean_avg_pool2d, F.avg_pool2d)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = lean(a, k), ref(b, k)
    assert torch.equal(ya, yb)
    g = torch.randn(ya.shape)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)


def test_lean_pool_memory():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    h = x * 1.0
    with SavedTensorMeter() as meter:
        lean_max_pool2d(h, 2)
    assert meter.held.activation_bytes == 2 * 3 * 4 * 4  # one uint8 window offset per output
    with SavedTensorMeter() as meter:
        lean_avg_pool2d(h, 2)
    assert meter.held.activation_bytes == 0
    with SavedTensorMeter() as meter:
        F.max_pool2d(h, 2)
    assert meter.held.activation_bytes == h.nbytes + 8 * 2 * 3 * 4 * 4  # what it replaces


def test_pool2d_module_switch_and_validation():
    x = torch.randn(1, 2, 6, 6)
    for kind, ref in (("max", F.max_pool2d), ("avg", F.avg_pool2d)):
        pool = Pool2d(kind, 2)
        assert torch.equal(pool(x), ref(x, 2))
        net = nn.Sequential(SparseConv2d(2, 2, 1), pool)
        set_activation_sparsity(net, 0.9)
        assert pool.lean
        assert torch.equal(pool(x), ref(x, 2))
        set_activation_sparsity(net, None)
        assert not pool.lean
    with pytest.raises(ValueError, match="kind"):
        Pool2d("min", 2)
    with pytest.raises(ValueError):
        lean_max_pool2d(torch.randn(1, 1, 17, 17), 17)


def test_lean_max_pool_backward_stays_on_input_device():
    x = torch.randn(1, 2, 4, 4, device="meta", requires_grad=True)
    lean_max_pool2d(x, 2).sum().backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape


def test_lean_avg_pool_backward_stays_on_input_device():
    """Control for the test above: the avg path allocates on grad_out's device and works on meta."""
    x = torch.randn(1, 2, 4, 4, device="meta", requires_grad=True)
    lean_avg_pool2d(x, 2).sum().backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape
