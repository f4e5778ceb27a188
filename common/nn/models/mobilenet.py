"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs: stride-1 stem and first 24-channel stage.

The expansion 1x1 convolution reads the linear bottleneck (no ReLU in front), so SAP prunes a
roughly centred tensor there; the depthwise and projection convolutions read ReLU6 outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from common.nn.models.factory import LayerFactory

# (expansion t, output channels c, repeats n, first stride s); strides of the paper's ImageNet
# table with the first two downsamplings removed for 32x32 inputs.
_CIFAR_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    def __init__(self, f: LayerFactory, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [f.conv(c_in, hidden, 1, after_relu=False), f.norm2d(hidden), f.relu(6.0)]
        layers += [
            f.conv(hidden, hidden, 3, stride, groups=hidden),
            f.norm2d(hidden),
            f.relu(6.0),
            f.conv(hidden, c_out, 1),
            f.norm2d(c_out),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out
        self.alpha = f.residual_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.alpha if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, f: LayerFactory, num_classes: int = 10, in_channels: int = 3, last_channels: int = 1280):
        super().__init__()
        self.stem = nn.Sequential(f.conv(in_channels, 32, 3, after_relu=False, stem=True), f.norm2d(32), f.relu(6.0))
        blocks, c_in = [], 32
        for t, c, n, s in _CIFAR_SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(f, c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            f.conv(c_in, last_channels, 1, after_relu=False), f.norm2d(last_channels), f.relu(6.0)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = f.linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


def mobilenet_v2(f: LayerFactory, **kwargs) -> MobileNetV2:
    return MobileNetV2(f, **kwargs)
