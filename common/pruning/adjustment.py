"""Mask adjustment maths: the FedMef / FedTiny server (Alg. 1, lines 26-34), FedDST's clients and
server, and FedDIP's global reconfiguration.

All functions are pure: they return new tensors and leave their inputs untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from common.pruning.bae import mark_low
from common.pruning.masks import Masks, _check_fraction, _keep_count, deviations
from common.pruning.topk import indices_to_mask, layer_tensor, resolve_counts, select_by_magnitude


def sum_topk_gradients(
    replies: Sequence[tuple[float, Mapping[str, tuple[Tensor, Tensor]]]],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, Tensor]:
    """``g_l = sum_k w_k g_k,l`` (Alg. 1, line 29) of the clients' sparse top-K gradients, as dense
    float32 tensors of ``shapes``; an entry a client did not send counts as 0.

    Each reply is (weight, {layer: (flat indices, values)}); the weights are the clients' |D_k|
    shares, chosen by the caller.
    """
    totals = {name: torch.zeros(math.prod(shape), dtype=torch.float32) for name, shape in shapes.items()}
    for weight, entries in replies:
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"reply weights must be finite and >= 0, got {weight}")
        for name, (indices, values) in entries.items():
            if name not in totals:
                raise ValueError(f"top-K gradients for unknown layer {name!r}; known layers: {sorted(totals)}")
            _check_sparse_entries(name, indices, values, totals[name].numel())
            totals[name].index_add_(0, indices, values.to(torch.float32), alpha=weight)
    return {name: total.view(shapes[name]) for name, total in totals.items()}


def prune_and_grow(
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    scores: Mapping[str, Tensor],
    counts: Mapping[str, int],
    centres: Mapping[str, Tensor] | None = None,
) -> tuple[Masks, dict[str, Tensor]]:
    """Per layer of ``masks``: drop the ``counts[l]`` active entries of smallest |w| and grow the
    ``counts[l]`` entries, pruned under the OLD mask, of largest |score| (Alg. 1, lines 30-34).

    ``scores`` are the summed top-K gradients on the FedMef/FedTiny server and the local dense
    gradient on a FedDST client. A just-dropped entry cannot be regrown and an active one cannot be
    "grown" (FedDST's official code ranked all weights), so every layer keeps its active count
    exactly and exactly ``2 * counts[l]`` positions change. Returns (new masks, the weights times
    the new masks: grown entries start at exactly 0). Layers absent from ``counts`` are unchanged.

    ``centres`` (:func:`~common.pruning.masks.filter_centres`): in a layer that has one, magnitude is
    ``|w − c|`` and grown entries start at ``c``, where NSConv makes them contribute nothing.
    """
    plan = resolve_counts(masks, counts)
    for name, k in plan.items():
        mask = masks[name]
        layer_tensor(weights, name, mask, "weights")
        active = int(torch.count_nonzero(mask))
        if k > min(active, mask.numel() - active):
            raise ValueError(
                f"count {k} for layer {name!r} is more than can be swapped: it has {active} active and "
                f"{mask.numel() - active} pruned entries, and the count may not exceed either"
            )
        layer_tensor(scores, name, mask, "scores")
    dropped = mark_low(deviations(weights, centres), masks, plan)
    new_masks: Masks = {}
    new_weights: dict[str, Tensor] = {}
    for name, k in plan.items():
        mask = masks[name]
        kept = mask & ~indices_to_mask(dropped[name], mask)
        grown = indices_to_mask(select_by_magnitude(scores[name], mask, k, in_mask=False), mask)
        new_masks[name] = kept | grown
        new_weights[name] = weights[name].detach().masked_fill(~kept, 0.0)
        if centres is not None and name in centres:
            new_weights[name] = torch.where(grown, centres[name].to(new_weights[name].dtype), new_weights[name])
    return new_masks, new_weights


def masked_average(
    contributions: Sequence[tuple[float, Mapping[str, Tensor], Mapping[str, Tensor]]],
) -> tuple[dict[str, Tensor], Masks]:
    """FedDST aggregation: each position is the example-weighted mean over the clients whose mask
    keeps it (weights renormalised over those clients), 0 where no client keeps it. Each
    contribution is (example weight, dense values, masks). Returns (values, union of the masks).
    """
    if not contributions:
        raise ValueError("masked_average needs at least one contribution")
    layers = set(contributions[0][2])
    for weight, values, masks in contributions:
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"contribution weights must be finite and >= 0, got {weight}")
        if set(masks) != layers:
            raise ValueError(f"every contribution must mask the same layers: {sorted(masks)} vs {sorted(layers)}")
        for name, mask in masks.items():
            layer_tensor(values, name, mask, "values")
    averaged: dict[str, Tensor] = {}
    union: Masks = {}
    for name in contributions[0][2]:
        first = contributions[0][1][name]
        total = torch.zeros_like(first)
        support = torch.zeros_like(first)
        kept = torch.zeros(first.shape, dtype=torch.bool, device=first.device)
        for weight, values, masks in contributions:
            mask = masks[name]
            total += weight * values[name].detach().masked_fill(~mask, 0.0)
            support += weight * mask
            kept |= mask
        # Where no weight supports a position the total is 0 as well, so dividing by 1 gives 0.
        averaged[name] = total / torch.where(support > 0, support, 1.0)
        union[name] = kept
    return averaged, union


def magnitude_masks_within(
    weights: Mapping[str, Tensor], allowed: Mapping[str, Tensor], keep: Mapping[str, int]
) -> Masks:
    """Per layer of ``allowed``, keep the ``keep[l]`` entries of largest |w| among the allowed
    positions (FedDST's server re-prunes the union of the client masks to the target count)."""
    missing = sorted(set(allowed) - set(keep))
    if missing:
        raise ValueError(f"keep has no count for layers {missing}")
    masks: Masks = {}
    for name, k in resolve_counts(allowed, keep).items():
        mask = allowed[name]
        weight = layer_tensor(weights, name, mask, "weights")
        available = int(torch.count_nonzero(mask))
        if k > available:
            raise ValueError(f"keep {k} for layer {name!r} exceeds its {available} allowed positions")
        masks[name] = indices_to_mask(select_by_magnitude(weight, mask, k), mask)
    return masks


def global_magnitude_masks(weights: Mapping[str, Tensor], sparsity: float) -> Masks:
    """FedDIP's reconfiguration: one |w| ranking over all layers together, keeping
    ``common.pruning.masks._keep_count(1 - sparsity, N)`` of the N entries. A layer may lose every entry.
    Ties go to the earlier position in the order of ``weights``, then flat index.
    """
    _check_fraction(sparsity, "sparsity")
    if not weights:
        raise ValueError("global_magnitude_masks needs at least one weight tensor")
    flat = torch.cat([w.detach().reshape(-1) for w in weights.values()])
    keep = _keep_count(1.0 - sparsity, flat.numel())
    parts = indices_to_mask(select_by_magnitude(flat, None, keep), flat).split([w.numel() for w in weights.values()])
    return {name: part.view(w.shape) for (name, w), part in zip(weights.items(), parts, strict=True)}


def _check_sparse_entries(name: str, indices: Tensor, values: Tensor, numel: int) -> None:
    if indices.dim() != 1 or values.dim() != 1:
        raise ValueError(
            f"top-K entries for layer {name!r} must be 1-D, got shapes {tuple(indices.shape)} and {tuple(values.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"top-K indices for layer {name!r} must be int32 or int64, got {indices.dtype}")
    if indices.numel() != values.numel():
        raise ValueError(f"layer {name!r} sent {indices.numel()} indices but {values.numel()} values")
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= numel:
        raise ValueError(f"top-K indices for layer {name!r} must lie in [0, {numel}), got [{low}, {high}]")
    if torch.unique(indices).numel() != indices.numel():
        raise ValueError(f"top-K indices for layer {name!r} repeat a position; each may be sent once")
    if not torch.isfinite(values).all():
        raise ValueError(f"top-K values for layer {name!r} must be finite")
