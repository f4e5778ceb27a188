"""Scaled activation pruning (SAP, FedMef §3.4): activations cached for backward, kept sparse.

A convolution or linear layer needs its input to form the weight gradient, so autograd normally
keeps that whole tensor alive from forward to backward. The functions here keep only its top
``1 - s_ta`` magnitudes, compressed by :mod:`common.sparse.codec` (a bitmap of positions plus the
values at the usual ``s_ta = 0.9``; the values in fp32, fp16, bf16 or int8 with per-channel scales, the
``sap-format`` of :mod:`common.nn.sapcache`), and nothing else of it: the full tensor is freed as soon as the
next layer has consumed it. ReLU and ReLU6 keep a 1-bit mask for their own backward instead of their
output. Everything is saved through ``ctx.save_for_backward`` so saved-tensor hooks (and thus
:mod:`common.measure.accounting`) see exactly what is held.

With ``s_ta = 0`` and the fp32 format the cache is the dense tensor and, for contiguous inputs, the
gradients equal plain autograd bit for bit (the cache decodes contiguous, which changes summation order otherwise).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.nn import bitkernels
from common.nn.sapcache import DEFAULT_SAP_FORMAT, SapCache, decode_cache, encode_cache
from common.sparse.bits import pack_bits, unpack_bits
from common.sparse.codec import EncodedTensor, encode_above, encode_masked
from common.sparse.sizes import SparseFormat

#: Elements sampled to estimate the pruning threshold. The estimate's density error has standard
#: deviation sqrt(k (1 - k) / SAMPLE) (0.0023 at k = 0.1); a full sort of a 4M-element tensor would
#: cost more than the convolution it serves, and on this CPU ``kthvalue`` over 2^16 samples takes
#: 25 times as long as over 2^14.
THRESHOLD_SAMPLE = 1 << 14

_sampler = torch.Generator().manual_seed(0x5A9)


def seed_threshold_sampler(seed: int) -> None:
    """Restart the stream the threshold samples come from. The trainer seeds it from the round's
    instructions, so a client's SAP thresholds, and with them its update, do not depend on what the
    process (a simulation worker serves many clients) computed before."""
    _sampler.manual_seed(seed)


def keep_threshold(x: torch.Tensor, s_ta: float) -> float | None:
    """The magnitude ``t`` such that ``|x| > t`` marks the ``1 - s_ta`` fraction of ``x`` to keep.

    None when everything is kept, ``inf`` when nothing is. Exact (``kthvalue`` over all of
    ``|x|``) for tensors of at most :data:`THRESHOLD_SAMPLE` elements, an estimated quantile from a
    uniform random sample above that. Exact zeros are never kept unless everything is
    (``s_ta = 0``), so a mostly-dead ReLU output keeps fewer entries.
    """
    if not 0.0 <= s_ta <= 1.0:
        raise ValueError(f"activation sparsity s_ta must lie in [0, 1], got {s_ta}")
    n = x.numel()
    keep = round((1.0 - s_ta) * n)
    if keep >= n:
        return None
    if keep <= 0:
        return math.inf
    flat = x.detach().reshape(-1)
    if n <= THRESHOLD_SAMPLE:
        return float(flat.abs().kthvalue(n - keep).values)
    # drawn from the CPU generator on every device, so CPU and CUDA sample the same positions
    sample = flat[torch.randint(n, (THRESHOLD_SAMPLE,), generator=_sampler).to(flat.device)].abs()
    rank = min(THRESHOLD_SAMPLE, max(1, math.ceil((1.0 - keep / n) * THRESHOLD_SAMPLE)))
    return float(sample.kthvalue(rank).values)


def keep_mask(x: torch.Tensor, s_ta: float) -> torch.Tensor:
    """Bool mask of the ``1 - s_ta`` fraction of ``x`` with the largest magnitude (see
    :func:`keep_threshold`): the entries :func:`compress_activation` keeps."""
    threshold = keep_threshold(x, s_ta)
    if threshold is None:
        return torch.ones_like(x, dtype=torch.bool)
    return x.detach().abs() > threshold


def compress_activation(x: torch.Tensor, s_ta: float) -> EncodedTensor:
    """The sparse cache of ``x`` at activation sparsity ``s_ta``: a bitmap, or dense if smaller
    (decoded contiguous, so with s_ta = 0 gradients equal autograd bit for bit for contiguous inputs).

    Only these two: both are a single linear pass. CSC can be ~10 % smaller on a (batch, C*H*W)
    activation at s_ta = 0.9, but needs ``nonzero`` and a sort, which cost more than the layer.
    """
    threshold = keep_threshold(x, s_ta)
    if threshold is None:
        return encode_masked(x, torch.ones_like(x, dtype=torch.bool), fmt=SparseFormat.DENSE)
    return encode_above(x, threshold)


def cache_activation(
    x: torch.Tensor, s_ta: float, value_format: str = DEFAULT_SAP_FORMAT, reference: torch.Tensor | None = None
) -> SapCache:
    """What SAP holds of ``x``: :func:`compress_activation`'s selection, its values stored in
    ``value_format`` (:mod:`common.nn.sapcache`; ``fp32`` is exactly :func:`compress_activation`), its
    positions relative to ``reference`` where they lie within it (:func:`~common.nn.sapcache.encode_cache`)."""
    return encode_cache(x, keep_threshold(x, s_ta), value_format, reference)


def _save_cache(ctx, cache: SapCache, *others: torch.Tensor) -> None:
    ctx.cache_meta, ctx.others = cache.meta, len(others)
    ctx.save_for_backward(*others, *cache.tensors())


class _DecodeScratch(threading.local):
    """One buffer that every SAP layer's backward decodes its input into, in turn.

    Each decoded input lives only inside its layer's backward, so one buffer the size of the largest
    serves them all. Without it every decode is a fresh allocation, and with the mmap threshold of
    :data:`common.measure.runtime.TRAINING_ENV` (which keeps the peak low) a fresh mapping, faulted in
    and zeroed by the kernel page by page, by both threads at once (``python -m bench.memory``:
    MobileNetV2's fp32 SAP step went from 1.49x to 1.11x of NSConv's, peak RSS unchanged). The buffer
    goes when a masked layer next runs forward, so it is never held beside a forward pass's
    activations."""

    buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        held = self.buffer
        if held is None or held.numel() < n or held.dtype != dtype or held.device != device:
            self.buffer = held = None  # the old one goes before the new one is allocated
            self.buffer = held = torch.empty(n, dtype=dtype, device=device)
        return held[:n]

    def release(self) -> None:
        self.buffer = None


_decode_scratch = _DecodeScratch()


def _load_cache(ctx) -> tuple[torch.Tensor, ...]:
    saved = ctx.saved_tensors
    others, cached = saved[: ctx.others], saved[ctx.others :]
    cache = SapCache.rebuild(ctx.cache_meta, cached)
    return (*others, decode_cache(cache, out=_decode_scratch.take(cache.shape, cache.dtype, cache.values.device)))


WeightFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class _MaskedLayerFunction(torch.autograd.Function):
    """A conv / linear layer whose weight ``w = weight_fn(θ, mask, gain)`` is recomputed in backward.

    Saved for backward: θ and the mask (held by the model anyway), the optional gain, and the input
    cache: a reference to ``x`` itself when ``cache`` is None (what plain autograd keeps), else that
    SAP compression of ``x`` (:func:`shared_cache`). Neither ``w`` nor any weight-sized intermediate
    (NSConv's centred filters) stays alive between forward and backward.
    """

    @staticmethod
    def forward(ctx, x, theta, mask, gain, bias, weight_fn, op, cache):
        ctx.weight_fn, ctx.op, ctx.has_bias = weight_fn, op, bias is not None
        if cache is None:
            ctx.cache_meta = None
            ctx.save_for_backward(theta, mask, gain, x)
        else:
            _save_cache(ctx, cache, theta, mask, gain)
        return op.forward(x, weight_fn(theta, mask, gain), bias)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.cache_meta is None:
            theta, mask, gain, x = ctx.saved_tensors
        else:
            theta, mask, gain, x = _load_cache(ctx)
        needs_x, needs_theta, _, needs_gain, needs_bias = ctx.needs_input_grad[:5]
        with torch.enable_grad():
            leaves = [theta.detach().requires_grad_(needs_theta)]
            if gain is not None:
                leaves.append(gain.detach().requires_grad_(needs_gain))
            weight = ctx.weight_fn(leaves[0], mask, leaves[1] if gain is not None else None)
        grad_x, grad_w, grad_b = ctx.op.backward(
            grad_out, x, weight.detach(), (needs_x, needs_theta or needs_gain, ctx.has_bias and needs_bias)
        )
        grad_theta = grad_gain = None
        if grad_w is not None:
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            # allow_unused: a weight function may ignore the gain (e.g. one that receives ŵ itself)
            grads = iter(torch.autograd.grad(weight, wanted, grad_w, allow_unused=True)) if wanted else iter(())
            grad_theta = next(grads) if needs_theta else None
            grad_gain = next(grads) if gain is not None and needs_gain else None
        return grad_x, grad_theta, None, grad_gain, grad_b, None, None, None


@dataclass(frozen=True)
class ConvOp:
    """``F.conv2d`` with fixed geometry, and its backward through ATen's own kernel."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def forward(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, grad_out, x, weight, needs):
        return torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight,
            [weight.shape[0]] if needs[2] else None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0] * len(self.stride),
            self.groups,
            list(needs),
        )


@dataclass(frozen=True)
class LinearOp:
    """``F.linear`` and its backward as the matrix products autograd uses."""

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def backward(self, grad_out, x, weight, needs):
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        return (
            grad_out @ weight if needs[0] else None,
            grad_2d.t() @ x.reshape(-1, x.shape[-1]) if needs[1] else None,
            grad_2d.sum(0) if needs[2] else None,
        )


def masked_layer(
    x,
    theta,
    mask,
    gain,
    bias,
    weight_fn: WeightFn,
    op,
    s_ta: float | None,
    value_format: str = DEFAULT_SAP_FORMAT,
    relative: bool = True,
):
    """Apply a masked conv / linear layer, caching its input sparsely when ``s_ta`` is a float, its
    kept values in ``value_format`` (:data:`common.nn.sapcache.SAP_FORMATS`), and with ``relative``
    its positions relative to the pass mask of the bit-masked ReLU whose output ``x`` is, if it is one.
    Nothing is cached where no gradient will be asked for (evaluation under ``torch.no_grad``)."""
    _decode_scratch.release()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, theta, gain, bias))
    cache = shared_cache(x, s_ta, value_format, relative) if s_ta is not None and needs_grad else None
    return _MaskedLayerFunction.apply(x, theta, mask, gain, bias, weight_fn, op, cache)


#: The attribute of an activation tensor that holds the SAP cache its first consumer made of it.
_SAP_CACHE = "_fedmef_sap_cache"


def shared_cache(x: torch.Tensor, s_ta: float, value_format: str, relative: bool) -> SapCache:
    """:func:`cache_activation` of ``x``, made once per tensor object and setting.

    A ResNet block with a projection shortcut feeds the same ReLU output to its first convolution
    and to the shortcut's: each would otherwise cache it, a second copy that was 14 % of ResNet18's
    SAP bytes (fp32 at batch 64: 24.5 MiB with it, 21.0 without). The cache rides on ``x`` as a
    Python attribute (as the ReLU's pass mask does, :func:`relu_pass_bits`), so both layers save the
    very same tensors and autograd holds them once. It is made again if ``x`` was changed in place
    since (its version counter moved) or a layer asks for another sparsity or format. It lives as
    long as ``x`` or the graph does: inside a model ``x`` is dropped after forward, but a caller who
    keeps an activation tensor past backward keeps its cache too.
    """
    key = (s_ta, value_format, relative, x._version)
    held = getattr(x, _SAP_CACHE, None)
    if held is not None and held[0] == key:
        return held[1]
    cache = cache_activation(x, s_ta, value_format, relu_pass_bits(x) if relative else None)
    setattr(x, _SAP_CACHE, (key, cache))
    return cache


class BitMaskReLUFunction(torch.autograd.Function):
    """ReLU (or ReLU6 with ``upper=6``) that keeps a 1-bit mask of its pass-through region.

    Returns ``(out, mask)``: the mask (packed MSB-first, ``0 < x`` and ``x < upper`` if capped) is the
    tensor saved for backward, returned as well so that :func:`bitmask_relu` can hand it on."""

    @staticmethod
    def forward(ctx, x, upper):
        ctx.shape = x.shape
        if bitkernels.usable(x):
            out, packed = bitkernels.relu_pack(x, upper)
        else:
            passes = x > 0 if upper is None else (x > 0) & (x < upper)
            out, packed = (x.clamp(min=0) if upper is None else x.clamp(0, upper)), pack_bits(passes.reshape(-1))
        ctx.save_for_backward(packed)
        ctx.mark_non_differentiable(packed)
        return out, packed

    @staticmethod
    def backward(ctx, grad_out, _grad_mask):
        (packed,) = ctx.saved_tensors
        if bitkernels.usable(grad_out):
            return bitkernels.mask_grad(grad_out, packed), None
        passes = unpack_bits(packed, grad_out.numel()).view(ctx.shape)
        return torch.where(passes, grad_out, 0.0), None


#: The attribute of a bit-masked ReLU's output tensor that holds its packed pass mask.
_PASS_BITS = "_fedmef_relu_pass_bits"


def bitmask_relu(x: torch.Tensor, upper: float | None = None) -> torch.Tensor:
    """ReLU / ReLU6 keeping 1 bit per element for backward; the output carries that mask for the next
    SAP layer (:func:`relu_pass_bits`)."""
    out, packed = BitMaskReLUFunction.apply(x, upper)
    setattr(out, _PASS_BITS, packed)
    return out


def relu_pass_bits(x: torch.Tensor) -> torch.Tensor | None:
    """The packed pass mask of the bit-masked ReLU whose output is the tensor object ``x``, else None.

    A Python attribute of the output tensor, not a registry of layers: it is there only on that very
    object, so a view, a sum (a residual join) or any op's result has none, and no model code has to
    say which layer follows which ReLU. The SAP cache does not trust it beyond its length: kept entries
    outside it are listed apart (:func:`common.sparse.codec.restrict_bitmap`), none behind a ReLU
    (``|out| > t >= 0`` means ``x > 0``), the kept saturated ones behind a ReLU6 (``out = 6`` is not in
    its pass mask). The coding is exact whatever the reference holds, so even an in-place change of
    the output after the ReLU cannot corrupt a cache.
    """
    return getattr(x, _PASS_BITS, None)


class _LeanMaxPool2dFunction(torch.autograd.Function):
    """Max-pooling (kernel = stride) that keeps, per output, the argmax's uint8 offset inside its
    k x k window (1 byte) instead of its fp32 input plus int64 indices (2.25 bytes per input)."""

    @staticmethod
    def forward(ctx, x, kernel):
        if kernel * kernel > 256:
            raise ValueError(f"lean max-pooling stores window offsets in uint8: kernel {kernel} is too large")
        out, indices = F.max_pool2d(x, kernel, return_indices=True)
        width = x.shape[-1]
        rows, cols = indices // width, indices % width
        ctx.kernel, ctx.in_size = kernel, x.shape[-2:]
        ctx.save_for_backward(((rows % kernel) * kernel + cols % kernel).to(torch.uint8))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (offsets,) = ctx.saved_tensors
        k, width = ctx.kernel, ctx.in_size[-1]
        offsets = offsets.long()
        out_h, out_w = offsets.shape[-2:]
        rows = torch.arange(out_h, device=offsets.device).view(-1, 1) * k + offsets // k
        cols = torch.arange(out_w, device=offsets.device).view(1, -1) * k + offsets % k
        return F.max_unpool2d(grad_out, rows * width + cols, k, output_size=ctx.in_size), None


class _LeanAvgPool2dFunction(torch.autograd.Function):
    """Average pooling that keeps only its input's shape: its backward never reads the input."""

    @staticmethod
    def forward(ctx, x, kernel):
        ctx.kernel, ctx.in_shape = kernel, x.shape
        return F.avg_pool2d(x, kernel)

    @staticmethod
    def backward(ctx, grad_out):
        k = [ctx.kernel, ctx.kernel]
        shape_only = grad_out.new_empty(ctx.in_shape)  # ATen takes the input for its size alone
        return torch.ops.aten.avg_pool2d_backward(grad_out, shape_only, k, k, [0, 0], False, True, None), None


def lean_max_pool2d(x: torch.Tensor, kernel: int) -> torch.Tensor:
    return _LeanMaxPool2dFunction.apply(x, kernel)


def lean_avg_pool2d(x: torch.Tensor, kernel: int) -> torch.Tensor:
    return _LeanAvgPool2dFunction.apply(x, kernel)
