"""The ServerApp refuses, before any round, a model that cannot take the data set's images."""

from __future__ import annotations

import pytest
import torch

from common.data.datasets import Dataset, Split, Standardisation
from common.protocol.config import ConfigError, parse_run_config
from server.server_app import check_model_takes


def _dataset(channels: int, size: int) -> Dataset:
    images = torch.zeros(4, channels, size, size, dtype=torch.uint8)
    split = Split(images, torch.arange(4) % 2, Standardisation((0.5,) * channels, (0.25,) * channels))
    return Dataset("synthetic", split, split, 10)


def test_lenet5_on_32x32_colour_images_is_a_config_error_naming_the_model_and_the_image_size():
    cfg = parse_run_config({"model": "lenet5", "dataset": "cifar10"})
    with pytest.raises(ConfigError, match=r"model = 'lenet5' does not take the cifar10 images \(3 x 32 x 32\)"):
        check_model_takes(cfg, _dataset(3, 32))


@pytest.mark.parametrize("model, channels, size", [("lenet5", 1, 28), ("resnet18", 3, 32), ("alexnet", 3, 32)])
def test_a_model_made_for_the_images_passes(model, channels, size):
    check_model_takes(
        parse_run_config({"model": model, "width": 8} if model == "resnet18" else {"model": model}),
        _dataset(channels, size),
    )
