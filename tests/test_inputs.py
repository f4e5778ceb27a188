"""Data held as uint8 pixels gives the model bit for bit the inputs of the float32 sets earlier versions held.

Versions before uint8 storage standardised a whole set to float32 once, at load, and a batch was its
rows. A running experiment matrix compares runs across code versions, so batches (augmented too), a
local round's weights and an evaluation must not move by one bit. :class:`_FloatSplit` is that old
holding, built here the old way; everything downstream of the data is the same code in both.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
import torch

from client.trainer import LocalResult, _stream, build_local_model, local_train
from common.data.datasets import STANDARDISATIONS, Split, Standardisation, load_dataset
from common.nn.training import evaluate
from common.protocol.config import parse_run_config
from common.protocol.instructions import Instructions
from common.pruning.masks import Masks, load_masks
from server.server_app import global_model
from server.strategy import make_strategy

pytestmark = pytest.mark.usefixtures("one_thread")


def _old_standardise(pixels: torch.Tensor, standardise: Standardisation) -> torch.Tensor:
    """What ``datasets._standardise`` did to a whole set before uint8 storage."""
    x = torch.from_numpy(pixels.numpy().astype(np.float32)).div_(255.0)
    x.sub_(torch.tensor(standardise.mean).view(1, -1, 1, 1)).div_(torch.tensor(standardise.std).view(1, -1, 1, 1))
    return x.contiguous()


class _FloatSplit:
    """The old Split: the whole set as standardised float32, a batch its rows (the old ``images[idx]``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    @classmethod
    def of(cls, split: Split) -> _FloatSplit:
        return cls(_old_standardise(split.images, split.standardise), split.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, rows: torch.Tensor | slice) -> torch.Tensor:
        return self.images[rows]

    def subset(self, rows: torch.Tensor | slice) -> _FloatSplit:
        return _FloatSplit(self.images[rows], self.labels[rows])


def _old(split: Split) -> Split:
    """``split`` held the old way, passed where a Split goes: the code under test uses only ``len``,
    ``labels``, ``inputs`` and ``subset``."""
    return cast(Split, _FloatSplit.of(split))


def _random_split(name: str, n: int, side: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    channels = len(STANDARDISATIONS[name].mean)
    pixels = torch.randint(0, 256, (n, channels, side, side), generator=g, dtype=torch.uint8)
    return Split(pixels, torch.randint(0, 10, (n,), generator=g), STANDARDISATIONS[name])


@pytest.mark.parametrize("name", sorted(STANDARDISATIONS))
def test_every_pixel_value_of_every_channel_standardises_as_in_the_whole_float_set(name):
    # Each output element depends only on its pixel value and channel, so all 256 values in every channel
    # cover every input; 3 x 5 images leave tails outside the vectorised loops too.
    channels = len(STANDARDISATIONS[name].mean)
    values = torch.arange(256, dtype=torch.uint8).view(-1, 1, 1, 1).expand(256, channels, 3, 5)
    split = Split(values.contiguous(), torch.zeros(256, dtype=torch.int64), STANDARDISATIONS[name])
    old = _old_standardise(split.images, split.standardise)
    assert torch.equal(split.inputs(slice(None)), old)
    rows = torch.randperm(256, generator=torch.Generator().manual_seed(1))[:37]
    assert torch.equal(split.inputs(rows), old[rows])
    assert torch.equal(split.inputs(slice(200, 203)), old[200:203])


def test_a_split_holds_uint8_pixels_only():
    with pytest.raises(TypeError, match="uint8"):
        Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), STANDARDISATIONS["fashion-mnist"])


def _instructions(server_round: int, **config) -> tuple[Instructions, dict[str, torch.Tensor], Masks]:
    cfg = parse_run_config({"batch-size": 32, "max-local-steps": 3, "grad-batches": 2, "augment": True, **config})
    torch.manual_seed(server_round)
    in_channels = 1 if cfg.model == "lenet5" else 3
    strategy = make_strategy(cfg, global_model(cfg, 10, in_channels))
    return strategy.instructions(server_round), strategy.global_state(), strategy.masks


def test_augmented_training_batches_are_the_old_ones():
    data = _random_split("cifar10", 100, 32)
    ins, _, _ = _instructions(1, model="resnet18", width=4)
    assert ins.augment
    new = _stream(data, ins, torch.Generator().manual_seed(ins.seed), torch.device("cpu"))
    old = _stream(_old(data), ins, torch.Generator().manual_seed(ins.seed), torch.device("cpu"))
    steps = 0
    for (images, labels), (old_images, old_labels) in zip(new, old, strict=True):
        assert images.dtype == torch.float32 and torch.equal(images, old_images) and torch.equal(labels, old_labels)
        steps += 1
    assert steps == 4  # 100 examples, batches of 32: the last batch, of 4, too


def _local_round(data: Split, server_round: int, **config) -> tuple[dict[str, torch.Tensor], LocalResult]:
    ins, state, masks = _instructions(server_round, **config)
    model = build_local_model(ins, 10, data.inputs(slice(0, 1)).shape[1])
    model.load_state_dict(state, strict=False)
    load_masks(model, masks)
    result = local_train(model, masks, data, ins)
    return model.state_dict(), result


@pytest.fixture(scope="module")
def fashion_mnist_train() -> Split:
    return load_dataset("fashion-mnist").train.subset(slice(0, 200))


@pytest.mark.parametrize("server_round", [1, 2], ids=["training", "adjustment-round"])
@pytest.mark.parametrize("model", ["lenet5 on fashion-mnist", "resnet18 w4 on cifar10-shaped"])
def test_a_local_round_ends_at_the_weights_of_the_old_float_path(model, server_round, fashion_mnist_train):
    if model.startswith("lenet5"):
        data, config = fashion_mnist_train, {"model": "lenet5"}
    else:
        data, config = _random_split("cifar10", 96, 32), {"model": "resnet18", "width": 4}
    state, result = _local_round(data, server_round, **config)
    old_state, old_result = _local_round(_old(data), server_round, **config)
    assert state.keys() == old_state.keys()
    for key in state:
        assert torch.equal(state[key], old_state[key]), key
    assert result.loss == old_result.loss and result.steps == old_result.steps == 3
    if server_round == 2:  # an adjustment round: BaE and the top-K gradient pass (micro-batched, exact)
        topk, old_topk = result.topk, old_result.topk
        assert topk is not None and old_topk is not None and topk.keys() == old_topk.keys()
        for key in topk:
            assert all(torch.equal(a, b) for a, b in zip(topk[key], old_topk[key], strict=True)), key
        assert result.marked > 0 and result.marked_norm_end == old_result.marked_norm_end
        assert result.topk_micro_batch == old_result.topk_micro_batch


def test_evaluation_is_that_of_the_old_float_path():
    data = _random_split("cifar10", 70, 32, seed=2)
    cfg = parse_run_config({"model": "resnet18", "width": 4})
    torch.manual_seed(0)
    model = global_model(cfg, 10, 3)
    assert evaluate(model, data, batch_size=32) == evaluate(model, _old(data), batch_size=32)
