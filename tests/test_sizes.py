"""Tests for common.sparse.sizes: the storage sizes and format choice of FedMef (Huang et al., CVPR 2024)
App. 7.1. That the codec's payloads are exactly these sizes is tested in test_codec.py."""

from __future__ import annotations

import math

import pytest

from common.sparse.bits import CodecError
from common.sparse.sizes import SparseFormat, choose_format, payload_bytes, storage_bits


def _paper_bits(fmt: SparseFormat, n_r: int, n_c: int, m: int, b: int) -> int:
    """FedMef App. 7.1 formulas verbatim (valid for m >= 2 not a power of two)."""
    n = n_r * n_c
    lg = lambda v: math.ceil(math.log2(v))  # noqa: E731
    return {
        SparseFormat.DENSE: n * b,
        SparseFormat.BITMAP: n + m * b,
        SparseFormat.COO: m * lg(n) + m * b,
        SparseFormat.CSR: m * lg(n_c) + n_r * lg(m) + m * b,
        SparseFormat.CSC: m * lg(n_r) + n_c * lg(m) + m * b,
    }[fmt]


@pytest.mark.parametrize("m", [17, 173, 400, 900, 1600])
@pytest.mark.parametrize("fmt", list(SparseFormat), ids=lambda f: f.value)
def test_conv_weight_sizes_match_paper(fmt: SparseFormat, m: int) -> None:
    shape = (64, 3, 3, 3)  # n_r = 64, n_c = 27, n = 1728
    expected_bits = _paper_bits(fmt, 64, 27, m, 32)
    assert storage_bits(fmt, shape, m, 32) == expected_bits
    assert payload_bytes(expected_bits) == math.ceil(expected_bits / 8)


def test_payload_bytes_rounds_up_to_whole_bytes() -> None:
    assert [payload_bytes(b) for b in (0, 1, 8, 9, 113)] == [0, 1, 1, 2, 15]
    with pytest.raises(CodecError):
        payload_bytes(-8)


@pytest.mark.parametrize("n", [10, 30, 70, 1000, 123450])
def test_paper_thresholds_exact_boundaries(n: int) -> None:
    shape = (n,)
    assert choose_format(shape, n, policy="paper") is SparseFormat.DENSE
    assert choose_format(shape, 9 * n // 10, policy="paper") is SparseFormat.DENSE
    assert choose_format(shape, 9 * n // 10 - 1, policy="paper") is SparseFormat.BITMAP
    assert choose_format(shape, 3 * n // 10, policy="paper") is SparseFormat.BITMAP
    assert choose_format(shape, 3 * n // 10 - 1, policy="paper") is SparseFormat.COO
    assert choose_format(shape, n // 10, policy="paper") is SparseFormat.COO
    assert choose_format(shape, n // 10 - 1, policy="paper") in (SparseFormat.CSR, SparseFormat.CSC)


def test_empty_tensor_is_dense() -> None:
    for shape in ((0,), (3, 0), (0, 4)):
        assert choose_format(shape, 0, policy="paper") is SparseFormat.DENSE
        assert choose_format(shape, 0, policy="smallest") is SparseFormat.DENSE


def test_smallest_prefers_bitmap_at_density_point_one_on_4m_elements() -> None:
    n = 1 << 22
    nnz = n // 10 + 1
    assert choose_format((n,), nnz, policy="paper") is SparseFormat.COO
    assert choose_format((n,), nnz, policy="smallest") is SparseFormat.BITMAP
    extra = storage_bits("coo", (n,), nnz, 32) - storage_bits("bitmap", (n,), nnz, 32)
    assert extra == nnz * 22 - n


@pytest.mark.parametrize("policy", ["paper", "smallest"])
def test_csr_vs_csc_picks_the_smaller(policy: str) -> None:
    # Tall matrix: 1000 row pointers cost more than 4 column pointers, so CSC wins; wide: CSR.
    assert choose_format((1000, 4), 10, policy=policy) is SparseFormat.CSC
    assert storage_bits("csc", (1000, 4), 10, 32) < storage_bits("csr", (1000, 4), 10, 32)
    assert choose_format((4, 1000), 10, policy=policy) is SparseFormat.CSR
    assert storage_bits("csr", (4, 1000), 10, 32) < storage_bits("csc", (4, 1000), 10, 32)


def test_smallest_is_the_minimum() -> None:
    for shape, nnz in (((64, 3, 3, 3), 5), ((64, 3, 3, 3), 300), ((100,), 50), ((7, 7), 49)):
        best = choose_format(shape, nnz, policy="smallest")
        cheapest = min(storage_bits(f, shape, nnz, 32) for f in SparseFormat)
        assert storage_bits(best, shape, nnz, 32) == cheapest


def test_choose_format_rejects_bad_arguments() -> None:
    with pytest.raises(CodecError, match="policy"):
        choose_format((10,), 1, policy="fastest")
    with pytest.raises(CodecError, match="nnz"):
        choose_format((10,), 11)
    with pytest.raises(CodecError, match="shape"):
        choose_format((10, -1), 0)
    with pytest.raises(CodecError, match="format"):
        storage_bits("zip", (10,), 1, 32)
    with pytest.raises(CodecError, match="value_bits"):
        storage_bits("coo", (10,), 1, 0)
