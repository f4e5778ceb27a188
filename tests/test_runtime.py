"""common/measure/runtime.py: the environment training processes start with, and that it does what it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.measure import runtime

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_FAULTS = """
import resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(1)
before = faults()
held = []
for _ in range(5):  # what a forward pass does: fill fresh activation-sized tensors and keep them
    held.append(torch.empty(16 * 2**20 // 4))
    held[-1].fill_(1.0)
print(faults() - before)
"""

_RETAINED = """
import os, torch
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
torch.ones(1)
first = torch.empty(16 * 2**20 // 4).fill_(1.0)
del first  # freeing a mapped 16 MiB block raises glibc's default threshold past it
before = rss_mib()
held = [torch.empty(4 * 2**20 // 4).fill_(1.0) for _ in range(24)]  # a forward's activations
del held[:-1]  # backward frees all but the newest
print(rss_mib() - before)
"""


def test_training_env_adds_the_settings_and_keeps_the_rest():
    env = runtime.training_env({"PATH": "/bin", "THP_MEM_ALLOC_ENABLE": "0"})
    assert env == {"PATH": "/bin", **runtime.TRAINING_ENV}


def test_training_env_keeps_a_users_own_glibc_tunables_after_its_own():
    env = runtime.training_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == runtime.TRAINING_ENV["GLIBC_TUNABLES"] + ":glibc.malloc.arena_max=2"
    assert runtime.training_env(runtime.TRAINING_ENV) == runtime.TRAINING_ENV


def test_allocator_reports_the_process_setting(monkeypatch):
    for key, value in runtime.training_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}).items():
        monkeypatch.setenv(key, value)
    assert runtime.allocator() == "thp+mmap"
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert runtime.allocator() == "thp"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert runtime.allocator() == "glibc"


def _plain_env() -> dict[str, str]:
    env = runtime.training_env()
    for key in runtime.TRAINING_ENV:
        del env[key]
    return env


def test_training_env_gives_freed_tensors_back_to_the_kernel():
    """23 of 24 freed 4 MiB tensors (92 MiB): glibc's default keeps them in its heap under the one
    still live; with the fixed mmap threshold each had its own mapping, unmapped on free."""

    def retained(env: dict[str, str]) -> float:
        done = subprocess.run([sys.executable, "-c", _RETAINED], env=env, capture_output=True, text=True, check=True)
        return float(done.stdout.split()[-1])

    assert retained(_plain_env()) > 80
    assert retained(runtime.training_env()) < 16


def _faults(env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(
    not _THP.exists() or "[never]" in _THP.read_text(), reason="the kernel has no transparent huge pages"
)
def test_huge_page_allocation_takes_far_fewer_page_faults():
    """Five 16 MiB tensors: 4096 faults each with 4 KiB pages, a handful with 2 MiB pages (more
    where the kernel finds no free huge page and falls back to small ones: 2628 in one run here)."""
    default, huge = _faults(_plain_env()), _faults(runtime.training_env())
    assert default >= 5 * 4000, default
    assert huge * 4 < default, (huge, default)


def test_a_process_reports_its_own_peak_not_the_one_it_inherited_from_its_parent():
    # ru_maxrss survives fork and exec on Linux: a small child of a big parent (a SuperNode's ClientApp)
    # would report the parent's peak
    probe = (
        "import resource; from common.measure import runtime; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, runtime.peak_rss_bytes())"
    )
    block = bytearray(400 * 2**20)
    block[::4096] = b"x" * len(block[::4096])
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root)
    del block
    inherited, own = map(int, out.stdout.split())
    assert inherited > 400 * 2**20
    assert 0 < own < 200 * 2**20
