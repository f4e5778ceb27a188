"""The small CNNs of FedDIP's experiments: LeNet-5 (Fashion-MNIST) and an AlexNet for 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from common.nn.models.factory import LayerFactory


def _conv_relu(f: LayerFactory, c_in: int, c_out: int, kernel: int, **kwargs) -> list[nn.Module]:
    return [f.conv(c_in, c_out, kernel, **kwargs), f.norm2d(c_out), f.relu()]


class _ConvClassifier(nn.Module):
    """``features`` (convolutions), then a three-layer perceptron on the flattened maps."""

    def __init__(self, features: list[nn.Module], f: LayerFactory, flat: int, hidden: tuple[int, int], classes: int):
        super().__init__()
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            f.linear(flat, hidden[0]), f.relu(), f.linear(hidden[0], hidden[1]), f.relu(), f.linear(hidden[1], classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class LeNet5(_ConvClassifier):
    """LeNet-5 (LeCun et al. 1998) on 28x28 inputs: 5x5 'same' stem, average-pool subsampling as in
    the original (under SAP the pooling keeps only its input's shape for backward)."""

    def __init__(self, f: LayerFactory, num_classes: int = 10, in_channels: int = 1):
        features = [
            *_conv_relu(f, in_channels, 6, 5, after_relu=False, stem=True),
            f.pool("avg"),
            *_conv_relu(f, 6, 16, 5, padding=0),
            f.pool("avg"),
        ]
        super().__init__(features, f, 16 * 5 * 5, (120, 84), num_classes)


class AlexNet(_ConvClassifier):
    """A five-convolution AlexNet (Krizhevsky et al. 2012) sized for 32x32 CIFAR images."""

    def __init__(self, f: LayerFactory, num_classes: int = 10, in_channels: int = 3):
        features = [
            *_conv_relu(f, in_channels, 64, 3, after_relu=False, stem=True),
            f.pool("max"),
            *_conv_relu(f, 64, 192, 3),
            f.pool("max"),
            *_conv_relu(f, 192, 384, 3),
            *_conv_relu(f, 384, 256, 3),
            *_conv_relu(f, 256, 256, 3),
            f.pool("max"),
        ]
        super().__init__(features, f, 256 * 4 * 4, (512, 512), num_classes)


def lenet5(f: LayerFactory, **kwargs) -> LeNet5:
    return LeNet5(f, **kwargs)


def alexnet(f: LayerFactory, **kwargs) -> AlexNet:
    return AlexNet(f, **kwargs)
