"""Process settings a training process should start with, and what the running one has.

PyTorch's CPU allocator takes memory for every tensor from glibc, which hands large blocks back to
the kernel on free and maps fresh, zero-filled pages for the next one. A training step allocates
and frees activation-sized tensors all the time, so with the default allocator a MobileNetV2 step
at batch 64 took 100k-400k page faults here (about 2 µs each in this VM), more with SAP, whose
forward frees what plain autograd would keep. ``THP_MEM_ALLOC_ENABLE=1`` makes PyTorch back large
tensors with transparent huge pages (2 MiB), 512 times fewer faults; torch reads it once, at its
first allocation, so it must be in the environment before the process starts. Every launcher of
this project sets it (bench/, deploy/ systemd unit and compose files).

glibc then keeps freed memory that the process never uses again. It serves a block of at least its
mmap threshold from a mapping of its own, unmapped on free, and smaller ones from a heap, which only
gives back memory at its top. The threshold starts at 128 KiB, but every mapped block freed raises it
to that block's size, up to 32 MiB. After the first activation-sized free, every tensor below 32 MiB
comes from the heap, and one live tensor near the top pins all the freed ones beneath it. Fixing
the threshold (``glibc.malloc.mmap_threshold``) keeps large tensors on their own mappings.
Measured on a SuperNode's ClientApp (``python -m bench.supernode_memory``, ResNet18 at width 64,
batch 64, normal rounds, VmHWM): FedMef 970 -> 693 MiB, FedTiny 1362 -> 877 MiB. Each mapping is
faulted in afresh, in huge pages, so the step pays for zeroing its new tensors (README, "Freed memory").
"""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

#: Environment for training processes (clients, simulation workers, benchmarks).
TRAINING_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}


def training_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with :data:`TRAINING_ENV` applied; glibc tunables
    that ``base`` already sets are kept after ours, so a user's own setting of the same one wins."""
    env = {**(os.environ if base is None else base)}
    theirs = env.get("GLIBC_TUNABLES", "")
    env.update(TRAINING_ENV)
    if theirs and theirs != TRAINING_ENV["GLIBC_TUNABLES"]:
        env["GLIBC_TUNABLES"] = f"{TRAINING_ENV['GLIBC_TUNABLES']}:{theirs}"
    return env


def allocator() -> str:
    """How this process allocates tensors: ``"thp+mmap"`` with all of :data:`TRAINING_ENV`, ``"thp"``
    with huge pages alone (this project's setting before 2026-12-02), else ``"glibc"``."""
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    mapped = TRAINING_ENV["GLIBC_TUNABLES"] in os.environ.get("GLIBC_TUNABLES", "").split(":")
    return ("thp+mmap" if mapped else "thp") if thp else "glibc"


def high_water_mark(pid: int | str = "self") -> int | None:
    """Process ``pid``'s VmHWM in bytes: the kernel's high-water mark of its resident memory since its
    exec; None where /proc has no such line. OSError when the process is gone."""
    found = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(found.group(1)) * 1024 if found else None


def peak_rss_bytes() -> int:
    """The largest resident memory of this process since its exec (:func:`high_water_mark`).

    ``ru_maxrss`` survives exec on Linux, so a process forked from a large parent (a SuperNode's
    ClientApp, a worker started by a big driver) reports the parent's peak if that was higher; VmHWM
    belongs to the process's own address space. ``ru_maxrss`` (KiB) where /proc is not there."""
    try:
        hwm = high_water_mark()
    except OSError:
        hwm = None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
