"""The native SAP kernels give bit-identical results to the torch code they replace, and fall back."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from flwr.cli.build import build_fab_from_files

from common.nn import bitkernels, sap
from common.nn.layers import set_activation_sparsity
from common.nn.models import build_model
from common.nn.sap import bitmask_relu, compress_activation
from common.sparse.bits import pack_bits, unpack_bits
from common.sparse.codec import CodecError, EncodedTensor, decode, encode_above, extend_bitmap, restrict_bitmap
from common.sparse.sizes import SparseFormat

native = pytest.mark.skipif(bitkernels.library() is None, reason=f"no native kernels: {bitkernels.status()}")

# Around the byte and the 32768-element block boundaries of the kernels.
SIZES = [1, 7, 8, 9, 1000, 32767, 32768, 32769, 3 * 32768 + 5]


@pytest.fixture
def torch_only(monkeypatch):
    """Run the callers' torch implementation, as on a machine without a C compiler."""
    monkeypatch.setattr(bitkernels, "usable", lambda *tensors: False)


def _awkward(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 6.0, 1e-30])
    x[: min(n, specials.numel())] = specials[: min(n, specials.numel())]
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, so NaN == NaN and -0.0 != 0.0."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@native
@pytest.mark.parametrize("n", SIZES)
def test_select_and_gather_match_torch(n):
    x = _awkward(n, n)
    keep = x.abs() > 1.0
    bitmap, counts, kept = bitkernels.select_above(x, 1.0)
    assert kept == int(keep.sum()) == int(counts.sum())
    assert torch.equal(bitmap, pack_bits(keep))
    assert _same(bitkernels.gather(x, bitmap, counts, kept), x[keep])


@native
@pytest.mark.parametrize("n", SIZES)
def test_scatter_matches_torch(n):
    x = _awkward(n, n + 1)
    keep = x.abs() > 0.5
    dense = bitkernels.scatter(x[keep], pack_bits(keep), n)
    assert _same(dense, torch.where(keep, x, torch.zeros(())))


def _patterns(n: int) -> dict[str, torch.Tensor]:
    """Keep masks that stress the branch-free copies at block edges (32768 elements a block)."""
    g = torch.Generator().manual_seed(5)
    block = torch.arange(n) % 32768
    masks = {f"random {d}": torch.rand(n, generator=g) < d for d in (0.01, 0.1, 0.5, 0.99)}
    masks["each block's last 3"] = block >= 32765
    masks["each block's first"] = block == 0
    masks["tensor's last 9"] = torch.arange(n) >= n - 9
    masks["first half only"] = torch.arange(n) < n // 2
    masks["all"] = torch.ones(n, dtype=torch.bool)
    masks["none"] = torch.zeros(n, dtype=torch.bool)
    return masks


@native
@pytest.mark.parametrize("n", [3 * 32768 + 13, 2 * 32768])
def test_gather_and_scatter_on_block_edge_patterns(n):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    for name, keep in _patterns(n).items():
        x = torch.where(keep, values.sign() * (2 + values.abs()), values.clamp(-0.9, 0.9))
        bitmap, counts, kept = bitkernels.select_above(x, 1.0)
        assert torch.equal(bitmap, pack_bits(keep)) and kept == int(keep.sum()), name
        gathered = bitkernels.gather(x, bitmap, counts, kept)
        assert _same(gathered, x[keep]), name
        assert _same(bitkernels.scatter(gathered, bitmap, n), torch.where(keep, x, torch.zeros(()))), name


@native
def test_scatter_rejects_a_bitmap_that_disagrees_with_the_values():
    keep = torch.rand(100) > 0.5
    with pytest.raises(ValueError, match="bitmap marks"):
        bitkernels.scatter(torch.ones(int(keep.sum()) + 1), pack_bits(keep), 100)
    with pytest.raises(ValueError, match="13 uint8 bytes on the CPU"):
        bitkernels.scatter(torch.ones(3), torch.zeros(12, dtype=torch.uint8), 100)
    strided = torch.zeros(26, dtype=torch.uint8)
    strided[::2] = pack_bits(keep)
    assert torch.equal(bitkernels.scatter(torch.ones(int(keep.sum())), strided[::2], 100), keep.float())


@native
def test_scatter_into_out_overwrites_it_and_rejects_one_that_does_not_fit():
    keep = torch.rand(100) > 0.5
    values, bitmap, scale = torch.rand(int(keep.sum())), pack_bits(keep), torch.tensor([2.0, -1.0])
    out = torch.full((100,), float("nan"))
    assert bitkernels.scatter(values, bitmap, 100, out).data_ptr() == out.data_ptr()
    assert _same(out, bitkernels.scatter(values, bitmap, 100))
    out.fill_(float("nan"))
    assert _same(
        bitkernels.scatter_scaled(values, bitmap, 100, scale, 50, out),
        bitkernels.scatter_scaled(values, bitmap, 100, scale, 50),
    )
    for bad in (torch.empty(99), torch.empty(100, dtype=torch.float64), torch.empty(200)[::2]):
        with pytest.raises(ValueError, match="out must be 100 contiguous"):
            bitkernels.scatter(values, bitmap, 100, bad)
        with pytest.raises(ValueError, match="out must be 100 contiguous"):
            bitkernels.scatter_scaled(values, bitmap, 100, scale, 50, bad)


@native
@pytest.mark.parametrize("upper", [None, 6.0])
@pytest.mark.parametrize("n", SIZES)
def test_relu_pack_and_mask_grad_match_torch(n, upper):
    x = _awkward(n, 2 * n) * 4
    out, bitmap = bitkernels.relu_pack(x, upper)
    passes = (x > 0) if upper is None else (x > 0) & (x < upper)
    assert _same(out, x.clamp(min=0) if upper is None else x.clamp(0, upper))
    assert torch.equal(bitmap, pack_bits(passes))
    grad = _awkward(n, 3 * n)
    assert _same(bitkernels.mask_grad(grad, bitmap), torch.where(unpack_bits(bitmap, n), grad, torch.zeros(())))


def _reference_patterns(n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(bitmap, reference) pairs: within the reference, with a few bits outside it, and the edges
    (empty reference, full reference, references whose blocks start their relative bits mid-byte)."""
    g = torch.Generator().manual_seed(n)
    pairs = {}
    for density in (0.003, 0.3, 0.5, 0.97):
        ref = torch.rand(n, generator=g) < density
        keep = ref & (torch.rand(n, generator=g) < 0.2)
        pairs[f"within {density}"] = (keep, ref)
        stray = keep.clone()
        stray[torch.randint(n, (3,), generator=g)] = True
        pairs[f"3 outside {density}"] = (stray, ref)
    for name, keep in _patterns(n).items():
        pairs[f"{name} in all"] = (keep, torch.ones(n, dtype=torch.bool))
        pairs[f"{name} in none"] = (keep, torch.zeros(n, dtype=torch.bool))
    return pairs


@pytest.mark.parametrize("n", [1, 7, 9, 1000, 3 * 32768 + 13, 5 * 32768 + 3])
def test_relative_bitmaps_are_the_same_with_and_without_kernels_and_round_trip(n, monkeypatch):
    """restrict_bitmap / extend_bitmap: the native kernels (several threads, so blocks whose relative
    bits start mid-byte share bytes) write the torch bytes, and the coding is exact either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        for name, (keep, ref) in _reference_patterns(n).items():
            bitmap, reference = pack_bits(keep), pack_bits(ref)
            fast_sub, fast_outside = restrict_bitmap(bitmap, reference, n)
            fast_back = extend_bitmap(fast_sub, fast_outside, reference, n)
            monkeypatch.setattr(bitkernels, "usable", lambda *tensors: False)
            sub, outside = restrict_bitmap(bitmap, reference, n)
            back = extend_bitmap(sub, outside, reference, n)
            monkeypatch.undo()
            assert torch.equal(fast_sub, sub) and torch.equal(fast_outside, outside), name
            assert torch.equal(sub, pack_bits(keep[ref])), name
            assert torch.equal(outside, (keep & ~ref).nonzero().view(-1)), name
            assert torch.equal(back, bitmap) and torch.equal(fast_back, bitmap), name
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fast", [True, False])
def test_relative_bitmap_errors_are_codec_errors_on_both_paths(fast, monkeypatch):
    if not fast:
        monkeypatch.setattr(bitkernels, "usable", lambda *tensors: False)
    keep = torch.tensor([True, False, True, True, False, False, True, False, True, True])
    ref = torch.tensor([True, True, False, True, True, False, True, False, True, True])
    bitmap, reference = pack_bits(keep), pack_bits(ref)
    sub, outside = restrict_bitmap(bitmap, reference, 10)
    assert outside.tolist() == [2]
    with pytest.raises(CodecError, match="the relative bitmap of 7 bits needs 1 bytes, got 2"):
        extend_bitmap(torch.cat([sub, sub]), outside, reference, 10)
    with pytest.raises(CodecError, match="padding bits"):
        extend_bitmap(sub | 1, outside, reference, 10)
    with pytest.raises(CodecError, match="the reference bitmap of 10 bits needs 2 bytes, got 1"):
        extend_bitmap(sub, outside, reference[:1], 10)
    with pytest.raises(CodecError, match="the relative bitmap must be a 1-D torch.uint8 bitmap"):
        extend_bitmap(sub.to(torch.int16), outside, reference, 10)
    with pytest.raises(CodecError, match="must be a 1-D torch.int64 tensor"):
        extend_bitmap(sub, outside.int(), reference, 10)
    with pytest.raises(CodecError, match="lies within it"):
        extend_bitmap(sub, torch.tensor([0]), reference, 10)
    with pytest.raises(CodecError, match="out of range"):
        extend_bitmap(sub, torch.tensor([10]), reference, 10)
    with pytest.raises(CodecError, match="strictly increasing"):
        extend_bitmap(sub, torch.tensor([7, 5]), reference, 10)


@pytest.mark.parametrize("threshold", [0.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("shape", [(5,), (3, 7, 11, 13), (64, 600)])
def test_encode_above_is_the_same_with_and_without_kernels(shape, threshold, monkeypatch):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    fast = encode_above(x, threshold)
    monkeypatch.setattr(bitkernels, "usable", lambda *tensors: False)
    slow = encode_above(x, threshold)
    assert (fast.fmt, fast.shape, fast.nnz) == (slow.fmt, slow.shape, slow.nnz)
    assert torch.equal(fast.positions, slow.positions) and _same(fast.values, slow.values)
    keep = x.abs() > threshold
    assert fast.nnz == int(keep.sum())
    assert fast.fmt is (SparseFormat.DENSE if threshold == 0.0 else SparseFormat.BITMAP)
    assert torch.equal(decode(fast), torch.where(keep, x, torch.zeros(())))
    monkeypatch.undo()
    assert torch.equal(decode(slow), decode(fast))


def test_encode_above_rejects_a_bad_threshold():
    for bad in (math.nan, "1", True):
        with pytest.raises(CodecError, match="threshold"):
            encode_above(torch.ones(3), bad)


@pytest.mark.parametrize("fast", [True, False], ids=["native", "torch"])
def test_bitmap_decode_errors_are_codec_errors_on_both_paths(fast, monkeypatch):
    if not fast:
        monkeypatch.setattr(bitkernels, "usable", lambda *tensors: False)
    keep = torch.arange(20) % 3 == 0
    bitmap = pack_bits(keep)
    good = EncodedTensor(
        SparseFormat.BITMAP, (20,), torch.float32, int(keep.sum()), torch.ones(int(keep.sum())), bitmap
    )
    assert torch.equal(decode(good), keep.float())
    lying = EncodedTensor(SparseFormat.BITMAP, (20,), torch.float32, 2, torch.ones(2), bitmap)
    with pytest.raises(CodecError, match="bitmap marks 7 entries but nnz=2"):
        decode(lying)


def _gradients(model, x, y):
    model.zero_grad(set_to_none=True)
    sap._sampler.manual_seed(11)  # the sampled thresholds must draw the same elements in both runs
    F.cross_entropy(model(x), y).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@native
def test_sap_training_step_is_bit_identical_without_kernels(monkeypatch):
    """MobileNetV2 with NSConv, SAP at 0.9 (sampled thresholds: inputs above 2^14 elements) and
    bit-masked ReLU6: every parameter gradient is the same on the native and the torch path."""
    torch.manual_seed(0)
    model = build_model("mobilenetv2", norm="nsconv", act_sparsity=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    fast = _gradients(model, x, y)
    monkeypatch.setattr(bitkernels, "usable", lambda *tensors: False)
    slow = _gradients(model, x, y)
    assert fast.keys() == slow.keys()
    for name in fast:
        assert torch.equal(fast[name], slow[name]), name
    set_activation_sparsity(model, None)
    assert any(not torch.equal(_gradients(model, x, y)[n], fast[n]) for n in fast)  # SAP did prune


@pytest.mark.parametrize("upper", [None, 6.0])
def test_bitmask_relu_gradient_equals_autograd_on_both_paths(upper, monkeypatch):
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(bitkernels, "usable", lambda *tensors: False)
        x = (torch.randn(2, 3, 17, 19) * 4).requires_grad_()
        g = torch.randn(2, 3, 17, 19)
        (bitmask_relu(x, upper) * g).sum().backward()
        ref = x.detach().clone().requires_grad_()
        ((F.relu(ref) if upper is None else F.relu6(ref)) * g).sum().backward()
        assert torch.equal(x.grad, ref.grad)


def test_compress_activation_uses_the_kernels_when_loaded(monkeypatch):
    x = torch.randn(64, 32, 8, 8)
    calls, real = [], bitkernels.select_above

    def spy(*args):
        calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(bitkernels, "select_above", spy)
    enc = compress_activation(x, 0.9)
    assert enc.fmt is SparseFormat.BITMAP
    assert len(calls) == (1 if bitkernels.library() is not None else 0)


def _status_in_subprocess(env: dict) -> str:
    code = "from common.nn import bitkernels; print(bitkernels.library() is None, bitkernels.status())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_disabled_or_missing_compiler_falls_back_to_torch(tmp_path):
    env = {**os.environ, "FEDMEF_CACHE": str(tmp_path)}
    assert _status_in_subprocess({**env, "FEDMEF_NATIVE": "0"}) == "True torch (disabled by FEDMEF_NATIVE)"
    missing = _status_in_subprocess({**env, "CC": str(tmp_path / "no-such-cc")})
    assert missing.startswith("True torch (no native kernels:"), missing
    assert not list(tmp_path.glob("*.so"))


def test_kernels_build_into_the_cache_dir(tmp_path):
    if bitkernels.library() is None:
        pytest.skip(bitkernels.status())
    out = _status_in_subprocess({**os.environ, "FEDMEF_CACHE": str(tmp_path)})
    assert out.startswith("False native (") and str(tmp_path) in out
    assert len(list(tmp_path.glob("bitkernels-*.so"))) == 1
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # the build directory was removed


def test_the_fab_bundle_holds_exactly_the_c_source():
    """bitkernels.c.json, the copy a Flower app bundle carries, is the text of bitkernels.c."""
    expected = bitkernels.bundle_text(bitkernels.C_SOURCE.read_text(encoding="utf-8"))
    assert bitkernels.BUNDLE.read_text(encoding="utf-8") == expected, (
        f"{bitkernels.BUNDLE.name} is stale: run `make kernels` (python -m common.nn.bitkernels --bundle)"
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec")  # flwr's own pathspec usage, once per file
def test_a_flower_app_bundle_carries_the_json_copy_and_not_the_c_file():
    """Why the copy exists: Flower's FAB filter drops .c files, and a Pi's ClientApp has only the FAB."""
    root = Path(bitkernels.__file__).parents[2]
    # pyproject.toml's fab-include names server/ and client/ too, and flwr wants each pattern to match
    apps = [root / "server" / "server_app.py", root / "client" / "client_app.py"]
    files = [root / "pyproject.toml", Path(bitkernels.__file__), bitkernels.C_SOURCE, bitkernels.BUNDLE, *apps]
    fab = build_fab_from_files({path.relative_to(root).as_posix(): path for path in files})[0]
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "common/nn/bitkernels.c.json" in names and "common/nn/bitkernels.c" not in names


def _load_copy(directory: Path, *sources: Path) -> ModuleType:
    """A fresh copy of the bitkernels module in ``directory``, with only ``sources`` beside it."""
    directory.mkdir(exist_ok=True)
    for path in (Path(bitkernels.__file__), *sources):
        shutil.copy(path, directory / path.name)
    spec = importlib.util.spec_from_file_location(f"bitkernels_in_{directory.name}", directory / "bitkernels.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@native
def test_kernels_build_from_the_bundle_alone_under_the_same_cache_key(tmp_path, monkeypatch):
    """As in a FAB, only bitkernels.c.json beside the module: the kernels build, under the key that
    bitkernels.c gives, and match torch bit for bit."""
    monkeypatch.setenv("FEDMEF_CACHE", str(tmp_path / "cache"))
    from_bundle = _load_copy(tmp_path / "fab", bitkernels.BUNDLE)
    assert from_bundle.library() is not None, from_bundle.status()
    from_c = _load_copy(tmp_path / "checkout", bitkernels.C_SOURCE)
    assert from_c.library() is not None and from_c.status() == from_bundle.status()  # the same .so path
    assert len(list((tmp_path / "cache").glob("bitkernels-*.so"))) == 1  # built once

    n = 3 * 32768 + 5
    x = _awkward(n, 17) * 4
    keep = x.abs() > 1.0
    bitmap, counts, kept = from_bundle.select_above(x, 1.0)
    assert torch.equal(bitmap, pack_bits(keep)) and kept == int(keep.sum())
    gathered = from_bundle.gather(x, bitmap, counts, kept)
    assert _same(gathered, x[keep])
    assert _same(from_bundle.scatter(gathered, bitmap, n), torch.where(keep, x, torch.zeros(())))
    out, passes = from_bundle.relu_pack(x, 6.0)
    assert _same(out, x.clamp(0, 6.0)) and torch.equal(passes, pack_bits((x > 0) & (x < 6.0)))
    grad = _awkward(n, 18)
    assert _same(from_bundle.mask_grad(grad, passes), torch.where(unpack_bits(passes, n), grad, torch.zeros(())))


@pytest.mark.parametrize("bundle", ["corrupt", "missing"])
def test_without_a_sound_source_the_kernels_fall_back_to_torch(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMEF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDMEF_NATIVE", raising=False)
    if bundle == "corrupt":
        edited = json.loads(bitkernels.BUNDLE.read_text(encoding="utf-8"))
        edited["source"] += "/* edited without regenerating the hash */\n"
        (tmp_path / "fab").mkdir()
        (tmp_path / "fab" / bitkernels.BUNDLE.name).write_text(json.dumps(edited), encoding="utf-8")
    module = _load_copy(tmp_path / "fab")
    assert module.library() is None
    assert module.status().startswith("torch (no kernel source:"), module.status()
    assert ("sha256" if bundle == "corrupt" else "No such file") in module.status()
    assert not (tmp_path / "cache").exists()


# Channel runs (inner) shorter than a byte, straddling bytes, and longer than a block.
CHANNEL_GEOMETRIES = [(5, 3, 1), (6, 40, 900), (2, 3, 40000), (64, 600, 1), (1, 1, 3 * 32768 + 5)]


@native
@pytest.mark.parametrize("outer, channels, inner", CHANNEL_GEOMETRIES)
def test_int8_channel_kernels_match_the_torch_expressions(outer, channels, inner):
    n = outer * channels * inner
    x = _awkward(n, seed=channels).view(outer, channels, inner)
    flat = x.reshape(-1)
    want_amax = torch.linalg.vector_norm(x, math.inf, dim=(0, 2))
    assert _same(bitkernels.channel_absmax(flat, inner, channels), want_amax)

    scale = torch.where(want_amax.isfinite() & (want_amax > 0), want_amax / 127, torch.ones(()))
    bitmap, counts, kept = bitkernels.select_above(flat, 0.7)
    scaled = (x / scale.view(1, -1, 1)).reshape(-1)
    keep = unpack_bits(bitmap, n)
    want_q = scaled[keep].round().clamp(-127, 127).to(torch.int8)
    assert torch.equal(bitkernels.gather_quantize(flat, bitmap, counts, kept, scale, inner), want_q)

    values = want_q.to(torch.float32)
    odd_scale = scale.clone()
    odd_scale[0] = -math.inf  # a hostile scale: 0 * -inf must give NaN where torch's product does
    for s in (scale, odd_scale):
        want = torch.zeros(n).masked_scatter_(keep, values).view(outer, channels, inner).mul_(s.view(1, -1, 1))
        assert _same(bitkernels.scatter_scaled(values, bitmap, n, s, inner), want.reshape(-1))


@native
def test_scatter_scaled_rejects_a_bitmap_that_disagrees_with_the_values():
    bitmap = pack_bits(torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="bitmap marks 2 entries but nnz=1"):
        bitkernels.scatter_scaled(torch.ones(1), bitmap, 3, torch.ones(1), 3)
