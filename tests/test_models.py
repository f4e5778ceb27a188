"""Tests for common.nn.models: every architecture under every norm / SAP setting is built the way the
FedMef/FedDIP papers need it (no BatchNorm in NSConv models, SAP everywhere but the stem, masks
over every conv/linear weight), and SAP really frees the activations it claims to."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.measure.accounting import SavedTensorMeter
from common.nn.layers import Pool2d, ReLU, SparseConv2d, SparseLinear, set_activation_sparsity
from common.nn.models import MODELS, NORMS, build_model
from common.nn.nsconv import RELU_GAMMA, NSConv2d
from common.pruning import masks as M

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")

INPUT = {
    "resnet18": (3, 32, 32),
    "resnet34": (3, 32, 32),
    "resnet50": (3, 32, 32),
    "mobilenetv2": (3, 32, 32),
    "lenet5": (1, 28, 28),
    "alexnet": (3, 32, 32),
}
SAP = [None, 0.9]
CONFIGS = [(name, norm, s) for name in INPUT for norm in NORMS for s in SAP]


def _convs(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _stem_name(model):
    return _convs(model)[0][0]


def test_registry_is_complete():
    assert set(MODELS) == set(INPUT)
    assert NORMS == ("batchnorm", "nsconv", "none")


# ----------------------------------------------------------------------------- forward shapes


CHEAP = [c for c in CONFIGS if c[0] not in ("resnet34", "resnet50")]


@pytest.mark.parametrize("name,norm,s", CHEAP)
def test_forward_shape(name, norm, s):
    model = build_model(name, norm, s)
    out = model(torch.randn(2, *INPUT[name]))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_deep_resnets_forward_once(name):
    model = build_model(name, "nsconv", 0.9)
    out = model(torch.randn(2, *INPUT[name]))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_num_classes_and_in_channels():
    m = build_model("resnet18", "nsconv", num_classes=7, in_channels=1)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert build_model("lenet5", "none", num_classes=3)(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    assert build_model("lenet5", "none", in_channels=3)(torch.randn(2, 3, 28, 28)).shape == (2, 10)


# The usual CIFAR parameter counts (kuangliu/pytorch-cifar ResNets, torchvision MobileNetV2 with
# 10 classes) and the hand count of LeNet-5 / the 5-conv AlexNet; a missing or extra layer shows.
PARAMS_BN = {"resnet18": 11_173_962, "resnet34": 21_282_122, "resnet50": 23_520_842, "mobilenetv2": 2_236_682}
LENET5_PLAIN = (1 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
ALEXNET_PLAIN = (
    (3 * 64 * 9 + 64)
    + (64 * 192 * 9 + 192)
    + (192 * 384 * 9 + 384)
    + (384 * 256 * 9 + 256)
    + (256 * 256 * 9 + 256)
    + (4096 * 512 + 512)
    + (512 * 512 + 512)
    + (512 * 10 + 10)
)


@pytest.mark.parametrize("name", list(PARAMS_BN))
def test_parameter_counts_match_reference_architectures(name):
    bn = build_model(name, "batchnorm")
    ns = build_model(name, "nsconv")
    assert sum(p.numel() for p in bn.parameters()) == PARAMS_BN[name]
    # NSConv's gain and bias take BatchNorm's place one for one
    assert sum(p.numel() for p in ns.parameters()) == PARAMS_BN[name]


def test_small_model_parameter_counts():
    assert sum(p.numel() for p in build_model("lenet5", "none").parameters()) == LENET5_PLAIN == 61_706
    assert sum(p.numel() for p in build_model("alexnet", "none").parameters()) == ALEXNET_PLAIN


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name,norm,s", CONFIGS)
def test_structure(name, norm, s):
    model = build_model(name, norm, s)
    mods = list(model.modules())
    convs = _convs(model)
    bns = [m for m in mods if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(isinstance(m, SparseConv2d) for _, m in convs)
    linears = [m for m in mods if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, SparseLinear) for m in linears)
    # no torch activations (an nn.ReLU would keep its whole output for backward)
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh)) for m in mods)
    assert any(isinstance(m, ReLU) for m in mods)
    # nor torch pooling with a backward that keeps its input (max: + int64 indices)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in mods)
    pools = [m for m in mods if isinstance(m, Pool2d)]
    assert len(pools) == {"lenet5": 2, "alexnet": 3}.get(name, 0)
    assert all(p.lean == (s is not None) for p in pools)
    if norm == "nsconv":
        assert not bns
        assert all(isinstance(m, NSConv2d) and m.bias is not None and m.gain is not None for _, m in convs)
    elif norm == "batchnorm":
        assert len(bns) == len(convs)  # conv-BN everywhere
        assert not any(isinstance(m, NSConv2d) for m in mods)
        assert all(m.bias is None for _, m in convs)
    else:
        assert not bns and not any(isinstance(m, NSConv2d) for m in mods)
        assert all(m.bias is not None for _, m in convs)

    stem = _stem_name(model)
    for cname, conv in convs:
        if cname == stem:
            assert conv.act_sparsity is None and not conv.sap_capable
        else:
            assert conv.act_sparsity == s and conv.sap_capable, cname
    # SAP's scope is the convolutions (§3.4); linear layers keep their exact inputs
    assert all(m.act_sparsity is None and not m.sap_capable for m in linears)
    assert all(m.bitmask == (s is not None) for m in mods if isinstance(m, ReLU))


@pytest.mark.parametrize("name", ["lenet5", "resnet18"])
def test_sap_on_linear_layers_is_an_option(name):
    model = build_model(name, "nsconv", 0.9, sap_linear=True)
    linears = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert linears and all(m.act_sparsity == 0.9 and m.sap_capable for m in linears)
    set_activation_sparsity(model, None)
    assert all(m.act_sparsity is None for m in linears)


def test_resnet_base_width_scales_every_stage():
    narrow = build_model("resnet18", "nsconv", width=16)
    convs = [m for m in narrow.modules() if isinstance(m, SparseConv2d)]
    assert convs[0].out_channels == 16 and max(c.out_channels for c in convs) == 128
    assert narrow.fc.in_features == 128
    with pytest.raises(ValueError, match="base width"):
        build_model("lenet5", "nsconv", width=16)


@pytest.mark.parametrize("name", list(INPUT))
def test_set_activation_sparsity_on_built_model(name):
    model = build_model(name, "nsconv", None)
    stem = _stem_name(model)
    set_activation_sparsity(model, 0.8)
    for cname, conv in _convs(model):
        assert conv.act_sparsity == (None if cname == stem else 0.8)
    assert all(m.bitmask for m in model.modules() if isinstance(m, ReLU))
    assert all(m.lean for m in model.modules() if isinstance(m, Pool2d))
    set_activation_sparsity(model, None)
    assert all(c.act_sparsity is None for _, c in _convs(model))
    assert not any(m.bitmask for m in model.modules() if isinstance(m, ReLU))
    assert not any(m.lean for m in model.modules() if isinstance(m, Pool2d))


def test_nsconv_gammas_follow_what_each_conv_reads():
    res = build_model("resnet18", "nsconv")
    assert res.stem[0].gamma == 1.0
    assert all(m.gamma == RELU_GAMMA for n, m in _convs(res) if n != "stem.0")
    mb = build_model("mobilenetv2", "nsconv")
    assert mb.stem[0].gamma == 1.0 and mb.head[0].gamma == 1.0
    block = mb.blocks[1]  # expansion 6: 1x1 expansion reads the linear bottleneck
    assert block.body[0].gamma == 1.0
    assert block.body[3].gamma == RELU_GAMMA and block.body[3].groups == block.body[3].in_channels
    assert block.body[6].gamma == RELU_GAMMA


def test_unknown_model_and_norm_and_bad_sparsity():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="norm"):
        build_model("resnet18", norm="groupnorm")
    with pytest.raises(ValueError):
        build_model("lenet5", act_sparsity=1.5)
    with pytest.raises(ValueError):
        build_model("lenet5", act_sparsity=-0.1)


@pytest.mark.parametrize("name", list(INPUT))
def test_masks_cover_every_conv_and_linear_weight(name):
    model = build_model(name, "nsconv")
    weights = M.prunable_weights(model)
    layer_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(weights) == layer_weights == set(M.model_masks(model))
    # every multi-dimensional parameter is a prunable weight (nothing prunable is missed)
    multi = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert multi == set(weights)
    # masks load into every layer; the model then is as sparse as asked
    masks = M.random_masks(M.weight_shapes(model), 0.9, generator=torch.Generator().manual_seed(0))
    M.load_masks(model, masks)
    assert M.sparsity(M.model_masks(model)) == pytest.approx(0.9, abs=1e-3)
    assert M.weight_sparsity(weights.values()) == pytest.approx(M.sparsity(masks), abs=1e-6)
    assert all(torch.equal(model.get_submodule(n.rsplit(".", 1)[0]).mask, masks[n]) for n in masks)


# ----------------------------------------------------------------------------- SAP behaviour in models


def test_sap_changes_no_forward_and_s0_no_gradient():
    torch.manual_seed(0)
    model = build_model("lenet5", "nsconv", None)
    M.load_masks(model, M.random_masks(M.weight_shapes(model), 0.8))
    x = torch.randn(4, 1, 28, 28)
    y = torch.tensor([0, 3, 5, 9])

    def grads(s):
        set_activation_sparsity(model, s)
        model.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_none, g_none = grads(None)
    out_zero, g_zero = grads(0.0)
    out_sap, g_sap = grads(0.9)
    assert torch.equal(out_none, out_zero) and torch.equal(out_none, out_sap)
    assert all(torch.equal(g_none[n], g_zero[n]) for n in g_none)
    # SAP changes the weight gradients of the layers whose input it prunes ...
    assert not torch.equal(g_none["features.4.weight"], g_sap["features.4.weight"])
    # ... but not the stem's: it caches the batch in full, and the gradient reaching it flows
    # through input gradients and 1-bit ReLU masks, which SAP leaves exact
    assert torch.equal(g_none["features.0.weight"], g_sap["features.0.weight"])


def test_sap_nsconv_lenet_learns():
    """A fixed batch is fitted with SAP at s_ta = 0.9 on a 90 %-sparse NSConv LeNet-5."""
    torch.manual_seed(0)
    model = build_model("lenet5", "nsconv", 0.9)
    masks = M.random_masks(M.weight_shapes(model), 0.9, generator=torch.Generator().manual_seed(1))
    M.load_masks(model, masks)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    M.keep_pruned_at_zero(opt, model, masks)
    x = torch.randn(16, 1, 28, 28)
    y = torch.arange(16) % 10
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    assert M.weight_sparsity(M.prunable_weights(model).values()) == pytest.approx(M.sparsity(masks))


def _saved_storages(model, x):
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved.setdefault(st.data_ptr(), (st.nbytes(), tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return saved


def _largest_activation(model, x):
    """Bytes of the largest float tensor the forward pass produces after the stem."""
    sizes = []
    handles = [
        m.register_forward_hook(lambda _m, _i, o: sizes.append(o.nbytes))
        for m in model.modules()
        if isinstance(m, ReLU)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return max(sizes)


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "mobilenetv2",
        "lenet5",
        "alexnet",
    ],
)
@pytest.mark.parametrize("sap_linear", [False, True])
def test_sap_model_holds_no_full_activation(name, sap_linear):
    """With SAP, the only full-size float tensors autograd holds are the input batch (the stem does
    not prune it: the training loop holds it anyway) and, unless SAP covers them too, the inputs of
    the linear layers."""
    torch.manual_seed(0)
    model = build_model(name, "nsconv", 0.9, sap_linear=sap_linear)
    x = torch.randn(2, *INPUT[name])
    saved = _saved_storages(model, x)
    assert saved.pop(x.untyped_storage().data_ptr())[0] == x.nbytes
    linear_inputs = [(2, m.in_features) for m in model.modules() if isinstance(m, SparseLinear)]
    if not sap_linear:
        kept = [v for v in saved.values() if v[1] in linear_inputs]
        assert sorted(v[1] for v in kept) == sorted(linear_inputs)
        saved = {k: v for k, v in saved.items() if v[1] not in linear_inputs}
    # SAP caches are flat (values, bitmaps); a saved tensor with the shape of a feature map is a
    # full activation kept alive, and int64 pooling indices cost more than the activation. The only
    # int64 a SAP cache may hold is the short list of kept entries outside its ReLU's mask (a ReLU6's
    # saturated ones), far below an activation's size.
    largest = _largest_activation(model, x)
    offenders = [
        v
        for v in saved.values()
        if (len(v[1]) >= 2 and v[2].is_floating_point) or (v[2] == torch.int64 and v[0] >= 0.01 * largest)
    ]
    offenders += [v for v in saved.values() if v[0] >= 0.2 * largest]
    assert not offenders, offenders


@pytest.mark.parametrize("name,limit", [("resnet18", 0.25), ("mobilenetv2", 0.15)])
def test_sap_cuts_measured_activation_memory(name, limit):
    """Paper Fig. 2: SAP saves >3x activation memory on MobileNetV2; measured, not estimated."""
    x = torch.randn(2, *INPUT[name])
    held = {}
    for s in (None, 0.9):
        torch.manual_seed(0)
        model = build_model(name, "nsconv", s)
        with SavedTensorMeter(model) as meter:
            out = model(x)
        out.sum().backward()
        held[s] = meter.held.activation_bytes
    assert held[0.9] < limit * held[None], held
