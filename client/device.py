"""What the device is, and whether the configured training fits its memory budget.

A SuperNode on a Raspberry Pi reports its architecture, cores, memory and (where readable) SoC
temperature and throttling to the server with its first reply. Before training, the client measures
what the round needs (dense fp32 parameters, gradients and momentum, plus the bytes autograd holds for
backward at the configured batch size) and, when the node's ``memory-budget-mb`` cannot hold it,
halves the batch size until it does, or refuses with a message that says what to change, instead of
being killed by the kernel's OOM killer half way through a round.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn

from common.measure import runtime
from common.measure.accounting import SavedTensorMeter
from common.nn import bitkernels
from common.protocol.config import describe_device

_PI_MODEL = Path("/proc/device-tree/model")
_THERMAL = Path("/sys/class/thermal/thermal_zone0/temp")
_THROTTLED = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
# Autograd's activation gradients, optimizer scratch and allocator slack on top of what the meter sees,
# as a share of the held bytes (measured on ResNet18 / LeNet-5 here; generous on purpose).
_BACKWARD_OVERHEAD = 1.0


class MemoryBudgetError(RuntimeError):
    """The configured training cannot fit the node's memory budget even at batch size 1."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip("\x00\n ")
    except OSError:
        return None


def device_report(compute: torch.device) -> dict[str, str | int | float]:
    """Architecture, cores, memory, the device training runs on (``compute``), whether the native SAP
    kernels and huge-page allocation are in use, and a Raspberry Pi's model, temperature and throttling flags."""
    memory = psutil.virtual_memory()
    report: dict[str, str | int | float] = {
        "arch": platform.machine(),
        "cores": os.cpu_count() or 1,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch-device": describe_device(compute),
        "memory-total-mb": memory.total / 2**20,
        "memory-available-mb": memory.available / 2**20,
        "sap-kernels": bitkernels.status().split(" ", 1)[0],
        "allocator": runtime.allocator(),
    }
    if (model := _read(_PI_MODEL)) is not None:
        report["model"] = model
    if (temp := _read(_THERMAL)) is not None and temp.lstrip("-").isdigit():
        report["temperature-c"] = int(temp) / 1000
    if (throttled := _read(_THROTTLED)) is not None:
        report["throttled"] = throttled  # firmware bit field: under-voltage, frequency capped, throttled
    return report


@dataclass(frozen=True)
class MemoryPlan:
    batch_size: int  # what fits
    needed_mb: float  # what a step adds to the process at that batch size
    budget_mb: float
    baseline_mb: float  # the process before training (interpreter, torch, data, model)
    asked_batch_size: int  # what the server's instructions said

    @property
    def adapted(self) -> bool:
        return self.batch_size < self.asked_batch_size


def training_bytes(model: nn.Module, example: torch.Tensor, batch_size: int) -> int:
    """Bytes one training step adds: gradients and momentum for every parameter, plus the bytes held
    for backward (measured with one forward pass at this batch size) and the backward's own scratch."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = example[:1].expand(batch_size, *example.shape[1:]).contiguous()
    was_training = model.training
    model.train()
    try:
        with SavedTensorMeter(model) as meter:
            out = model(batch)
        del out
    finally:
        model.train(was_training)
    return int(2 * params + (1 + _BACKWARD_OVERHEAD) * meter.held.activation_bytes)


def plan_batch_size(
    model: nn.Module, example: torch.Tensor, batch_size: int, budget_mb: float, baseline_mb: float | None = None
) -> MemoryPlan:
    """The largest batch size <= ``batch_size`` (halving) whose step fits ``budget_mb`` on top of
    ``baseline_mb`` (default: this process's RSS now); MemoryBudgetError when not even batch 1 fits."""
    baseline = psutil.Process().memory_info().rss / 2**20 if baseline_mb is None else baseline_mb
    size = batch_size
    while True:
        needed = training_bytes(model, example, size) / 2**20
        if baseline + needed <= budget_mb:
            return MemoryPlan(size, needed, budget_mb, baseline, batch_size)
        if size == 1:
            raise MemoryBudgetError(
                f"training needs about {baseline + needed:.0f} MB at batch size 1 ({baseline:.0f} MB already in use "
                f"+ {needed:.0f} MB for the step), over this node's memory-budget-mb = {budget_mb:.0f}: turn SAP on "
                "(sap='on', s-ta 0.9), choose a smaller model, or give the node more memory"
            )
        size = max(1, size // 2)
