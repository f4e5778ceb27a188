"""The data a client trains on: its partition of a data set, found from the node's config.

Simulation gives each node ``partition-id`` and ``num-partitions``; the client then cuts the same
Dirichlet (or IID) partition every process computes from the run's seed. A deployed SuperNode may
instead name a prepared partition file with ``data-path`` (see :mod:`common.data.partition_files`: an
``.npz`` with the arrays and metadata saying which data set and partition they are), so a Raspberry Pi
never holds the whole data set. Whatever in the node config or the file is wrong raises
:class:`DataError` saying what to fix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data.datasets import DataError, Dataset, Split, load_dataset
from common.data.partition_files import REMAKE_HELP, read_partition
from common.protocol.config import RunConfig


@dataclass(frozen=True)
class ClientData:
    train: Split
    val: Split
    num_classes: int
    in_channels: int
    partition_id: int
    dataset: str  # the run-config name, e.g. "cifar10"


def load_client_data(run: RunConfig, node_config: Mapping[str, Any]) -> ClientData:
    """This node's data: the partition file its node config names as ``data-path`` (read once per
    process, checked against ``run`` on every call), else partition ``partition-id`` of ``num-partitions``
    of the run's data set."""
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        data = _partition_file(path)
        if data.dataset != run.dataset:
            raise DataError(
                f"partition file {path} holds a {data.dataset} partition but this run trains on {run.dataset}: "
                f"{REMAKE_HELP}"
            )
        return data
    missing = [key for key in ("partition-id", "num-partitions") if key not in node_config]
    if missing:
        raise DataError(
            f"node config lacks {', '.join(missing)}: start the SuperNode with --node-config "
            "'partition-id=0 num-partitions=N' or 'data-path=\"/path/partition.npz\"'"
        )
    partition_id, num_partitions = (
        int(node_config_number(node_config, key, "a whole number", float.is_integer))
        for key in ("partition-id", "num-partitions")
    )
    try:
        return _partition(
            run.dataset,
            run.data_dir,
            run.download,
            run.partitioner,
            run.dirichlet_alpha,
            run.seed,
            run.val_fraction,
            partition_id,
            num_partitions,
        )
    except ValueError as exc:  # out of range, or more partitions than the data set can fill
        raise DataError(
            f"node config partition-id={partition_id} num-partitions={num_partitions}: {exc}; "
            "fix the SuperNode's --node-config"
        ) from exc


def node_config_number(
    node_config: Mapping[str, Any], key: str, expected: str, valid: Callable[[float], bool]
) -> float:
    """The finite number under ``key`` in the node config for which ``valid`` holds, else a DataError
    that says it must be ``expected``. Flower gives a number, or a string where the value was quoted."""
    value = node_config[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan  # fails the check below like any non-number
    if isinstance(value, bool) or not (math.isfinite(number) and valid(number)):
        raise DataError(f"node config {key} must be {expected}, got {value!r}: fix the SuperNode's --node-config")
    return number


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
    return ClientData(train, val, full.num_classes, full.in_channels, partition_id, dataset)


@functools.lru_cache(maxsize=2)
def _partition_file(path: str) -> ClientData:
    meta, train, val = read_partition(Path(path))
    return ClientData(train, val, meta.num_classes, meta.image_shape[0], meta.partition_id, meta.dataset)
