"""Model zoo: ``build_model(name, norm=..., act_sparsity=...)`` for every architecture of the papers."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from common.nn.models.factory import NORMS, LayerFactory, Norm
from common.nn.models.mobilenet import mobilenet_v2
from common.nn.models.resnet import resnet18, resnet34, resnet50
from common.nn.models.small import alexnet, lenet5
from common.nn.nsconv import RELU_GAMMA
from common.nn.sapcache import DEFAULT_SAP_FORMAT

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenetv2": mobilenet_v2,
    "lenet5": lenet5,
    "alexnet": alexnet,
}

WIDTH_MODELS = ("resnet18", "resnet34", "resnet50")
DEFAULT_WIDTH = 64


def build_model(
    name: str,
    norm: Norm = "nsconv",
    act_sparsity: float | None = None,
    num_classes: int = 10,
    in_channels: int | None = None,
    gamma: float = RELU_GAMMA,
    sap_linear: bool = False,
    width: int | None = None,
    sap_format: str = DEFAULT_SAP_FORMAT,
    sap_relative: bool = True,
) -> nn.Module:
    """Build ``name`` with the given norm (``batchnorm | nsconv | none``) and SAP setting.

    ``act_sparsity=None`` trains with plain autograd; a float ``s_ta`` turns SAP on for the
    convolutions, and for the linear layers too with ``sap_linear``; ``sap_format`` is how those caches
    store their kept values (``fp32 | fp16 | bf16 | int8``, :mod:`common.nn.sapcache`), ``sap_relative``
    whether their positions are coded relative to a preceding ReLU's mask (:class:`LayerFactory`). ``width``: the
    ResNets' base width (None or 64: He et al.'s); other models take only the default.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    kwargs: dict[str, int] = {"num_classes": num_classes}
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    if name in WIDTH_MODELS and width is not None:
        kwargs["base_width"] = width
    elif width not in (None, DEFAULT_WIDTH):
        raise ValueError(f"a base width is defined for {', '.join(WIDTH_MODELS)}, not {name!r}")
    return MODELS[name](LayerFactory(norm, act_sparsity, gamma, sap_linear, sap_format, sap_relative), **kwargs)


__all__ = ["DEFAULT_WIDTH", "MODELS", "NORMS", "WIDTH_MODELS", "LayerFactory", "build_model"]
