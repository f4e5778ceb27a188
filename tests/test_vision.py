"""Tests for common.data.vision: torchvision importable next to the CPU torch, and nothing done where it
imports by itself."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from common.data import vision

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_shim(monkeypatch):
    """The shim as if not yet called in this process, and every op schema it would declare recorded."""
    declared = []
    monkeypatch.setattr(torch.library, "define", lambda name, schema, *a, **k: declared.append(name))
    vision.ensure_torchvision.cache_clear()
    yield declared
    vision.ensure_torchvision.cache_clear()


def test_declares_nothing_where_torchvision_imports_cleanly(fresh_shim, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    vision.ensure_torchvision()
    assert fresh_shim == []


def test_another_import_failure_is_not_hidden(fresh_shim, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # "import torchvision" raises ImportError
    with pytest.raises(ImportError):
        vision.ensure_torchvision()
    assert fresh_shim == []


def test_datasets_and_transforms_work_after_the_shim_in_a_fresh_interpreter():
    # A fresh interpreter: whether the plain import fails depends on the installed build, and a failed
    # import leaves nothing to retry in this one.
    code = """
import torch
try:
    import torchvision
    needed = False
except RuntimeError as exc:
    assert "torchvision::nms does not exist" in str(exc), exc
    needed = True
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
from common.data.vision import ensure_torchvision
ensure_torchvision()
ensure_torchvision()  # once: a second call declares nothing twice (that would raise)
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.transforms import v2
x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
assert torch.equal(v2.functional.horizontal_flip(x), x.flip(-1))
assert v2.RandomCrop(8, padding=2)(x).shape == x.shape
assert CIFAR10.base_folder == "cifar-10-batches-py" and ImageFolder is not None
print("needed" if needed else "not needed")
"""
    run = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() in ("needed", "not needed")
