"""Magnitude top-K within a subset of positions, and the clients' top-K gradients (FedMef Alg. 1,
lines 17-21).

Every selection in mask adjustment has the same shape: among the positions where a mask is True
(or False), take the ``k`` entries of largest (or smallest) magnitude. :func:`select_by_magnitude`
is that one primitive; BaE marking, prune-and-grow, FedDST's re-prune and FedDIP's global pruning
are all built on it, so they share one tie rule and one memory bound.

Indices are flat positions in the FULL tensor. The public FedMef port ranked the pruned subset and
then used the rank inside that subset as a position in the full tensor, growing the wrong weights.

Memory. On CPU, ``torch.topk`` copies the whole slice into a scratch vector of (value, index)
pairs, 16 bytes per entry (four times a float32 gradient; measured: +160 MiB for a 32 MiB
gradient), and a sort holds values plus int64 indices for every entry. Selecting over a whole
layer at once would therefore cost several gradients' worth of memory on exactly the devices
FedMef is meant for. The selection here instead streams the tensor in chunks and keeps a running
set of at most ``k`` candidates: beyond its input it holds O(k + chunk) entries, and it never
writes to its input, so no in-place mode is needed.

Ties go to the lower flat index, identically on every device. NaN values are not supported.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

# 64 Ki entries: a few MiB of scratch per step, small next to any layer worth streaming.
CHUNK = 1 << 16


def resolve_counts(masks: Mapping[str, Tensor], counts: Mapping[str, int]) -> dict[str, int]:
    """``counts`` for every layer of ``masks`` (0 where absent), rejecting unknown layers and
    negative counts."""
    unknown = sorted(set(counts) - set(masks))
    if unknown:
        raise ValueError(f"counts name layers without a mask: {unknown}; known layers: {sorted(masks)}")
    resolved = {name: int(counts.get(name, 0)) for name in masks}
    negative = {name: k for name, k in resolved.items() if k < 0}
    if negative:
        raise ValueError(f"counts must be >= 0, got {negative}")
    return resolved


def layer_tensor(tensors: Mapping[str, Tensor], name: str, like: Tensor, what: str) -> Tensor:
    """``tensors[name]``, checked to exist and to have the shape of ``like`` (its mask)."""
    if name not in tensors:
        raise ValueError(f"{what} has no entry for layer {name!r}")
    tensor = tensors[name]
    if tensor.shape != like.shape:
        raise ValueError(f"{what} for layer {name!r} has shape {tuple(tensor.shape)}, its mask has {tuple(like.shape)}")
    return tensor


def indices_to_mask(indices: Tensor, like: Tensor) -> Tensor:
    """A bool tensor shaped like ``like``, True exactly at the flat ``indices``."""
    flat = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    flat[indices] = True
    return flat.view(like.shape)


def select_by_magnitude(
    values: Tensor,
    mask: Tensor | None,
    k: int,
    *,
    in_mask: bool = True,
    largest: bool = True,
    chunk: int = CHUNK,
) -> Tensor:
    """Flat int64 indices, ascending, of the ``k`` entries with the largest (``largest=False``:
    smallest) ``|values|`` among the positions where ``mask == in_mask`` (every position when
    ``mask`` is None). ``k`` is capped at the number of such positions.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.shape != values.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, values have {tuple(values.shape)}")
    flat = values.detach().reshape(-1)
    keep = None if mask is None else mask.reshape(-1)
    best_idx = torch.empty(0, dtype=torch.long, device=flat.device)
    if k == 0:
        return best_idx
    best_key = flat.new_empty(0)
    # Steps at least k long keep the total work O(n) however large k is, while the memory bound
    # stays O(k + chunk).
    step = max(chunk, k)
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        if keep is None:
            local = torch.arange(part.numel(), device=flat.device)
        else:
            here = keep[start : start + step]
            local = (here if in_mask else ~here).nonzero().squeeze(1)
        # The survivors so far all precede this chunk, so the candidates stay in index order.
        key = torch.cat((best_key, part[local].abs()))
        idx = torch.cat((best_idx, local + start))
        if key.numel() > k:
            kth = torch.topk(key, k, largest=largest, sorted=False).values
            kth = kth.min() if largest else kth.max()
            better = key > kth if largest else key < kth
            # Fill the places left after the strictly better entries with the first (lowest-index)
            # entries that tie with the k-th value.
            tied = key == kth
            chosen = better | (tied & (tied.cumsum(0) <= k - better.sum()))
            key, idx = key[chosen], idx[chosen]
        best_key, best_idx = key, idx
    return best_idx


def topk_pruned_gradients(
    grads: Mapping[str, Tensor], masks: Mapping[str, Tensor], counts: Mapping[str, int]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer of ``masks``, the ``counts[l]`` PRUNED positions (mask False) of largest |g|
    (Alg. 1, line 19), as (flat int64 index into the full tensor, ascending; float32 value with
    its sign). A layer absent from ``counts`` gets empty tensors; a count above the layer's pruned
    entries is capped.

    ``grads`` are the dense loss gradients at the final local weights. They are not modified,
    and the selection adds only O(count + CHUNK) memory per layer (see the module docstring).
    """
    entries: dict[str, tuple[Tensor, Tensor]] = {}
    for name, k in resolve_counts(masks, counts).items():
        mask = masks[name]
        grad = layer_tensor(grads, name, mask, "grads")
        idx = select_by_magnitude(grad, mask, k, in_mask=False)
        entries[name] = idx, grad.detach().reshape(-1)[idx].to(torch.float32)
    return entries
