"""Value formats of SAP's activation cache (FedMef §3.4): how the kept entries are stored.

:func:`common.nn.sap.compress_activation` selects the top ``1 - s_ta`` magnitudes of a layer's input
and stores their positions (a 1-bit-per-element bitmap, or nothing when the cache is dense) and their
values. This module stores those values in one of four formats, chosen by the run-config key
``sap-format`` (bits per element of the activation at ``s_ta = 0.9``, bitmap included: ``1 + 0.1 b``):

========  ================  ==============================================================  =======
format    value storage     error of a decoded kept value ``v``                             bits/el
========  ================  ==============================================================  =======
``fp32``  the activation's  none: lossless, bit for bit (today's cache)                     4.2
          own dtype
``fp16``  IEEE half         round to nearest even: ``|err| <= 2^-11 |v|`` for               2.6
                            ``2^-14 <= |v| <= 65504``, ``<= 2^-25`` below; finite values
                            beyond ±65504 saturate to ±65504
``bf16``  bfloat16          round to nearest even: ``|err| <= 2^-8 |v|`` (fp32's range)     2.6
``int8``  int8 + a float32  ``q = round(v / scale_c)``, ``scale_c = max|x_c| / 127`` over     1.8
          scale per channel channel ``c``: ``|err| <= scale_c / 2`` (plus fp32 rounding of
                            ``q * scale_c``, a relative 2^-24)
========  ================  ==============================================================  =======

The int8 scale is per channel (dim 1 of a convolution's (N, C, H, W) input; the last dim, the
features, of a linear layer's input; one scale for a 1-D tensor): its bound ``scale_c / 2`` is never
above a per-tensor scale's, and channel ranges after a ReLU differ by orders of magnitude, which a
single scale would spend on the largest channel. It costs 4 bytes per channel (0.1 % of the cache of
a 64-channel 32x32 layer at batch 64). Rounding is deterministic (half to even); stochastic rounding
is not implemented. Every kept ``|v|`` exceeds the threshold, so ``scale_c > 0`` for every channel that
keeps anything; channels that keep nothing get scale 1.

Native kernels: the selection, gather and scatter of the bitmap are the C kernels of
:mod:`common.nn.bitkernels` (float32) for every format. int8 has three of its own there: the
per-channel maximum, a gather that divides and rounds only the kept entries, and a scatter that
multiplies by the scale as it writes, so its cache costs about what fp32's does (a 64x144x32x32 ReLU
output on one thread of this machine: encode 92 -> 23 ms, decode 92 -> 31 ms, fp32's 10 and 32 ms;
the maximum as an integer reduction, which vectorizes, then took encode from 16 to 12 ms against
fp32's 8-9 ms, on a busier machine; one-off timings, README "Benchmarks").
fp16 / bf16 convert the kept values with torch, one extra pass over a tenth of the activation. The
torch fallback computes the same expressions, so both paths agree bit for bit
(``tests/test_sapcache.py``, ``tests/test_bitkernels.py``).

The choice between a bitmap and dense storage counts the format's own value bits, so an int8 cache
goes dense above 7/8 kept rather than 31/32.

Behind a bit-masked ReLU the bitmap is coded relative to the ReLU's 1-bit mask, which autograd holds
anyway (:func:`encode_cache`'s ``reference``): one bit per passing element, about half a bit per
element, so the table's ``1 +`` becomes about ``0.5 +`` (1.3 bits per element in int8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from common.nn import bitkernels
from common.sparse.bits import CodecError
from common.sparse.codec import (
    EncodedTensor,
    choose_format,
    decode,
    encode_above,
    encode_masked,
    extend_bitmap,
    restrict_bitmap,
)
from common.sparse.sizes import SparseFormat

#: The values of run-config key ``sap-format``.
SAP_FORMATS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
DEFAULT_SAP_FORMAT = "fp32"

#: Storage dtype of each format's values; None: the activation's own dtype (lossless).
_STORAGE: dict[str, torch.dtype | None] = {
    "fp32": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
}
FP16_MAX = 65504.0
INT8_MAX = 127


def check_format(value_format: str) -> str:
    """``value_format`` if it is one of :data:`SAP_FORMATS`, else a ValueError naming them."""
    if value_format not in _STORAGE:
        raise ValueError(f"SAP cache format must be one of {', '.join(SAP_FORMATS)}, got {value_format!r}")
    return value_format


def value_bits(value_format: str, dtype: torch.dtype = torch.float32) -> int:
    """Bits per stored value of ``value_format`` for an activation of ``dtype``."""
    storage = _STORAGE[check_format(value_format)] or dtype
    return 8 * torch.empty((), dtype=storage).element_size()


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The axis of the int8 scales: 1 for a conv input (N, C, H, W), the last for a linear input,
    None (one scale) for a 0-D or 1-D tensor."""
    if len(shape) == 4:
        return 1
    return len(shape) - 1 if len(shape) >= 2 else None


def channel_geometry(shape: tuple[int, ...], axis: int | None) -> tuple[int, int]:
    """``(inner, channels)``: flat element ``i`` of a tensor of ``shape`` lies in channel
    ``(i // inner) % channels`` of ``axis`` (one channel of every element for None)."""
    if axis is None:
        return max(math.prod(shape), 1), 1
    return max(math.prod(shape[axis + 1 :]), 1), shape[axis]


def _scale_shape(shape: tuple[int, ...], axis: int | None) -> list[int]:
    """How the 1-D scale broadcasts over a tensor of ``shape``."""
    if axis is None:
        return [1] * len(shape) if shape else []
    return [shape[axis] if d == axis else 1 for d in range(len(shape))]


@dataclass(frozen=True, eq=False)
class SapCache:
    """One activation as SAP holds it: positions as :class:`~common.sparse.codec.EncodedTensor` has
    them (``fmt`` dense or bitmap), values in ``value_format``'s storage dtype, and for int8 the
    per-channel ``scale`` (``dtype``, the activation's, 1-D over ``axis``).

    With a ``reference`` (a bitmap fmt only), the positions are coded relative to it
    (:func:`~common.sparse.codec.restrict_bitmap`): ``positions`` holds one bit per set bit of
    ``reference``, ``outside`` the flat int64 positions of the kept entries where ``reference`` is
    clear. ``reference`` is another tensor's storage (the 1-bit mask of the ReLU that produced the
    activation), shared, not copied, so autograd holds it once."""

    value_format: str
    fmt: SparseFormat
    shape: tuple[int, ...]
    dtype: torch.dtype
    nnz: int
    axis: int | None
    values: torch.Tensor
    positions: torch.Tensor
    scale: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    outside: torch.Tensor | None = None

    @property
    def payload_nbytes(self) -> int:
        """Bytes of values, positions and scales: what autograd holds for this activation beyond the
        ``reference``, which the ReLU holds anyway."""
        optional = (t.nbytes for t in (self.scale, self.outside) if t is not None)
        return self.values.nbytes + self.positions.nbytes + sum(optional)

    @property
    def meta(self) -> tuple:
        """Non-tensor fields, to keep on an autograd ctx next to :meth:`tensors`."""
        return self.value_format, self.fmt, self.shape, self.dtype, self.nnz, self.axis, self.reference is not None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """``(values, positions[, scale][, reference, outside])``, for ``ctx.save_for_backward(*cache.tensors())``."""
        optional = (t for t in (self.scale, self.reference, self.outside) if t is not None)
        return (self.values, self.positions, *optional)

    @classmethod
    def rebuild(cls, meta: tuple, tensors: tuple[torch.Tensor, ...]) -> SapCache:
        """Reassemble from :attr:`meta` and the tensors of :meth:`tensors`; a wrong count is a CodecError."""
        value_format, fmt, shape, dtype, nnz, axis, relative = meta
        want = 2 + (value_format == "int8") + 2 * relative
        if len(tensors) != want:
            what = f"a {value_format} SAP cache{' with relative positions' if relative else ''}"
            raise CodecError(f"{what} has {want} tensors, got {len(tensors)}")
        values, positions, *rest = tensors
        scale = rest.pop(0) if value_format == "int8" else None
        reference, outside = rest if relative else (None, None)
        return cls(value_format, fmt, shape, dtype, nnz, axis, values, positions, scale, reference, outside)


def _from_encoded(value_format: str, enc: EncodedTensor, values: torch.Tensor, axis=None, scale=None) -> SapCache:
    return SapCache(value_format, enc.fmt, enc.shape, enc.dtype, enc.nnz, axis, values, enc.positions, scale)


def int8_scale(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``max |x| / 127`` per slice along ``axis`` (one value for None), 1 where that max is 0 or not finite."""
    x = x.detach()
    if x.numel() and bitkernels.usable(x):
        amax = bitkernels.channel_absmax(x, *channel_geometry(tuple(x.shape), axis))
    elif axis is None:
        amax = torch.linalg.vector_norm(x.reshape(-1), math.inf).reshape(1) if x.numel() else x.new_zeros(1)
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        amax = torch.linalg.vector_norm(x, math.inf, dim=dims) if x.numel() else x.new_zeros(x.shape[axis])
    scale = amax / INT8_MAX
    return torch.where((scale > 0) & scale.isfinite(), scale, torch.ones((), dtype=scale.dtype, device=scale.device))


def encode_cache(
    x: torch.Tensor, threshold: float | None, value_format: str, reference: torch.Tensor | None = None
) -> SapCache:
    """Keep the entries of ``x`` with ``|x| > threshold`` (all of them for None) in ``value_format``.

    ``reference``: a packed bitmap over ``x`` (``ceil(n / 8)`` uint8 bytes, the 1-bit mask of the
    ReLU whose output ``x`` is). A bitmap cache codes its positions relative to it
    (:func:`~common.sparse.codec.restrict_bitmap`) where that is smaller: about half the bitmap
    behind a ReLU, a little more behind a ReLU6, which lists its kept saturated entries apart. The
    dense-or-bitmap choice itself counts a full bitmap, so dense may be kept a little beyond where
    the relative coding would be smaller, at nearly everything kept (s_ta near 0).
    """
    cache = _encode_absolute(x, threshold, check_format(value_format))
    if reference is None or cache.fmt is not SparseFormat.BITMAP:
        return cache
    sub, outside = restrict_bitmap(cache.positions, reference, x.numel())
    if sub.nbytes + outside.nbytes >= cache.positions.nbytes:
        return cache
    return replace(cache, positions=sub, reference=reference, outside=outside)


def _encode_absolute(x: torch.Tensor, threshold: float | None, value_format: str) -> SapCache:
    x = x.detach()
    storage = _STORAGE[value_format]
    bits = value_bits(value_format, x.dtype)
    if storage is None:
        # today's cache, unchanged: fp32 values as the codec keeps them
        if threshold is None:
            enc = encode_masked(x, torch.ones_like(x, dtype=torch.bool), fmt=SparseFormat.DENSE)
        else:
            enc = encode_above(x, threshold)
        return _from_encoded(value_format, enc, enc.values)
    if value_format == "int8":
        axis = channel_axis(tuple(x.shape))
        scale = int8_scale(x, axis)
        if threshold is not None and x.numel() and bitkernels.usable(x):
            # the native path divides only the kept entries, inside the gather (bitkernels.c)
            bitmap, counts, nnz = bitkernels.select_above(x, threshold)
            if choose_format(tuple(x.shape), nnz, bits, "single-pass") is SparseFormat.BITMAP:
                inner, _ = channel_geometry(tuple(x.shape), axis)
                q = bitkernels.gather_quantize(x, bitmap, counts, nnz, scale, inner)
                return SapCache(value_format, SparseFormat.BITMAP, tuple(x.shape), x.dtype, nnz, axis, q, bitmap, scale)
        scaled = x / scale.view(_scale_shape(tuple(x.shape), axis))
        if threshold is None:
            enc = encode_masked(scaled, torch.ones_like(x, dtype=torch.bool), fmt=SparseFormat.DENSE)
        else:
            enc = encode_above(x, threshold, value_bits=bits, values_from=scaled)
        q = enc.values.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return _from_encoded(value_format, enc, q, axis, scale)
    if threshold is None:
        enc = encode_masked(x, torch.ones_like(x, dtype=torch.bool), fmt=SparseFormat.DENSE)
    else:
        enc = encode_above(x, threshold, value_bits=bits)
    values = enc.values.clamp(-FP16_MAX, FP16_MAX) if value_format == "fp16" else enc.values
    return _from_encoded(value_format, enc, values.to(storage))


def decode_cache(cache: SapCache, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense activation a :class:`SapCache` holds (dropped entries 0), validating it first; decoded
    into ``out`` when given (:func:`common.sparse.codec.decode`)."""
    if not isinstance(cache, SapCache):
        raise CodecError(f"expected a SapCache, got {type(cache).__name__}")
    if cache.value_format not in _STORAGE:
        raise CodecError(f"unknown SAP cache format {cache.value_format!r}; expected one of {', '.join(SAP_FORMATS)}")
    storage = _STORAGE[cache.value_format] or cache.dtype
    values = cache.values
    if not isinstance(values, torch.Tensor) or values.dtype != storage:
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise CodecError(f"a {cache.value_format} SAP cache holds {storage} values, got {got}")
    scale = cache.scale
    if cache.value_format == "int8":
        channels = 1 if cache.axis is None else cache.shape[cache.axis]
        if (
            not isinstance(scale, torch.Tensor)
            or scale.dim() != 1
            or scale.dtype != cache.dtype
            or scale.numel() != channels
        ):
            what = f"{tuple(scale.shape)} {scale.dtype}" if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise CodecError(
                f"an int8 SAP cache of shape {cache.shape} needs {channels} {cache.dtype} scales, got {what}"
            )
    elif scale is not None:
        raise CodecError(f"a {cache.value_format} SAP cache carries no scale")
    positions = cache.positions
    if cache.reference is not None:
        if cache.fmt is not SparseFormat.BITMAP:
            raise CodecError(f"only a bitmap SAP cache codes its positions relative to a reference, not {cache.fmt}")
        positions = extend_bitmap(positions, cache.outside, cache.reference, math.prod(cache.shape))
    enc = EncodedTensor(cache.fmt, cache.shape, cache.dtype, cache.nnz, values.to(cache.dtype), positions)
    if scale is None:
        return decode(enc, out=out)
    return decode(enc, channel_scale=(scale, channel_geometry(cache.shape, cache.axis)[0]), out=out)
