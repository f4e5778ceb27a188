"""The storage formats of FedMef (Huang et al., CVPR 2024), Appendix 7.1, and their exact sizes.

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

A payload is ``ceil(s / 8)`` bytes. These sizes are not estimates: :mod:`common.sparse.codec`
encodes every format to exactly this many bytes, which its tests check, and
:mod:`common.measure.accounting` charges them in its appendix 7.2 memory estimates.
"""

from __future__ import annotations

import math
import operator
from enum import Enum

import torch

from common.sparse.bits import CodecError, index_bits

__all__ = ["SparseFormat", "choose_format", "payload_bytes", "storage_bits"]

_MAX_DIM = (1 << 63) - 1  # torch sizes are int64
_POLICIES = ("paper", "smallest", "single-pass")


class SparseFormat(str, Enum):  # noqa: UP042 -- StrEnum would change str() of the members
    """Storage formats of FedMef App. 7.1, in tie-breaking order for ``policy="smallest"``."""

    DENSE = "dense"
    BITMAP = "bitmap"
    COO = "coo"
    CSR = "csr"
    CSC = "csc"


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


def storage_bits(fmt: SparseFormat | str, shape: tuple[int, ...] | torch.Size, nnz: int, value_bits: int) -> int:
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
