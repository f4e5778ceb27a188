"""Image datasets as in-memory tensors, read from the files users actually have.

Fashion-MNIST: the four ``*-idx?-ubyte[.gz]`` files (Debian's ``dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist``). CIFAR-10: either the ``cifar-10-batches-py`` pickles of the
official archive or a ``cifar10.npz`` with ``x_train, y_train, x_test, y_test`` (rows of 3072 bytes).
Nothing here downloads; a missing or damaged file raises :class:`DataError` saying how to get it.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_HELP = ("get Fashion-MNIST with 'apt-get install dataset-fashion-mnist' (Debian) or put "
                      "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                      "t10k-labels-idx1-ubyte.gz from the Fashion-MNIST release in one folder and pass it as data dir")
CIFAR10_HELP = ("put the extracted 'cifar-10-batches-py' folder of the official CIFAR-10 python archive, or a "
                "cifar10.npz with x_train/y_train/x_test/y_test, in a folder and pass it as data dir")

# Per-channel statistics of the training sets, for standardising inputs.
_STATS = {"fashion-mnist": ((0.2860,), (0.3530,)),
          "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


class DataError(RuntimeError):
    """A dataset could not be found or read; the message says how to get it."""


@dataclass(frozen=True)
class Split:
    """Images as float32 NCHW tensors, standardised per channel, and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]


def _standardise(name: str, images: np.ndarray, labels: np.ndarray) -> Split:
    mean, std = _STATS[name]
    x = torch.from_numpy(images).float().div_(255.0)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return Split(x.contiguous(), torch.from_numpy(labels.astype(np.int64)))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format): magic 0x0000 0x08 ndim, big-endian dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}; the file is damaged, {FASHION_MNIST_HELP}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an uint8 IDX file; {FASHION_MNIST_HELP}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} ends inside its header: truncated; {FASHION_MNIST_HELP}")
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes, its header promises {expected}: truncated; {FASHION_MNIST_HELP}")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _checked_split(name: str, images: np.ndarray, labels: np.ndarray, source: Path, help_text: str) -> Split:
    if len(images) != len(labels):
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels; the files do not belong together, {help_text}")
    return _standardise(name, images, labels)


def _cifar_images(x: np.ndarray, source: Path) -> np.ndarray:
    """Rows of 3072 bytes (the pickles' CHW order), NCHW, or NHWC (as Keras saves it) -> NCHW."""
    if x.ndim == 2 and x.shape[1] == 3072:
        return x.reshape(-1, 3, 32, 32)
    if x.shape[1:] == (3, 32, 32):
        return x
    if x.shape[1:] == (32, 32, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(f"{source}: images of shape {x.shape} are neither (N, 3072), (N, 3, 32, 32) nor (N, 32, 32, 3); {CIFAR10_HELP}")


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(data_dir: str | Path | None = None) -> Dataset:
    """Fashion-MNIST (60k / 10k, 1x28x28) from ``data_dir`` or the Debian package's folder."""
    folders = [Path(data_dir)] if data_dir else list(FASHION_MNIST_DIRS)
    for folder in folders:
        files = {stem: _find(folder, stem) for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
        if all(files.values()):
            parts = {stem: _read_idx(path) for stem, path in files.items()}
            train = _checked_split("fashion-mnist", parts["train-images-idx3-ubyte"][:, None],
                                   parts["train-labels-idx1-ubyte"], folder, FASHION_MNIST_HELP)
            test = _checked_split("fashion-mnist", parts["t10k-images-idx3-ubyte"][:, None],
                                  parts["t10k-labels-idx1-ubyte"], folder, FASHION_MNIST_HELP)
            return Dataset("fashion-mnist", train, test, 10)
    raise DataError(f"Fashion-MNIST not found in {', '.join(map(str, folders))}: {FASHION_MNIST_HELP}")


def load_cifar10(data_dir: str | Path) -> Dataset:
    """CIFAR-10 (3x32x32) from the official python pickles or an ``.npz`` in ``data_dir``."""
    folder = Path(data_dir)
    npz = folder / "cifar10.npz" if folder.is_dir() else folder
    if npz.suffix == ".npz" and npz.is_file():
        try:
            with np.load(npz) as arrays:
                parts = {k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"cannot read {npz}: {exc}; {CIFAR10_HELP}") from exc
        return Dataset("cifar10",
                       _checked_split("cifar10", _cifar_images(parts["x_train"], npz), parts["y_train"], npz, CIFAR10_HELP),
                       _checked_split("cifar10", _cifar_images(parts["x_test"], npz), parts["y_test"], npz, CIFAR10_HELP), 10)
    batches = folder / "cifar-10-batches-py" if (folder / "cifar-10-batches-py").is_dir() else folder
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if all((batches / n).is_file() for n in names):
        loaded = {}
        for n in names:
            try:
                with open(batches / n, "rb") as fh:
                    entry = pickle.load(fh, encoding="bytes")
                loaded[n] = (np.asarray(entry[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(entry[b"labels"]))
            except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as exc:
                raise DataError(f"cannot read {batches / n}: {exc}; the file is damaged, {CIFAR10_HELP}") from exc
        train_x = np.concatenate([loaded[n][0] for n in names[:5]])
        train_y = np.concatenate([loaded[n][1] for n in names[:5]])
        return Dataset("cifar10", _checked_split("cifar10", train_x, train_y, batches, CIFAR10_HELP),
                       _checked_split("cifar10", *loaded["test_batch"], batches, CIFAR10_HELP), 10)
    raise DataError(f"CIFAR-10 not found in {folder}: {CIFAR10_HELP}")


LOADERS = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(LOADERS)}")
    if name == "cifar10" and not data_dir:
        raise DataError(f"CIFAR-10 needs a data dir: {CIFAR10_HELP}")
    return LOADERS[name](data_dir) if data_dir else LOADERS[name]()
