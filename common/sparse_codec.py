"""Sparse tensor codec: the compression schemes of FedMef (Huang et al., CVPR 2024), Appendix 7.1.

One codec serves two purposes: compact activation caches inside autograd functions (a hot
path: every step is a vectorised torch op that also runs on an accelerator, and the bitmap
encode / decode of contiguous float32 CPU tensors use the fused C loops of
:mod:`common.bitkernels`) and the wire format between the Flower server and its clients
(``to_bytes`` / ``from_bytes``).

Geometry. A tensor with ``n`` elements is viewed as a 2-D matrix of ``n_r x n_c`` before
compression, as in the paper: ``n_r = shape[0]`` and ``n_c = prod(shape[1:])`` (equal to the
paper's ``n / shape[0]`` and still defined when ``shape[0] == 0``); a 0-d or 1-d tensor is
``1 x n``. ``m`` is the number of kept entries and ``b`` the bits per value.

Bit-width convention. A field that takes ``v`` distinct values is stored in
``index_bits(v) = max(1, ceil(log2 v))`` bits, computed exactly as ``(v - 1).bit_length()``.
COO offsets (``n`` values) and CSR column / CSC row indices (``n_c`` / ``n_r`` values) then
cost exactly what the paper states. CSR row pointers (CSC column pointers) hold cumulative
counts in ``0..m``, i.e. ``m + 1`` values, so they take ``index_bits(m + 1)`` bits: this equals
the paper's ``ceil(log2 m)`` unless ``m`` is a power of two, where it is one bit more (the
paper's width cannot represent the final pointer ``m`` in that case). Pointers are stored as
``n_r`` entries, the END offset of each row, so the last one equals ``m``.

Storage in bits (``s``), per format:

* dense:  ``n * b``
* bitmap: ``n + m * b``
* coo:    ``m * index_bits(n) + m * b``
* csr:    ``m * index_bits(n_c) + n_r * index_bits(m + 1) + m * b``
* csc:    ``m * index_bits(n_r) + n_c * index_bits(m + 1) + m * b``

Payload layout. All position fields form ONE contiguous MSB-first bit stream (CSR: column
indices, then row pointers; CSC: row indices, then column pointers), zero-padded to a whole
byte, followed by the values. Values are always the kept entries in row-major order of the
flattened tensor (all ``n`` entries for dense), whatever the format, so the payload is exactly
``ceil(s / 8)`` bytes. Padding bits must be zero and indices must be strictly increasing, which
makes every encoding canonical and lets ``decode`` reject corrupted input.

``encode`` keeps the entries with ``x != 0``; a negative zero therefore decodes as ``+0.0``
(equal under ``==``). Wire values are in little-endian byte order (the host order of every
platform torch ships wheels for).
"""

from __future__ import annotations

import functools
import math
import operator
import struct
from dataclasses import dataclass
from enum import Enum

import torch

from common import bitkernels

__all__ = [
    "CodecError",
    "EncodedTensor",
    "SparseFormat",
    "choose_format",
    "decode",
    "encode",
    "encode_above",
    "encode_masked",
    "from_bytes",
    "header_nbytes",
    "index_bits",
    "pack_bits",
    "pack_uints",
    "payload_bytes",
    "storage_bits",
    "to_bytes",
    "unpack_bits",
    "unpack_uints",
]


class CodecError(ValueError):
    """Invalid input to the FedMef sparse codec (App. 7.1); the message says how to fix it."""


class SparseFormat(str, Enum):
    """Storage formats of FedMef App. 7.1, in tie-breaking order for ``policy="smallest"``."""

    DENSE = "dense"
    BITMAP = "bitmap"
    COO = "coo"
    CSR = "csr"
    CSC = "csc"


_MAGIC = b"SPC1"
# Codes start at 1 so that a zero-filled buffer is rejected instead of read as a valid header.
_FORMAT_CODES: dict[SparseFormat, int] = {fmt: i + 1 for i, fmt in enumerate(SparseFormat)}
_FORMAT_BY_CODE: dict[int, SparseFormat] = {c: f for f, c in _FORMAT_CODES.items()}
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float32: 3,
    torch.float64: 4,
}
_DTYPE_BY_CODE: dict[int, torch.dtype] = {c: d for d, c in _DTYPE_CODES.items()}
_FIXED_HEADER = struct.Struct("<4sBBB")
_MAX_DIM = (1 << 63) - 1  # torch sizes are int64
_MAX_UINT_WIDTH = 63  # int64 holds every value of a 63-bit field
# Bounds the (chunk x width) int64 scratch of pack_uints / unpack_uints to 16 MiB.
_CHUNK_BITS = 1 << 21
_POLICIES = ("paper", "smallest", "single-pass")


def index_bits(v: int) -> int:
    """Bits for a field taking ``v`` distinct values: ``max(1, ceil(log2 v))`` (FedMef App. 7.1)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise CodecError(f"index_bits needs a non-negative int count of values, got {v!r}")
    return max(1, (v - 1).bit_length())


# --------------------------------------------------------------------------- geometry & sizes


def _as_format(fmt: SparseFormat | str) -> SparseFormat:
    try:
        return SparseFormat(fmt)
    except (ValueError, TypeError):
        names = ", ".join(f.value for f in SparseFormat)
        raise CodecError(f"unknown sparse format {fmt!r}; use one of: {names}") from None


def _check_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise CodecError(f"shape must be a sequence of ints, got {shape!r}") from None
    checked = []
    for d in dims:
        try:
            size = operator.index(d)
        except TypeError:
            size = -1
        if isinstance(d, bool) or not 0 <= size <= _MAX_DIM:
            raise CodecError(f"shape {dims!r} must contain ints in [0, 2**63 - 1], got {d!r}")
        checked.append(size)
    return tuple(checked)


def _geometry(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(n_r, n_c, n) of the 2-D view that FedMef App. 7.1 compresses."""
    n = math.prod(shape)
    if len(shape) <= 1:
        return 1, n, n
    return shape[0], math.prod(shape[1:]), n


def _check_nnz(nnz: int, n: int) -> None:
    if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= n:
        raise CodecError(f"nnz must be an int in [0, n={n}], got {nnz!r}")


def _position_bits(fmt: SparseFormat, n_r: int, n_c: int, n: int, m: int) -> int:
    if fmt is SparseFormat.DENSE:
        return 0
    if fmt is SparseFormat.BITMAP:
        return n
    if fmt is SparseFormat.COO:
        return m * index_bits(n)
    if fmt is SparseFormat.CSR:
        return m * index_bits(n_c) + n_r * index_bits(m + 1)
    return m * index_bits(n_r) + n_c * index_bits(m + 1)


def _value_count(fmt: SparseFormat, n: int, m: int) -> int:
    return n if fmt is SparseFormat.DENSE else m


def storage_bits(
    fmt: SparseFormat | str, shape: tuple[int, ...] | torch.Size, nnz: int, value_bits: int
) -> int:
    """Total bits ``s`` to store a tensor in ``fmt`` (FedMef App. 7.1, module-doc convention)."""
    fmt = _as_format(fmt)
    n_r, n_c, n = _geometry(_check_shape(shape))
    _check_nnz(nnz, n)
    if isinstance(value_bits, bool) or not isinstance(value_bits, int) or value_bits <= 0:
        raise CodecError(f"value_bits must be a positive int, got {value_bits!r}")
    return _position_bits(fmt, n_r, n_c, n, nnz) + _value_count(fmt, n, nnz) * value_bits


def payload_bytes(bits: int) -> int:
    """``ceil(bits / 8)``: the payload bytes for ``storage_bits(...)`` bits (FedMef App. 7.1)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 0:
        raise CodecError(f"payload_bytes needs a non-negative int bit count, got {bits!r}")
    return -(-bits // 8)


def header_nbytes(ndim: int) -> int:
    """Bytes of the ``to_bytes`` header for an ``ndim``-dimensional tensor (not in FedMef's s)."""
    if isinstance(ndim, bool) or not isinstance(ndim, int) or not 0 <= ndim <= 255:
        raise CodecError(f"ndim must be an int in [0, 255], got {ndim!r}")
    return _FIXED_HEADER.size + 8 * ndim + 8


def choose_format(
    shape: tuple[int, ...] | torch.Size, nnz: int, value_bits: int = 32, policy: str = "paper"
) -> SparseFormat:
    """Pick a storage format for a tensor with ``nnz`` kept entries (FedMef App. 7.1).

    ``policy="paper"`` applies the paper's density thresholds (dense >= 0.9 > bitmap >= 0.3 >
    coo >= 0.1 > csr/csc, whichever of the two is smaller; an empty tensor is dense), compared
    in exact integer arithmetic so boundaries such as 0.3 are not blurred by rounding.
    ``policy="smallest"`` picks the format with the fewest ``storage_bits`` (ties go to the
    earlier of dense, bitmap, coo, csr, csc). It exists because the thresholds are not always
    the cheapest: at density 0.1 on a 4M-element activation COO spends 0.1 * 22 = 2.2 position
    bits per element while a bitmap spends 1, and activation memory is what FedMef minimises.
    ``policy="single-pass"`` picks the smaller of dense and bitmap, the two formats that encode
    and decode in one linear pass: the choice for activation caches, which are rebuilt every step.
    """
    if policy not in _POLICIES:
        raise CodecError(f"unknown policy {policy!r}; use one of {', '.join(_POLICIES)}")
    shape = _check_shape(shape)
    n = math.prod(shape)
    bits = {f: storage_bits(f, shape, nnz, value_bits) for f in SparseFormat}
    if policy != "paper":
        candidates = SparseFormat if policy == "smallest" else (SparseFormat.DENSE, SparseFormat.BITMAP)
        return min(candidates, key=lambda f: bits[f])
    if n == 0 or 10 * nnz >= 9 * n:
        return SparseFormat.DENSE
    if 10 * nnz >= 3 * n:
        return SparseFormat.BITMAP
    if 10 * nnz >= n:
        return SparseFormat.COO
    return SparseFormat.CSC if bits[SparseFormat.CSC] < bits[SparseFormat.CSR] else SparseFormat.CSR


# --------------------------------------------------------------------------- bit helpers


@functools.lru_cache(maxsize=None)
def _unpack_table(device: torch.device) -> torch.Tensor:
    """Byte value -> its eight bits MSB-first as eight 0/1 bytes, read as one int64 per entry."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (torch.arange(256, dtype=torch.uint8)[:, None] >> shifts) & 1
    return bits.contiguous().view(torch.int64).reshape(256).to(device)


_GATHER_BITS = 0x8040201008040201 - (1 << 64)  # the same 64 bits as a signed int64


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


# --------------------------------------------------------------------------- encoded tensors


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
    if dtype not in _DTYPE_CODES:
        names = ", ".join(str(d) for d in _DTYPE_CODES)
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


def encode_above(x: torch.Tensor, threshold: float) -> EncodedTensor:
    """Keep the entries with ``|x| > threshold``, as a bitmap or dense, whichever is smaller.

    ``encode_masked(x, x.abs() > threshold, policy="single-pass")`` in effect, which SAP caches
    every activation with; contiguous float32 CPU tensors take the fused native kernels of
    :mod:`common.bitkernels` (same bytes, a fraction of the passes).
    """
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"encode needs a torch.Tensor, got {type(x).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise CodecError(f"threshold must be a number, got {threshold!r}")
    x = x.detach()
    if bitkernels.usable(x):
        bitmap, counts, nnz = bitkernels.select_above(x, threshold)
        if choose_format(tuple(x.shape), nnz, 32, "single-pass") is SparseFormat.BITMAP:
            return EncodedTensor(SparseFormat.BITMAP, tuple(x.shape), x.dtype, nnz,
                                 bitkernels.gather(x, bitmap, counts, nnz), bitmap)
    return encode_masked(x, x.abs() > threshold, policy="single-pass")


def encode(
    x: torch.Tensor, fmt: SparseFormat | str | None = None, policy: str = "paper"
) -> EncodedTensor:
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
        raise CodecError(
            f"{fmt.value} with nnz={enc.nnz} needs {want_values} values, got {values.numel()}"
        )
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


def decode(enc: EncodedTensor) -> torch.Tensor:
    """Exact inverse of ``encode`` / ``encode_masked`` (FedMef App. 7.1), validating first."""
    fmt, shape, n_r, n_c, n, pos_bits = _check_structure(enc)
    m, values, positions = enc.nnz, enc.values, enc.positions
    device = values.device
    _check_zero_padding(positions, pos_bits)
    if fmt is SparseFormat.DENSE:
        return values.clone(memory_format=torch.contiguous_format).reshape(shape)

    try:
        if fmt is SparseFormat.BITMAP and bitkernels.usable(values):
            try:
                return bitkernels.scatter(values, positions, n).reshape(shape)
            except ValueError as err:
                raise CodecError(str(err)) from None
        out = torch.zeros(n, dtype=enc.dtype, device=device)
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
        raise CodecError(
            f"{inner_name} index {int(idx.max())} is out of range for {inner} {inner_name}s"
        )
    major = torch.repeat_interleave(torch.arange(outer, device=device), counts)
    # In storage order the key major*inner+idx must rise, which rules out duplicate entries.
    _check_strictly_increasing(
        major * inner + idx, f"{inner_name} indices within each {outer_name}"
    )
    if fmt is SparseFormat.CSR:
        offsets = major * n_c + idx
    else:
        # Values are in row-major order while CSC lists entries column by column.
        offsets = torch.sort(idx * n_c + major).values
    out[offsets] = values
    return out.reshape(shape)


# --------------------------------------------------------------------------- wire format


def _tensor_from_bytes(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not data:
        return torch.zeros(0, dtype=dtype)
    # bytearray gives torch a private, writable buffer instead of aliasing the caller's bytes.
    return torch.frombuffer(bytearray(data), dtype=dtype)


def to_bytes(enc: EncodedTensor) -> bytes:
    """Serialise for the Flower wire: a header (magic, codes, shape, nnz) + the App. 7.1 payload."""
    fmt, shape, *_ = _check_structure(enc)
    if len(shape) > 255:
        raise CodecError(f"the wire header supports at most 255 dimensions, got {len(shape)}")
    header = _FIXED_HEADER.pack(_MAGIC, _FORMAT_CODES[fmt], _DTYPE_CODES[enc.dtype], len(shape))
    header += struct.pack(f"<{len(shape)}QQ", *shape, enc.nnz)
    positions = enc.positions.detach().cpu().numpy().tobytes()
    values = enc.values.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return header + positions + values


def from_bytes(buf: bytes | bytearray | memoryview) -> EncodedTensor:
    """Parse ``to_bytes`` output, checking header fields and the exact payload length."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise CodecError(f"from_bytes needs bytes, got {type(buf).__name__}")
    data = bytes(buf)
    if len(data) < _FIXED_HEADER.size:
        raise CodecError(f"truncated header: {len(data)} bytes, need at least {_FIXED_HEADER.size}")
    magic, fcode, dcode, ndim = _FIXED_HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CodecError(f"bad magic {magic!r}, expected {_MAGIC!r}: not a sparse-codec buffer")
    if fcode not in _FORMAT_BY_CODE:
        raise CodecError(f"unknown format code {fcode}; the sender may use a newer codec version")
    if dcode not in _DTYPE_BY_CODE:
        raise CodecError(f"unknown dtype code {dcode}; the sender may use a newer codec version")
    fmt, dtype = _FORMAT_BY_CODE[fcode], _DTYPE_BY_CODE[dcode]
    hdr = header_nbytes(ndim)
    if len(data) < hdr:
        raise CodecError(f"truncated header: {len(data)} bytes, a {ndim}-d header needs {hdr}")
    *dims, nnz = struct.unpack_from(f"<{ndim}QQ", data, _FIXED_HEADER.size)
    shape = _check_shape(tuple(dims))
    n_r, n_c, n = _geometry(shape)
    _check_nnz(nnz, n)
    pos_len = -(-_position_bits(fmt, n_r, n_c, n, nnz) // 8)
    val_len = _value_count(fmt, n, nnz) * dtype.itemsize
    got = len(data) - hdr
    if got != pos_len + val_len:
        kind = "truncated" if got < pos_len + val_len else "over-long"
        raise CodecError(
            f"{kind} payload: {got} bytes after the header, expected {pos_len + val_len}"
        )
    positions = _tensor_from_bytes(data[hdr : hdr + pos_len], torch.uint8)
    values = _tensor_from_bytes(data[hdr + pos_len :], dtype)
    return EncodedTensor(fmt, shape, dtype, nnz, values, positions)
