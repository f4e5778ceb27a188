"""Tests for common.sparse.codec: FedMef (Huang et al., CVPR 2024) App. 7.1 compression."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from common.sparse.bits import pack_bits, pack_uints
from common.sparse.codec import CodecError, EncodedTensor, decode, encode, encode_masked
from common.sparse.sizes import SparseFormat, choose_format, payload_bytes, storage_bits

ALL_FORMATS = list(SparseFormat)


def _sparse(shape: tuple[int, ...], density: float, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Magnitudes in [0.5, 1.5) are never zero, so only the mask decides which entries vanish.
    signs = torch.randint(0, 2, shape, generator=g) * 2 - 1
    vals = (torch.rand(shape, generator=g) + 0.5) * signs
    mask = torch.rand(shape, generator=g) < density
    return (vals * mask).to(dtype)


def _with_exact_nnz(shape: tuple[int, ...], m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.zeros(n)
    x[torch.randperm(n, generator=g)[:m]] = torch.rand(m, generator=g) + 0.5
    return x.reshape(shape)


CASES: dict[str, Callable[[], torch.Tensor]] = {
    "empty_1d": lambda: torch.zeros(0),
    "empty_3x0": lambda: torch.zeros(3, 0),
    "all_zero": lambda: torch.zeros(5, 7),
    "all_dense": lambda: torch.rand(4, 6) + 0.5,
    "one_zero": lambda: torch.zeros(1),
    "one_nonzero": lambda: torch.tensor([-2.5]),
    "scalar": lambda: torch.tensor(3.25),
    "scalar_zero": lambda: torch.tensor(0.0),
    "transposed": lambda: _sparse((10, 6), 0.3, 1).t(),
    "strided_slice": lambda: _sparse((12, 20, 3), 0.4, 2)[::2, 1::3, 1],
    "float16": lambda: _sparse((9, 11), 0.15, 3, torch.float16),
    "bfloat16": lambda: _sparse((9, 11), 0.15, 4, torch.bfloat16),
    "float64": lambda: _sparse((9, 11), 0.15, 5, torch.float64),
}
for _seed, (_density, _shape) in enumerate(
    (d, s) for d in (0.02, 0.15, 0.5, 0.95) for s in ((257,), (33, 17), (4, 3, 5, 7))
):
    _name = f"d{_density}_{'x'.join(map(str, _shape))}"
    CASES[_name] = lambda s=_shape, d=_density, seed=_seed: _sparse(s, d, 100 + seed)

FORMAT_CHOICES: list[tuple[SparseFormat | None, str]] = [(f, "paper") for f in ALL_FORMATS] + [
    (None, "paper"),
    (None, "smallest"),
]


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.is_contiguous()
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt,policy", FORMAT_CHOICES, ids=lambda v: getattr(v, "value", v))
def test_round_trip(case: str, fmt: SparseFormat | None, policy: str) -> None:
    x = CASES[case]()
    enc = encode(x, fmt=fmt, policy=policy)
    if fmt is not None:
        assert enc.fmt is fmt
    assert enc.nnz == int((x != 0).sum())
    assert enc.shape == tuple(x.shape) and enc.dtype == x.dtype
    value_bits = 8 * x.element_size()
    assert enc.payload_nbytes == payload_bytes(storage_bits(enc.fmt, x.shape, enc.nnz, value_bits))
    _assert_same(decode(enc), x)


def test_auto_choice_follows_choose_format() -> None:
    x = _sparse((40, 50), 0.15, 7)
    nnz = int((x != 0).sum())
    assert encode(x).fmt is choose_format(x.shape, nnz, 32, "paper") is SparseFormat.COO
    assert encode(x, policy="smallest").fmt is choose_format(x.shape, nnz, 32, "smallest")
    assert encode_masked(x, x != 0).fmt is SparseFormat.BITMAP  # "smallest" is the default there


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.value)
def test_encode_masked_keeps_explicit_zeros_and_drops_the_rest(fmt: SparseFormat) -> None:
    x = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 4.0]])
    keep = torch.tensor([[True, False, True], [True, True, False]])
    enc = encode_masked(x, keep, fmt=fmt)
    assert enc.nnz == 4
    if fmt is not SparseFormat.DENSE:
        assert enc.values.tolist() == [0.0, 2.0, 3.0, 0.0]  # row-major order, kept zeros included
    _assert_same(decode(enc), torch.tensor([[0.0, 0.0, 2.0], [3.0, 0.0, 0.0]]))


def test_encode_masked_non_contiguous_inputs_and_detaches() -> None:
    base = torch.randn(8, 6, requires_grad=True)
    x = base.t()
    keep = (torch.rand(8, 6) < 0.4).t()
    for fmt in ALL_FORMATS:
        enc = encode_masked(x, keep, fmt=fmt)
        assert not enc.values.requires_grad
        _assert_same(decode(enc), torch.where(keep, x.detach(), torch.zeros(())))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.value)
def test_rebuild_from_saved_tensors(fmt: SparseFormat) -> None:
    x = _sparse((6, 7), 0.3, 8)
    enc = encode(x, fmt=fmt)
    values, positions = enc.tensors()
    assert positions.dtype == torch.uint8 and positions.dim() == 1
    assert (positions.numel() == 0) == (fmt is SparseFormat.DENSE)
    again = EncodedTensor.rebuild(enc.meta, values, positions)
    assert again.meta == enc.meta and again.values is values and again.positions is positions
    _assert_same(decode(again), x)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.value)
def test_large_tensor_round_trip_spans_several_chunks(fmt: SparseFormat) -> None:
    # 2**19 entries at density 0.5: the COO offsets alone take ~5M bits, several packing chunks,
    # and CSR/CSC pointers start mid-byte after the index stream.
    x = _sparse((64, 1 << 13), 0.5, 9)
    enc = encode_masked(x, x != 0, fmt=fmt)
    assert enc.payload_nbytes == payload_bytes(storage_bits(fmt, x.shape, enc.nnz, 32))
    _assert_same(decode(enc), x)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.value)
def test_decode_into_a_dirty_buffer_writes_every_entry_and_returns_a_view_of_it(fmt: SparseFormat) -> None:
    x = _sparse((9, 13), 0.3, 12)
    enc = encode(x, fmt=fmt)
    buffer = torch.full((x.numel(),), float("nan"))
    out = decode(enc, out=buffer)
    _assert_same(out, x)
    assert out.data_ptr() == buffer.data_ptr()
    scale = torch.tensor([0.5, 2.0, -1.0])  # one factor per 39 entries: 3 channels of 3 x 13
    scaled = decode(enc, channel_scale=(scale, 39), out=buffer.fill_(float("nan")))
    _assert_same(scaled, decode(enc, channel_scale=(scale, 39)))


def test_decode_rejects_an_out_buffer_of_the_wrong_size_dtype_or_layout() -> None:
    enc = encode(_sparse((4, 5), 0.3, 13), fmt="bitmap")
    for bad in (
        torch.empty(19),
        torch.empty(21),
        torch.empty(20, dtype=torch.float64),
        torch.empty(4, 5),
        torch.empty(40)[::2],
    ):
        with pytest.raises(CodecError, match="out must be"):
            decode(enc, out=bad)


# --------------------------------------------------------------------------- payloads are exactly the App. 7.1 sizes


@pytest.mark.parametrize("m", [17, 173, 400, 900, 1600])
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.value)
def test_conv_weight_payloads_are_exactly_their_storage_bits(fmt: SparseFormat, m: int) -> None:
    shape = (64, 3, 3, 3)  # the paper's formulas give these storage_bits (test_sizes.py)
    x = _with_exact_nnz(shape, m, m)
    enc = encode(x, fmt=fmt)
    assert enc.payload_nbytes == payload_bytes(storage_bits(fmt, shape, m, 32))


def test_pointer_width_when_nnz_is_power_of_two() -> None:
    # Pointers take values 0..m, so m = 16 needs 5 bits where the paper's ceil(log2 16) gives 4:
    # one extra bit per row (CSR, 64 rows) or per column (CSC, 27 columns).
    paper_csr = 16 * math.ceil(math.log2(27)) + 64 * math.ceil(math.log2(16)) + 16 * 32
    paper_csc = 16 * math.ceil(math.log2(64)) + 27 * math.ceil(math.log2(16)) + 16 * 32
    assert storage_bits("csr", (64, 27), 16, 32) == paper_csr + 64
    assert storage_bits("csc", (64, 27), 16, 32) == paper_csc + 27
    x = _with_exact_nnz((64, 27), 16, 0)
    for fmt in ("csr", "csc"):
        _assert_same(decode(encode(x, fmt=fmt)), x)


@pytest.mark.parametrize(
    "fmt,expected_bits,expected_bytes",
    [
        (SparseFormat.DENSE, 640, 80),  # 20 * 32
        (SparseFormat.BITMAP, 116, 15),  # 20 + 3 * 32
        (SparseFormat.COO, 111, 14),  # 3 * ceil(log2 20)=5 -> 15, + 96
        (SparseFormat.CSR, 113, 15),  # 3 * ceil(log2 5)=3 -> 9, + 4 rows * ceil(log2 3)=2, + 96
        (SparseFormat.CSC, 112, 14),  # 3 * ceil(log2 4)=2 -> 6, + 5 cols * 2 -> 10, + 96
    ],
)
def test_hand_checked_4x5_float32(fmt: SparseFormat, expected_bits: int, expected_bytes: int) -> None:
    x = torch.zeros(4, 5)
    x[0, 1], x[2, 4], x[3, 0] = 1.0, -2.0, 3.0
    assert storage_bits(fmt, (4, 5), 3, 32) == expected_bits
    assert payload_bytes(storage_bits(fmt, (4, 5), 3, 32)) == expected_bytes
    enc = encode(x, fmt=fmt)
    assert enc.payload_nbytes == expected_bytes
    _assert_same(decode(enc), x)


@pytest.mark.parametrize(
    "fmt,expected_bits,expected_bytes",
    [
        (SparseFormat.DENSE, 160, 20),  # 10 * 16
        (SparseFormat.BITMAP, 122, 16),  # 10 + 7 * 16
        (SparseFormat.COO, 140, 18),  # 7 * ceil(log2 10)=4 -> 28, + 112
        (SparseFormat.CSR, 143, 18),  # 7 cols * 4 -> 28, + 1 row * ceil(log2 7)=3 -> 3, + 112
        (SparseFormat.CSC, 149, 19),  # 7 rows * 1 (min width) -> 7, + 10 cols * 3 -> 30, + 112
    ],
)
def test_hand_checked_1d_float16(fmt: SparseFormat, expected_bits: int, expected_bytes: int) -> None:
    x = torch.tensor([1, 0, 2, 3, 0, 4, 5, 0, 6, 7], dtype=torch.float16)
    assert storage_bits(fmt, (10,), 7, 16) == expected_bits
    enc = encode(x, fmt=fmt)
    assert enc.payload_nbytes == payload_bytes(storage_bits(fmt, (10,), 7, 16)) == expected_bytes
    _assert_same(decode(enc), x)


def test_coo_position_bits_are_packed_contiguously() -> None:
    # Offsets 1, 3, 9 of n = 10 in 4-bit fields: 0001 0011 1001 + 4 zero pad bits.
    enc = encode(torch.tensor([0, 1, 0, 2, 0, 0, 0, 0, 0, 3.0]), fmt="coo")
    assert enc.positions.tolist() == [0b00010011, 0b10010000]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64])
def test_encode_rejects_unsupported_dtypes(dtype: torch.dtype) -> None:
    x = torch.zeros(4, dtype=dtype)
    with pytest.raises(CodecError, match=str(dtype)):
        encode(x)
    with pytest.raises(CodecError, match=str(dtype)):
        encode_masked(x, torch.ones(4, dtype=torch.bool))


def test_encode_rejects_non_tensors_and_bad_masks() -> None:
    with pytest.raises(CodecError):
        encode([1.0, 0.0])  # type: ignore[arg-type]
    x = torch.randn(3, 4)
    with pytest.raises(CodecError, match="shape"):
        encode_masked(x, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(CodecError, match="shape"):
        encode_masked(x, torch.ones(12, dtype=torch.bool))
    with pytest.raises(CodecError, match="bool"):
        encode_masked(x, torch.ones(3, 4))
    with pytest.raises(CodecError, match="format"):
        encode(x, fmt="rle")
    with pytest.raises(CodecError, match="policy"):
        encode(x, policy="best")


def test_decode_rejects_huge_shape_without_crashing() -> None:
    enc = encode(torch.tensor([0.0, 1.0]), fmt="coo")
    offsets = pack_uints(torch.tensor([1]), 62)  # valid for n = 2**62, which cannot be allocated
    hostile = EncodedTensor(SparseFormat.COO, (1, 1 << 62), torch.float32, 1, enc.values, offsets)
    with pytest.raises(CodecError, match="allocate"):
        decode(hostile)


def _fake(fmt: SparseFormat, shape: tuple[int, ...], nnz: int, positions: torch.Tensor) -> EncodedTensor:
    return EncodedTensor(fmt, shape, torch.float32, nnz, torch.ones(nnz), positions)


def test_crafted_coo_errors() -> None:
    # n = 10 -> 4-bit offsets.
    good = decode(_fake(SparseFormat.COO, (10,), 2, pack_uints(torch.tensor([3, 9]), 4)))
    assert good.nonzero().view(-1).tolist() == [3, 9]
    with pytest.raises(CodecError, match="out of range"):
        decode(_fake(SparseFormat.COO, (10,), 2, pack_uints(torch.tensor([3, 12]), 4)))
    with pytest.raises(CodecError, match="increasing"):
        decode(_fake(SparseFormat.COO, (10,), 2, pack_uints(torch.tensor([5, 3]), 4)))
    with pytest.raises(CodecError, match="increasing"):
        decode(_fake(SparseFormat.COO, (10,), 2, pack_uints(torch.tensor([4, 4]), 4)))


def _csr_positions(idx: list[int], ptrs: list[int], idx_width: int, ptr_width: int) -> torch.Tensor:
    """The position stream written out by hand, bit by bit, independently of pack_uints."""
    bits = "".join(format(i, f"0{idx_width}b") for i in idx)
    bits += "".join(format(p, f"0{ptr_width}b") for p in ptrs)
    bits += "0" * (-len(bits) % 8)
    as_bytes = [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]
    return torch.tensor(as_bytes, dtype=torch.uint8)


def test_crafted_csr_and_csc_errors() -> None:
    # Shape (3, 5): column indices take 3 bits, pointers (0..2) take 2 bits.
    good = _fake(SparseFormat.CSR, (3, 5), 2, _csr_positions([1, 4], [1, 2, 2], 3, 2))
    expected = torch.zeros(3, 5)
    expected[0, 1] = expected[1, 4] = 1.0
    _assert_same(decode(good), expected)
    with pytest.raises(CodecError, match="out of range"):
        decode(_fake(SparseFormat.CSR, (3, 5), 2, _csr_positions([1, 6], [1, 2, 2], 3, 2)))
    with pytest.raises(CodecError, match="non-decreasing"):
        decode(_fake(SparseFormat.CSR, (3, 5), 2, _csr_positions([1, 4], [2, 1, 2], 3, 2)))
    with pytest.raises(CodecError, match="last row pointer"):
        decode(_fake(SparseFormat.CSR, (3, 5), 2, _csr_positions([1, 4], [1, 1, 1], 3, 2)))
    with pytest.raises(CodecError, match="last row pointer"):
        decode(_fake(SparseFormat.CSR, (3, 5), 2, _csr_positions([1, 4], [1, 2, 3], 3, 2)))
    with pytest.raises(CodecError, match="increasing"):
        decode(_fake(SparseFormat.CSR, (3, 5), 2, _csr_positions([4, 1], [2, 2, 2], 3, 2)))
    # CSC of shape (3, 5): row indices take 2 bits, 5 column pointers take 2 bits.
    good_csc = _fake(SparseFormat.CSC, (3, 5), 2, _csr_positions([0, 1], [0, 1, 1, 1, 2], 2, 2))
    _assert_same(decode(good_csc), expected)
    with pytest.raises(CodecError, match="out of range"):
        decode(_fake(SparseFormat.CSC, (3, 5), 2, _csr_positions([3, 1], [0, 1, 1, 1, 2], 2, 2)))
    with pytest.raises(CodecError, match="last column pointer"):
        decode(_fake(SparseFormat.CSC, (3, 5), 2, _csr_positions([0, 1], [0, 1, 1, 1, 1], 2, 2)))


def test_csc_values_are_row_major() -> None:
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 0.0]])
    enc = encode(x, fmt="csc")
    assert enc.values.tolist() == [1.0, 2.0, 3.0, 4.0]
    _assert_same(decode(enc), x)


def test_crafted_bitmap_errors() -> None:
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 4, 7]] = True
    with pytest.raises(CodecError, match="bitmap marks 3"):
        decode(_fake(SparseFormat.BITMAP, (10,), 2, pack_bits(mask)))
    padded = pack_bits(mask)
    padded[-1] |= 1  # a padding bit after the 10 used bits
    with pytest.raises(CodecError, match="padding"):
        decode(_fake(SparseFormat.BITMAP, (10,), 3, padded))


def test_length_and_type_mismatches() -> None:
    enc = encode(_sparse((6, 9), 0.2, 11), fmt="csr")
    with pytest.raises(CodecError, match="values"):
        decode(EncodedTensor.rebuild(enc.meta, enc.values[:-1], enc.positions))
    with pytest.raises(CodecError, match="position bytes"):
        decode(EncodedTensor.rebuild(enc.meta, enc.values, enc.positions[:-1]))
    with pytest.raises(CodecError, match="position bytes"):
        longer = torch.cat([enc.positions, enc.positions[:1]])
        decode(EncodedTensor.rebuild(enc.meta, enc.values, longer))
    with pytest.raises(CodecError, match="dtype"):
        decode(EncodedTensor.rebuild(enc.meta, enc.values.double(), enc.positions))
    with pytest.raises(CodecError, match="uint8"):
        decode(EncodedTensor.rebuild(enc.meta, enc.values, enc.positions.to(torch.int16)))
    with pytest.raises(CodecError, match="nnz"):
        decode(EncodedTensor(enc.fmt, enc.shape, enc.dtype, 10**6, enc.values, enc.positions))
    dense = encode(torch.ones(3), fmt="dense")
    with pytest.raises(CodecError, match="values"):
        decode(EncodedTensor.rebuild(dense.meta, dense.values[:2], dense.positions))
