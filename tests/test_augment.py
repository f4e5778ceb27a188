"""The random crop + flip augmentation: per-sample, shape-preserving, reproducible, a crop of the pad."""

import pytest
import torch

from common.data.augment import random_crop_flip


def test_each_image_is_a_crop_of_its_padded_self_possibly_mirrored():
    images = torch.randn(64, 3, 32, 32)
    out = random_crop_flip(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    offsets, flips = set(), 0
    for i in range(64):
        matches = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy : dy + 32, dx : dx + 32]))
        ]
        assert matches, i
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(offsets) > 20  # offsets drawn per image, not one per batch
    assert 16 < flips < 48


def test_the_same_generator_state_gives_the_same_batch():
    images = torch.randn(8, 1, 28, 28)
    a = random_crop_flip(images, torch.Generator().manual_seed(5))
    b = random_crop_flip(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="N x C x H x W"):
        random_crop_flip(images[0], torch.Generator())
