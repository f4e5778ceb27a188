"""Per-layer weight masks: layer densities (ERK, uniform), random masks, applying them.

Masks are plain ``{parameter name: bool tensor}`` dicts over the weights of every convolution and
linear layer (biases, norms and gains stay dense), so the maths here works on tensors alone and the
server can own masks without a model. :func:`model_masks` / :func:`load_masks` move masks in and out
of the ``mask`` buffers of :mod:`common.nn.layers`, where NSConv needs them in its forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal, cast

import torch
from torch import nn

Masks = dict[str, torch.Tensor]
Distribution = Literal["erk", "uniform"]


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel layer densities (Evci et al., RigL) whose weighted mean is ``density``.

    Layer l gets ``eps * (sum of its dims) / (product of its dims)``; ``eps`` is solved so that the
    kept count over all layers equals ``density * total``. A layer whose share would exceed 1 is made
    dense and the rest re-solved, as often as needed.
    """
    _check_fraction(density, "density")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    total = sum(sizes.values())
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * total - sum(sizes[name] for name in dense)
        weighted = sum(raw[name] * sizes[name] for name in sizes if name not in dense)
        if weighted <= 0:
            return {name: 1.0 for name in sizes}
        eps = budget / weighted
        over = {name for name in sizes if name not in dense and eps * raw[name] > 1.0}
        if not over:
            return {name: 1.0 if name in dense else eps * raw[name] for name in sizes}
        dense |= over


def uniform_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """The same density for every layer."""
    _check_fraction(density, "density")
    return {name: density for name in shapes}


def layer_densities(
    shapes: Mapping[str, tuple[int, ...]], sparsity: float, distribution: Distribution = "erk"
) -> dict[str, float]:
    """Layer densities for a target overall parameter sparsity ``s_tm`` (paper §3.3)."""
    _check_fraction(sparsity, "sparsity")
    if distribution == "erk":
        return erk_densities(shapes, 1.0 - sparsity)
    if distribution == "uniform":
        return uniform_densities(shapes, 1.0 - sparsity)
    raise ValueError(f"unknown mask distribution {distribution!r}: use 'erk' or 'uniform'")


def random_masks(
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float,
    distribution: Distribution = "erk",
    generator: torch.Generator | None = None,
) -> Masks:
    """Random masks with exactly ``round(density_l * n_l)`` active entries per layer (Alg. 1, line 2)."""
    masks: Masks = {}
    for name, d in layer_densities(shapes, sparsity, distribution).items():
        n = math.prod(shapes[name])
        keep = _keep_count(d, n)
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=generator)[:keep]] = True
        masks[name] = flat.view(shapes[name])
    return masks


def magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float, distribution: Distribution = "erk") -> Masks:
    """Keep the largest-|w| entries of each layer at the layer densities of ``distribution``."""
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    masks: Masks = {}
    for name, d in layer_densities(shapes, sparsity, distribution).items():
        w = weights[name].detach().reshape(-1)
        keep = _keep_count(d, w.numel())
        flat = torch.zeros(w.numel(), dtype=torch.bool)
        flat[torch.topk(w.abs(), keep, sorted=False).indices] = True
        masks[name] = flat.view(shapes[name])
    return masks


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights that carry a mask: those of every convolution and linear layer."""
    return {
        # Conv2d and Linear register their weight as a Parameter; torch's stubs type it as a plain Tensor.
        f"{module_name}.weight" if module_name else "weight": cast(nn.Parameter, module.weight)
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }


def weight_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(w.shape) for name, w in prunable_weights(model).items()}


def model_masks(model: nn.Module) -> Masks:
    """The masks held in the layers' ``mask`` buffers (all-ones for a layer without one)."""
    masks: Masks = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            name = f"{module_name}.weight" if module_name else "weight"
            mask = getattr(module, "mask", None)
            masks[name] = mask.clone() if mask is not None else torch.ones_like(module.weight, dtype=torch.bool)
    return masks


def load_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Copy ``masks`` into the layers' ``mask`` buffers and zero the pruned weights."""
    weights = prunable_weights(model)
    unknown = set(masks) - set(weights)
    if unknown:
        raise KeyError(f"masks for unknown weights {sorted(unknown)}; expected names like {next(iter(weights), '')!r}")
    modules = dict(model.named_modules())
    targets = {}
    for name, mask in masks.items():
        module = modules[name.rsplit(".", 1)[0] if "." in name else ""]
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight has {tuple(module.weight.shape)}")
        if getattr(module, "mask", None) is None:
            raise TypeError(
                f"{name} belongs to a {type(module).__name__} without a mask buffer; "
                "build the model from common.nn.layers"
            )
        targets[name] = module
    # Everything is validated before the first copy, so a bad call leaves the model untouched.
    for name, module in targets.items():
        module.mask.copy_(masks[name].to(torch.bool))
    apply_masks_(model, masks)


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set pruned weights to exactly 0 (masks on any device: a CPU mask from the wire zeroes a CUDA model)."""
    weights = prunable_weights(model)
    for name, mask in masks.items():
        weights[name].mul_(mask.to(weights[name].device, weights[name].dtype))


@torch.no_grad()
def mask_gradients_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned weights, so momentum never builds up there."""
    weights = prunable_weights(model)
    for name, mask in masks.items():
        grad = weights[name].grad
        if grad is not None:
            grad.mul_(mask.to(grad.device, grad.dtype))


def keep_pruned_at_zero(optimizer: torch.optim.Optimizer, model: nn.Module, masks: Mapping[str, torch.Tensor]):
    """Hook ``optimizer`` so that every step masks gradients before and weights after the update.

    Masking the gradient alone is not enough: weight decay and momentum buffers built before a mask
    changed would still move a pruned weight. Returns the hook handles (call ``.remove()`` to undo).
    """

    def before(_opt, _args, _kwargs):
        mask_gradients_(model, masks)

    def after(_opt, _args, _kwargs):
        apply_masks_(model, masks)

    return optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)


#: ``prune-centre``: where magnitude is measured from when marking, pruning and growing weights.
#: ``zero`` is the paper's; ``filter-mean`` is each NSConv filter's mean of its active weights.
PRUNE_CENTRES = ("zero", "filter-mean")


def filter_centres(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per convolution (4-D weight) of ``masks``: μ_i of NSConv's eq. 7 for every output filter i, the
    mean of its ACTIVE weights, shaped (c_out, 1, 1, 1) to broadcast against the weight (0 for a filter
    with none). Linear layers get no entry: no standardisation moves their zero.

    NSConv computes with ``(θ − μ_i) / σ_i``, so a weight at μ_i contributes nothing, and adding or
    removing one there changes neither μ_i nor ``σ_i² · n_i``, hence no other weight's value: pruning
    and growing at μ_i leave the layer's function exactly as it was. A weight at 0 is not neutral
    unless μ_i = 0 (tests/test_nsconv.py)."""
    centres = {}
    for name, mask in masks.items():
        weight = weights[name]
        if weight.dim() != 4:
            continue
        m, dims = mask.to(weight.dtype), (1, 2, 3)
        centres[name] = (weight.detach() * m).sum(dims, keepdim=True) / m.sum(dims, keepdim=True).clamp(min=1.0)
    return centres


def deviations(
    weights: Mapping[str, torch.Tensor], centres: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """``w − c`` per layer, ``w`` itself where ``centres`` has no entry (or is None); differentiable in
    ``w``, the centres are held fixed."""
    offsets = centres or {}
    return {name: w - offsets[name].detach() if name in offsets else w for name, w in weights.items()}


def count_active(masks: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(active entries, total entries) over all masks."""
    active = sum(int(torch.count_nonzero(m)) for m in masks.values())
    return active, sum(m.numel() for m in masks.values())


def sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Overall fraction of pruned entries."""
    active, total = count_active(masks)
    return 1.0 - active / total if total else 0.0


def layer_sparsity(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {name: 1.0 - int(torch.count_nonzero(m)) / m.numel() if m.numel() else 0.0 for name, m in masks.items()}


def weight_sparsity(weights: Iterable[torch.Tensor]) -> float:
    """Fraction of exact zeros over the given tensors (what a codec would see)."""
    zeros = total = 0
    for w in weights:
        zeros += w.numel() - int(torch.count_nonzero(w))
        total += w.numel()
    return zeros / total if total else 0.0


def _keep_count(density: float, n: int) -> int:
    """Active entries of an n-entry layer at ``density``: at least one, so no layer is cut off."""
    return min(n, max(1, round(density * n))) if n else 0


def _check_fraction(value: float, what: str) -> None:
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{what} must lie in [0, 1], got {value}")
