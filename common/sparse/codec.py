"""Sparse tensors encoded in the storage formats of FedMef (Huang et al., CVPR 2024), Appendix 7.1.

What SAP (FedMef §3.4) keeps of an activation between forward and backward: an
:class:`EncodedTensor` inside an autograd function. It is a hot path: every step is a vectorised
torch op that also runs on an accelerator, and the bitmap encode / decode of contiguous float32
CPU tensors use the fused C loops of :mod:`common.nn.bitkernels`. It is not the wire format: what
travels between the Flower server and its clients is encoded by :mod:`common.protocol.wire`.

Formats. SAP's caches are dense or bitmap (``encode_above``, ``policy="single-pass"``). COO, CSR
and CSC are the appendix's reference formats: nothing encodes them at run time, and they are kept
so that the sizes of :mod:`common.sparse.sizes`, which ``policy="paper"`` and the memory estimates
of :mod:`common.measure.accounting` charge, belong to real encoders and decoders whose payloads
``tests/test_codec.py`` checks byte for byte.

Payload layout. All position fields form ONE contiguous MSB-first bit stream (CSR: column
indices, then row pointers; CSC: row indices, then column pointers), zero-padded to a whole
byte, followed by the values. Values are always the kept entries in row-major order of the
flattened tensor (all ``n`` entries for dense), whatever the format, so the payload is exactly
``ceil(s / 8)`` bytes (``s`` as in :mod:`common.sparse.sizes`). Padding bits must be zero and
indices must be strictly increasing, which makes every encoding canonical and lets ``decode``
reject corrupted input.

``encode`` keeps the entries with ``x != 0``; a negative zero therefore decodes as ``+0.0``
(equal under ``==``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.nn import bitkernels
from common.sparse.bits import CodecError, _pack_fields, index_bits, pack_bits, unpack_bits, unpack_uints
from common.sparse.sizes import (
    SparseFormat,
    _as_format,
    _check_nnz,
    _check_shape,
    _geometry,
    _position_bits,
    _value_count,
    choose_format,
)

# CodecError lives in common.sparse.bits, which every module of the package imports; it is exported here
# as the error of encode and decode.
__all__ = [
    "CodecError",
    "EncodedTensor",
    "decode",
    "encode",
    "encode_above",
    "encode_masked",
    "extend_bitmap",
    "restrict_bitmap",
]

_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class EncodedTensor:
    """A tensor compressed with one of the FedMef App. 7.1 schemes.

    ``values`` holds the kept entries in row-major order of the flattened tensor (all ``n``
    entries for DENSE); ``positions`` is the packed uint8 position bit stream (empty for DENSE).
    Equality is identity: a field-wise ``==`` would compare tensors element-wise and fail.
    """

    fmt: SparseFormat
    shape: tuple[int, ...]
    dtype: torch.dtype
    nnz: int
    values: torch.Tensor
    positions: torch.Tensor

    @property
    def payload_nbytes(self) -> int:
        """Bytes of values plus positions: FedMef's ``ceil(s / 8)``."""
        return self.values.nbytes + self.positions.nbytes

    @property
    def meta(self) -> tuple[SparseFormat, tuple[int, ...], torch.dtype, int]:
        """Non-tensor fields, to keep on an autograd ctx next to ``tensors()``."""
        return self.fmt, self.shape, self.dtype, self.nnz

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, positions)``, for ``ctx.save_for_backward(*enc.tensors())``."""
        return self.values, self.positions

    @classmethod
    def rebuild(
        cls,
        meta: tuple[SparseFormat, tuple[int, ...], torch.dtype, int],
        values: torch.Tensor,
        positions: torch.Tensor,
    ) -> EncodedTensor:
        """Reassemble from ``meta`` and the two tensors of ``tensors()``."""
        fmt, shape, dtype, nnz = meta
        return cls(fmt, shape, dtype, nnz, values, positions)


def _check_value_dtype(dtype: torch.dtype) -> None:
    if dtype not in _VALUE_DTYPES:
        names = ", ".join(str(d) for d in _VALUE_DTYPES)
        raise CodecError(f"unsupported value dtype {dtype}; convert the tensor to one of: {names}")


def encode_masked(
    x: torch.Tensor,
    keep: torch.Tensor,
    fmt: SparseFormat | str | None = None,
    policy: str = "smallest",
) -> EncodedTensor:
    """Compress the entries of ``x`` where ``keep`` is True (FedMef App. 7.1); others decode to 0.

    ``fmt=None`` lets ``choose_format`` decide under ``policy``. The result holds data only
    (``x`` is detached), and stays on ``x``'s device.
    """
    if not isinstance(x, torch.Tensor) or x.layout != torch.strided:
        raise CodecError("encode needs a dense (strided) torch.Tensor")
    _check_value_dtype(x.dtype)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        got = keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise CodecError(f"keep must be a torch.bool tensor, got {got}")
    if keep.shape != x.shape:
        raise CodecError(f"keep has shape {tuple(keep.shape)} but x has {tuple(x.shape)}")
    if keep.device != x.device:
        raise CodecError(f"keep is on {keep.device} but x is on {x.device}; move them together")
    shape = tuple(x.shape)
    n_r, n_c, n = _geometry(shape)
    value_bits = 8 * x.element_size()
    flat_x = x.detach().reshape(-1)
    flat_keep = keep.reshape(-1)
    nnz = int(torch.count_nonzero(flat_keep))
    fmt = choose_format(shape, nnz, value_bits, policy) if fmt is None else _as_format(fmt)
    device = x.device

    if fmt is SparseFormat.DENSE:
        values = torch.where(flat_keep, flat_x, torch.zeros((), dtype=x.dtype, device=device))
        positions = torch.zeros(0, dtype=torch.uint8, device=device)
    else:
        values = flat_x[flat_keep]
        keep2d = flat_keep.view(n_r, n_c)
        if fmt is SparseFormat.BITMAP:
            positions = pack_bits(flat_keep)
        # COO, CSR and CSC below are the appendix's reference formats (module doc): only tests encode them.
        elif fmt is SparseFormat.COO:
            offsets = flat_keep.nonzero().view(-1)
            positions = _pack_fields([(offsets, index_bits(n))], device)
        elif fmt is SparseFormat.CSR:
            cols = keep2d.nonzero()[:, 1]
            ends = keep2d.sum(dim=1).cumsum(dim=0)
            positions = _pack_fields([(cols, index_bits(n_c)), (ends, index_bits(nnz + 1))], device)
        else:
            # Transposed nonzero() lists entries column by column, as CSC stores them.
            rows = keep2d.t().nonzero()[:, 1]
            ends = keep2d.sum(dim=0).cumsum(dim=0)
            positions = _pack_fields([(rows, index_bits(n_r)), (ends, index_bits(nnz + 1))], device)
    return EncodedTensor(fmt, shape, x.dtype, nnz, values, positions)


def encode_above(
    x: torch.Tensor, threshold: float, value_bits: int | None = None, values_from: torch.Tensor | None = None
) -> EncodedTensor:
    """Keep the entries with ``|x| > threshold``, as a bitmap or dense, whichever is smaller.

    ``encode_masked(x, x.abs() > threshold, policy="single-pass")`` in effect, which SAP caches
    every activation with; contiguous float32 CPU tensors take the fused native kernels of
    :mod:`common.nn.bitkernels` (same bytes, a fraction of the passes).

    ``value_bits``: the bits each value will be stored in (default: ``x``'s own), which sets where
    dense beats a bitmap (a SAP cache that converts the values to 16 or 8 bits afterwards passes 16 or
    8). ``values_from``: a tensor of ``x``'s shape and dtype to take the kept values from instead of
    ``x`` (the selection still reads ``x``): SAP's int8 cache gathers ``x`` already divided by its
    per-channel scale.
    """
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"encode needs a torch.Tensor, got {type(x).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise CodecError(f"threshold must be a number, got {threshold!r}")
    x = x.detach()
    bits = 8 * x.element_size() if value_bits is None else value_bits
    src = x if values_from is None else values_from.detach()
    if src.shape != x.shape or src.dtype != x.dtype or src.device != x.device:
        raise CodecError(
            f"values_from must match x: got {tuple(src.shape)} {src.dtype} on {src.device}, "
            f"x is {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    if bitkernels.usable(x, src):
        bitmap, counts, nnz = bitkernels.select_above(x, threshold)
        if choose_format(tuple(x.shape), nnz, bits, "single-pass") is SparseFormat.BITMAP:
            return EncodedTensor(
                SparseFormat.BITMAP, tuple(x.shape), x.dtype, nnz, bitkernels.gather(src, bitmap, counts, nnz), bitmap
            )
    keep = x.abs() > threshold
    if bits == 8 * x.element_size():
        return encode_masked(src, keep, policy="single-pass")
    fmt = choose_format(tuple(x.shape), int(torch.count_nonzero(keep)), bits, "single-pass")
    return encode_masked(src, keep, fmt=fmt)


def _check_bitmap_type(bits: torch.Tensor, what: str) -> None:
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1:
        got = f"{bits.dtype} of shape {tuple(bits.shape)}" if isinstance(bits, torch.Tensor) else type(bits).__name__
        raise CodecError(f"{what} must be a 1-D torch.uint8 bitmap, got {got}")


def _check_bitmap(bits: torch.Tensor, count: int, what: str) -> None:
    """``bits`` must be ``ceil(count / 8)`` uint8 bytes, 1-D, with zero padding."""
    _check_bitmap_type(bits, what)
    if bits.numel() != -(-count // 8):
        raise CodecError(f"{what} of {count} bits needs {-(-count // 8)} bytes, got {bits.numel()}")
    _check_zero_padding(bits, count)


def restrict_bitmap(bitmap: torch.Tensor, reference: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``bitmap`` (``n`` bits) coded relative to ``reference`` (``n`` bits): ``(sub, outside)``.

    Layout. ``sub``: one bit per set bit of ``reference``, in order, MSB-first, zero-padded to a whole
    byte; bit ``j`` is bit ``i_j`` of ``bitmap``, ``i_j`` the position of the ``j``-th set bit of
    ``reference`` (``pext(bitmap, reference)`` over the whole stream). ``outside``: the positions
    (flat, ascending, int64) of ``bitmap``'s set bits where ``reference``'s is clear. That is
    ``ceil(p / 8) + 8 e`` bytes (``p = popcount(reference)``, ``e`` outside bits) instead of
    ``ceil(n / 8)``, and :func:`extend_bitmap` recovers ``bitmap`` exactly whatever ``reference`` is.
    SAP passes the 1-bit mask a bit-masked ReLU already holds for its own backward: ``e = 0`` behind a
    ReLU, a handful of saturated entries behind a ReLU6.
    """
    _check_bitmap(bitmap, n, "the bitmap")
    _check_bitmap(reference, n, "the reference bitmap")
    if bitkernels.usable_bitmaps(bitmap, reference):
        sub, outside = bitkernels.restrict_bits(bitmap, reference, n)
        return sub, _outside(bitmap, reference) if outside else torch.zeros(0, dtype=torch.int64)
    return pack_bits(unpack_bits(bitmap, n)[unpack_bits(reference, n)]), _outside(bitmap, reference)


def _outside(bitmap: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Ascending int64 positions of the bits set in ``bitmap`` and clear in ``reference``: a pass over
    the bytes, then only over the few that have any (the same ops with and without the kernels)."""
    stray = torch.bitwise_and(bitmap, torch.bitwise_not(reference))
    at = stray.nonzero().view(-1)
    bits = unpack_bits(stray[at], 8 * at.numel()).view(-1, 8)
    return (8 * at.view(-1, 1) + torch.arange(8, device=at.device))[bits]


def extend_bitmap(sub: torch.Tensor, outside: torch.Tensor | None, reference: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n``-bit bitmap that :func:`restrict_bitmap` coded as ``(sub, outside)`` relative to
    ``reference``, validating the coding first."""
    _check_bitmap(reference, n, "the reference bitmap")
    _check_bitmap_type(sub, "the relative bitmap")
    if not isinstance(outside, torch.Tensor) or outside.dtype != torch.int64 or outside.dim() != 1:
        got = f"{outside.dtype} of shape {tuple(outside.shape)}" if isinstance(outside, torch.Tensor) else outside
        raise CodecError(f"the positions outside the reference must be a 1-D torch.int64 tensor, got {got}")
    if outside.numel():
        if int(outside.min()) < 0 or int(outside.max()) >= n:
            raise CodecError(f"a position outside the reference is out of range for n={n}")
        _check_strictly_increasing(outside, "positions outside the reference")
        within = (reference[outside // 8] >> (7 - outside % 8).to(torch.uint8)) & 1
        if bool(within.any()):
            raise CodecError("a position listed outside the reference lies within it; the cache is corrupt")
    if bitkernels.usable_bitmaps(sub, reference):
        bitmap, ones = bitkernels.extend_bits(sub, reference, n)
        _check_bitmap(sub, ones, "the relative bitmap")
        assert bitmap is not None  # the kernel writes it whenever sub has the size just checked
    else:
        within_mask = unpack_bits(reference, n)
        ones = int(torch.count_nonzero(within_mask))
        _check_bitmap(sub, ones, "the relative bitmap")
        keep = torch.zeros(n, dtype=torch.bool, device=within_mask.device)
        keep[within_mask] = unpack_bits(sub, ones)
        bitmap = pack_bits(keep)
    # distinct bits, all clear so far (outside the reference): their sum per byte is their OR
    bits = (torch.ones((), dtype=torch.uint8, device=bitmap.device) << (7 - outside % 8)).to(torch.uint8)
    return bitmap.index_put_((outside // 8,), bits, accumulate=True)


def encode(x: torch.Tensor, fmt: SparseFormat | str | None = None, policy: str = "paper") -> EncodedTensor:
    """Compress the non-zeros of ``x`` (FedMef App. 7.1); ``encode_masked(x, x != 0, ...)``."""
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"encode needs a torch.Tensor, got {type(x).__name__}")
    return encode_masked(x, x != 0, fmt=fmt, policy=policy)


def _check_structure(
    enc: EncodedTensor,
) -> tuple[SparseFormat, tuple[int, ...], int, int, int, int]:
    """Validate metadata and tensor sizes; returns (fmt, shape, n_r, n_c, n, position_bits)."""
    if not isinstance(enc, EncodedTensor):
        raise CodecError(f"expected an EncodedTensor, got {type(enc).__name__}")
    fmt = _as_format(enc.fmt)
    shape = _check_shape(enc.shape)
    n_r, n_c, n = _geometry(shape)
    _check_nnz(enc.nnz, n)
    _check_value_dtype(enc.dtype)
    values, positions = enc.values, enc.positions
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.dtype != enc.dtype:
        raise CodecError(f"values must be a 1-D tensor of dtype {enc.dtype}")
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
        raise CodecError("positions must be a 1-D torch.uint8 tensor")
    if positions.dtype != torch.uint8:
        raise CodecError(f"positions must have dtype torch.uint8, got {positions.dtype}")
    if values.device != positions.device:
        raise CodecError(f"values are on {values.device} but positions on {positions.device}")
    want_values = _value_count(fmt, n, enc.nnz)
    if values.numel() != want_values:
        raise CodecError(f"{fmt.value} with nnz={enc.nnz} needs {want_values} values, got {values.numel()}")
    pos_bits = _position_bits(fmt, n_r, n_c, n, enc.nnz)
    want_bytes = -(-pos_bits // 8)
    if positions.numel() != want_bytes:
        raise CodecError(
            f"{fmt.value} of shape {shape} with nnz={enc.nnz} needs {want_bytes} position bytes, "
            f"got {positions.numel()}"
        )
    return fmt, shape, n_r, n_c, n, pos_bits


def _check_zero_padding(positions: torch.Tensor, used_bits: int) -> None:
    tail = used_bits % 8
    if tail and int(positions[-1]) & ((1 << (8 - tail)) - 1):
        raise CodecError("padding bits after the position stream must be zero; the data is corrupt")


def _check_strictly_increasing(idx: torch.Tensor, what: str) -> None:
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise CodecError(f"{what} must be strictly increasing (sorted, no duplicates)")


def _counts_from_ends(ends: torch.Tensor, m: int, what: str) -> torch.Tensor:
    """Per-row counts from END pointers, after checking they are a valid cumulative count."""
    if ends.numel() and not bool((ends[1:] >= ends[:-1]).all()):
        raise CodecError(f"{what} pointers must be non-decreasing")
    last = int(ends[-1]) if ends.numel() else 0
    if last != m:
        raise CodecError(f"the last {what} pointer must equal nnz={m}, got {last}")
    return torch.diff(ends, prepend=ends.new_zeros(1))


def decode(
    enc: EncodedTensor, channel_scale: tuple[torch.Tensor, int] | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact inverse of ``encode`` / ``encode_masked`` (FedMef App. 7.1), validating first.

    ``channel_scale``: ``(scale, inner)``, a 1-D float tensor of one factor per channel and the
    channel's run length: every decoded entry ``i`` (zeros included) is multiplied by
    ``scale[(i // inner) % len(scale)]`` (SAP's int8 cache, :mod:`common.nn.sapcache`). A bitmap on
    the native path does it inside the scatter, else the decoded tensor is multiplied; the products
    are the same.

    ``out``: a contiguous 1-D tensor of the decoded size, dtype and device to decode into (every entry
    is written), so that a caller decoding many tensors in turn can reuse one buffer; the result is
    then a view of it."""
    if out is not None:
        _, _, _, _, n, _ = _check_structure(enc)
        if out.dim() != 1 or out.numel() != n or out.dtype != enc.dtype or not out.is_contiguous():
            raise CodecError(f"out must be a contiguous 1-D {enc.dtype} tensor of {n} entries")
        if out.device != enc.values.device:
            raise CodecError(f"out is on {out.device}, the values on {enc.values.device}")
    if channel_scale is None:
        return _decode(enc, out)
    scale, inner = channel_scale
    fmt, shape, _, _, n, pos_bits = _check_structure(enc)
    if fmt is SparseFormat.BITMAP and n and bitkernels.usable(enc.values, scale):
        _check_zero_padding(enc.positions, pos_bits)
        try:
            return bitkernels.scatter_scaled(enc.values, enc.positions, n, scale, inner, out).reshape(shape)
        except ValueError as err:
            raise CodecError(str(err)) from None
    decoded = _decode(enc, out)
    if n:
        decoded.view(-1, scale.numel(), inner).mul_(scale.view(1, -1, 1))
    return decoded


def _decode(enc: EncodedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    fmt, shape, n_r, n_c, n, pos_bits = _check_structure(enc)
    m, values, positions = enc.nnz, enc.values, enc.positions
    device = values.device
    _check_zero_padding(positions, pos_bits)
    if fmt is SparseFormat.DENSE:
        if out is not None:
            return out.copy_(values.reshape(-1)).reshape(shape)
        return values.clone(memory_format=torch.contiguous_format).reshape(shape)

    try:
        if fmt is SparseFormat.BITMAP and bitkernels.usable(values):
            try:
                return bitkernels.scatter(values, positions, n, out).reshape(shape)
            except ValueError as err:
                raise CodecError(str(err)) from None
        out = torch.zeros(n, dtype=enc.dtype, device=device) if out is None else out.zero_()
    except RuntimeError as err:
        # Sparse formats carry n only in metadata, so a hostile shape must not crash the peer;
        # callers decoding untrusted data should also compare enc.shape with what they expect.
        raise CodecError(f"cannot allocate the decoded tensor of shape {shape}: {err}") from None
    if fmt is SparseFormat.BITMAP:
        mask = unpack_bits(positions, n)
        ones = int(torch.count_nonzero(mask))
        if ones != m:
            raise CodecError(f"bitmap marks {ones} entries but nnz={m}")
        out.masked_scatter_(mask, values)
        return out.reshape(shape)

    # The appendix's reference formats (module doc), which only tests encode: COO, then CSR / CSC.
    if fmt is SparseFormat.COO:
        offsets = unpack_uints(positions, m, index_bits(n))
        if m and int(offsets.max()) >= n:
            raise CodecError(f"COO offset {int(offsets.max())} is out of range for n={n}")
        _check_strictly_increasing(offsets, "COO offsets")
        out[offsets] = values
        return out.reshape(shape)

    if fmt is SparseFormat.CSR:
        inner, outer, inner_name, outer_name = n_c, n_r, "column", "row"
    else:
        inner, outer, inner_name, outer_name = n_r, n_c, "row", "column"
    idx_width = index_bits(inner)
    idx = unpack_uints(positions, m, idx_width)
    ends = unpack_uints(positions, outer, index_bits(m + 1), bit_offset=m * idx_width)
    counts = _counts_from_ends(ends, m, outer_name)
    if m and int(idx.max()) >= inner:
        raise CodecError(f"{inner_name} index {int(idx.max())} is out of range for {inner} {inner_name}s")
    major = torch.repeat_interleave(torch.arange(outer, device=device), counts)
    # In storage order the key major*inner+idx must rise, which rules out duplicate entries.
    _check_strictly_increasing(major * inner + idx, f"{inner_name} indices within each {outer_name}")
    if fmt is SparseFormat.CSR:
        offsets = major * n_c + idx
    else:
        # Values are in row-major order while CSC lists entries column by column.
        offsets = torch.sort(idx * n_c + major).values
    out[offsets] = values
    return out.reshape(shape)
