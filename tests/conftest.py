"""Shared fixtures for the common.* test modules (used through ``pytestmark``, not autouse)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def seeded():
    """Start a test from a fixed global RNG state, so its statistical checks are deterministic."""
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's many tiny ops on one intra-op thread, then restore the setting.

    On a 2-core machine shared with other work, OpenMP hand-offs made an 8x8 convolution ~100x
    slower than single-threaded; the tensors here are far too small to gain from threads.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)
def device(request) -> torch.device:
    """Each device a test runs on: the CPU always, a CUDA device where torch sees one (skipped elsewhere)."""
    return torch.device(request.param)
