"""Masked local training and evaluation on in-memory tensors (shared by the client and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.data.datasets import Split


def batches(
    split: Split, batch_size: int, generator: torch.Generator, shuffle: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (standardised float32 images, labels) mini-batches; the last, smaller batch is kept."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield split.inputs(idx), split.labels[idx]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live, and so where its batches must go. The data stay on the CPU,
    where the batch order and augmentation draw from their CPU generators, and each batch moves on its
    own: on the CPU that move is a no-op, so CPU training is what it was before devices existed."""
    return next(model.parameters()).device


@dataclass
class TrainStats:
    steps: int = 0
    examples: int = 0
    loss_sum: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.examples if self.examples else float("nan")


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    stats: TrainStats,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> float:
    """One SGD step on cross-entropy (plus ``penalty()`` if given); masks are kept by hooks on
    ``optimizer`` (see ``masks``). ``forward`` replaces ``model(images)``, e.g. a masked functional call."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy((forward or model)(images), labels)
    if penalty is not None:
        loss = loss + penalty()
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"training diverged: loss is {loss.item()} at step {stats.steps}; lower the learning rate"
        )
    loss.backward()
    optimizer.step()
    stats.steps += 1
    stats.examples += len(labels)
    stats.loss_sum += loss.item() * len(labels)
    return loss.item()


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``split``."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    loss_sum, correct = 0.0, 0
    try:
        for images, labels in batches(split, batch_size, torch.Generator(), shuffle=False):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(1) == labels).sum())
    finally:
        model.train(was_training)
    n = max(len(split), 1)
    return loss_sum / n, correct / n
