"""Local training as the server's :class:`~common.protocol.instructions.Instructions` say (Algorithm 1, lines 5-22).

One function, :func:`local_train`, runs every method's local round: masked SGD (pruned weights stay
exactly 0), BaE in FedMef's adjustment rounds (eq. 2-4), FedDST's own prune/grow halfway through the
round, FedDIP's error feedback with incremental regularisation, and the top-K gradients of pruned
positions afterwards. Flower stays out of this module; :mod:`client.client_app` wraps it.

Everything runs on the device of the model and masks it is given (the CPU or a CUDA device); the data
stay on the CPU, where batch order and augmentation draw from the round's generator, and each batch
moves to that device as it is used (:func:`~common.nn.training.model_device`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from common.data.augment import random_crop_flip
from common.data.datasets import Split
from common.measure.accounting import SavedTensorMeter
from common.nn.layers import _Masked, set_activation_sparsity
from common.nn.models import Norm, build_model
from common.nn.sap import seed_threshold_sampler
from common.nn.training import TrainStats, batches, model_device, train_step
from common.protocol.instructions import Instructions
from common.pruning.adjustment import prune_and_grow
from common.pruning.bae import Marks, budget_lr, extrusion_penalty, extrusion_prox_, mark_low, marked_norm
from common.pruning.masks import (
    Masks,
    deviations,
    filter_centres,
    keep_pruned_at_zero,
    load_masks,
    prunable_weights,
)
from common.pruning.topk import topk_pruned_gradients


@dataclass
class LocalResult:
    examples: int
    loss: float
    steps: int
    train_time_s: float
    activation_bytes: int
    masks: Masks  # the structure the returned weights live under (FedDST may have changed it)
    topk: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    marked: int = 0  # BaE: weights marked for extrusion, and their L2 norm before and after the round
    marked_norm_start: float = 0.0
    marked_norm_end: float = 0.0
    topk_activation_bytes: int = 0  # held by one forward of the adjustment round's gradient pass
    topk_micro_batch: int = 0


def build_local_model(ins: Instructions, num_classes: int, in_channels: int) -> nn.Module:
    return build_model(
        ins.model,
        norm=cast(Norm, ins.norm),  # a str on the wire; LayerFactory rejects any value outside Norm
        act_sparsity=ins.act_sparsity,
        num_classes=num_classes,
        in_channels=in_channels,
        gamma=ins.gamma,
        sap_linear=ins.sap_linear,
        width=ins.width,
        sap_format=ins.sap_format,
    )


def planned_steps(examples: int, ins: Instructions) -> int:
    """Steps of this round: E epochs of ``ceil(n / batch)`` batches, capped by ``max_local_steps``."""
    steps = ins.local_epochs * math.ceil(examples / ins.batch_size)
    return min(steps, ins.max_local_steps) if ins.max_local_steps else steps


def _stream(
    data: Split, ins: Instructions, generator: torch.Generator, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The round's training batches on ``device``, randomly cropped and flipped per image when
    ``augment`` is on (on the CPU, so every device sees the same batches)."""
    for _ in range(ins.local_epochs):
        for images, labels in batches(data, ins.batch_size, generator):
            images = random_crop_flip(images, generator) if ins.augment else images
            yield images.to(device), labels.to(device)


def effective_weight_gradients(
    model: nn.Module,
    data: Split,
    batch_size: int,
    max_batches: int,
    generator: torch.Generator,
    micro_batch: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Dense ∂L/∂ŵ for every masked layer, ŵ the weight the layer computes with, averaged over batches,
    and the activation bytes one forward of the pass held for backward (measured).

    A pruned position's gradient is what growing it would start from (RigL, FedTiny). The mask
    multiplies it away in ∂L/∂θ, so the layers run once with ŵ itself as a dense leaf: same forward,
    gradient everywhere. Only this pass holds a dense weight gradient (one per layer, summed in place).
    ``micro_batch`` splits each batch into chunks whose gradients add up to the batch's (exact for
    models without BatchNorm, whose output for one example does not depend on the others).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _Masked)}
    device = model_device(model)
    leaves = {f"{name}.weight": m.effective_weight().detach().requires_grad_() for name, m in layers.items()}
    for m in layers.values():
        # An instance attribute shadows the class's weight function (deleted again below); mypy forbids
        # assigning to a method, and setattr with a constant name would trip ruff's B010.
        m.weight_fn = lambda: _as_is  # type: ignore[method-assign]
    seen, held = 0, 0
    try:
        for images, labels in batches(data, batch_size, generator):
            images, labels = images.to(device), labels.to(device)
            for chunk, chunk_labels in zip(
                images.split(micro_batch or len(images)), labels.split(micro_batch or len(labels)), strict=True
            ):
                with SavedTensorMeter(model, leaves.values()) as meter:
                    logits = functional_call(model, leaves, (chunk,))
                held = max(held, meter.held.activation_bytes)
                loss = F.cross_entropy(logits, chunk_labels, reduction="sum") / len(labels)
                # Accumulated in place into each leaf's .grad: autograd.grad would return a fresh dense
                # gradient per chunk beside the running sum, one more copy of the weights at the peak.
                loss.backward(inputs=list(leaves.values()))
            seen += 1
            if seen >= max_batches:
                break
    finally:
        for m in layers.values():
            del m.weight_fn
    # A layer the loss never reached (or an empty split) has gradient 0.
    grads = {key: torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for key, leaf in leaves.items()}
    return {key: total.div_(max(seen, 1)) for key, total in grads.items()}, held


def gradient_pass(
    model: nn.Module, data: Split, ins: Instructions, generator: torch.Generator, step_bytes: int
) -> tuple[dict[str, torch.Tensor], int, int]:
    """The dense gradient of an adjustment round (top-K or FedDST), its held activation bytes and the
    micro-batch it ran at.

    ``topk-pass = sap`` runs the layers as they train: under SAP the gradients of pruned positions come
    from pruned activations (the grown positions then matched the exact top-K on only 59-84 % of SAP
    layers). ``exact`` switches SAP off and splits each batch into micro-batches whose exact activations
    take no more than a training step held (``step_bytes``), so the pass is exact without raising the
    client's peak memory. Without SAP both are the plain full-batch pass.
    """
    if ins.topk_pass == "sap" or ins.act_sparsity is None:
        grads, held = effective_weight_gradients(model, data, ins.batch_size, ins.grad_batches, generator)
        return grads, held, ins.batch_size
    set_activation_sparsity(model, None)
    try:
        micro = _fitting_micro_batch(model, data, ins.batch_size, step_bytes)
        grads, held = effective_weight_gradients(
            model, data, ins.batch_size, ins.grad_batches, generator, micro_batch=micro
        )
    finally:
        set_activation_sparsity(model, ins.act_sparsity)
    return grads, held, micro


def _fitting_micro_batch(model: nn.Module, data: Split, batch_size: int, budget: int) -> int:
    """The largest micro-batch whose exact gradient pass holds at most ``budget`` activation bytes.

    The pass's bytes are measured at 2 and 4 examples and taken as linear in the examples: a fixed part
    (the dense leaves' masks and standardisation terms) plus a part per example. A micro-batch is a view
    of its batch, so the first layer pins the whole batch, as the training step's does: that part does
    not shrink with the micro-batch."""
    if len(data) < 4:
        return 1
    probe = data.subset(slice(0, 4))
    held = [effective_weight_gradients(model, probe, n, 1, torch.Generator(), micro_batch=n)[1] for n in (2, 4)]
    input_bytes = probe.inputs(slice(0, 1)).nbytes  # as the model takes it: float32, not the stored pixels
    per_example = (held[1] - held[0]) / 2
    fixed = held[0] - 2 * per_example
    inner = max(per_example - input_bytes, 1.0)  # what one more example adds beyond its own input
    return max(1, min(batch_size, int((budget - fixed - batch_size * input_bytes) // inner)))


def _as_is(theta: torch.Tensor, mask: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    return theta


def _error_feedback_forward(model: nn.Module, masks: Masks) -> Callable[[torch.Tensor], torch.Tensor]:
    """FedDIP: compute with ``w ⊙ m`` but pass the gradient straight to the dense ``w``, so weights
    masked too early can come back (straight-through estimator via a functional call, no model copy)."""
    weights = prunable_weights(model)

    def forward(images: torch.Tensor) -> torch.Tensor:
        masked = {name: w + (w * masks[name] - w).detach() for name, w in weights.items()}
        return functional_call(model, masked, (images,))

    return forward


def local_train(model: nn.Module, masks: Masks, data: Split, ins: Instructions) -> LocalResult:
    """Run one round of local training in place on ``model`` (whose weights the server just sent), on
    the device that ``model`` and ``masks`` are on; the result's tensors are on that device too."""
    if len(data) == 0:
        raise ValueError("this client has no training examples; check its partition")
    generator = torch.Generator().manual_seed(ins.seed)
    seed_threshold_sampler(ins.seed)
    masks = {name: m.clone() for name, m in masks.items()}
    weights = prunable_weights(model)
    # Error feedback computes with w ⊙ m itself, so the layers see an all-ones mask.
    # Built only where used: an all-ones bool copy of the masks is 10.6 MiB for ResNet18 at width 64.
    load_masks(model, masks if ins.mode == "masked" else {name: torch.ones_like(m) for name, m in masks.items()})
    if ins.mode == "error-feedback":
        with torch.no_grad():  # the server sent w ⊙ m; dense training starts from it
            for name, w in weights.items():
                w.mul_(masks[name])
    optimizer = torch.optim.SGD(model.parameters(), lr=ins.lr, momentum=ins.momentum, weight_decay=ins.weight_decay)
    hooks = keep_pruned_at_zero(optimizer, model, masks) if ins.mode == "masked" else ()
    forward = _error_feedback_forward(model, masks) if ins.mode == "error-feedback" else None
    counts = dict(zip(masks, ins.counts, strict=False))

    # Where BaE measures and pulls the marks from, recomputed as training moves the filters' means.
    def centres() -> dict[str, torch.Tensor] | None:
        return filter_centres(weights, masks) if ins.prune_centre == "filter-mean" else None

    penalties: list[Callable[[], torch.Tensor]] = []
    marks: Marks = {}
    if ins.bae and ins.adjusting:
        marks = mark_low(deviations({n: w.detach() for n, w in weights.items()}, centres()), masks, counts)
        if ins.bae_step == "loss":
            penalties.append(
                lambda: ins.bae_lambda * extrusion_penalty(deviations(weights, centres()), marks, ins.bae_penalty)
            )
    norm_start = marked_norm(deviations(weights, centres()), marks) if marks else 0.0
    if ins.reg_lambda > 0:  # FedDIP: un-squared per-layer L2 norm
        penalties.append(lambda: ins.reg_lambda * sum(w.norm() for w in weights.values()))
    # penalties is not empty where penalty is built, so the sum is a tensor, never sum()'s start value 0
    penalty = (lambda: cast(torch.Tensor, sum(p() for p in penalties))) if penalties else None

    model.train()
    total = planned_steps(len(data), ins)
    activation_bytes = _held_activation_bytes(model, forward, next(batches(data, ins.batch_size, generator))[0])
    stats = TrainStats()
    start = time.perf_counter()
    try:
        for images, labels in _stream(data, ins, generator, model_device(model)):
            if stats.steps >= total:
                break
            if ins.adjust_local and ins.adjusting and stats.steps == total // 2:
                _adjust_locally(model, masks, counts, data, ins, generator, activation_bytes)
            if marks:
                lr = budget_lr(ins.lr, ins.eta0, stats.steps, total, marked_norm(deviations(weights, centres()), marks))
                for group in optimizer.param_groups:
                    group["lr"] = lr
            train_step(model, optimizer, images, labels, stats, forward=forward, penalty=penalty)
            if marks and ins.bae_step == "proximal":
                extrusion_prox_(weights, marks, ins.bae_lambda, lr, ins.bae_penalty, centres())
    finally:
        for hook in hooks:
            hook.remove()
    topk, pass_bytes, micro = None, 0, 0
    if ins.topk and ins.adjusting:
        # Training is over: its last gradients and the momentum buffers (two copies of the weights) go
        # before the pass allocates its own dense leaves and gradients, so that an adjustment round
        # peaks no higher than a normal one.
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        grads, pass_bytes, micro = gradient_pass(model, data, ins, generator, activation_bytes)
        topk = topk_pruned_gradients(grads, masks, counts)
    return LocalResult(
        stats.examples,
        stats.mean_loss,
        stats.steps,
        time.perf_counter() - start,
        activation_bytes,
        masks,
        topk,
        sum(m.numel() for m in marks.values()),
        norm_start,
        marked_norm(deviations(weights, centres()), marks) if marks else 0.0,
        pass_bytes,
        micro,
    )


def _adjust_locally(
    model: nn.Module,
    masks: Masks,
    counts: dict[str, int],
    data: Split,
    ins: Instructions,
    generator: torch.Generator,
    step_bytes: int,
) -> None:
    """FedDST: drop the smallest active and grow the largest-gradient pruned weights, once per
    adjustment round, in the middle of local training (paper §4.1: 5 epochs, adjust, 5 epochs)."""
    grads, _, _ = gradient_pass(model, data, ins, generator, step_bytes)
    weights = prunable_weights(model)
    new_masks, new_weights = prune_and_grow({n: w.detach() for n, w in weights.items()}, masks, grads, counts)
    masks.update(new_masks)  # the optimizer hooks hold this dict, so they follow the new structure
    with torch.no_grad():
        for name, w in weights.items():
            w.copy_(new_weights[name])
    load_masks(model, masks)


def _held_activation_bytes(model: nn.Module, forward: Callable | None, images: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after one forward pass (measured, not estimated)."""
    images = images.to(model_device(model))
    with SavedTensorMeter(model) as meter:
        out = (forward or model)(images)
    del out
    return meter.held.activation_bytes
