"""The data a client trains on: its partition of a data set, found from the node's config.

Simulation gives each node ``partition-id`` and ``num-partitions``; the client then cuts the same
Dirichlet (or IID) partition every process computes from the run's seed. A deployed SuperNode may
instead name a prepared partition file with ``data-path`` (an ``.npz`` with x_train, y_train, x_val,
y_val and num_classes), so a Raspberry Pi never holds the whole data set.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data.datasets import DataError, Dataset, Split, load_dataset
from common.protocol.config import RunConfig


@dataclass(frozen=True)
class ClientData:
    train: Split
    val: Split
    num_classes: int
    in_channels: int
    partition_id: int  # -1 for a partition file


def load_client_data(run: RunConfig, node_config: Mapping[str, Any]) -> ClientData:
    if "data-path" in node_config:
        return _partition_file(str(node_config["data-path"]))
    missing = [key for key in ("partition-id", "num-partitions") if key not in node_config]
    if missing:
        raise DataError(
            f"node config lacks {', '.join(missing)}: start the SuperNode with --node-config "
            "'partition-id=0 num-partitions=N' or 'data-path=\"/path/partition.npz\"'"
        )
    return _partition(
        run.dataset,
        run.data_dir,
        run.download,
        run.partitioner,
        run.dirichlet_alpha,
        run.seed,
        run.val_fraction,
        int(node_config["partition-id"]),
        int(node_config["num-partitions"]),
    )


@functools.lru_cache(maxsize=1)
def _dataset(name: str, data_dir: str, download: bool) -> Dataset:
    """One copy per process: a simulation worker serves many clients of the same data set."""
    return load_dataset(name, data_dir or None, download=download)


@functools.lru_cache(maxsize=16)
def _partition(
    dataset: str,
    data_dir: str,
    download: bool,
    scheme: str,
    alpha: float,
    seed: int,
    val_fraction: float,
    partition_id: int,
    num_partitions: int,
) -> ClientData:
    # Imported here: it pulls in Flower Datasets (pyarrow, pandas), which a device reading a prepared
    # partition file (data-path) neither needs installed nor should pay for in RAM.
    from common.data.partition import client_data

    full = _dataset(dataset, data_dir, download)
    train, val = client_data(
        full, partition_id, num_partitions, scheme=scheme, alpha=alpha, seed=seed, val_fraction=val_fraction
    )
    return ClientData(train, val, full.num_classes, full.in_channels, partition_id)


@functools.lru_cache(maxsize=2)
def _partition_file(path: str) -> ClientData:
    keys = ("x_train", "y_train", "x_val", "y_val", "num_classes")
    try:
        with np.load(path) as arrays:
            parts = {key: arrays[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DataError(
            f"cannot read the partition file {path}: {exc}; it must be an .npz with {', '.join(keys)} "
            "(make it with deploy's partition tool)"
        ) from exc
    if Path(path).suffix != ".npz":
        raise DataError(f"partition file {path} is not an .npz")

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        if x.ndim != 4 or len(x) != len(y):
            raise DataError(f"partition file {path}: images must be N x C x H x W float32 with one label each")
        return Split(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)))

    train, val = split(parts["x_train"], parts["y_train"]), split(parts["x_val"], parts["y_val"])
    return ClientData(train, val, int(parts["num_classes"]), train.images.shape[1], -1)
