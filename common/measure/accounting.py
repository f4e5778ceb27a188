"""Memory and compute accounting: what backward really holds, and the paper's estimates (app. 7.2-7.3).

:class:`SavedTensorMeter` counts, through saved-tensor hooks, every tensor autograd keeps between
forward and backward (built-in ops and SAP's functions alike), each storage once. The analytic side
follows the appendix: memory from parameter / activation storage sizes under the codec's formats,
FLOPs from per-layer multiply-accumulates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from common.methods import Method
from common.sparse.sizes import choose_format, payload_bytes, storage_bits


@dataclass
class HeldBytes:
    """Bytes held for backward, split into activations (everything that is not model state) and the
    model's own parameters and buffers that autograd saved (held by the model anyway)."""

    activation_bytes: int = 0
    model_bytes: int = 0
    tensors: int = 0


class SavedTensorMeter:
    """Context manager counting the distinct storages autograd saves for backward inside it.

    A saved view pins its whole storage, so storages (not views) are counted, each once; storages
    of the model's parameters and buffers are reported apart. Use it around the forward pass and read
    :attr:`held` before calling backward.
    """

    def __init__(self, model: nn.Module | None = None, state: Iterable[torch.Tensor] = ()):
        """``state``: more tensors to count as model state (weights a functional call passes in)."""
        state = [
            *(model.parameters() if model is not None else ()),
            *(model.buffers() if model is not None else ()),
            *state,
        ]
        self._model_storages = {t.untyped_storage().data_ptr() for t in state}
        self._seen: set[int] = set()
        self.held = HeldBytes()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen and storage.nbytes() > 0:
            self._seen.add(key)
            self.held.tensors += 1
            if key in self._model_storages:
                self.held.model_bytes += storage.nbytes()
            else:
                self.held.activation_bytes += storage.nbytes()
        # Not ``tensor`` itself: where an op saves its own output (ReLU, BatchNorm), the graph node would
        # hold the output, whose grad_fn is that node, a cycle through C++ that Python's collector cannot
        # see. An inference-only forward (the client's activation probe) then kept its whole graph alive:
        # 45 MB per client of ResNet18 w8, until Ray's workers were killed for memory. A detached view
        # shares the storage and version counter, so backward reads the same values.
        return tensor.detach()

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


@dataclass(frozen=True)
class LayerCost:
    """One convolution or linear layer seen in a forward pass."""

    name: str
    weight_numel: int
    active_weights: int
    input_numel: int
    macs: int  # multiply-accumulates of the dense layer for the whole batch


def profile_layers(model: nn.Module, example: torch.Tensor) -> list[LayerCost]:
    """Run ``example`` through ``model`` (no grad) and record every conv / linear layer's cost."""
    costs: list[LayerCost] = []
    handles = []

    def hook(name):
        def record(module, inputs, output):
            weight = module.weight
            per_output = weight[0].numel()  # c_in/groups * k * k, or in_features
            mask = getattr(module, "mask", None)
            costs.append(
                LayerCost(
                    name,
                    weight.numel(),
                    int(torch.count_nonzero(mask)) if mask is not None else weight.numel(),
                    inputs[0].numel(),
                    per_output * output.numel(),
                )
            )

        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return costs


def sparse_bytes(shape: tuple[int, ...], nnz: int, value_bits: int = 32) -> int:
    """Bytes of a tensor stored in the appendix 7.1 format chosen by its density."""
    fmt = choose_format(shape, nnz, value_bits, policy="paper")
    return payload_bytes(storage_bits(fmt, shape, nnz, value_bits))


@dataclass(frozen=True)
class MemoryEstimate:
    """Appendix 7.2 terms in bytes and the per-method training footprints built from them."""

    dense_params: int
    sparse_params: int
    dense_activations: int
    sparse_activations: int
    topk: int

    def footprint(self, method: Method, sap: bool | None = None) -> int:
        """Training memory of ``method`` (with SAP as the method has it, unless ``sap`` says otherwise):
        parameters and their gradients (sparse storage for a sparse model), the activation cache (sparse
        under SAP) and the activation gradients (never pruned), plus the top-K gradients where an
        adjustment round needs a weight gradient (FedMef, FedTiny, FedDST)."""
        sap = method.sap if sap is None else sap
        params = self.sparse_params if method.sparse_model else self.dense_params
        cache = self.sparse_activations if sap else self.dense_activations
        topk = self.topk if method.sparse_model and method.needs_gradients else 0
        return 2 * params + cache + self.dense_activations + topk


def estimate_memory(costs: list[LayerCost], act_sparsity: float, adjust_fraction: float = 0.4) -> MemoryEstimate:
    """Appendix 7.2 with the codec's storage sizes.

    Activations are the inputs of the conv / linear layers (what a weight gradient needs); the
    sparse ones keep ``1 - act_sparsity`` of each. The top-K term holds ξ = ``adjust_fraction`` ×
    active weights as (value, int32 index) pairs; 0.4 = ζ at t = 0 with the paper's α = 0.2.
    """
    dense_params = sum(4 * c.weight_numel for c in costs)
    sparse_params = sum(sparse_bytes((c.weight_numel,), c.active_weights) for c in costs)
    dense_act = sum(4 * c.input_numel for c in costs)
    sparse_act = sum(sparse_bytes((c.input_numel,), round((1 - act_sparsity) * c.input_numel)) for c in costs)
    topk = sum(8 * math.floor(adjust_fraction * c.active_weights) for c in costs)
    return MemoryEstimate(dense_params, sparse_params, dense_act, sparse_act, topk)


@dataclass(frozen=True)
class FlopEstimate:
    """Appendix 7.3: inference FLOPs of the dense and sparse model for one batch, SAP/BaE overhead,
    and the per-round maxima for E local iterations."""

    dense: float
    sparse: float
    overhead: float

    def fedavg(self, local_iters: int) -> float:
        return 3 * self.dense * local_iters

    def fedtiny(self, local_iters: int) -> float:  # FedDST alike: dense gradient in the last iteration
        return 3 * self.sparse * (local_iters - 1) + self.sparse + 2 * self.dense

    def fedmef(self, local_iters: int) -> float:
        s = self.sparse + self.overhead
        return 3 * s * (local_iters - 1) + s + 2 * self.dense


def estimate_flops(costs: list[LayerCost], param_sparsity: float) -> FlopEstimate:
    """F_d, F_s (2 FLOPs per multiply-accumulate, a layer's share scaled by its density) and
    F_o = 4 (1 - s_m) n_θ + n_a log2 n_a."""
    dense = sum(2 * c.macs for c in costs)
    sparse = sum(2 * c.macs * c.active_weights / c.weight_numel for c in costs)
    n_theta = sum(c.weight_numel for c in costs)
    n_a = sum(c.input_numel for c in costs)
    overhead = 4 * (1 - param_sparsity) * n_theta + n_a * math.log2(max(n_a, 2))
    return FlopEstimate(dense, sparse, overhead)
