"""Golomb-Rice coding (Golomb 1966; Rice 1979) of sorted positions: a sparse mask in fewer bits than the
bitmap or the fixed-width offsets of FedMef App. 7.1.

The positions ``p_0 < p_1 < ...`` of a mask's set bits become gaps ``g_i = p_i - p_{i-1} - 1``
(with ``p_{-1} = -1``), and each gap is split by a parameter ``k`` into a quotient ``g >> k``,
written in unary (that many ones, then a zero), and a ``k``-bit remainder. The two parts go into
two separate streams so that both decode in bulk, with ``numpy.unpackbits`` and
:func:`common.sparse.bits.read_uints`, instead of one variable-length code at a time.

Layout (all counts little-endian): ``count`` (uint32), ``k`` (one byte), the unary stream's length
in bytes (uint32), the unary stream, then the remainders as ``count`` ``k``-bit fields
(:func:`common.sparse.bits.pack_uints`), each stream zero-padded to a whole byte.

:mod:`common.protocol.wire` sends a mask this way when it is smaller than its bitmap or its
fixed-width positions.
"""

from __future__ import annotations

import numpy as np
import torch

from common.sparse.bits import CodecError, pack_bits, pack_uints, read_uints

__all__ = ["rice_decode", "rice_encode"]

_HEADER_BYTES = 9  # count (uint32), k (uint8), unary stream length (uint32)


def rice_encode(positions: torch.Tensor) -> bytes:
    """Rice codes of ``positions``, strictly increasing and non-negative as ``torch.nonzero`` lists them.

    The parameter ``k`` is chosen exactly rather than estimated. With ``count`` gaps, the unary
    stream holds ``sum(g_i >> k)`` ones and ``count`` zeros and the remainders ``count * k`` bits,
    so the whole code costs ``count * (k + 1) + sum(g_i >> k)`` bits before padding; the encoder
    evaluates this for every ``k`` in 0..31 and keeps the cheapest, the smallest on a tie (once
    ``2^k`` exceeds every gap a larger ``k`` only adds bits, so 0..31 serves layers of up to 2^31
    weights). For the geometric gaps of a random mask of density ``d`` the minimum lies near
    ``2^k = ln 2 / d`` (Gallager and van Voorhis, 1975), about ``k + 2`` bits per position; the
    search costs 32 vectorised sums and, unlike that formula, stays optimal for the clustered gaps
    that magnitude pruning leaves.
    """
    gaps = torch.diff(positions, prepend=positions.new_tensor([-1])) - 1
    count = gaps.numel()
    k = min(range(32), key=lambda b: count * (b + 1) + int((gaps >> b).sum())) if count else 0
    quotients = gaps >> k
    ends = torch.cumsum(quotients + 1, 0) - 1
    unary = torch.ones(int(ends[-1]) + 1 if count else 0, dtype=torch.bool)
    unary[ends] = False
    unary_bytes = pack_bits(unary).numpy().tobytes()
    remainders = pack_uints(gaps & ((1 << k) - 1), k).numpy().tobytes() if k else b""
    return np.uint32(count).tobytes() + bytes([k]) + np.uint32(len(unary_bytes)).tobytes() + unary_bytes + remainders


def rice_decode(data: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Inverse of :func:`rice_encode` for positions below ``n``, read from the start of the uint8 CPU tensor ``data``.

    Returns the positions and the number of bytes they took. A header that does not fit ``data``,
    quotients that disagree with the count, or a position of ``n`` or beyond raise
    :class:`~common.sparse.bits.CodecError`.

    Decoded in numpy, a fixed number of whole-array passes (see :func:`common.sparse.bits.read_uints`
    for why not torch). The ``i``-th zero of the unary stream sits at ``e_i = sum_{j<=i} (q_j + 1) - 1``,
    so ``sum_{j<=i} q_j = e_i - i`` and, with ``p_i = sum_{j<=i} (g_j + 1) - 1`` and ``g_j = (q_j << k) + r_j``,
    ``p_i = ((e_i - i) << k) + sum_{j<=i} r_j + i``: one cumulative sum, no per-gap differences.
    """
    raw = data.numpy()
    if _HEADER_BYTES > raw.size:
        raise CodecError("the Rice header is truncated")
    count = int.from_bytes(raw[:4].tobytes(), "little")
    k = int(raw[4])
    unary_nbytes = int.from_bytes(raw[5:9].tobytes(), "little")
    remainder_nbytes = -(-count * k // 8)
    at = _HEADER_BYTES
    if count > n or k > 31 or at + unary_nbytes + remainder_nbytes > raw.size:
        raise CodecError(f"Rice header (count {count}, k {k}) does not fit the buffer")
    # Inverting the bytes first makes the unary stream's zeros the set bits that flatnonzero lists.
    ends = np.flatnonzero(np.unpackbits(~raw[at : at + unary_nbytes]))
    if ends.size < count or (count and int(ends[count - 1]) // 8 + 1 != unary_nbytes):
        raise CodecError(f"Rice quotients do not match the count {count}")
    ends = ends[:count]
    # The smallest position the last quotients allow; checked before shifting so that nothing overflows.
    if count and (int(ends[-1]) - (count - 1)) << k >= n:
        raise CodecError(f"Rice-coded positions reach beyond the {n} entries")
    at += unary_nbytes
    index = np.arange(count, dtype=np.int64)
    positions = ((ends - index) << k) + index
    if k:
        positions += np.cumsum(read_uints(raw[at : at + remainder_nbytes], count, k))
    if count and int(positions[-1]) >= n:
        raise CodecError(f"Rice-coded positions reach beyond the {n} entries")
    return torch.from_numpy(positions), at + remainder_nbytes
