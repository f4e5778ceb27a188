"""Tests for common.sparse.rice: Golomb-Rice coded positions, exact round trips and rejection of corrupt codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.sparse.bits import CodecError
from common.sparse.rice import rice_decode, rice_encode

N = 10_007


def _positions(density: float, seed: int) -> torch.Tensor:
    mask = torch.rand(N, generator=torch.Generator().manual_seed(seed)) < density
    return torch.nonzero(mask).reshape(-1)


def _as_tensor(code: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(code), dtype=torch.uint8)


def _header(code: bytes) -> tuple[int, int, int]:
    """(count, k, unary stream bytes) of a code."""
    return int(np.frombuffer(code[:4], np.uint32)[0]), code[4], int(np.frombuffer(code[5:9], np.uint32)[0])


CASES = {
    "empty": torch.zeros(0, dtype=torch.int64),
    "first only": torch.tensor([0]),
    "last only": torch.tensor([N - 1]),
    "all": torch.arange(N),
    "two far apart": torch.tensor([3, N - 2]),
    **{f"density {d}": _positions(d, i) for i, d in enumerate((0.001, 0.08, 0.5, 0.99))},
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_takes_exactly_the_code_bytes(case: str) -> None:
    positions = CASES[case]
    code = rice_encode(positions)
    decoded, used = rice_decode(_as_tensor(code + b"\xff\x00\x17"), N)  # trailing bytes are not read
    assert used == len(code)
    assert torch.equal(decoded, positions)


@pytest.mark.parametrize("case", list(CASES))
def test_k_minimises_the_bits_of_both_streams(case: str) -> None:
    positions = CASES[case]
    count, k, unary_nbytes = _header(rice_encode(positions))
    gaps = torch.diff(positions, prepend=positions.new_tensor([-1])) - 1
    cost = [count * (b + 1) + int((gaps >> b).sum()) for b in range(32)]
    assert count == positions.numel()
    assert cost[k] == min(cost) and k == cost.index(min(cost))
    assert unary_nbytes == -(-(count + int((gaps >> k).sum())) // 8)


def test_a_random_mask_costs_about_k_plus_2_bits_per_position() -> None:
    positions = _positions(0.08, 7)
    code = rice_encode(positions)
    _, k, _ = _header(code)
    assert 2**k <= np.log(2) / 0.08 < 2 ** (k + 1)  # near the optimum for geometric gaps
    assert 8 * len(code) / positions.numel() < k + 2.5
    assert 8 * len(code) < 0.5 * N  # under half a bit per entry, where a bitmap takes one


def test_corrupt_codes_are_rejected() -> None:
    code = rice_encode(CASES["density 0.08"])
    _, _, unary_nbytes = _header(code)
    with pytest.raises(CodecError, match="truncated"):
        rice_decode(_as_tensor(code[:8]), N)
    with pytest.raises(CodecError, match="does not fit"):
        rice_decode(_as_tensor(code[:-1]), N)
    with pytest.raises(CodecError, match="does not fit"):
        rice_decode(_as_tensor(np.uint32(N + 1).tobytes() + code[4:]), N)
    with pytest.raises(CodecError, match="does not fit"):
        rice_decode(_as_tensor(code[:4] + bytes([32]) + code[5:]), N)
    with pytest.raises(CodecError, match="quotients do not match the count"):
        rice_decode(_as_tensor(code[:5] + np.uint32(unary_nbytes - 1).tobytes() + code[9:]), N)
    with pytest.raises(CodecError, match="quotients do not match the count"):
        rice_decode(_as_tensor(code[:5] + np.uint32(unary_nbytes + 1).tobytes() + code[9:] + b"\x00"), N)
    with pytest.raises(CodecError, match="beyond"):
        rice_decode(_as_tensor(code), int(CASES["density 0.08"][-1]))
