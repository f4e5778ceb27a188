"""SAP cache value formats (common.nn.sapcache): fp32 exact, fp16 / bf16 / int8 within their stated
bounds, corrupt caches refused, native kernels and torch fallback bit-identical, the held bytes the
format's, and the ``sap-format`` key flowing from the run config to the layers."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from client.trainer import build_local_model
from common.measure.accounting import SavedTensorMeter
from common.nn import bitkernels, sap
from common.nn.layers import SparseConv2d, SparseLinear, _Masked
from common.nn.models import build_model
from common.nn.models.factory import LayerFactory
from common.nn.nsconv import NSConv2d
from common.nn.sap import cache_activation, compress_activation, keep_mask, keep_threshold
from common.nn.sapcache import (
    FP16_MAX,
    SAP_FORMATS,
    SapCache,
    channel_axis,
    decode_cache,
    encode_cache,
    int8_scale,
)
from common.protocol.config import ConfigError, parse_run_config
from common.protocol.instructions import round_instructions
from common.sparse.bits import CodecError, pack_bits
from common.sparse.codec import decode
from common.sparse.sizes import SparseFormat

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")

LOSSY = ("fp16", "bf16", "int8")
STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (NaN == NaN, -0.0 != 0.0), for any dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


def _caches_equal(a: SapCache, b: SapCache) -> bool:
    return (
        a.meta == b.meta
        and _same(a.values, b.values)
        and torch.equal(a.positions, b.positions)
        and all(
            (s is None and t is None) or (s is not None and t is not None and _same(s, t))
            for s, t in ((a.scale, b.scale), (a.reference, b.reference), (a.outside, b.outside))
        )
    )


def _bound(fmt: str, x: torch.Tensor, cache: SapCache) -> torch.Tensor:
    """The stated per-element error bound of ``fmt`` for the kept entries of ``x`` (module doc)."""
    mag = x.abs()
    if fmt == "fp16":
        return torch.where(mag >= 2.0**-14, mag * 2.0**-11, torch.full_like(mag, 2.0**-25))
    if fmt == "bf16":
        return mag * 2.0**-8
    assert cache.scale is not None
    shape = [1] * x.dim()
    if cache.axis is not None:
        shape[cache.axis] = -1
    half_step = (cache.scale / 2).view(shape) if shape else cache.scale[0] / 2
    return half_step * (1 + 2.0**-20) + mag * 2.0**-23  # + fp32 rounding of q * scale


def _inputs() -> dict[str, tuple[torch.Tensor, float]]:
    """(x, s_ta) edge cases: empty, all-zero, all-kept, one element, non-contiguous, 2-D, typical."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 6, 9, 9, generator=g) * torch.rand(1, 6, 1, 1, generator=g).mul(20)
    return {
        "empty": (torch.zeros(0, 3, 4, 4), 0.9),
        "all_zero": (torch.zeros(2, 3, 5, 5), 0.9),
        "all_kept": (torch.randn(2, 3, 5, 5, generator=g), 0.0),
        "one_element": (torch.tensor([2.5]), 0.0),
        "one_element_dropped": (torch.tensor([2.5]), 1.0),
        "non_contiguous": (base.transpose(2, 3), 0.9),
        "channels_last": (base.contiguous(memory_format=torch.channels_last), 0.7),
        "linear_2d": (torch.randn(16, 20, generator=g) * 3, 0.9),
        "conv_typical": (base, 0.9),
        "relu_output": (F.relu(base), 0.9),
    }


CASES = list(_inputs())


def _encode(x: torch.Tensor, s_ta: float, fmt: str) -> SapCache:
    sap._sampler.manual_seed(0x5A9)
    return cache_activation(x, s_ta, fmt)


# ----------------------------------------------------------------------------- round trips and bounds


@pytest.mark.parametrize("case", CASES)
def test_fp32_round_trips_exactly_and_is_todays_cache(case):
    x, s_ta = _inputs()[case]
    keep = keep_mask(x, s_ta)
    cache = _encode(x, s_ta, "fp32")
    out = decode_cache(cache)
    assert _same(out, torch.where(keep, x, torch.zeros(())).contiguous())
    sap._sampler.manual_seed(0x5A9)
    enc = compress_activation(x, s_ta)
    assert (cache.fmt, cache.shape, cache.nnz, cache.dtype) == (enc.fmt, enc.shape, enc.nnz, enc.dtype)
    assert _same(cache.values, enc.values) and torch.equal(cache.positions, enc.positions)
    assert cache.scale is None and _same(out, decode(enc))


@pytest.mark.parametrize("fmt", LOSSY)
@pytest.mark.parametrize("case", CASES)
def test_lossy_formats_stay_within_their_bound(case, fmt):
    x, s_ta = _inputs()[case]
    keep = keep_mask(x, s_ta)
    cache = _encode(x, s_ta, fmt)
    assert cache.values.dtype == STORAGE[fmt]
    out = decode_cache(cache)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))  # dropped entries decode to exactly 0
    err = (out - x).abs()
    assert (err[keep] <= _bound(fmt, x, cache).expand_as(x)[keep]).all(), (case, fmt, err[keep].max())


def test_fp16_and_bf16_bounds_are_tight_over_their_range():
    """Over many magnitudes the worst relative error reaches, but does not pass, the stated bound."""
    g = torch.Generator().manual_seed(3)
    x = torch.exp2(torch.empty(200_000).uniform_(-14, 15.9, generator=g)) * torch.randn(200_000, generator=g).sign()
    for fmt, bound in (("fp16", 2.0**-11), ("bf16", 2.0**-8)):
        rel = ((decode_cache(encode_cache(x, None, fmt)) - x).abs() / x.abs()).max().item()
        assert 0.9 * bound < rel <= bound, (fmt, rel)


def test_fp16_saturates_instead_of_overflowing():
    x = torch.tensor([1e5, -7e4, 65504.0, 3.0, math.inf])
    out = decode_cache(encode_cache(x, None, "fp16"))
    assert out.tolist() == [FP16_MAX, -FP16_MAX, FP16_MAX, 3.0, FP16_MAX]
    out = decode_cache(encode_cache(x[:4], None, "bf16"))  # bf16 has fp32's range
    assert torch.allclose(out, x[:4], rtol=2.0**-8)


def test_int8_scale_is_per_channel_and_its_bound_holds_on_skewed_channels():
    g = torch.Generator().manual_seed(9)
    scales = torch.tensor([1e-3, 1.0, 1e3]).view(1, 3, 1, 1)
    x = torch.randn(8, 3, 6, 6, generator=g) * scales
    cache = encode_cache(x, 0.0, "int8")  # keep every non-zero magnitude
    assert cache.axis == 1 and cache.scale is not None and cache.scale.shape == (3,)
    assert torch.equal(cache.scale, x.abs().amax(dim=(0, 2, 3)) / 127)
    err = (decode_cache(cache) - x).abs()
    # the small channel keeps its own resolution: a per-tensor scale would give it an error of ~4
    assert err[:, 0].max() <= cache.scale[0] / 2 * (1 + 1e-6) and err[:, 0].max() < 1e-4
    assert cache.values.abs().max() == 127
    assert channel_axis((5, 7)) == 1 and channel_axis((2, 3, 7)) == 2 and channel_axis((9,)) is None


def test_int8_channels_without_kept_entries_get_unit_scale():
    x = torch.zeros(2, 3, 4, 4)
    x[:, 1] = torch.randn(2, 4, 4)
    scale = int8_scale(x, 1)
    assert scale[0] == 1 and scale[2] == 1 and scale[1] == x.abs().max() / 127
    assert torch.isfinite(decode_cache(encode_cache(x, 0.0, "int8"))).all()


@pytest.mark.parametrize("fmt", SAP_FORMATS)
def test_dense_or_bitmap_is_chosen_by_the_formats_own_value_bits(fmt):
    """At 95 % kept a bitmap still beats dense fp32 (1 + 0.95 * 32 < 32 bits), not dense int8 or fp16."""
    x = torch.randn(64, 100)
    cache = _encode(x, 0.05, fmt)
    want = SparseFormat.BITMAP if fmt == "fp32" else SparseFormat.DENSE
    assert cache.fmt is want
    bits = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}[fmt]
    assert cache.values.nbytes == bits // 8 * (x.numel() if want is SparseFormat.DENSE else cache.nnz)
    assert _encode(x, 0.9, fmt).fmt is SparseFormat.BITMAP


# ----------------------------------------------------------------------------- positions relative to a ReLU mask


def _relu(x: torch.Tensor, upper: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A ReLU / ReLU6 output and its packed pass mask, as :func:`common.nn.sap.bitmask_relu` keeps it."""
    out = x.clamp(min=0) if upper is None else x.clamp(0, upper)
    passes = x > 0 if upper is None else (x > 0) & (x < upper)
    return out, pack_bits(passes.reshape(-1))


@pytest.mark.parametrize("upper", [None, 6.0])
@pytest.mark.parametrize("fmt", SAP_FORMATS)
@pytest.mark.parametrize("case", CASES)
def test_relative_positions_decode_exactly_as_the_bitmap_does(case, fmt, upper):
    """Coded relative to the ReLU's mask, every case and format decodes to the same bits as with a
    full bitmap: fp32 exactly the kept entries, the lossy formats within their bounds as before."""
    x, s_ta = _inputs()[case]
    out, mask = _relu(x * 4, upper)  # x 4: a ReLU6 saturates some kept entries
    plain, relative = _encode(out, s_ta, fmt), _encode_relative(out, s_ta, fmt, mask)
    assert _same(decode_cache(relative), decode_cache(plain))
    if relative.reference is not None:
        assert relative.reference is mask and relative.payload_nbytes < plain.payload_nbytes
        assert relative.positions.numel() == -(-int(_popcount(mask)) // 8)


def _encode_relative(x: torch.Tensor, s_ta: float, fmt: str, mask: torch.Tensor) -> SapCache:
    sap._sampler.manual_seed(0x5A9)
    return cache_activation(x, s_ta, fmt, mask)


def _popcount(mask: torch.Tensor) -> int:
    return sum(bin(b).count("1") for b in mask.tolist())


def test_a_relu6_lists_its_kept_saturated_entries_outside_the_mask():
    x = torch.randn(4, 8, 10, 10, generator=torch.Generator().manual_seed(3)) * 2
    out, mask = _relu(x, 6.0)
    cache = _encode_relative(out, 0.9, "fp32", mask)
    saturated = (out == 6.0).reshape(-1).nonzero().view(-1)
    assert saturated.numel() > 0 and cache.outside is not None
    assert torch.equal(cache.outside, saturated)  # 6 is above the threshold: all of them are kept
    assert torch.equal(decode_cache(cache), decode_cache(_encode(out, 0.9, "fp32")))


def test_the_full_bitmap_stays_where_relative_coding_is_not_smaller():
    """A mask that leaves most kept entries outside (here: an input that is not the ReLU's output)
    would cost 8 bytes per entry: the cache keeps its bitmap and no reference."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    _, mask = _relu(-x, None)
    cache = _encode_relative(x, 0.5, "fp32", mask)
    assert cache.reference is None and cache.outside is None
    assert torch.equal(cache.positions, _encode(x, 0.5, "fp32").positions)
    dense = _encode_relative(F.relu(x), 0.0, "fp32", _relu(x, None)[1])
    assert dense.fmt is SparseFormat.DENSE and dense.reference is None


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_a_relative_cache_missing_or_mangling_its_reference_is_refused(fmt):
    out, mask = _relu(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2, 6.0)
    good = _encode_relative(out, 0.9, fmt, mask)
    assert good.reference is not None and good.outside is not None
    with pytest.raises(CodecError, match=f"a {fmt} SAP cache with relative positions has"):
        SapCache.rebuild(good.meta, good.tensors()[:-1])
    rest = good.tensors()[2:-2]
    with pytest.raises(CodecError, match="relative bitmap of .* bits needs"):
        decode_cache(SapCache.rebuild(good.meta, (good.values, good.positions[:-1], *rest, mask, good.outside)))
    with pytest.raises(CodecError, match="the reference bitmap of 384 bits needs 48 bytes, got 47"):
        decode_cache(SapCache.rebuild(good.meta, (good.values, good.positions, *rest, mask[:-1], good.outside)))
    with pytest.raises(CodecError, match="the reference bitmap must be a 1-D torch.uint8 bitmap"):
        decode_cache(SapCache.rebuild(good.meta, (good.values, good.positions, *rest, mask.int(), good.outside)))
    with pytest.raises(CodecError, match="outside the reference must be a 1-D torch.int64 tensor"):
        decode_cache(SapCache.rebuild(good.meta, (good.values, good.positions, *rest, mask, good.outside.float())))
    with pytest.raises(CodecError, match="only a bitmap SAP cache codes its positions relative"):
        decode_cache(replace(good, fmt=SparseFormat.DENSE))


# ----------------------------------------------------------------------------- corrupt caches


def _good(fmt: str) -> SapCache:
    return encode_cache(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)), 1.0, fmt)


@pytest.mark.parametrize("fmt", SAP_FORMATS)
def test_truncated_values_or_positions_are_refused(fmt):
    good = _good(fmt)
    meta = good.meta
    with pytest.raises(CodecError, match="needs .* values, got"):
        decode_cache(SapCache.rebuild(meta, (good.values[:-1], *good.tensors()[1:])))
    with pytest.raises(CodecError, match="position bytes"):
        decode_cache(SapCache.rebuild(meta, (good.values, good.positions[:-1], *good.tensors()[2:])))
    with pytest.raises(CodecError, match=f"a {fmt} SAP cache has"):
        SapCache.rebuild(meta, good.tensors()[:1])


@pytest.mark.parametrize("fmt", SAP_FORMATS)
def test_values_of_another_format_are_refused(fmt):
    good = _good(fmt)
    other = torch.float32 if fmt != "fp32" else torch.float16
    values = good.values.to(other)
    with pytest.raises(CodecError, match=f"a {fmt} SAP cache holds .* values, got {other}"):
        decode_cache(SapCache.rebuild(good.meta, (values, *good.tensors()[1:])))


def test_int8_scales_missing_or_mis_shaped_are_refused():
    good = _good("int8")
    assert good.scale is not None
    for bad in (good.scale[:2], good.scale.double(), good.scale.view(1, 3)):
        with pytest.raises(CodecError, match="needs 3 torch.float32 scales"):
            decode_cache(SapCache.rebuild(good.meta, (good.values, good.positions, bad)))
    fp16 = _good("fp16")
    with pytest.raises(CodecError, match="carries no scale"):
        decode_cache(SapCache("fp16", *fp16.meta[1:6], fp16.values, fp16.positions, torch.ones(3)))
    with pytest.raises(CodecError, match="unknown SAP cache format 'fp8'"):
        decode_cache(SapCache("fp8", *fp16.meta[1:6], fp16.values, fp16.positions))
    with pytest.raises(ValueError, match="SAP cache format must be one of fp32, fp16, bf16, int8, got 'fp8'"):
        encode_cache(torch.ones(3), None, "fp8")


# ----------------------------------------------------------------------------- native kernels vs torch


@pytest.mark.parametrize("fmt", SAP_FORMATS)
@pytest.mark.parametrize(
    "shape, s_ta",
    [
        ((3, 5, 7, 11), 0.9),
        ((64, 600), 0.9),
        ((4, 16, 32, 33), 0.9),
        ((8, 40, 30, 30), 0.9),  # several kernel blocks; channel runs of 900, not whole bytes
        ((5,), 0.0),
        ((64, 100), 0.05),
    ],
)
def test_native_and_torch_paths_are_bit_identical(fmt, shape, s_ta, monkeypatch):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 3
    fast = _encode(x, s_ta, fmt)
    fast_out = decode_cache(fast)
    monkeypatch.setattr(bitkernels, "usable", lambda *tensors: False)
    slow = _encode(x, s_ta, fmt)
    assert _caches_equal(fast, slow)
    assert _same(decode_cache(slow), fast_out)
    monkeypatch.undo()
    assert _same(decode_cache(slow), fast_out)


def _gradients(model, x, y):
    model.zero_grad(set_to_none=True)
    sap._sampler.manual_seed(11)
    F.cross_entropy(model(x), y).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("fmt", LOSSY)
def test_a_training_step_is_bit_identical_without_kernels(fmt, monkeypatch):
    torch.manual_seed(0)
    model = build_model("mobilenetv2", norm="nsconv", act_sparsity=0.9, sap_format=fmt)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(10, (2,))
    fast = _gradients(model, x, y)
    monkeypatch.setattr(bitkernels, "usable", lambda *tensors: False)
    slow = _gradients(model, x, y)
    for name in fast:
        assert torch.equal(fast[name], slow[name]), name


# ----------------------------------------------------------------------------- gradients and held bytes


def _layer(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(4)
    if kind == "nsconv":
        return NSConv2d(6, 8, 3, padding=1), (2, 6, 9, 9)
    if kind == "sparseconv":
        return SparseConv2d(6, 8, 3, padding=1, bias=True), (2, 6, 9, 9)
    return SparseLinear(20, 7), (5, 20)


def _run(layer, x, s_ta, fmt):
    layer.act_sparsity, layer.sap_format = s_ta, fmt
    layer.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    sap._sampler.manual_seed(0x5A9)
    y = layer(xx)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)))
    return y.detach(), xx.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("kind", ["sparseconv", "nsconv", "linear"])
def test_s_ta_zero_in_fp32_gives_exactly_the_unpruned_gradients(kind):
    layer, shape = _layer(kind)
    x = torch.randn(shape)
    y0, gx0, gp0 = _run(layer, x, None, "fp32")
    y1, gx1, gp1 = _run(layer, x, 0.0, "fp32")
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    for name in gp0:
        assert torch.equal(gp0[name], gp1[name]), name


@pytest.mark.parametrize("fmt", SAP_FORMATS)
@pytest.mark.parametrize("kind", ["sparseconv", "nsconv", "linear"])
def test_weight_gradient_is_that_of_the_decoded_cache(kind, fmt):
    """The format changes only what backward reads: forward and the input gradient are untouched, and
    the weight gradient equals plain autograd's on the decoded cache."""
    layer, shape = _layer(kind)
    x = torch.randn(shape) * 2
    y_plain, gx_plain, _ = _run(layer, x, None, "fp32")
    y, gx, gp = _run(layer, x, 0.9, fmt)
    assert torch.equal(y, y_plain) and torch.equal(gx, gx_plain)
    sap._sampler.manual_seed(0x5A9)
    decoded = decode_cache(cache_activation(x, 0.9, fmt))
    _, _, gp_ref = _run(layer, decoded, None, "fp32")
    for name in gp:
        assert torch.allclose(gp[name], gp_ref[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("fmt", SAP_FORMATS)
def test_held_bytes_are_the_formats(fmt):
    layer, shape = _layer("nsconv")
    layer.act_sparsity, layer.sap_format = 0.9, fmt
    x = torch.randn(shape, requires_grad=True)
    with SavedTensorMeter(layer) as meter:
        layer(x)
    n, k = x.numel(), round(0.1 * x.numel())
    bits = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}[fmt]
    scale = 4 * shape[1] if fmt == "int8" else 0
    assert meter.held.activation_bytes == math.ceil(n / 8) + k * bits // 8 + scale


def test_bytes_per_element_at_s_ta_0_9_on_a_large_activation():
    """1 bitmap bit plus ``b`` bits per kept value (and 32 per int8 channel): 4.2, 2.6, 2.6 and 1.8
    bits per element at exactly 10 % kept."""
    x = torch.randn(64, 64, 32, 32)
    n, threshold = x.numel(), keep_threshold(x, 0.9)
    for fmt, bits in (("fp32", 32), ("fp16", 16), ("bf16", 16), ("int8", 8)):
        cache = encode_cache(x, threshold, fmt)
        assert cache.fmt is SparseFormat.BITMAP and abs(cache.nnz / n - 0.1) < 0.01
        assert cache.payload_nbytes == n // 8 + cache.nnz * bits // 8 + (4 * 64 if fmt == "int8" else 0)
        at_ten_percent = 1 + 0.1 * bits + (32 * 64 / n if fmt == "int8" else 0)
        assert abs(at_ten_percent - {"fp32": 4.2, "fp16": 2.6, "bf16": 2.6, "int8": 1.8}[fmt]) < 1e-3


# ----------------------------------------------------------------------------- the run-config key


def test_sap_format_key_is_validated_and_flows_to_every_sap_layer():
    with pytest.raises(ConfigError, match="sap-format = 'fp8': choose one of bf16, fp16, fp32, int8"):
        parse_run_config({"sap-format": "fp8"})
    with pytest.raises(ConfigError, match="sap-format must be a str"):
        parse_run_config({"sap-format": 8})
    assert parse_run_config({}).sap_format == "fp32"
    cfg = parse_run_config({"model": "resnet18", "width": 8, "sap-format": "int8"})
    ins = round_instructions(cfg, 1, cfg.method.mode, 0)
    assert ins.sap_format == "int8"
    model = build_local_model(ins, 10, 3)
    layers = [m for m in model.modules() if isinstance(m, _Masked)]
    assert layers and all(m.sap_format == "int8" for m in layers)
    with pytest.raises(ValueError, match="SAP cache format must be one of"):
        LayerFactory("nsconv", 0.9, sap_format="int4")


def test_bench_memory_reports_bytes_per_format_and_position_coding(tmp_path):
    """``python -m bench.memory --bytes-only`` on MobileNetV2 at batch 2: one row per format and
    position coding, each format smaller than the one before it and than NSConv without SAP, and
    positions relative to the ReLU masks smaller than full bitmaps."""
    import json

    from bench import memory

    memory.bytes_only(["mobilenetv2"], 2, tmp_path, [0.9])
    entry = json.loads((tmp_path / "memory_bytes.json").read_text())["models"]["mobilenetv2"]
    formats = entry["formats"]["0.9"]
    assert list(formats) == list(SAP_FORMATS)
    plain = entry["activation_bytes"]["nsconv@0.9"]
    for pos in ("relu-relative", "bitmap"):
        held = {f: formats[f][pos]["activation_bytes"] for f in SAP_FORMATS}
        assert held["fp32"] > held["fp16"] == held["bf16"] > held["int8"]
        for f in SAP_FORMATS:
            assert formats[f][pos]["activation_reduction"] == plain / held[f] > 1
    for f in SAP_FORMATS:
        assert formats[f]["relu-relative"]["activation_bytes"] < formats[f]["bitmap"]["activation_bytes"]
    text = (tmp_path / "memory_bytes.md").read_text()
    assert "| mobilenetv2 | 0.9 | int8 | relu-relative |" in text and "| mobilenetv2 | 0.9 | int8 | bitmap |" in text


def test_bench_memory_measures_a_training_step_beside_the_appendix_estimate():
    """The child of ``python -m bench.memory``, in this process: one timed step of MobileNetV2 at batch 2."""
    from bench import memory

    r = memory.measure("mobilenetv2", "nsconv", 0.9, 0.9, batch=2, steps=1, sap_format="int8")
    assert 0 < r["activation_bytes"] < r["estimate_bytes"]
    assert len(r["step_seconds"]) == 1 and r["step_seconds_median"] > 0
    # where the step's time went besides arithmetic: kernel time within it, pages faulted in
    assert len(r["step_kernel_seconds"]) == len(r["step_minor_faults"]) == 1
    assert 0 <= r["step_kernel_seconds"][0] <= r["step_seconds"][0] * (os.cpu_count() or 1) + 0.05
    assert r["step_minor_faults"][0] >= 0
    assert r["gradient_bytes"] == r["parameter_bytes"]


def test_bench_memory_checkpointed_body_holds_less_and_gives_the_same_gradients():
    """``nsconv+checkpoint``, the alternative a user would reach for: ``torch.utils.checkpoint`` over
    the body recomputes it in backward, so its gradients equal plain NSConv's exactly, while the meter
    still sees the segment inputs it keeps (fewer bytes, not none)."""
    import torch.nn.functional as F

    from bench import memory
    from common.measure.accounting import SavedTensorMeter

    runs = {}
    for segments in (0, memory.CHECKPOINT_SEGMENTS):
        model = memory._model("resnet18", "nsconv", None, "fp32", 0.9, True, segments)
        x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
        with SavedTensorMeter(model) as meter:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        runs[segments] = meter.held.activation_bytes, [p.grad for p in model.parameters()]
    (plain_bytes, plain_grads), (ckpt_bytes, ckpt_grads) = runs.values()
    assert 0 < ckpt_bytes < plain_bytes / 2
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ckpt_grads, strict=True))
