"""A SuperNode's partition file (node config ``data-path``): what it records, and every way it can be wrong
refused with a DataError that names the file, what is wrong and how to remake it."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import client.data as client_data_module
from client.data import load_client_data
from common.data.datasets import STANDARDISATIONS, DataError, Dataset, Split
from common.data.partition_files import PartitionMeta, write_partition
from common.protocol.config import parse_run_config

FASHION = parse_run_config({})  # the default run: Fashion-MNIST
REMAKE = "python -m deploy.prepare_partitions"


def _dataset(num_classes: int = 3, labels_up_to: int = 3, n: int = 12) -> Dataset:
    """n 1 x 4 x 4 Fashion-MNIST-like images labelled 0..labels_up_to-1 (beyond its classes when more)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    train = Split(pixels, torch.arange(n) % labels_up_to, STANDARDISATIONS["fashion-mnist"])
    return Dataset("fashion-mnist", train, train.subset(slice(0, 2)), num_classes)


def _write(path: Path, dataset: Dataset | None = None, partition_id: int = 0, num_partitions: int = 2) -> Path:
    """Rows 0..8 as training and 9..11 as validation examples of ``dataset``, as partition_id of num_partitions."""
    dataset = dataset or _dataset()
    meta = PartitionMeta.of(dataset, FASHION, partition_id, num_partitions)
    write_partition(path, dataset, np.arange(9), np.arange(9, 12), meta)
    return path


def _load(path: Path, run=FASHION):
    return load_client_data(run, {"data-path": str(path)})


def _refused(path: Path, match: str, run=FASHION) -> str:
    """The message of the DataError loading ``path`` raises: it names the file and says how to remake it."""
    with pytest.raises(DataError, match=match) as caught:
        _load(path, run)
    message = str(caught.value)
    assert str(path) in message and REMAKE in message, message
    return message


def test_a_partition_file_records_where_it_comes_from_and_loads_as_such(tmp_path):
    dataset = _dataset()
    data = _load(_write(tmp_path / "partition.npz", dataset, partition_id=2, num_partitions=3))
    assert data.partition_id == 2 and data.dataset == "fashion-mnist"
    assert data.num_classes == 3 and data.in_channels == 1
    assert torch.equal(data.train.images, dataset.train.images[:9]) and torch.equal(
        data.val.labels, torch.arange(9, 12) % 3
    )
    with np.load(tmp_path / "partition.npz", allow_pickle=False) as f:
        meta = json.loads(f["meta"].item())
    assert meta == {
        "dataset": "fashion-mnist",
        "num_classes": 3,
        "image_shape": [1, 4, 4],
        "partition_id": 2,
        "num_partitions": 3,
        "partitioner": FASHION.partitioner,
        "dirichlet_alpha": FASHION.dirichlet_alpha,
        "seed": FASHION.seed,
        "val_fraction": FASHION.val_fraction,
        "max_examples": 0,
        "format_version": 2,
    }


def test_a_partition_of_another_data_set_is_refused_on_every_call_though_the_file_is_read_once(tmp_path):
    path = _write(tmp_path / "partition.npz")
    assert len(_load(path).train) == 9  # read, and cached for this path
    message = _refused(
        path, "holds a fashion-mnist partition but this run trains on cifar10", parse_run_config({"dataset": "cifar10"})
    )
    assert "data-path" in message


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"x_train,y_train\n0.5,3\n", id="text"),
        pytest.param(b"", id="empty"),
        pytest.param("npy", id="a single .npy array"),
        pytest.param("object array", id="pickled objects"),
    ],
)
def test_a_file_that_is_no_partition_file_is_refused_without_inviting_unsafe_loading(tmp_path, content):
    path = tmp_path / "partition.npz"
    if content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros((2, 1, 4, 4), np.float32))
    elif content == "object array":
        with open(path, "wb") as f:
            np.savez(f, x_train=np.array([{"a": 1}], dtype=object))
    else:
        path.write_bytes(content)
    message = _refused(path, "not a partition file")
    assert "allow_pickle" not in message and "pickle.load" not in message


def _member_data_offset(path: Path, member: str) -> tuple[int, int]:
    """Where the stored bytes of ``member`` start in the zip file at ``path``, and how many there are."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_a_truncated_partition_file_is_refused(tmp_path, keep):
    path = _write(tmp_path / "partition.npz")
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    _refused(path, "damaged")


@pytest.mark.parametrize("member", ["x_train.npy", "y_val.npy", "meta.npy"])
def test_a_flipped_bit_inside_an_array_is_caught_by_the_zip_checksum(tmp_path, member):
    path = _write(tmp_path / "partition.npz")
    start, size = _member_data_offset(path, member)
    raw = bytearray(path.read_bytes())
    raw[start + size - 2] ^= 0x04  # in the array's data, past the .npy header
    path.write_bytes(bytes(raw))
    _refused(path, "BadZipFile: Bad CRC-32")


def test_labels_beyond_the_files_classes_are_refused(tmp_path):
    path = _write(tmp_path / "partition.npz", _dataset(num_classes=3, labels_up_to=5))
    _refused(path, r"labels 0\.\.4, outside the 0\.\.2 of its 3 classes")


def test_a_file_without_metadata_from_an_older_version_is_refused_with_remake(tmp_path):
    path = tmp_path / "partition.npz"
    images, labels = np.zeros((4, 1, 4, 4), np.float32), np.zeros(4, np.int64)
    with open(path, "wb") as f:  # what versions before the metadata wrote
        np.savez(f, x_train=images, y_train=labels, x_val=images, y_val=labels, num_classes=np.int64(3))
    _refused(path, "has no metadata.*older version.*remake it")


def _rewrite(path: Path, **changes: np.ndarray) -> None:
    with np.load(path, allow_pickle=False) as f:
        arrays = {key: f[key] for key in f.files}
    with open(path, "wb") as f:
        np.savez(f, **{**arrays, **changes})


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        (
            {"x_train": np.zeros((9, 3, 4, 4), np.uint8)},
            r"train images of shape \(9, 3, 4, 4\).*not uint8 N x 1 x 4 x 4",
        ),
        ({"x_val": np.zeros((3, 1, 4, 4), np.float64)}, r"val images .*float64"),
        ({"x_train": np.zeros((9, 16), np.uint8)}, r"train images of shape \(9, 16\)"),
        ({"y_train": np.zeros(8, np.int64)}, r"9 train images but labels of shape \(8,\)"),
        ({"y_val": np.zeros(3, np.float32)}, r"labels .*float32.*not one integer each"),
        ({"x_train": np.zeros((0, 1, 4, 4), np.uint8), "y_train": np.zeros(0, np.int64)}, "no training examples"),
        ({"meta": np.array("{not json")}, "damaged metadata"),
        ({"meta": np.array(3)}, "damaged metadata"),
        ({"meta": np.array(json.dumps({"format_version": 2, "dataset": "cifar10"}))}, "damaged metadata"),
        ({"meta": np.array(json.dumps({"format_version": 3}))}, "format version 3, this node reads version 2"),
    ],
)
def test_arrays_or_metadata_that_do_not_fit_together_are_refused(tmp_path, changes, says):
    path = _write(tmp_path / "partition.npz")
    _rewrite(path, **changes)
    _refused(path, says)


def test_a_version_1_file_of_standardised_float32_images_is_refused_with_remake(tmp_path):
    path = _write(tmp_path / "partition.npz")
    with np.load(path, allow_pickle=False) as f:
        meta, x_train, x_val = json.loads(f["meta"].item()), f["x_train"], f["x_val"]
    _rewrite(
        path,
        meta=np.array(json.dumps({**meta, "format_version": 1})),
        x_train=(x_train / np.float32(255) - np.float32(0.2860)) / np.float32(0.3530),
        x_val=(x_val / np.float32(255) - np.float32(0.2860)) / np.float32(0.3530),
    )
    _refused(path, "format version 1, this node reads version 2.*remake it")


def test_a_file_naming_a_data_set_this_node_does_not_know_is_refused(tmp_path):
    path = _write(tmp_path / "partition.npz")
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(f["meta"].item())
    _rewrite(path, meta=np.array(json.dumps({**meta, "dataset": "imagenet"})))
    _refused(path, "damaged metadata")


def test_a_partition_id_outside_the_partitions_in_the_metadata_is_refused(tmp_path):
    path = _write(tmp_path / "partition.npz")
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(f["meta"].item())
    _rewrite(path, meta=np.array(json.dumps({**meta, "partition_id": 2, "num_partitions": 2})))
    _refused(path, "damaged metadata")


# ------------------------------------------------------------------- simulation partitions


@pytest.mark.parametrize("key", ["partition-id", "num-partitions"])
@pytest.mark.parametrize("value", ["x", "1.5", "", True])
def test_a_partition_number_that_is_not_a_whole_number_names_the_node_config_key(key, value):
    node_config = {"partition-id": 0, "num-partitions": 2, key: value}
    with pytest.raises(
        DataError, match=f"node config {key} must be a whole number, got {value!r}: fix the SuperNode's --node-config"
    ):
        load_client_data(FASHION, node_config)


@pytest.mark.parametrize(("partition_id", "num_partitions"), [(5, 2), (-1, 2), (0, 0)])
def test_a_partition_outside_the_partitions_names_the_node_config_keys(monkeypatch, partition_id, num_partitions):
    monkeypatch.setattr(client_data_module, "_dataset", lambda *args: _dataset(n=40))
    node_config = {"partition-id": partition_id, "num-partitions": num_partitions}
    with pytest.raises(
        DataError, match=f"node config partition-id={partition_id} num-partitions={num_partitions}: .*--node-config"
    ):
        load_client_data(parse_run_config({"partitioner": "iid"}), node_config)
