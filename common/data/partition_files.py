"""Partition files: one ``.npz`` per device holding exactly what simulated node i of N trains on.

Each file has x_train, y_train, x_val, y_val (uint8 N x C x H x W images, int64 labels) and ``meta``, a
JSON string (:class:`PartitionMeta`: data set, classes, image shape, which partition of how many, how
they were cut, format version); the node standardises the images it draws with its data set's
statistics, as the simulation does. ``deploy.prepare_partitions`` writes them for a fleet; a
SuperNode whose node config names one as ``data-path`` reads it (:mod:`client.data`) with
:func:`read_partition`, which checks the arrays against the metadata, so a Raspberry Pi never holds the
whole set and a wrong or damaged file is refused with a message instead of failing in training.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from common.data.datasets import STANDARDISATIONS, DataError, Dataset, Split, load_dataset, read_npz

# 2: uint8 pixels, a quarter of version 1's standardised float32 images
FORMAT_VERSION = 2
REMAKE_HELP = (
    "remake it with 'python -m deploy.prepare_partitions --partitions N --out DIR' and the run's "
    "--preset/--set (so that its data set and partitioning are the run's) and copy it to the node, or fix "
    "the node's data-path"
)


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
    # Imported here: it pulls in Flower Datasets (pyarrow, pandas), which a device that only reads its
    # partition file (read_partition) neither needs installed nor should pay for in RAM.
    from common.data.partition import partition_indices, train_val_split

    parts = partition_indices(
        dataset.train.labels.numpy(), num_partitions, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed
    )
    splits = []
    for i, part in enumerate(parts):
        if 0 < max_examples < len(part):
            part = np.sort(np.random.default_rng([cfg.seed, i]).choice(part, max_examples, replace=False))
        splits.append(train_val_split(part, cfg.val_fraction, cfg.seed))
    return splits


@dataclass(frozen=True)
class PartitionMeta:
    """What a partition file holds and how it was cut; stored in the file as JSON under ``meta``."""

    dataset: str  # the run-config name, e.g. "cifar10"
    num_classes: int
    image_shape: tuple[int, int, int]  # C, H, W
    partition_id: int  # 0-based: <prefix>-<i>.npz holds partition i-1, that of simulated node i-1
    num_partitions: int
    partitioner: str
    dirichlet_alpha: float
    seed: int
    val_fraction: float
    max_examples: int  # 0: the whole partition
    format_version: int = FORMAT_VERSION

    @classmethod
    def of(
        cls, dataset: Dataset, cfg: PartitionSettings, partition_id: int, num_partitions: int, max_examples: int = 0
    ) -> PartitionMeta:
        c, h, w = dataset.train.images.shape[1:]
        return cls(
            dataset.name,
            dataset.num_classes,
            (c, h, w),
            partition_id,
            num_partitions,
            cfg.partitioner,
            cfg.dirichlet_alpha,
            cfg.seed,
            cfg.val_fraction,
            max_examples,
        )


def write_partition(path: Path, dataset: Dataset, train: np.ndarray, val: np.ndarray, meta: PartitionMeta) -> None:
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
            # A str array: it loads with allow_pickle=False, unlike a dict or an object array.
            np.savez(f, **arrays, meta=np.array(json.dumps(asdict(meta))))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the SuperNode's user must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_partition(path: Path) -> tuple[PartitionMeta, Split, Split]:
    """The metadata, train and validation Splits of the partition file at ``path``.

    DataError, naming the file, what is wrong and how to remake it, for a file that is not a partition
    file, is damaged, or whose arrays do not match its metadata (image shape, labels in 0..classes-1, one
    label per image, some training examples). A file of an older format, without metadata (before
    version 1) or with float32 images (version 1), is refused too rather than loaded unchecked or
    converted: remaking it takes seconds.
    """
    arrays = read_npz(path, f"it is not a partition file, or it is damaged: {REMAKE_HELP}")

    def bad(problem: str) -> DataError:
        return DataError(f"partition file {path} {problem}: {REMAKE_HELP}")

    if "meta" not in arrays:
        raise bad("has no metadata (data set, classes, which partition): an older version wrote it")
    meta = _meta(arrays["meta"], bad)
    missing = [key for key in ("x_train", "y_train", "x_val", "y_val") if key not in arrays]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    splits = []
    for split in ("train", "val"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.shape[1:] != meta.image_shape:
            raise bad(
                f"holds {split} images of shape {x.shape} ({x.dtype}), not uint8 N x "
                f"{' x '.join(map(str, meta.image_shape))} as its metadata says"
            )
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise bad(f"holds {len(x)} {split} images but labels of shape {y.shape} ({y.dtype}), not one integer each")
        if len(y) and (y.min() < 0 or y.max() >= meta.num_classes):
            raise bad(
                f"holds {split} labels {y.min()}..{y.max()}, outside the 0..{meta.num_classes - 1} of its "
                f"{meta.num_classes} classes"
            )
        splits.append(
            Split(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64, copy=False)), STANDARDISATIONS[meta.dataset])
        )
    train, val = splits
    if not len(train):
        raise bad("holds no training examples")
    return meta, train, val


def _meta(stored: np.ndarray, bad: Callable[[str], DataError]) -> PartitionMeta:
    """The :class:`PartitionMeta` a partition file stores; ``bad(problem)`` for one this version cannot use."""
    try:
        fields = json.loads(stored.item()) if stored.dtype.kind == "U" and stored.ndim == 0 else None
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object in a str array")
        if fields.get("format_version") != FORMAT_VERSION:
            raise bad(f"is of format version {fields.get('format_version')}, this node reads version {FORMAT_VERSION}")
        meta = PartitionMeta(**{**fields, "image_shape": tuple(fields["image_shape"])})
    except (ValueError, TypeError, KeyError) as exc:
        raise bad(f"has damaged metadata ({type(exc).__name__}: {exc})") from exc
    ints = (meta.num_classes, *meta.image_shape, meta.partition_id, meta.num_partitions)
    if not (
        meta.dataset in STANDARDISATIONS
        and len(meta.image_shape) == 3
        and all(isinstance(n, int) for n in ints)
        and min(meta.num_classes, *meta.image_shape) > 0
        and 0 <= meta.partition_id < meta.num_partitions
    ):
        raise bad(f"has damaged metadata: {meta}")
    return meta


def prepare(
    out: Path, num_partitions: int, cfg: PartitionSettings, prefix: str = "pi", max_examples: int = 0
) -> list[Path]:
    """Write ``out/<prefix>-<i>.npz`` for i = 1..num_partitions, print sizes and label histograms."""
    from common.data.partition import label_histogram  # here, for the reason partition_splits gives

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
        write_partition(path, dataset, train, val, PartitionMeta.of(dataset, cfg, i - 1, num_partitions, max_examples))
        paths.append(path)
        print(
            f"{path.name:<16} {len(train):>7} {len(val):>6} {path.stat().st_size / 2**20:>7.1f}  "
            + " ".join(str(n) for n in histogram)
        )
    return paths
