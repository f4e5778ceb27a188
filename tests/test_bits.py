"""Tests for common.sparse.bits: the MSB-first bit packing of FedMef (Huang et al., CVPR 2024) App. 7.1."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from common.sparse.bits import CodecError, index_bits, pack_bits, pack_uints, read_uints, unpack_bits, unpack_uints


def test_index_bits() -> None:
    assert [index_bits(v) for v in (0, 1, 2, 3, 4, 5, 1024, 1025)] == [1, 1, 1, 2, 2, 3, 10, 11]
    assert index_bits(1 << 22) == 22  # a 4M-element tensor needs 22-bit offsets
    with pytest.raises(CodecError):
        index_bits(-1)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 1000, 4097])
def test_pack_bits_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    mask_np = rng.random(n) < 0.5
    packed = pack_bits(torch.from_numpy(mask_np))
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert np.array_equal(packed.numpy(), np.packbits(mask_np))
    expected = np.unpackbits(np.packbits(mask_np), count=n).astype(bool)
    assert np.array_equal(unpack_bits(packed, n).numpy(), expected)


def test_pack_bits_multi_dim_and_non_contiguous() -> None:
    mask = torch.rand(5, 13) < 0.5
    assert torch.equal(unpack_bits(pack_bits(mask.t()), 65), mask.t().reshape(-1))


def test_pack_bits_is_vectorised() -> None:
    mask = torch.rand(1 << 22) < 0.5
    pack_bits(mask)
    start = time.perf_counter()
    packed = pack_bits(mask)
    back = unpack_bits(packed, mask.numel())
    # A per-element Python loop takes seconds here; vectorised torch takes a few ms.
    assert time.perf_counter() - start < 1.0
    assert torch.equal(back, mask)


def _reference_pack_uints(ints: np.ndarray, width: int) -> np.ndarray:
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = (ints.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)
    return np.packbits(bits.astype(bool).reshape(-1))


@pytest.mark.parametrize("width,count", [(1, 13), (5, 1000), (8, 17), (13, 200_003), (22, 3), (63, 40_000)])
def test_pack_uints_round_trip_and_matches_reference(width: int, count: int) -> None:
    rng = np.random.default_rng(width)
    ints = rng.integers(0, (1 << width) - 1, size=count, dtype=np.int64, endpoint=True)
    ints[0] = (1 << width) - 1
    packed = pack_uints(torch.from_numpy(ints), width)
    assert packed.numel() == math.ceil(count * width / 8)
    assert np.array_equal(packed.numpy(), _reference_pack_uints(ints, width))
    assert np.array_equal(unpack_uints(packed, count, width).numpy(), ints)


def test_unpack_uints_at_bit_offset() -> None:
    packed = pack_uints(torch.tensor([5, 6, 7, 1, 2]), 3)
    assert unpack_uints(packed, 3, 3, bit_offset=6).tolist() == [7, 1, 2]


def test_pack_uints_rejects_bad_input() -> None:
    with pytest.raises(CodecError, match="fit"):
        pack_uints(torch.tensor([8]), 3)
    with pytest.raises(CodecError, match="fit"):
        pack_uints(torch.tensor([-1]), 3)
    for width in (0, 64):
        with pytest.raises(CodecError, match="width"):
            pack_uints(torch.tensor([1]), width)
    with pytest.raises(CodecError, match="integer"):
        pack_uints(torch.tensor([1.0]), 3)
    with pytest.raises(CodecError, match="bits"):
        unpack_uints(torch.zeros(2, dtype=torch.uint8), 6, 3)
    with pytest.raises(CodecError, match="bool"):
        pack_bits(torch.tensor([1, 0]))
    with pytest.raises(CodecError, match="unpack"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)


@pytest.mark.parametrize("width", range(1, 64))
def test_read_uints_matches_unpack_uints(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    for count in (0, 1, 7, 8, 9, 1001):
        ints = torch.randint(0, 2 ** min(width, 62), (count,), generator=gen)
        if count:
            ints[0] = ints[-1] = 2**width - 1  # all ones: every bit of the field, none of its neighbours
        packed = pack_uints(ints, width)
        tail = np.array([0xFF, 0xA5], dtype=np.uint8)  # bytes after the fields are not read
        got = read_uints(np.concatenate([packed.numpy(), tail]), count, width)
        assert got.dtype == np.int64
        assert np.array_equal(got, unpack_uints(packed, count, width).numpy())
        assert np.array_equal(got, ints.numpy())


def test_read_uints_rejects_bad_input() -> None:
    data = np.zeros(3, dtype=np.uint8)
    with pytest.raises(CodecError, match="only 24 remain"):
        read_uints(data, 5, 5)
    with pytest.raises(CodecError, match="bit width"):
        read_uints(data, 1, 64)
    with pytest.raises(CodecError, match="non-negative"):
        read_uints(data, -1, 3)
    with pytest.raises(CodecError, match="uint8"):
        read_uints(data.astype(np.int16), 1, 3)
