"""Tests for common.data.datasets on tiny synthetic files (downloads are served from local files)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import common.data.datasets as datasets_module
from common.data.datasets import (
    DataError,
    DataNotFound,
    download_dataset,
    load_cifar10,
    load_cinic10,
    load_dataset,
    load_fashion_mnist,
    load_tiny_imagenet,
)
from common.data.vision import ensure_torchvision

FM_MEAN, FM_STD = 0.2860, 0.3530
C10_MEAN = (0.4914, 0.4822, 0.4465)
C10_STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    """Point the default cache at an empty folder, so no test sees (or fills) the user's real one."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets_module, "CACHE_DIR", cache)
    return cache


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write(path, data: bytes, gz: bool):
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _fashion_files(folder, n_train=5, n_test=3, gz=True, side=28):
    rng = np.random.default_rng(0)
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for stem, arr in parts.items():
        _write(folder / (stem + (".gz" if gz else "")), _idx_bytes(arr), gz)
    return parts


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_loads_idx(tmp_path, gz):
    parts = _fashion_files(tmp_path, gz=gz)
    ds = load_fashion_mnist(tmp_path)
    assert ds.name == "fashion-mnist" and ds.num_classes == 10 and ds.in_channels == 1
    assert ds.train.images.shape == (5, 1, 28, 28) and ds.test.images.shape == (3, 1, 28, 28)
    assert ds.train.images.dtype == torch.uint8  # held as the file's pixels, standardised per batch
    assert ds.train.labels.dtype == torch.int64
    assert ds.train.labels.tolist() == [0, 1, 2, 3, 4]
    assert ds.test.labels.tolist() == [0, 3, 6]
    assert len(ds.train) == 5 and len(ds.test) == 3
    assert torch.equal(ds.train.images[:, 0], torch.from_numpy(parts["train-images-idx3-ubyte"]))
    expected = (torch.from_numpy(parts["train-images-idx3-ubyte"]).float() / 255 - FM_MEAN) / FM_STD
    torch.testing.assert_close(ds.train.inputs(slice(None))[:, 0], expected)
    # through the dispatcher too
    ds2 = load_dataset("fashion-mnist", tmp_path)
    assert torch.equal(ds2.test.images, ds.test.images)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_truncated_idx_payload_raises(tmp_path, gz):
    _fashion_files(tmp_path, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    arr = np.zeros((5, 28, 28), np.uint8)
    _write(tmp_path / name, _idx_bytes(arr)[:-100], gz)
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist(tmp_path)


def test_idx_with_trailing_bytes_raises(tmp_path):
    _fashion_files(tmp_path)
    _write(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(5, np.uint8)) + b"\x00\x00", True)
    with pytest.raises(DataError, match="header promises"):
        load_fashion_mnist(tmp_path)


def test_idx_truncated_in_header_raises_data_error(tmp_path):
    _fashion_files(tmp_path)
    _write(tmp_path / "t10k-images-idx3-ubyte.gz", bytes([0, 0, 8, 3]) + struct.pack(">I", 3), True)
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist(tmp_path)


def test_damaged_gzip_stream_raises(tmp_path):
    _fashion_files(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])  # cut inside the gzip stream
    with pytest.raises(DataError, match="damaged|truncated"):
        load_fashion_mnist(tmp_path)


def test_non_uint8_idx_raises(tmp_path):
    _fashion_files(tmp_path)
    raw = bytearray(_idx_bytes(np.zeros(5, np.uint8)))
    raw[2] = 0x0D  # float32 IDX
    _write(tmp_path / "train-labels-idx1-ubyte.gz", bytes(raw), True)
    with pytest.raises(DataError, match="uint8 IDX"):
        load_fashion_mnist(tmp_path)


def test_image_label_count_mismatch_raises(tmp_path):
    _fashion_files(tmp_path)
    _write(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(4, np.uint8)), True)
    with pytest.raises(DataError):
        load_fashion_mnist(tmp_path)


def test_missing_fashion_mnist_folder_gives_apt_hint(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_incomplete_fashion_mnist_folder_gives_hint(tmp_path):
    _fashion_files(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path)


# ----------------------------------------------------------------------------- CIFAR-10


def _cifar_arrays(n_train=4, n_test=2):
    """Images whose R, G, B planes are constant 0, 128, 255 (rows of 3072 bytes, CHW like the
    official archive), so the channel order and per-channel standardisation are checkable."""
    planes = np.concatenate([np.full(1024, v, np.uint8) for v in (0, 128, 255)])
    return {
        "x_train": np.tile(planes, (n_train, 1)),
        "y_train": np.arange(n_train, dtype=np.int64) % 10,
        "x_test": np.tile(planes, (n_test, 1)),
        "y_test": np.array([9, 1][:n_test], dtype=np.int64),
    }


def _check_cifar(ds, n_train=4, n_test=2):
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.in_channels == 3
    assert ds.train.images.shape == (n_train, 3, 32, 32) and ds.test.images.shape == (n_test, 3, 32, 32)
    assert ds.train.labels.dtype == torch.int64
    assert ds.train.labels.tolist() == list(range(n_train))
    assert ds.test.labels.tolist() == [9, 1][:n_test]
    for c, v in enumerate((0, 128, 255)):
        expected = (v / 255 - C10_MEAN[c]) / C10_STD[c]
        assert torch.equal(ds.train.images[:, c], torch.full((n_train, 32, 32), v, dtype=torch.uint8))
        torch.testing.assert_close(ds.train.inputs(slice(None))[:, c], torch.full((n_train, 32, 32), expected))


def test_cifar10_npz_in_folder(tmp_path):
    np.savez(tmp_path / "cifar10.npz", **_cifar_arrays())
    _check_cifar(load_cifar10(tmp_path))
    _check_cifar(load_dataset("cifar10", tmp_path))


def test_cifar10_npz_path(tmp_path):
    np.savez(tmp_path / "cifar10.npz", **_cifar_arrays())
    _check_cifar(load_cifar10(tmp_path / "cifar10.npz"))


def test_cifar10_python_pickles(tmp_path, monkeypatch):
    batches = _write_pickles(tmp_path, _cifar_arrays(n_train=5), [9, 1], monkeypatch)
    _check_cifar(load_cifar10(tmp_path), n_train=5)
    _check_cifar(load_cifar10(batches), n_train=5)


def test_cifar10_pickles_that_are_not_the_official_files_are_refused(tmp_path):
    batches = _write_pickles(tmp_path, _cifar_arrays(n_train=5), [9, 1])  # well-formed, not the archive's MD5s
    with pytest.raises(DataError, match="not those of the official archive") as info:
        load_cifar10(tmp_path)
    assert str(batches) in str(info.value)


def test_cifar10_npz_missing_key_raises(tmp_path):
    arrays = _cifar_arrays()
    del arrays["y_test"]
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(DataError, match="cifar10.npz"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_cifar10_npz_that_is_damaged_or_no_npz_says_so_without_inviting_unsafe_loading(tmp_path, damage):
    npz = tmp_path / "cifar10.npz"
    np.savez(npz, **_cifar_arrays())
    npz.write_bytes(npz.read_bytes()[:1000] if damage == "truncated" else b"x_train,y_train\n")
    with pytest.raises(DataError, match="cifar10.npz.*damaged") as caught:
        load_cifar10(tmp_path)
    assert "allow_pickle" not in str(caught.value)


def test_cifar10_damaged_pickle_raises(tmp_path, monkeypatch):
    batches = _write_pickles(tmp_path, _cifar_arrays(n_train=5), [9, 1], monkeypatch)
    (batches / "data_batch_3").write_bytes(b"not a pickle")  # its MD5 no longer the one expected
    with pytest.raises(DataError, match="damaged"):
        load_cifar10(tmp_path)


def test_cifar10_npz_hwc_layout_is_not_scrambled(tmp_path):
    arrays = _cifar_arrays()
    for split in ("x_train", "x_test"):
        arrays[split] = arrays[split].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # NHWC
    np.savez(tmp_path / "cifar10.npz", **arrays)
    try:
        ds = load_cifar10(tmp_path)
    except DataError:
        return  # rejecting the layout is fine too
    _check_cifar(ds)


def test_cifar10_requires_data_dir_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="data dir"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        load_cifar10(tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist", tmp_path)


def test_cifar10_npz_nchw_layout(tmp_path):
    arrays = _cifar_arrays()
    for split in ("x_train", "x_test"):
        arrays[split] = arrays[split].reshape(-1, 3, 32, 32)
    np.savez(tmp_path / "cifar10.npz", **arrays)
    _check_cifar(load_cifar10(tmp_path))


def test_cifar10_npz_bad_image_shape_raises(tmp_path):
    arrays = _cifar_arrays()
    arrays["x_train"] = np.zeros((4, 3, 1024), np.uint8)  # 3072 bytes per image, but not a known layout
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(DataError, match="shape"):
        load_cifar10(tmp_path)


def test_cifar10_npz_count_mismatch_raises(tmp_path):
    arrays = _cifar_arrays()
    arrays["y_train"] = arrays["y_train"][:3]
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(DataError, match="labels"):
        load_cifar10(tmp_path)


def _write_pickles(root, arrays, test_labels, monkeypatch=None):
    """The official archive's cifar-10-batches-py/ in ``root``, with ``arrays`` in it (str keys: the
    archive's Python 2 pickles unpickle so with latin-1); with ``monkeypatch``, torchvision's CIFAR10 is
    told these files' MD5s, as if they were the official ones."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    for i in range(5):
        entry = {"data": arrays["x_train"][i : i + 1], "labels": [int(arrays["y_train"][i])]}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(entry))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": arrays["x_test"], "labels": test_labels}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane", "automobile"]}))
    if monkeypatch is not None:
        ensure_torchvision()
        from torchvision.datasets import CIFAR10

        def md5(name):
            return hashlib.md5((folder / name).read_bytes()).hexdigest()

        monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)])
        monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
        monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5("batches.meta")})
    return folder


def test_cifar10_pickle_count_mismatch_raises(tmp_path, monkeypatch):
    _write_pickles(tmp_path, _cifar_arrays(n_train=5), [9], monkeypatch)
    with pytest.raises(DataError, match="labels"):
        load_cifar10(tmp_path)


def test_cifar10_pickle_bad_row_size_raises(tmp_path, monkeypatch):
    arrays = _cifar_arrays(n_train=5)
    arrays["x_test"] = np.zeros((2, 3000), np.uint8)
    _write_pickles(tmp_path, arrays, [9, 1], monkeypatch)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path)


# ----------------------------------------------------------------------------- image folders


def _save_image(path, pixels: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _cinic_folders(root):
    """Two classes; 'airplane' images are RGB (0, 128, 255), 'cat' images grayscale 128."""
    rgb = np.zeros((32, 32, 3), np.uint8) + np.array([0, 128, 255], np.uint8)
    gray = np.full((32, 32), 128, np.uint8)
    for split, n in (("train", 3), ("valid", 1), ("test", 2)):
        for i in range(n):
            _save_image(root / split / "airplane" / f"a{i}.png", rgb)
            _save_image(root / split / "cat" / f"c{i}.png", gray)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_cinic10_loads_class_folders(tmp_path):
    _cinic_folders(tmp_path)
    ds = load_cinic10(tmp_path)
    assert ds.name == "cinic10" and ds.num_classes == 2 and ds.in_channels == 3
    assert ds.train.images.shape == (6, 3, 32, 32) and ds.test.images.shape == (4, 3, 32, 32)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.test.labels.tolist() == [0, 0, 1, 1]
    assert ds.train.images[0, :, 0, 0].tolist() == [0, 128, 255]
    assert ds.train.images[3, :, 0, 0].tolist() == [128, 128, 128]  # grayscale -> RGB
    assert ds.train.standardise == datasets_module.STANDARDISATIONS["cinic10"]
    assert torch.equal(load_dataset("cinic10", tmp_path).test.images, ds.test.images)


def _tiny_imagenet_folder(root):
    """wnids listed out of order; 2 training images per class, 3 validation images."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("n02\nn01\n")
    for wnid in ("n01", "n02"):
        (root / "train" / wnid).mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t10\t10\n")
        for i in range(2):
            pixels = rng.integers(0, 256, (64, 64, 3), np.uint8)
            _save_image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", pixels)
    annotations = []
    for i, wnid in enumerate(("n02", "n01", "n02")):
        pixels = rng.integers(0, 256, (64, 64) if i == 0 else (64, 64, 3), np.uint8)  # one grayscale
        _save_image(root / "val" / "images" / f"val_{i}.JPEG", pixels)
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")


def test_tiny_imagenet_loads_folder_or_its_parent(tmp_path):
    _tiny_imagenet_folder(tmp_path / "tiny-imagenet-200")
    ds = load_tiny_imagenet(tmp_path)
    assert ds.name == "tiny-imagenet" and ds.num_classes == 2 and ds.in_channels == 3
    assert ds.train.images.shape == (4, 3, 64, 64) and ds.test.images.shape == (3, 3, 64, 64)
    assert ds.train.labels.tolist() == [0, 0, 1, 1]  # n01 -> 0, n02 -> 1
    assert ds.test.labels.tolist() == [1, 0, 1]
    assert ds.train.images.dtype == torch.uint8
    again = load_dataset("tiny-imagenet", tmp_path / "tiny-imagenet-200")
    assert torch.equal(again.test.images, ds.test.images)


@pytest.mark.parametrize("suffix", ["png", "JPEG"])
def test_truncated_image_names_the_file(tmp_path, suffix):
    _cinic_folders(tmp_path)
    path = tmp_path / "test" / "cat" / f"c1.{suffix}"
    _save_image(path, np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match=f"c1.{suffix}"):
        load_cinic10(tmp_path)


def test_image_of_wrong_size_or_garbage_raises(tmp_path):
    _cinic_folders(tmp_path)
    _save_image(tmp_path / "train" / "cat" / "big.png", np.zeros((40, 40), np.uint8))
    with pytest.raises(DataError, match=r"big.png is 40x40 pixels, not 32x32"):
        load_cinic10(tmp_path)
    (tmp_path / "train" / "cat" / "big.png").write_bytes(b"no image at all")
    with pytest.raises(DataError, match="big.png"):
        load_cinic10(tmp_path)


def test_cinic10_mismatched_class_folders_raise(tmp_path):
    _cinic_folders(tmp_path)
    (tmp_path / "test" / "dog").mkdir()
    with pytest.raises(DataError, match="class folders"):
        load_cinic10(tmp_path)


def test_tiny_imagenet_bad_annotation_and_missing_class_raise(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    _tiny_imagenet_folder(root)
    with open(root / "val" / "val_annotations.txt", "a") as fh:
        fh.write("val_9.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="line 4"):
        load_tiny_imagenet(root)
    (root / "wnids.txt").write_text("n01\nn02\nn03\n")
    with pytest.raises(DataError, match="n03"):
        load_tiny_imagenet(root)


@pytest.mark.parametrize("name, hint", [("cinic10", "datashare.ed.ac.uk"), ("tiny-imagenet", "tiny-imagenet-200.zip")])
def test_image_folder_datasets_need_their_folder(tmp_path, name, hint):
    with pytest.raises(DataNotFound, match=hint):
        load_dataset(name)
    with pytest.raises(DataNotFound, match=hint):
        load_dataset(name, tmp_path)
    with pytest.raises(DataError, match="cannot be downloaded automatically.*" + hint):
        load_dataset(name, tmp_path, download=True)


# ----------------------------------------------------------------------------- downloads


def _serve(monkeypatch, name, files):
    """Make ``download_dataset(name)`` fetch ``files`` through file:// URLs, with their true digests."""
    table = tuple(
        datasets_module._Download(
            f.as_uri(), hashlib.md5(f.read_bytes()).hexdigest(), hashlib.sha256(f.read_bytes()).hexdigest()
        )
        for f in files
    )
    monkeypatch.setitem(datasets_module._DOWNLOADS, name, table)


def _offline(monkeypatch):
    def urlopen(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _fashion_server(tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    _fashion_files(server)
    _serve(monkeypatch, "fashion-mnist", sorted(server.iterdir()))


def test_download_fashion_mnist_then_load_offline(tmp_path, monkeypatch):
    _fashion_server(tmp_path, monkeypatch)
    data = tmp_path / "data"
    ds = load_dataset("fashion-mnist", data, download=True)
    assert ds.train.images.shape == (5, 1, 28, 28)
    assert _files(data) == sorted(
        [
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
        ]
    )
    assert sorted(p.name for p in data.iterdir()) == _files(data)  # and no temporary folder left behind
    _offline(monkeypatch)  # found locally now: no second download
    assert torch.equal(load_dataset("fashion-mnist", data, download=True).train.images, ds.train.images)


def test_download_without_data_dir_goes_to_cache(tmp_path, monkeypatch, empty_cache):
    monkeypatch.setattr(datasets_module, "FASHION_MNIST_DIRS", (tmp_path / "no-debian-package",))
    _fashion_server(tmp_path, monkeypatch)
    with pytest.raises(DataNotFound):
        load_dataset("fashion-mnist")
    load_dataset("fashion-mnist", download=True)
    assert len(_files(empty_cache / "fashion-mnist")) == 4
    assert len(load_dataset("fashion-mnist").test) == 3  # later runs find the cache without download


def _tar_gz(path, entries):
    """A .tar.gz of (name, bytes) files; bytes None makes a symlink to /etc/passwd instead."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_download_cifar10_extracts_pickles(tmp_path, monkeypatch):
    pickles = _write_pickles(tmp_path, _cifar_arrays(n_train=5), [9, 1], monkeypatch)
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    _tar_gz(
        archive,
        [(f"cifar-10-batches-py/{p.name}", p.read_bytes()) for p in sorted(pickles.iterdir())]
        + [("cifar-10-batches-py/link", None)],
    )
    _serve(monkeypatch, "cifar10", [archive])
    data = tmp_path / "data"
    _check_cifar(load_dataset("cifar10", data, download=True), n_train=5)
    assert _files(data) == sorted(f"cifar-10-batches-py/{p.name}" for p in pickles.iterdir())  # no link, no archive
    assert [p.name for p in data.iterdir()] == ["cifar-10-batches-py"]


def test_cifar10_download_is_the_archive_torchvision_reads():
    ensure_torchvision()
    from torchvision.datasets import CIFAR10

    (download,) = datasets_module._DOWNLOADS["cifar10"]
    assert (download.url, download.md5) == (CIFAR10.url, CIFAR10.tgz_md5)


@pytest.mark.parametrize("evil", ["../evil", "cifar-10-batches-py/../../evil", "/tmp/evil-absolute"])
def test_download_rejects_tar_path_traversal(tmp_path, monkeypatch, evil):
    archive = tmp_path / "server" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    _tar_gz(archive, [("cifar-10-batches-py/data_batch_1", b"fine"), (evil, b"pwned")])
    _serve(monkeypatch, "cifar10", [archive])
    data = tmp_path / "data"
    with pytest.raises(DataError, match="unsafe path"):
        download_dataset("cifar10", data)
    assert _files(data) == [] and list(data.iterdir()) == []
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize(
    "name, hint", [("fashion-mnist", "sudo apt-get install dataset-fashion-mnist"), ("cifar10", "cifar10.npz")]
)
def test_download_offline_says_so_and_leaves_nothing(tmp_path, monkeypatch, name, hint):
    _offline(monkeypatch)
    data = tmp_path / "data"
    with pytest.raises(DataError, match="offline") as info:
        load_dataset(name, data, download=True)
    assert hint in str(info.value)
    assert list(data.iterdir()) == []


def test_download_broken_mid_stream_leaves_nothing(tmp_path, monkeypatch):
    class Response(io.BytesIO):
        def read(self, size=-1):
            if self.tell():
                raise ConnectionResetError("connection reset by peer")
            return super().read(100)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Response(b"x" * 1000))
    data = tmp_path / "data"
    with pytest.raises(DataError, match="offline"):
        download_dataset("fashion-mnist", data)
    assert list(data.iterdir()) == []


@pytest.mark.parametrize(("field", "kind"), [("md5", "MD5"), ("sha256", "SHA-256")])
def test_download_with_wrong_digest_leaves_nothing(tmp_path, monkeypatch, field, kind):
    _fashion_server(tmp_path, monkeypatch)
    last = datasets_module._DOWNLOADS["fashion-mnist"][-1]
    wrong = last._replace(**{field: "0" * len(getattr(last, field))})
    monkeypatch.setitem(
        datasets_module._DOWNLOADS, "fashion-mnist", datasets_module._DOWNLOADS["fashion-mnist"][:-1] + (wrong,)
    )
    data = tmp_path / "data"
    with pytest.raises(DataError, match=f"{kind} .*corrupt"):
        download_dataset("fashion-mnist", data)
    assert list(data.iterdir()) == []


def test_download_unknown_dataset_raises(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        download_dataset("mnist", tmp_path)
