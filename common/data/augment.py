"""Per-sample data augmentation for 32x32 training batches: the random crop and horizontal flip of
He et al. (2016) that CIFAR training uses, on an already standardised batch tensor.

One small torch function, cheap enough for a Raspberry Pi (one pad and one gather per batch); it
stands in until torchvision's transforms come in, and draws from the caller's generator, so a run
stays reproducible.
"""

from __future__ import annotations

import torch


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Each image of an ``N x C x H x W`` batch zero-padded by ``padding``, cropped back to ``H x W``
    at an offset drawn uniformly per image, and mirrored left-right with probability 1/2.

    Zero is the data set's mean after standardisation, so the padding shows the mean colour: hence a
    standardised float batch (:meth:`~common.data.datasets.Split.inputs`), not the stored uint8 pixels,
    which have no value for it.
    """
    if images.dim() != 4:
        raise ValueError(f"expected an N x C x H x W batch, got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy + torch.arange(h)  # N x H
    cols = dx + torch.arange(w)  # N x W
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None]
    # advanced indexing moves the channel axis last: N x H x W x C
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
