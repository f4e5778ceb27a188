"""Image datasets as in-memory tensors, read from the files users actually have.

Fashion-MNIST: the four ``*-idx?-ubyte[.gz]`` files (Debian's ``dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist``). CIFAR-10: either the ``cifar-10-batches-py`` folder of the
official archive (read and MD5-checked by ``torchvision.datasets.CIFAR10``) or a ``cifar10.npz`` with
``x_train, y_train, x_test, y_test`` (rows of 3072 bytes). CINIC-10 and Tiny ImageNet: their unpacked
image folders (``torchvision.datasets.ImageFolder``). Without a data dir each dataset is also looked for
in ``~/.cache/fedmef/<name>``, where :func:`download_dataset` puts Fashion-MNIST and CIFAR-10. A missing
or damaged file raises :class:`DataError` saying how to get it.

What torchvision does not do here stays in this module:

- Fashion-MNIST's IDX files: ``torchvision.datasets.FashionMNIST`` reads only uncompressed files under
  ``<root>/FashionMNIST/raw/``, so Debian's ``.gz`` files would have to be unpacked into a copy (about
  55 MB) first; its parser also reports a truncated file as a bare ``AssertionError``.
- Tiny ImageNet's validation images: one folder labelled by ``val_annotations.txt``, not class folders.
- Downloads: torchvision's ``download_url`` has no timeout (a black-holed network hangs it), retries a
  failed HTTPS download over plain HTTP, checks MD5 only, and its ``extract_archive`` extracts a tar
  with no filter (before Python 3.14 its members may land outside the target). :func:`download_dataset`
  times out, checks SHA-256 and MD5, and extracts only regular files inside the target.

torchvision is imported inside the loaders (through :mod:`common.data.vision`): the ClientApp imports
this module for its types and errors, and a device that only reads partition files need not have it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple
from zipfile import BadZipFile

import numpy as np
import torch
from PIL import Image

from common.data.vision import ensure_torchvision

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
CACHE_DIR = Path.home() / ".cache" / "fedmef"
FASHION_MNIST_HELP = (
    "get Fashion-MNIST with 'sudo apt-get install dataset-fashion-mnist' (Debian) or put "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz from the Fashion-MNIST release in one folder and pass it as data dir"
)
CIFAR10_HELP = (
    "put the extracted 'cifar-10-batches-py' folder of the official CIFAR-10 python archive, or a "
    "cifar10.npz with x_train/y_train/x_test/y_test, in a folder and pass it as data dir (on this "
    "project's machines: ../shared/data/cifar10)"
)
CINIC10_HELP = (
    "download CINIC-10 from https://datashare.ed.ac.uk/handle/10283/3192, unpack it and pass the folder "
    "holding train/, valid/ and test/ as data dir"
)
TINY_IMAGENET_HELP = (
    "download https://cs231n.stanford.edu/tiny-imagenet-200.zip, unpack it and pass the "
    "tiny-imagenet-200 folder as data dir"
)


# The Fashion-MNIST release's own files, over HTTPS: its S3 site (fashion-mnist.s3-website...) serves
# plain HTTP only, so the copy in the release's GitHub repository, at a fixed commit. Same bytes: the
# MD5s are the release's (its README), the SHA-256s those TensorFlow Datasets records for the S3 files
# (tensorflow_datasets/url_checksums/fashion_mnist.txt), and both labels files of that commit match both.
_FASHION_MNIST_URL = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/"
    "b2617bb6d3ffa2e429640350f613e3291e10b141/data/fashion/"
)


class _Download(NamedTuple):
    """A file to fetch (an archive among them is unpacked) and the digests it must have."""

    url: str
    md5: str
    sha256: str


_DOWNLOADS = {
    "fashion-mnist": tuple(
        _Download(_FASHION_MNIST_URL + name, md5, sha256)
        for name, md5, sha256 in (
            (
                "train-images-idx3-ubyte.gz",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            ),
            (
                "train-labels-idx1-ubyte.gz",
                "25c81989df183df01b3e8a0aad5dffbe",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            ),
            (
                "t10k-images-idx3-ubyte.gz",
                "bef4ecab320f06d8554ea6380940ec79",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            ),
            (
                "t10k-labels-idx1-ubyte.gz",
                "bb300cfdad3c16e7a12a480ee83cd310",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            ),
        )
    ),
    # the official archive; its SHA-256 as Keras checks it (keras/src/datasets/cifar10.py)
    "cifar10": (
        _Download(
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        ),
    ),
}
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


class DataError(RuntimeError):
    """A dataset could not be found or read; the message says how to get it."""


class DataNotFound(DataError):
    """A dataset's files are not where it was looked for (as opposed to being there but damaged)."""


@dataclass(frozen=True)
class Standardisation:
    """Per-channel mean and std of a data set's pixels on the 0..1 scale: what turns its uint8 images
    into the float32 inputs a model sees."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``N x C x H x W`` -> float32 ``(pixels / 255 - mean) / std``, a new tensor.

        Always these four steps in this order, in float32, one element at a time: a batch so converted
        is bit for bit the rows of the whole set converted at once, which is how earlier versions held
        it, so runs stay comparable across versions.
        """
        x = pixels.to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)


@dataclass(frozen=True)
class Split:
    """uint8 NCHW images, int64 labels, and the :class:`Standardisation` that turns the images drawn
    for a batch into model inputs (:meth:`inputs`).

    A whole set is held as its pixels, a quarter of its float32 size (CIFAR-10's training set: 146 MiB
    rather than 585; every simulation worker holds one), and floats exist only for the batch drawn.
    """

    images: torch.Tensor
    labels: torch.Tensor
    standardise: Standardisation

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise TypeError(
                f"Split images must be uint8 N x C x H x W, got {self.images.dtype} of shape {tuple(self.images.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The standardised float32 images of ``rows``, as the model takes them."""
        return self.standardise(self.images[rows])

    def subset(self, rows: torch.Tensor | slice) -> Split:
        """The examples of ``rows`` (a view for a slice, a copy for an index tensor)."""
        return Split(self.images[rows], self.labels[rows], self.standardise)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]


# Per-channel statistics of the training sets, for standardising inputs.
STANDARDISATIONS = {
    "fashion-mnist": Standardisation((0.2860,), (0.3530,)),
    "cifar10": Standardisation((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cinic10": Standardisation((0.4789, 0.4723, 0.4305), (0.2421, 0.2383, 0.2587)),
    "tiny-imagenet": Standardisation((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


def _split(name: str, images: np.ndarray, labels: np.ndarray) -> Split:
    # np.require copies only what torch cannot take as it is: IDX arrays are read-only views of the file.
    pixels = torch.from_numpy(np.require(images, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]))
    return Split(pixels, torch.from_numpy(labels.astype(np.int64)), STANDARDISATIONS[name])


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
        raise DataError(
            f"{path} holds {len(raw)} bytes, its header promises {expected}: truncated; {FASHION_MNIST_HELP}"
        )
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_npz(path: Path, help_text: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, unpickling nothing; DataError (ending in ``help_text``) for
    a file that is not such an archive, is truncated or damaged."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path} holds a single .npy array, not an .npz archive; {help_text}")
        with loaded as arrays:
            # Members are read on access, so a damaged one (the zip's CRC check) raises here.
            return {key: arrays[key] for key in arrays.files}
    except (BadZipFile, zlib.error, OSError, ValueError, KeyError, EOFError) as exc:
        # numpy answers a file it cannot parse by suggesting allow_pickle, i.e. running code the file
        # holds: never pass that on.
        reason = "not an .npz archive of plain arrays" if "pickle" in str(exc) else str(exc)
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {reason}); {help_text}") from exc


def _checked_split(name: str, images: np.ndarray, labels: np.ndarray, source: Path, help_text: str) -> Split:
    if len(images) != len(labels):
        raise DataError(
            f"{source}: {len(images)} images but {len(labels)} labels; the files do not belong together, {help_text}"
        )
    return _split(name, images, labels)


def _cifar_images(x: np.ndarray, source: Path) -> np.ndarray:
    """Rows of 3072 bytes (the pickles' CHW order), NCHW, or NHWC (as Keras saves it) -> NCHW."""
    if x.ndim == 2 and x.shape[1] == 3072:
        return x.reshape(-1, 3, 32, 32)
    if x.shape[1:] == (3, 32, 32):
        return x
    if x.shape[1:] == (32, 32, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(
        f"{source}: images of shape {x.shape} are neither (N, 3072), (N, 3, 32, 32) nor (N, 32, 32, 3); {CIFAR10_HELP}"
    )


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(data_dir: str | Path | None = None) -> Dataset:
    """Fashion-MNIST (60k / 10k, 1x28x28) from ``data_dir``, else the Debian package's folder or the cache."""
    folders = [Path(data_dir)] if data_dir else [*FASHION_MNIST_DIRS, CACHE_DIR / "fashion-mnist"]
    for folder in folders:
        files = {
            stem: _find(folder, stem)
            for stem in (
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )
        }
        found = {stem: path for stem, path in files.items() if path is not None}
        if len(found) == len(files):
            parts = {stem: _read_idx(path) for stem, path in found.items()}
            train, test = (
                _checked_split(
                    "fashion-mnist",
                    parts[f"{s}-images-idx3-ubyte"][:, None],
                    parts[f"{s}-labels-idx1-ubyte"],
                    folder,
                    FASHION_MNIST_HELP,
                )
                for s in ("train", "t10k")
            )
            return Dataset("fashion-mnist", train, test, 10)
    raise DataNotFound(f"Fashion-MNIST not found in {', '.join(map(str, folders))}: {FASHION_MNIST_HELP}")


_CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def load_cifar10(data_dir: str | Path | None = None) -> Dataset:
    """CIFAR-10 (3x32x32) from the official python pickles or an ``.npz`` in ``data_dir`` (or the cache)."""
    folder = Path(data_dir) if data_dir else CACHE_DIR / "cifar10"
    npz = folder / "cifar10.npz" if folder.is_dir() else folder
    if npz.suffix == ".npz" and npz.is_file():
        parts = read_npz(npz, f"the file is damaged or not CIFAR-10's, {CIFAR10_HELP}")
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in parts]
        if missing:
            raise DataError(f"{npz} lacks {', '.join(missing)}; {CIFAR10_HELP}")
        return Dataset(
            "cifar10",
            _checked_split("cifar10", _cifar_images(parts["x_train"], npz), parts["y_train"], npz, CIFAR10_HELP),
            _checked_split("cifar10", _cifar_images(parts["x_test"], npz), parts["y_test"], npz, CIFAR10_HELP),
            10,
        )
    # torchvision's CIFAR10 takes the folder that holds cifar-10-batches-py; either may be given here.
    root = folder.parent if folder.name == "cifar-10-batches-py" else folder
    batches = root / "cifar-10-batches-py"
    if all((batches / n).is_file() for n in _CIFAR10_BATCHES):
        ensure_torchvision()
        from torchvision.datasets import CIFAR10

        try:
            train, test = (CIFAR10(str(root), train=is_train) for is_train in (True, False))
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as exc:
            raise DataError(
                f"cannot read {batches} ({exc}): its files are damaged or not those of the official archive, "
                f"{CIFAR10_HELP}"
            ) from exc

        def split(part: CIFAR10) -> Split:
            # torchvision turned the pickles' NCHW rows into NHWC by a transpose; undone, it is the file's order
            images = np.asarray(part.data).transpose(0, 3, 1, 2)
            return _checked_split("cifar10", images, np.asarray(part.targets), batches, CIFAR10_HELP)

        return Dataset("cifar10", split(train), split(test), 10)
    raise DataNotFound(f"CIFAR-10 not found in {folder}: {CIFAR10_HELP}")


def _image_folder(folder: Path, help_text: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names (sorted folder names) and (image file, label) pairs of a class-per-folder tree."""
    ensure_torchvision()
    from torchvision.datasets import ImageFolder

    try:
        # allow_empty: an empty class folder is the caller's to judge, with the classes in view
        found = ImageFolder(str(folder), allow_empty=True)
    except OSError as exc:
        raise DataError(f"cannot list the classes of {folder}: {exc}; {help_text}") from exc
    return found.classes, found.samples


def _image_split(name: str, files: list[tuple[str, int]], size: int, source: Path, help_text: str) -> Split:
    """(image file, label) pairs -> a Split of uint8 (N, 3, size, size); grayscale and palette images
    become RGB, as torchvision's image folders load them."""
    if not files:
        raise DataError(f"no images in {source}; {help_text}")
    ensure_torchvision()
    from torchvision.datasets.folder import pil_loader

    images = np.empty((len(files), 3, size, size), np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            pixels = np.asarray(pil_loader(path))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image {path}: {exc}; the file is damaged, {help_text}") from exc
        if pixels.shape != (size, size, 3):
            raise DataError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels, not {size}x{size}; {help_text}")
        images[i] = pixels.transpose(2, 0, 1)
    return _split(name, images, np.array([label for _, label in files]))


def _read_text(path: Path, help_text: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}; {help_text}") from exc


def load_cinic10(data_dir: str | Path | None = None) -> Dataset:
    """CINIC-10 (3x32x32; its train/ as train, test/ as test) from ``data_dir``'s class folders of PNGs."""
    root = Path(data_dir) if data_dir else CACHE_DIR / "cinic10"
    train_dir, test_dir = root / "train", root / "test"
    if not (train_dir.is_dir() and test_dir.is_dir()):
        raise DataNotFound(f"CINIC-10 not found in {root} (no train/ and test/ folders): {CINIC10_HELP}")
    (classes, train), (test_classes, test) = (_image_folder(d, CINIC10_HELP) for d in (train_dir, test_dir))
    if classes != test_classes:
        raise DataError(
            f"{root}: the class folders of train/ {classes} and test/ {test_classes} differ; {CINIC10_HELP}"
        )
    return Dataset(
        "cinic10",
        _image_split("cinic10", train, 32, train_dir, CINIC10_HELP),
        _image_split("cinic10", test, 32, test_dir, CINIC10_HELP),
        len(classes),
    )


def load_tiny_imagenet(data_dir: str | Path | None = None) -> Dataset:
    """Tiny ImageNet (3x64x64; its val/ as test) from the unpacked ``tiny-imagenet-200`` folder or its parent.

    Labels number the wnids of ``wnids.txt`` in sorted order, as an image-folder loader would.
    """
    root = Path(data_dir) if data_dir else CACHE_DIR / "tiny-imagenet"
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    wnids_file, annotations = root / "wnids.txt", root / "val" / "val_annotations.txt"
    if not (wnids_file.is_file() and annotations.is_file()):
        raise DataNotFound(
            f"Tiny ImageNet not found in {root} (no wnids.txt and val/val_annotations.txt): {TINY_IMAGENET_HELP}"
        )
    wnids = sorted(set(_read_text(wnids_file, TINY_IMAGENET_HELP).split()))
    # train/<wnid>/ holds images/ and a boxes file, which the image folder skips as no image
    classes, train = _image_folder(root / "train", TINY_IMAGENET_HELP)
    if classes != wnids:
        raise DataError(
            f"{root}: wnids.txt lists {sorted(set(wnids) - set(classes))} without a folder in train/ and train/ "
            f"has {sorted(set(classes) - set(wnids))} not in wnids.txt; {TINY_IMAGENET_HELP}"
        )
    label = {wnid: i for i, wnid in enumerate(wnids)}
    test = []
    for number, line in enumerate(_read_text(annotations, TINY_IMAGENET_HELP).splitlines(), 1):
        fields = line.split()  # file, wnid, then a bounding box
        if not fields:
            continue
        if len(fields) < 2 or fields[1] not in label:
            raise DataError(
                f"{annotations} line {number}: expected '<file> <wnid from wnids.txt> ...', "
                f"got {line!r}; {TINY_IMAGENET_HELP}"
            )
        test.append((str(root / "val" / "images" / fields[0]), label[fields[1]]))
    return Dataset(
        "tiny-imagenet",
        _image_split("tiny-imagenet", train, 64, root / "train", TINY_IMAGENET_HELP),
        _image_split("tiny-imagenet", test, 64, annotations, TINY_IMAGENET_HELP),
        len(wnids),
    )


LOADERS = {
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cinic10": load_cinic10,
    "tiny-imagenet": load_tiny_imagenet,
}
_HELP = {
    "fashion-mnist": FASHION_MNIST_HELP,
    "cifar10": CIFAR10_HELP,
    "cinic10": CINIC10_HELP,
    "tiny-imagenet": TINY_IMAGENET_HELP,
}


def _fetch(download: _Download, path: Path, help_text: str) -> None:
    """Download ``download.url`` to ``path`` and check its SHA-256 and MD5."""
    url = download.url
    digests = {"SHA-256": hashlib.sha256(), "MD5": hashlib.md5(usedforsecurity=False)}
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
            while chunk := response.read(1 << 20):
                for digest in digests.values():
                    digest.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        raise DataError(
            f"{url} answered HTTP {exc.code} {exc.reason}; to use local files instead, {help_text}"
        ) from exc
    except _NETWORK_ERRORS as exc:
        raise DataError(
            f"cannot download {url} ({getattr(exc, 'reason', exc)}): this machine seems to be offline; "
            f"to use local files instead, {help_text}"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc}; free some space or choose another data dir") from exc
    for kind, expected in (("SHA-256", download.sha256), ("MD5", download.md5)):
        if digests[kind].hexdigest() != expected:
            raise DataError(
                f"{url} arrived with {kind} {digests[kind].hexdigest()}, not {expected}: the download is "
                f"corrupt; try again or, to use local files instead, {help_text}"
            )


def _extract_tar(archive: Path, dest: Path) -> None:
    """Extract the regular files of ``archive`` into ``dest``; an archive naming paths outside it is rejected."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts:
                    raise DataError(f"{archive.name} holds the unsafe path {member.name!r}; refusing to extract it")
                if member.isfile():  # links and devices: none is needed, and a link could point outside dest
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None, "extractfile gives a file object for every regular member"
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"cannot extract {archive.name}: {exc}; the download is damaged, try again") from exc


def download_dataset(name: str, dest_dir: str | Path) -> Path:
    """Download Fashion-MNIST or CIFAR-10 into ``dest_dir`` and return it.

    Everything is fetched, checked and unpacked in a temporary folder inside ``dest_dir`` first, so a
    failed download leaves no partial file where the loaders look.
    """
    if name not in _DOWNLOADS:
        raise DataError(
            f"{name!r} cannot be downloaded automatically; {_HELP[name]}"
            if name in _HELP
            else f"unknown dataset {name!r}; choose one of {sorted(_DOWNLOADS)}"
        )
    dest = Path(dest_dir)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
            staging = Path(tmp) / "files"
            staging.mkdir()
            for download in _DOWNLOADS[name]:
                file = Path(tmp) / download.url.rsplit("/", 1)[-1]
                _fetch(download, file, _HELP[name])
                if file.name.endswith(".tar.gz"):
                    _extract_tar(file, staging)
                else:
                    file.rename(staging / file.name)
            for file in sorted(p for p in staging.rglob("*") if p.is_file()):
                target = dest / file.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, target)
    except OSError as exc:
        raise DataError(f"cannot write into {dest}: {exc}; choose a writable data dir") from exc
    return dest


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """Dataset ``name`` from ``data_dir`` (default: its usual folders and ``~/.cache/fedmef/<name>``).

    With ``download``, a dataset not found there is first downloaded into ``data_dir`` or the cache.
    """
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(LOADERS)}")
    try:
        return LOADERS[name](data_dir)
    except DataNotFound:
        if not download:
            raise
    download_dataset(name, Path(data_dir) if data_dir else CACHE_DIR / name)
    return LOADERS[name](data_dir)
