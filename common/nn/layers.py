"""Masked convolution / linear layers and the activation, each with optional SAP.

Every prunable layer carries its mask as a ``mask`` buffer (so NSConv can standardise over the
active weights and a state dict carries the structure) and an ``act_sparsity`` attribute: ``None``
caches its input as plain autograd would, a float ``s_ta`` caches it through SAP
(:mod:`common.nn.sap`), its kept values stored in the layer's ``sap_format``
(:mod:`common.nn.sapcache`), its positions relative to the 1-bit mask of the bit-masked ReLU that
produced the input where there is one and ``sap_relative`` is on (:func:`common.nn.sap.relu_pass_bits`).
In both cases the effective weight is recomputed in backward rather than kept. The client sets SAP
and its format from the server's config; the layers decide nothing.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from common.nn.sap import ConvOp, LinearOp, bitmask_relu, lean_avg_pool2d, lean_max_pool2d, masked_layer
from common.nn.sapcache import DEFAULT_SAP_FORMAT, check_format


def masked_weight(theta: torch.Tensor, mask: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    """``θ ⊙ m``: the weight of a plain sparse layer."""
    return theta * mask


class _Masked(nn.Module):
    """What SparseConv2d and SparseLinear share: the mask buffer, SAP switch and weight function.

    A mixin placed before ``nn.Conv2d`` / ``nn.Linear``; it defines no ``__init__`` and no
    ``nn.Module`` method, so the MRO still reaches the torch layer before ``nn.Module``. Declared
    below: what it reads from that layer and its own attributes (``bias`` is left to
    ``nn.Module.__getattr__``: declaring it would clash with how ``nn.Linear`` types it).
    """

    weight: torch.Tensor
    mask: torch.Tensor
    gain: nn.Parameter | None
    act_sparsity: float | None
    sap_capable: bool
    sap_format: str
    sap_relative: bool

    def _add_mask(self, act_sparsity: float | None, sap_capable: bool, sap_format: str, sap_relative: bool) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.register_parameter("gain", None)
        self.act_sparsity = act_sparsity
        self.sap_capable = sap_capable
        self.sap_format = check_format(sap_format)
        self.sap_relative = sap_relative

    def weight_fn(self):
        """``(θ, mask, gain) -> w``; must be differentiable, it is re-run in backward."""
        return masked_weight

    def effective_weight(self) -> torch.Tensor:
        return self.weight_fn()(self.weight, self.mask, self.gain)

    def _apply_masked(self, x: torch.Tensor, op) -> torch.Tensor:
        return masked_layer(
            x,
            self.weight,
            self.mask,
            self.gain,
            self.bias,
            self.weight_fn(),
            op,
            self.act_sparsity,
            self.sap_format,
            self.sap_relative,
        )


class SparseConv2d(_Masked, nn.Conv2d):
    """``nn.Conv2d`` computing with ``weight ⊙ mask``, its input cached by SAP when enabled."""

    def __init__(
        self,
        *args,
        act_sparsity: float | None = None,
        sap_capable: bool = True,
        sap_format: str = DEFAULT_SAP_FORMAT,
        sap_relative: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._add_mask(act_sparsity, sap_capable, sap_format, sap_relative)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The factory passes int paddings; a string one ('same') would fail in ConvOp's backward, which needs ints.
        padding = cast(tuple[int, ...], self.padding)
        return self._apply_masked(x, ConvOp(self.stride, padding, self.dilation, self.groups))


class SparseLinear(_Masked, nn.Linear):
    """``nn.Linear`` computing with ``weight ⊙ mask``, its input cached by SAP when enabled."""

    def __init__(
        self,
        *args,
        act_sparsity: float | None = None,
        sap_capable: bool = True,
        sap_format: str = DEFAULT_SAP_FORMAT,
        sap_relative: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._add_mask(act_sparsity, sap_capable, sap_format, sap_relative)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_masked(x, LinearOp())


class ReLU(nn.Module):
    """ReLU, or ReLU6 with ``upper=6``; with ``bitmask=True`` it keeps 1 bit per element for backward.

    Never in-place: an in-place ReLU would make autograd keep its full output alive.
    """

    def __init__(self, upper: float | None = None, bitmask: bool = False):
        super().__init__()
        self.upper = upper
        self.bitmask = bitmask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bitmask:
            return bitmask_relu(x, self.upper)
        return F.relu(x) if self.upper is None else F.relu6(x)

    def extra_repr(self) -> str:
        return f"upper={self.upper}, bitmask={self.bitmask}"


class Pool2d(nn.Module):
    """Non-overlapping ``max`` or ``avg`` pooling; ``lean=True`` keeps only what backward needs
    (int32 argmax indices, or nothing) instead of autograd's copy of the whole input."""

    def __init__(self, kind: str, kernel: int, lean: bool = False):
        super().__init__()
        if kind not in ("max", "avg"):
            raise ValueError(f"pooling kind must be 'max' or 'avg', got {kind!r}")
        self.kind, self.kernel, self.lean = kind, kernel, lean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean:
            return (lean_max_pool2d if self.kind == "max" else lean_avg_pool2d)(x, self.kernel)
        return (F.max_pool2d if self.kind == "max" else F.avg_pool2d)(x, self.kernel)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, kernel={self.kernel}, lean={self.lean}"


def set_activation_sparsity(model: nn.Module, s_ta: float | None) -> None:
    """Switch SAP on (``s_ta`` a float) or off (``None``) in every layer that was built for it.

    Layers built without SAP (the stem, whose input the training loop holds anyway) stay off.
    """
    if s_ta is not None and not 0.0 <= s_ta <= 1.0:
        raise ValueError(f"activation sparsity s_ta must be None or lie in [0, 1], got {s_ta}")
    for module in model.modules():
        if isinstance(module, _Masked) and module.sap_capable:
            module.act_sparsity = s_ta
        elif isinstance(module, ReLU):
            module.bitmask = s_ta is not None
        elif isinstance(module, Pool2d):
            module.lean = s_ta is not None
