"""Tests for common.datasets on tiny synthetic files (nothing is downloaded)."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from common.datasets import DataError, load_cifar10, load_dataset, load_fashion_mnist

FM_MEAN, FM_STD = 0.2860, 0.3530
C10_MEAN = (0.4914, 0.4822, 0.4465)
C10_STD = (0.2470, 0.2435, 0.2616)


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
    assert ds.train.images.dtype == torch.float32
    assert ds.train.labels.dtype == torch.int64
    assert ds.train.labels.tolist() == [0, 1, 2, 3, 4]
    assert ds.test.labels.tolist() == [0, 3, 6]
    assert len(ds.train) == 5 and len(ds.test) == 3
    expected = (torch.from_numpy(parts["train-images-idx3-ubyte"]).float() / 255 - FM_MEAN) / FM_STD
    torch.testing.assert_close(ds.train.images[:, 0], expected)
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
        torch.testing.assert_close(ds.train.images[:, c], torch.full((n_train, 32, 32), expected))


def test_cifar10_npz_in_folder(tmp_path):
    np.savez(tmp_path / "cifar10.npz", **_cifar_arrays())
    _check_cifar(load_cifar10(tmp_path))
    _check_cifar(load_dataset("cifar10", tmp_path))


def test_cifar10_npz_path(tmp_path):
    np.savez(tmp_path / "cifar10.npz", **_cifar_arrays())
    _check_cifar(load_cifar10(tmp_path / "cifar10.npz"))


def test_cifar10_python_pickles(tmp_path):
    arrays = _cifar_arrays(n_train=5)
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for i in range(5):
        entry = {b"data": arrays["x_train"][i:i + 1], b"labels": [int(arrays["y_train"][i])]}
        (batches / f"data_batch_{i + 1}").write_bytes(pickle.dumps(entry))
    (batches / "test_batch").write_bytes(pickle.dumps({b"data": arrays["x_test"], b"labels": [9, 1]}))
    _check_cifar(load_cifar10(tmp_path), n_train=5)
    _check_cifar(load_cifar10(batches), n_train=5)


def test_cifar10_npz_missing_key_raises(tmp_path):
    arrays = _cifar_arrays()
    del arrays["y_test"]
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(DataError, match="cifar10.npz"):
        load_cifar10(tmp_path)


def test_cifar10_damaged_pickle_raises(tmp_path):
    for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / n).write_bytes(b"not a pickle")
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


def _write_pickles(folder, arrays, test_labels):
    for i in range(5):
        entry = {b"data": arrays["x_train"][i:i + 1], b"labels": [int(arrays["y_train"][i])]}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(entry))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": arrays["x_test"], b"labels": test_labels}))


def test_cifar10_pickle_count_mismatch_raises(tmp_path):
    _write_pickles(tmp_path, _cifar_arrays(n_train=5), test_labels=[9])
    with pytest.raises(DataError, match="labels"):
        load_cifar10(tmp_path)


def test_cifar10_pickle_bad_row_size_raises(tmp_path):
    arrays = _cifar_arrays(n_train=5)
    arrays["x_test"] = np.zeros((2, 3000), np.uint8)
    _write_pickles(tmp_path, arrays, test_labels=[9, 1])
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(tmp_path)
