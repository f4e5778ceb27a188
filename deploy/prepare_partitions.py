"""Cut a data set into one partition file per device, the same partitions the simulation trains on.

    python -m deploy.prepare_partitions --partitions 10 --out partitions/
    # -> partitions/pi-1.npz ... pi-10.npz; copy pi-N.npz to device N as /var/lib/fedmef/partition.npz

The data set, partitioner, Dirichlet alpha, validation share and seed come from the run config exactly
as the simulation reads it (``[tool.flwr.app.config]`` in pyproject.toml, then ``--preset``, then
``--set``), so device N holds what simulated SuperNode N-1 of N holds. Each file is an ``.npz`` with
x_train, y_train, x_val, y_val (uint8 N x C x H x W images, int64 labels) and ``meta``
(data set, classes, image shape, partition N-1 of how many, partitioner, alpha, seed, validation share,
example cap, format version): what :mod:`client.data` reads, and checks against the run, when a
SuperNode's node config names it as ``data-path``. A file of an older format (without metadata, or
format version 1's float32 images) is refused there: rerun this to remake it.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

from common.data.datasets import DataError
from common.data.partition_files import PartitionMeta, partition_splits, prepare, write_partition
from common.protocol.config import ConfigError, RunConfig, parse_run_config

__all__ = ["PartitionMeta", "main", "partition_splits", "prepare", "run_config", "write_partition"]


def run_config(preset: Path | None = None, overrides: str = "") -> RunConfig:
    """The run config the simulation would use: the app's defaults, a preset file, ``k=v`` overrides."""
    values: dict[str, Any] = {}
    if preset is not None:
        values.update(tomllib.loads(preset.read_text()))
    if overrides:
        values.update(tomllib.loads("\n".join(overrides.split())))
    return parse_run_config(values)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--partitions", type=int, required=True, help="number of devices (SuperNodes)")
    p.add_argument("--out", type=Path, required=True, help="folder for the partition files")
    p.add_argument("--prefix", default="pi", help="file names <prefix>-1.npz ...; match make-pki.sh's -p (default: pi)")
    p.add_argument(
        "--max-examples",
        type=int,
        default=0,
        help="keep at most this many examples per partition (0 = all), for quick trials",
    )
    p.add_argument("--preset", type=Path, default=None, help="a conf/*.toml file of run-config overrides")
    p.add_argument("--set", default="", help='more run-config overrides, e.g. "dirichlet-alpha=0.1 seed=7"')
    a = p.parse_args(argv)
    if a.partitions < 1 or a.max_examples < 0:
        p.error("--partitions must be >= 1 and --max-examples >= 0")
    try:
        cfg = run_config(a.preset, a.set)
        prepare(a.out, a.partitions, cfg, a.prefix, a.max_examples)
    except (ConfigError, DataError, ValueError, OSError, tomllib.TOMLDecodeError) as exc:
        sys.exit(f"prepare_partitions: {exc}")


if __name__ == "__main__":
    main()
