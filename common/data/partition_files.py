"""Partition files: one ``.npz`` per device holding exactly what simulated node i of N trains on.

Each file has x_train, y_train, x_val, y_val (float32 N x C x H x W standardised images, int64 labels)
and num_classes. ``deploy.prepare_partitions`` writes them for a fleet; a SuperNode whose node config
names one as ``data-path`` reads it (:mod:`client.data`), so a Raspberry Pi never holds the whole set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

from common.data.datasets import Dataset, load_dataset
from common.data.partition import label_histogram, partition_indices, train_val_split


class PartitionSettings(Protocol):
    """The run-config fields that decide the partitions (a ``RunConfig`` is one). Read-only
    properties, so that a frozen dataclass matches."""

    @property
    def dataset(self) -> str: ...
    @property
    def data_dir(self) -> str: ...
    @property
    def download(self) -> bool: ...
    @property
    def partitioner(self) -> str: ...
    @property
    def dirichlet_alpha(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def val_fraction(self) -> float: ...


def partition_splits(
    dataset: Dataset, cfg: PartitionSettings, num_partitions: int, max_examples: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) row indices into ``dataset.train`` for each partition.

    ``max_examples`` > 0 keeps a seeded random subset of each partition (before the validation split),
    for quick trials; the label mix stays that of the partition."""
    parts = partition_indices(
        dataset.train.labels.numpy(), num_partitions, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed
    )
    splits = []
    for i, part in enumerate(parts):
        if 0 < max_examples < len(part):
            part = np.sort(np.random.default_rng([cfg.seed, i]).choice(part, max_examples, replace=False))
        splits.append(train_val_split(part, cfg.val_fraction, cfg.seed))
    return splits


def write_partition(path: Path, dataset: Dataset, train: np.ndarray, val: np.ndarray) -> None:
    """Write one partition file atomically: a device never sees a half-written file under ``path``."""
    rows = {"train": train, "val": val}
    arrays = {
        f"{kind}_{split}": getattr(dataset.train, attr)[idx].numpy()
        for split, idx in rows.items()
        for kind, attr in (("x", "images"), ("y", "labels"))
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # A file object, not a name: np.savez appends ".npz" to a name that lacks it.
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, num_classes=np.int64(dataset.num_classes))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the SuperNode's user must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare(
    out: Path, num_partitions: int, cfg: PartitionSettings, prefix: str = "pi", max_examples: int = 0
) -> list[Path]:
    """Write ``out/<prefix>-<i>.npz`` for i = 1..num_partitions, print sizes and label histograms."""
    dataset = load_dataset(cfg.dataset, cfg.data_dir or None, download=cfg.download)
    splits = partition_splits(dataset, cfg, num_partitions, max_examples)
    out.mkdir(parents=True, exist_ok=True)
    labels = dataset.train.labels.numpy()
    histograms = label_histogram(labels, [np.concatenate(s) for s in splits], dataset.num_classes)
    print(
        f"{cfg.dataset}: {num_partitions} partitions ({cfg.partitioner}, alpha {cfg.dirichlet_alpha}, "
        f"seed {cfg.seed}, validation {cfg.val_fraction}) -> {out}"
    )
    print(f"{'file':<16} {'train':>7} {'val':>6} {'MiB':>7}  examples per class 0..{dataset.num_classes - 1}")
    paths = []
    for i, ((train, val), histogram) in enumerate(zip(splits, histograms, strict=True), start=1):
        path = out / f"{prefix}-{i}.npz"
        write_partition(path, dataset, train, val)
        paths.append(path)
        print(
            f"{path.name:<16} {len(train):>7} {len(val):>6} {path.stat().st_size / 2**20:>7.1f}  "
            + " ".join(str(n) for n in histogram)
        )
    return paths
