"""Cut a data set into one partition file per device, the same partitions the simulation trains on.

    python -m deploy.prepare_partitions --partitions 10 --out partitions/
    # -> partitions/pi-1.npz ... pi-10.npz; copy pi-N.npz to device N as /var/lib/fedmef/partition.npz

The data set, partitioner, Dirichlet alpha, validation share and seed come from the run config exactly
as the simulation reads it (``[tool.flwr.app.config]`` in pyproject.toml, then ``--preset``, then
``--set``), so device N holds what simulated SuperNode N-1 of N holds. Each file is an ``.npz`` with
x_train, y_train, x_val, y_val (float32 N x C x H x W standardised images, int64 labels) and
num_classes: what :mod:`client.data` reads when a SuperNode's node config names it as ``data-path``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError, RunConfig, parse_run_config
from common.datasets import DataError, Dataset, load_dataset
from common.partition import label_histogram, partition_indices, train_val_split

ROOT = Path(__file__).resolve().parent.parent


def run_config(preset: Path | None = None, overrides: str = "") -> RunConfig:
    """The run config the simulation would use: pyproject's defaults, a preset file, ``k=v`` overrides."""
    values: dict[str, Any] = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    if preset is not None:
        values.update(tomllib.loads(preset.read_text()))
    if overrides:
        values.update(tomllib.loads("\n".join(overrides.split())))
    return parse_run_config(values)


def partition_splits(dataset: Dataset, cfg: RunConfig, num_partitions: int,
                     max_examples: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) row indices into ``dataset.train`` for each partition.

    ``max_examples`` > 0 keeps a seeded random subset of each partition (before the validation split),
    for quick trials; the label mix stays that of the partition."""
    parts = partition_indices(dataset.train.labels.numpy(), num_partitions, cfg.partitioner,
                              cfg.dirichlet_alpha, cfg.seed)
    splits = []
    for i, part in enumerate(parts):
        if 0 < max_examples < len(part):
            part = np.sort(np.random.default_rng([cfg.seed, i]).choice(part, max_examples, replace=False))
        splits.append(train_val_split(part, cfg.val_fraction, cfg.seed))
    return splits


def write_partition(path: Path, dataset: Dataset, train: np.ndarray, val: np.ndarray) -> None:
    """Write one partition file atomically: a device never sees a half-written file under ``path``."""
    rows = {"train": train, "val": val}
    arrays = {f"{kind}_{split}": getattr(dataset.train, attr)[idx].numpy()
              for split, idx in rows.items() for kind, attr in (("x", "images"), ("y", "labels"))}
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


def prepare(out: Path, num_partitions: int, cfg: RunConfig, prefix: str = "pi",
            max_examples: int = 0) -> list[Path]:
    """Write ``out/<prefix>-<i>.npz`` for i = 1..num_partitions, print sizes and label histograms."""
    dataset = load_dataset(cfg.dataset, cfg.data_dir or None, download=cfg.download)
    splits = partition_splits(dataset, cfg, num_partitions, max_examples)
    out.mkdir(parents=True, exist_ok=True)
    labels = dataset.train.labels.numpy()
    histograms = label_histogram(labels, [np.concatenate(s) for s in splits], dataset.num_classes)
    print(f"{cfg.dataset}: {num_partitions} partitions ({cfg.partitioner}, alpha {cfg.dirichlet_alpha}, "
          f"seed {cfg.seed}, validation {cfg.val_fraction}) -> {out}")
    print(f"{'file':<16} {'train':>7} {'val':>6} {'MiB':>7}  examples per class 0..{dataset.num_classes - 1}")
    paths = []
    for i, ((train, val), histogram) in enumerate(zip(splits, histograms), start=1):
        path = out / f"{prefix}-{i}.npz"
        write_partition(path, dataset, train, val)
        paths.append(path)
        print(f"{path.name:<16} {len(train):>7} {len(val):>6} {path.stat().st_size / 2**20:>7.1f}  "
              + " ".join(str(n) for n in histogram))
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--partitions", type=int, required=True, help="number of devices (SuperNodes)")
    p.add_argument("--out", type=Path, required=True, help="folder for the partition files")
    p.add_argument("--prefix", default="pi", help="file names <prefix>-1.npz ...; match make-pki.sh's -p (default: pi)")
    p.add_argument("--max-examples", type=int, default=0,
                   help="keep at most this many examples per partition (0 = all), for quick trials")
    p.add_argument("--preset", type=Path, default=None, help="a conf/*.toml file of run-config overrides")
    p.add_argument("--set", default="", help="more run-config overrides, e.g. \"dirichlet-alpha=0.1 seed=7\"")
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
