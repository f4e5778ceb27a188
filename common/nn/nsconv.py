"""Normalized sparse convolution (NSConv, FedMef §3.4, eq. 7).

Each output filter is standardised over its ACTIVE weights only and scaled by
``γ / sqrt(active count)``; pruned entries are forced back to 0. For a PyTorch convolution (a plain
sum over the receptive field, no 1/c_in factor) this scale gives Theorem 1: every output channel has
mean 0 whatever the input mean, because each filter's active weights sum to exactly 0.

A note on Theorem 1's variance ``γ²(σ_f² + μ_f²)``: that is the variance over random weights as well
as data. For one fixed standardised filter and inputs with independent entries, the μ_f² term
cancels with the filter's zero sum and the output variance is ``γ² σ_f²`` (both agree for centred
inputs). :data:`RELU_GAMMA` uses the latter to keep variance constant behind a ReLU.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from common.nn.layers import SparseConv2d

#: γ that maps unit-variance pre-activations through ReLU to unit-variance NSConv outputs:
#: Var[relu(z)] = 1/2 - 1/(2π) for z ~ N(0, 1), so γ = (1/2 - 1/(2π))^(-1/2) ≈ 1.7129.
RELU_GAMMA = 1.0 / math.sqrt(0.5 - 0.5 / math.pi)


def standardize_filters(
    theta: torch.Tensor, mask: torch.Tensor, gain: torch.Tensor | None = None, gamma: float = 1.0, eps: float = 1e-6
) -> torch.Tensor:
    """Eq. 7: ``θ̂_i = g_i · γ · (θ_i − μ_i) / sqrt(σ_i² + eps) / sqrt(n_i) ⊙ m_i``.

    μ_i, σ_i² and n_i are the mean, variance and count of filter i's ACTIVE weights; ``g_i`` an
    optional per-filter gain. An empty or single-entry filter gives θ̂_i = 0, never a division by 0.
    """
    m = mask.to(theta.dtype)
    dims = tuple(range(1, theta.dim()))
    count = m.sum(dims, keepdim=True).clamp(min=1.0)
    mean = (theta * m).sum(dims, keepdim=True) / count
    centred = (theta - mean) * m
    var = centred.square().sum(dims, keepdim=True) / count
    scale = gamma * torch.rsqrt((var + eps) * count)
    if gain is not None:
        scale = scale * gain.view(-1, *([1] * len(dims)))
    return centred * scale


class NSConv2d(SparseConv2d):
    """Sparse convolution with filter-wise standardisation over active weights (eq. 7), no BatchNorm.

    ``gain=True`` adds a learned per-filter gain (folded into the weight, so it costs no activation
    memory); the conv bias plays the role of BatchNorm's shift.
    """

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-6, gain: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma = gamma
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(self.out_channels)) if gain else None

    def weight_fn(self):
        return functools.partial(standardize_filters, gamma=self.gamma, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:.4g}"
