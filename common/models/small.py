"""The small CNNs of FedDIP's experiments: LeNet-5 (Fashion-MNIST) and an AlexNet for 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from common.models.factory import LayerFactory


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) on 28x28 inputs: 5x5 'same' stem, average-pool subsampling as in
    the original (under SAP the pooling keeps only its input's shape for backward)."""

    def __init__(self, f: LayerFactory, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            f.conv(in_channels, 6, 5, after_relu=False, stem=True), f.norm2d(6), f.relu(), f.pool('avg'),
            f.conv(6, 16, 5, padding=0), f.norm2d(16), f.relu(), f.pool('avg'),
        )
        self.classifier = nn.Sequential(f.linear(16 * 5 * 5, 120), f.relu(), f.linear(120, 84), f.relu(),
                                        f.linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class AlexNet(nn.Module):
    """A five-convolution AlexNet (Krizhevsky et al. 2012) sized for 32x32 CIFAR images."""

    def __init__(self, f: LayerFactory, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            f.conv(in_channels, 64, 3, after_relu=False, stem=True), f.norm2d(64), f.relu(), f.pool('max'),
            f.conv(64, 192, 3), f.norm2d(192), f.relu(), f.pool('max'),
            f.conv(192, 384, 3), f.norm2d(384), f.relu(),
            f.conv(384, 256, 3), f.norm2d(256), f.relu(),
            f.conv(256, 256, 3), f.norm2d(256), f.relu(), f.pool('max'),
        )
        self.classifier = nn.Sequential(f.linear(256 * 4 * 4, 512), f.relu(), f.linear(512, 512), f.relu(),
                                        f.linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def lenet5(f: LayerFactory, **kwargs) -> LeNet5:
    return LeNet5(f, **kwargs)


def alexnet(f: LayerFactory, **kwargs) -> AlexNet:
    return AlexNet(f, **kwargs)
