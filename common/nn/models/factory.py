"""One place that turns (norm, SAP) choices into layers, so every architecture builds the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from common.nn.layers import Pool2d, ReLU, SparseConv2d, SparseLinear
from common.nn.nsconv import RELU_GAMMA, NSConv2d
from common.nn.sapcache import DEFAULT_SAP_FORMAT, check_format

Norm = Literal["batchnorm", "nsconv", "none"]
NORMS: tuple[str, ...] = ("batchnorm", "nsconv", "none")


@dataclass(frozen=True)
class LayerFactory:
    """Builds convolutions, norms and activations for one model.

    ``norm``: ``batchnorm`` (conv-BN-ReLU), ``nsconv`` (NSConv-ReLU, no BatchNorm anywhere) or
    ``none`` (plain sparse conv, no normalisation). ``act_sparsity``: ``None`` for plain autograd,
    else SAP's ``s_ta`` for every convolution except the stem. ``gamma``: NSConv's γ after a ReLU
    (eq. 7). ``sap_linear`` extends SAP to the linear layers, which the paper leaves out: they have no
    NSConv, and their pruned-activation gradients are the worst approximated (cosine 0.5-0.7 with the
    exact gradient on classifier heads at s_ta 0.9, against about 0.8 on convolutions).
    ``sap_format``: how every SAP layer stores its cached values (:data:`common.nn.sapcache.SAP_FORMATS`).
    ``sap_relative``: whether a SAP layer fed by a ReLU codes its cached positions relative to the ReLU's
    1-bit mask (lossless, never larger; off only to measure what it saves, as ``bench.memory`` does).
    """

    norm: Norm = "nsconv"
    act_sparsity: float | None = None
    gamma: float = RELU_GAMMA
    sap_linear: bool = False
    sap_format: str = DEFAULT_SAP_FORMAT
    sap_relative: bool = True

    def __post_init__(self):
        check_format(self.sap_format)
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.act_sparsity is not None and not 0.0 <= self.act_sparsity <= 1.0:
            raise ValueError(f"act_sparsity must be None or lie in [0, 1], got {self.act_sparsity}")

    def conv(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        after_relu: bool = True,
        stem: bool = False,
        padding: int | None = None,
    ) -> SparseConv2d:
        """A ``kernel``x``kernel`` convolution, 'same' padding unless ``padding`` is given.

        ``after_relu`` tells NSConv whether its input is a ReLU output (γ = RELU_GAMMA keeps the
        variance) or a centred tensor (γ = 1). The ``stem`` reads the input batch, which the training
        loop holds anyway: caching it sparsely would free nothing and only blur the first layer's
        gradient, so the stem never uses SAP.
        """
        kwargs: dict[str, Any] = dict(
            stride=stride,
            padding=kernel // 2 if padding is None else padding,
            groups=groups,
            act_sparsity=None if stem else self.act_sparsity,
            sap_capable=not stem,
            sap_format=self.sap_format,
            sap_relative=self.sap_relative,
        )
        if self.norm == "nsconv":
            return NSConv2d(c_in, c_out, kernel, bias=True, gamma=self.gamma if after_relu else 1.0, **kwargs)
        return SparseConv2d(c_in, c_out, kernel, bias=self.norm == "none", **kwargs)

    @property
    def residual_scale(self) -> float:
        """What a residual branch is multiplied by before the addition.

        BatchNorm re-centres and re-scales each branch. Without it every addition adds the branch's
        variance to the skip path's, so activations and gradients grow stage by stage: a 90 %-sparse
        NSConv ResNet18 reached logit std 1.6 at initialisation and diverged within 7 SGD steps at
        lr 0.01. Scaling the branch by α = 0.2, as normaliser-free ResNets do (Brock et al., 2021),
        keeps the growth to (1 + α²) per block.
        """
        return 1.0 if self.norm == "batchnorm" else 0.2

    def norm2d(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if self.norm == "batchnorm" else nn.Identity()

    def relu(self, upper: float | None = None) -> ReLU:
        return ReLU(upper, bitmask=self.act_sparsity is not None)

    def pool(self, kind: str, kernel: int = 2) -> Pool2d:
        return Pool2d(kind, kernel, lean=self.act_sparsity is not None)

    def linear(self, c_in: int, c_out: int) -> SparseLinear:
        sap = self.sap_linear and self.act_sparsity is not None
        return SparseLinear(
            c_in,
            c_out,
            act_sparsity=self.act_sparsity if sap else None,
            sap_capable=self.sap_linear,
            sap_format=self.sap_format,
            sap_relative=self.sap_relative,
        )
