"""CIFAR-style ResNets (He et al. 2016): 3x3 stem, no max-pool, four stages, global average pool.

Every convolution reads a ReLU output (ReLU-Conv order, as SAP and Theorem 1 assume); the residual
addition keeps nothing for backward.
"""

from __future__ import annotations

import torch
from torch import nn

from common.nn.models.factory import LayerFactory


class _Residual(nn.Module):
    """``relu(branch(x) · α + shortcut(x))``; a block builds its branch's layers, then calls :meth:`join`
    (after them, so parameters keep the order of the data path)."""

    def join(self, f: LayerFactory, c_in: int, c_out: int, stride: int) -> None:
        self.shortcut = _shortcut(f, c_in, c_out, stride)
        self.relu_out = f.relu()
        self.alpha = f.residual_scale

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_out(self.branch(x) * self.alpha + self.shortcut(x))


class BasicBlock(_Residual):
    expansion = 1

    def __init__(self, f: LayerFactory, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * self.expansion
        self.conv1, self.bn1, self.relu1 = f.conv(c_in, width, 3, stride), f.norm2d(width), f.relu()
        self.conv2, self.bn2 = f.conv(width, c_out, 3), f.norm2d(c_out)
        self.join(f, c_in, c_out, stride)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))


class Bottleneck(_Residual):
    expansion = 4

    def __init__(self, f: LayerFactory, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * self.expansion
        self.conv1, self.bn1, self.relu1 = f.conv(c_in, width, 1), f.norm2d(width), f.relu()
        self.conv2, self.bn2, self.relu2 = f.conv(width, width, 3, stride), f.norm2d(width), f.relu()
        self.conv3, self.bn3 = f.conv(width, c_out, 1), f.norm2d(c_out)
        self.join(f, c_in, c_out, stride)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.bn3(self.conv3(out))


def _shortcut(f: LayerFactory, c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(f.conv(c_in, c_out, 1, stride), f.norm2d(c_out))


class ResNet(nn.Module):
    """``base_width`` channels in the stem and first stage, doubling per stage (64 is He et al.'s;
    a smaller one, e.g. 16, gives the same depth and structure at about 1/16 of the compute)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, ...],
        f: LayerFactory,
        num_classes: int = 10,
        in_channels: int = 3,
        base_width: int = 64,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            f.conv(in_channels, base_width, 3, after_relu=False, stem=True), f.norm2d(base_width), f.relu()
        )
        stages, c_in = [], base_width
        for i, depth in enumerate(depths):
            width = base_width * 2**i
            blocks = []
            for j in range(depth):
                blocks.append(block(f, c_in, width, stride=2 if i > 0 and j == 0 else 1))
                c_in = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = f.linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(f: LayerFactory, **kwargs) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), f, **kwargs)


def resnet34(f: LayerFactory, **kwargs) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), f, **kwargs)


def resnet50(f: LayerFactory, **kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), f, **kwargs)
