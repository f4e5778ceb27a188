"""Bit packing for the storage formats of FedMef (Huang et al., CVPR 2024), Appendix 7.1.

Two primitives, both vectorised torch ops that also run on an accelerator: a bool mask packed
MSB-first into bytes (the bitmap format, byte-compatible with ``numpy.packbits``), and non-negative
ints packed into fixed-width MSB-first fields (COO offsets, CSR / CSC indices and pointers, and the
position lists of :mod:`common.protocol.wire`). A field that takes ``v`` distinct values is
``index_bits(v)`` wide; :mod:`common.sparse.sizes` derives every format's size from that width.
:func:`read_uints` reads such fields in numpy, for the wire decoders.

:class:`CodecError` is defined here, at the bottom of the package, so that bit packing, sizes and
the codec all raise the same error.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["CodecError", "index_bits", "pack_bits", "pack_uints", "read_uints", "unpack_bits", "unpack_uints"]

_MAX_UINT_WIDTH = 63  # int64 holds every value of a 63-bit field
# Bounds the (chunk x width) int64 scratch of pack_uints / unpack_uints to 16 MiB.
_CHUNK_BITS = 1 << 21
_GATHER_BITS = 0x8040201008040201 - (1 << 64)  # the same 64 bits as a signed int64


class CodecError(ValueError):
    """Invalid input to the FedMef sparse codec (App. 7.1); the message says how to fix it."""


def index_bits(v: int) -> int:
    """Bits for a field taking ``v`` distinct values: ``max(1, ceil(log2 v))`` (FedMef App. 7.1)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise CodecError(f"index_bits needs a non-negative int count of values, got {v!r}")
    return max(1, (v - 1).bit_length())


@functools.cache
def _unpack_table(device: torch.device) -> torch.Tensor:
    """Byte value -> its eight bits MSB-first as eight 0/1 bytes, read as one int64 per entry."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (torch.arange(256, dtype=torch.uint8)[:, None] >> shifts) & 1
    return bits.contiguous().view(torch.int64).reshape(256).to(device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack bools MSB-first into uint8 like ``numpy.packbits``: the FedMef App. 7.1 bitmap."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise CodecError(f"pack_bits needs a torch.bool tensor, got {got}")
    flat = mask.reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8, device=mask.device)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # Eight 0/1 bytes read as one uint64 (little-endian: x86-64 and the Pi's aarch64) and multiplied
    # by 0x8040201008040201 put byte i's bit at position 63 - i with no carries, so the top byte is
    # the MSB-first packed byte: one multiply per 8 elements instead of eight shift-or passes.
    groups = flat.view(torch.uint8)
    if groups.storage_offset() % 8 or not groups.is_contiguous():
        groups = groups.clone(memory_format=torch.contiguous_format)
    words = groups.view(torch.int64) * _GATHER_BITS
    return ((words >> 56) & 0xFF).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``n`` bits of ``packed`` as a 1-D bool tensor."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise CodecError("unpack_bits needs a 1-D torch.uint8 tensor (the output of pack_bits)")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 8 * packed.numel():
        raise CodecError(f"cannot unpack n={n!r} bits from {packed.numel()} bytes")
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=packed.device)
    used = packed[: -(-n // 8)]
    # One 8-byte table lookup per packed byte: a fifth of the time of shifting out all eight bits.
    words = _unpack_table(packed.device).index_select(0, used.to(torch.int32))
    return words.view(torch.bool)[:n]


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= _MAX_UINT_WIDTH:
        raise CodecError(f"bit width must be an int in [1, {_MAX_UINT_WIDTH}], got {width!r}")


def _check_uints(ints: torch.Tensor, width: int) -> torch.Tensor:
    if not isinstance(ints, torch.Tensor) or ints.dim() != 1:
        raise CodecError("pack_uints needs a 1-D integer torch tensor")
    if ints.dtype.is_floating_point or ints.dtype.is_complex or ints.dtype == torch.bool:
        raise CodecError(f"pack_uints needs an integer tensor, got {ints.dtype}")
    ints = ints.to(torch.int64)
    if ints.numel() and (int(ints.min()) < 0 or int(ints.max()) >= 1 << width):
        raise CodecError(f"values must lie in [0, 2**{width}) to fit a {width}-bit field")
    return ints


def _pack_fields(fields: list[tuple[torch.Tensor, int]], device: torch.device) -> torch.Tensor:
    """Concatenate fixed-width fields into one MSB-first bit stream (FedMef App. 7.1 positions)."""
    chunks: list[torch.Tensor] = []
    carry = torch.zeros(0, dtype=torch.bool, device=device)
    for ints, width in fields:
        shifts = torch.arange(width - 1, -1, -1, dtype=torch.int64, device=device)
        # A multiple of 8 values fills whole bytes, so bits only carry over between fields.
        step = max(8, (_CHUNK_BITS // width) // 8 * 8)
        for start in range(0, ints.numel(), step):
            part = ints[start : start + step]
            bits = ((part[:, None] >> shifts) & 1).to(torch.bool).reshape(-1)
            if carry.numel():
                bits = torch.cat([carry, bits])
            whole = bits.numel() // 8 * 8
            chunks.append(pack_bits(bits[:whole]))
            carry = bits[whole:]
    if carry.numel():
        chunks.append(pack_bits(carry))
    if not chunks:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    return torch.cat(chunks)


def pack_uints(ints: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative ints into ``width``-bit MSB-first fields (FedMef App. 7.1 offsets)."""
    _check_width(width)
    ints = _check_uints(ints, width)
    return _pack_fields([(ints, width)], ints.device)


def unpack_uints(packed: torch.Tensor, count: int, width: int, bit_offset: int = 0) -> torch.Tensor:
    """Read ``count`` ``width``-bit fields starting at ``bit_offset``; inverse of ``pack_uints``."""
    _check_width(width)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise CodecError("unpack_uints needs a 1-D torch.uint8 tensor (the output of pack_uints)")
    for name, val in (("count", count), ("bit_offset", bit_offset)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise CodecError(f"{name} must be a non-negative int, got {val!r}")
    if bit_offset + count * width > 8 * packed.numel():
        raise CodecError(
            f"need {bit_offset + count * width} bits for {count} fields of {width} bits at offset "
            f"{bit_offset}, but the buffer holds only {8 * packed.numel()}"
        )
    device = packed.device
    shifts = torch.arange(width - 1, -1, -1, dtype=torch.int64, device=device)
    step = max(1, _CHUNK_BITS // width)
    out = torch.empty(count, dtype=torch.int64, device=device)
    for start in range(0, count, step):
        k = min(step, count - start)
        first = bit_offset + start * width
        lo, hi = first // 8, -(-(first + k * width) // 8)
        bits = unpack_bits(packed[lo:hi], 8 * (hi - lo))
        skip = first - 8 * lo
        fields = bits[skip : skip + k * width].view(k, width).to(torch.int64)
        # Each field's bits are distinct powers of two, so the sum is an exact bitwise OR.
        out[start : start + k] = (fields << shifts).sum(dim=1)
    return out


def read_uints(data: np.ndarray, count: int, width: int) -> np.ndarray:
    """``unpack_uints`` for bytes already in host memory: ``count`` ``width``-bit fields from the start of
    the 1-D uint8 array ``data``, as int64.

    The wire decoders use it: numpy runs single-threaded, where torch's intra-op threads wait on each
    other at every op while other processes hold the cores (a client training beside the decode).

    Eight fields fill exactly ``width`` bytes, so as rows of ``width`` bytes the ``j``-th field of
    every row sits in the same byte columns ``j*width // 8 .. ((j+1)*width - 1) // 8``: a few
    column-wide shifts per ``j`` read them all, instead of expanding every bit.
    """
    _check_width(width)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
        raise CodecError("read_uints needs a 1-D numpy uint8 array")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise CodecError(f"count must be a non-negative int, got {count!r}")
    nbytes = -(-count * width // 8)
    if nbytes > data.size:
        raise CodecError(
            f"need {count * width} bits for {count} fields of {width} bits, but only {8 * data.size} remain"
        )
    rows = -(-count // 8)
    padded = np.zeros(rows * width, dtype=np.uint64)
    padded[:nbytes] = data[:nbytes]
    columns = padded.reshape(rows, width)
    out = np.empty((rows, 8), dtype=np.uint64)
    for j in range(8):
        first, last = j * width, (j + 1) * width - 1
        window = np.zeros(rows, dtype=np.uint64)
        for col in range(first // 8, last // 8):
            window = (window << np.uint64(8)) | columns[:, col]
        # Only the field's bits of its last byte go in, so the window holds at most 7 + 63 bits, and the
        # at most 6 that uint64 drops lie before the field.
        tail = last % 8 + 1
        window = (window << np.uint64(tail)) | (columns[:, last // 8] >> np.uint64(8 - tail))
        out[:, j] = window & np.uint64((1 << width) - 1)
    return out.reshape(-1)[:count].astype(np.int64)
