"""Tests for common.data.partition on synthetic labels (Flower Datasets' partitioners underneath)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from common.data.datasets import STANDARDISATIONS, Dataset, Split
from common.data.partition import client_data, label_histogram, partition_indices, train_val_split

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """6,000 labels, class-sorted like an image-folder dataset, so an unshuffled split would show it."""
    return np.repeat(np.arange(NUM_CLASSES), 600)


def _mean_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    counts = label_histogram(labels, parts, NUM_CLASSES).astype(float)
    p = counts / counts.sum(1, keepdims=True)
    log_p = np.log(p, out=np.zeros_like(p), where=p > 0)  # 0 log 0 = 0
    return float(np.mean(-(p * log_p).sum(1)))


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_partitions_are_disjoint_and_cover_everything(labels, scheme):
    parts = partition_indices(labels, 20, scheme=scheme)
    assert len(parts) == 20
    everything = np.concatenate(parts)
    assert len(everything) == len(labels)
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))
    assert min(len(p) for p in parts) >= 10


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_same_seed_same_partitions_other_seed_different(labels, scheme):
    a = partition_indices(labels, 10, scheme=scheme, seed=1)
    b = partition_indices(labels.copy(), 10, scheme=scheme, seed=1)  # another array, same content
    c = partition_indices(labels, 10, scheme=scheme, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_result_is_cached_and_read_only(labels):
    a = partition_indices(labels, 10, seed=7)
    b = partition_indices(labels.astype(np.int32), 10, seed=7)  # same labels in another dtype: same entry
    assert all(x is y for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError):
        a[0][0] = 1


def test_smaller_alpha_skews_labels_more(labels):
    skewed = partition_indices(labels, 10, alpha=0.1)
    even = partition_indices(labels, 10, alpha=100.0)
    assert _mean_entropy(labels, skewed) < _mean_entropy(labels, even) - 0.5
    assert _mean_entropy(labels, even) > 0.95 * np.log(NUM_CLASSES)


def test_iid_is_balanced_in_size_and_labels(labels):
    parts = partition_indices(labels, 12, scheme="iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _mean_entropy(labels, parts) > 0.95 * np.log(NUM_CLASSES)  # shuffled before the shards are cut


def test_impossible_request_fails_fast_with_advice(labels):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="fewer partitions"):
        partition_indices(labels, 700, min_partition_size=10)  # 7,000 > 6,000 samples
    with pytest.raises(ValueError, match="fewer partitions"):
        partition_indices(labels[:100], 10, scheme="iid", min_partition_size=11)
    # Possible on paper (10 x 10 = 100) but no Dirichlet draw is that even: Flower's retries run out.
    with pytest.raises(ValueError, match="raise alpha"):
        partition_indices(labels[::60], 10, alpha=0.1, min_partition_size=10)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "shards"}, "scheme"),
        ({"num_partitions": 0}, "num_partitions"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition_indices(labels, **{"num_partitions": 5, **kwargs})


@pytest.mark.parametrize("bad", [np.array([], np.int64), np.zeros((4, 4), np.int64), np.array([0.5, 1.5])])
def test_bad_labels_raise_value_error(bad):
    with pytest.raises(ValueError, match="labels"):
        partition_indices(bad, 1, min_partition_size=1)


def test_train_val_split_is_disjoint_deterministic_and_sized():
    indices = np.arange(100, 200)
    train, val = train_val_split(indices, 0.1, seed=3)
    assert len(train) == 90 and len(val) == 10
    assert np.array_equal(np.sort(np.concatenate([train, val])), indices)
    again = train_val_split(indices, 0.1, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, train_val_split(indices, 0.1, seed=4)[1])
    assert len(train_val_split(indices, 0.0, seed=3)[1]) == 0
    assert [len(x) for x in train_val_split(np.arange(1), 0.9, seed=0)] == [1, 0]  # train keeps one sample
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(indices, 1.0, seed=0)


def _dataset(n: int = 400) -> Dataset:
    labels = torch.arange(n) % 4
    images = labels.to(torch.uint8).view(-1, 1, 1, 1).expand(n, 1, 2, 2).contiguous()  # each image holds its label
    train = Split(images, labels, STANDARDISATIONS["fashion-mnist"])
    return Dataset("synthetic", train, train.subset(slice(0, 8)), 4)


def test_client_data_gives_each_client_its_own_rows():
    ds = _dataset()
    seen = []
    for pid in range(4):
        train, val = client_data(ds, pid, 4, alpha=1.0)
        assert train.images.shape[1:] == (1, 2, 2) and len(train) > 0 and len(val) > 0
        assert torch.equal(train.images[:, 0, 0, 0].long(), train.labels)  # images stayed with their labels
        seen += [len(train), len(val)]
    assert sum(seen) == 400
    parts = partition_indices(ds.train.labels.numpy(), 4, alpha=1.0)
    train, val = client_data(ds, 2, 4, alpha=1.0, val_fraction=0.2)
    assert len(train) + len(val) == len(parts[2]) and len(val) == round(0.2 * len(parts[2]))


@pytest.mark.parametrize("pid", [-1, 4])
def test_client_data_rejects_partition_id_out_of_range(pid):
    with pytest.raises(ValueError, match="0 to 3"):
        client_data(_dataset(), pid, 4)


def test_label_histogram_counts_and_checks_range():
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 3)
    assert hist.tolist() == [[1, 1, 0], [0, 1, 3]]
    with pytest.raises(ValueError, match="num_classes"):
        label_histogram(labels, [np.arange(6)], 2)
