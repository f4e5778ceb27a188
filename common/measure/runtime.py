"""Process settings a training process should start with, and what the running one has.

PyTorch's CPU allocator takes memory for every tensor from glibc, which hands large blocks back to
the kernel on free and maps fresh, zero-filled pages for the next one. A training step allocates
and frees activation-sized tensors all the time, so with the default allocator a MobileNetV2 step
at batch 64 took 100k-400k page faults here (about 2 µs each in this VM), more with SAP, whose
forward frees what plain autograd would keep. ``THP_MEM_ALLOC_ENABLE=1`` makes PyTorch back large
tensors with transparent huge pages (2 MiB), 512 times fewer faults; torch reads it once, at its
first allocation, so it must be in the environment before the process starts. Every launcher of
this project sets it (bench/, deploy/ systemd unit and compose files).
"""

from __future__ import annotations

import os

#: Environment for training processes (clients, simulation workers, benchmarks).
TRAINING_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def training_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with :data:`TRAINING_ENV` applied."""
    return {**(os.environ if base is None else base), **TRAINING_ENV}


def allocator() -> str:
    """``"thp"`` when this process was started with huge-page tensor allocation, else ``"glibc"``."""
    return "thp" if all(os.environ.get(k) == v for k, v in TRAINING_ENV.items()) else "glibc"
