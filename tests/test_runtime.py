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


def test_training_env_adds_the_settings_and_keeps_the_rest():
    env = runtime.training_env({"PATH": "/bin", "THP_MEM_ALLOC_ENABLE": "0"})
    assert env == {"PATH": "/bin", **runtime.TRAINING_ENV}


def test_allocator_reports_the_process_setting(monkeypatch):
    for key, value in runtime.TRAINING_ENV.items():
        monkeypatch.setenv(key, value)
    assert runtime.allocator() == "thp"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert runtime.allocator() == "glibc"


def _faults(env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(
    not _THP.exists() or "[never]" in _THP.read_text(), reason="the kernel has no transparent huge pages"
)
def test_huge_page_allocation_takes_far_fewer_page_faults():
    """Five 16 MiB tensors: 4096 faults each with 4 KiB pages, a handful with 2 MiB pages (more
    where the kernel finds no free huge page and falls back to small ones: 2628 in one run here)."""
    plain = runtime.training_env()
    for key in runtime.TRAINING_ENV:
        del plain[key]
    default, huge = _faults(plain), _faults(runtime.training_env())
    assert default >= 5 * 4000, default
    assert huge * 4 < default, (huge, default)
