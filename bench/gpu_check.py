"""The GPU check: SAP on a CUDA device against the CPU, and FedMef's local training there (time, memory).

    python -m bench.gpu_check                          # needs CUDA; bench/results/gpu_check.json + a table
    python -m bench.gpu_check --device cpu --quick     # the same code on the CPU in seconds (the test runs it)

1. SAP consistency. Each SAP piece of the project (masked convolution, NSConv with its gain, masked
   linear layer, the bit-mask ReLU and ReLU6, the lean pools) and the whole CIFAR model (ResNet18 at
   base width 8, NSConv, 90 % sparse masks, s_ta 0.9) runs forward and backward from the same weights,
   inputs and output gradient on the device and on the CPU, the threshold sampler seeded alike. The
   table gives the largest difference of the output and of every gradient, absolute and relative to the
   largest CPU magnitude of that tensor, and the activation bytes each held for backward. TF32 is off
   for this part, so a difference is float32 rounding (on the CPU the native C kernels, on CUDA SAP's
   torch code); a row beyond its tolerance makes the check exit 2.
2. Local training. Rounds of the FedMef client (``client.trainer.local_train``, as a ClientApp runs
   it) on that model and device under the CIFAR preset (``conf/cifar10_cpu.toml``, an adjustment every
   second round), with SAP, and with BaE and the top-K gradient pass in the adjustment rounds; once
   more without SAP, for the memory it saves. Per round: steps, time per step (the first
   round includes CUDA's warm-up), loss, the bytes held for backward, and the device's peak allocated
   memory (``torch.cuda.max_memory_allocated``, reset per round). Data: CIFAR-10 from ``--data-dir``
   (default ``../shared/data/cifar10`` beside the checkout, where present), else synthetic images.

Sized for a minute or two on one GPU (not yet run on one); ``--quick`` shrinks every size for a CPU
run. Without a CUDA device the default run exits 1 at once and says so. It needs torch and this
repository alone, not Flower, so it runs on a GPU machine's own PyTorch.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.trainer import build_local_model, local_train
from common.data.datasets import STANDARDISATIONS, Split, load_dataset
from common.measure.accounting import SavedTensorMeter
from common.nn import bitkernels
from common.nn.layers import Pool2d, ReLU, SparseConv2d, SparseLinear
from common.nn.models import build_model
from common.nn.nsconv import RELU_GAMMA, NSConv2d
from common.nn.sap import seed_threshold_sampler
from common.protocol.config import describe_device, parse_run_config
from common.protocol.instructions import round_instructions
from common.pruning.masks import load_masks, random_masks, weight_shapes
from common.pruning.schedules import adjust_counts, adjust_fraction, is_adjustment_round

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
# Relative to the largest CPU magnitude of each compared tensor. One layer: float32 rounding of one
# convolution or product (TF32 off). The whole model: rounding through 20 layers, and SAP thresholds
# sampled from inputs that differ by that rounding, so a few activations at the threshold flip.
LAYER_TOLERANCE = 1e-4
MODEL_TOLERANCE = 1e-2
SEED = 0


@contextmanager
def _no_tf32() -> Iterator[None]:
    """Full float32 in CUDA's matrix products and cuDNN's convolutions (cuDNN's default is TF32)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _forward_backward(module: nn.Module, x: torch.Tensor, device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """``module``'s output and gradients (input and parameters) on ``device``, back on the CPU, and the
    activation bytes it held for backward; a copy of ``module`` runs, so each device starts alike."""
    module = copy.deepcopy(module).to(device)
    leaf = x.detach().clone().to(device).requires_grad_()
    seed_threshold_sampler(SEED)
    with SavedTensorMeter(module) as meter:
        out = module(leaf)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(SEED))
    out.backward(grad_out.to(device))
    grads = {f"grad {name}": p.grad for name, p in module.named_parameters() if p.grad is not None}
    tensors = {"output": out, "grad input": leaf.grad, **grads}
    return {name: t.detach().cpu() for name, t in tensors.items() if t is not None}, meter.held.activation_bytes


def _masked(layer: nn.Module, density: float = 0.5) -> nn.Module:
    """``layer`` with a random mask of ``density`` loaded (pruned weights at 0, as in training)."""
    load_masks(layer, random_masks(weight_shapes(layer), 1.0 - density, generator=torch.Generator().manual_seed(SEED)))
    return layer


def sap_cases(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], float]]:
    """Name -> (module factory, input shape, tolerance). Feature maps of 16 x 32 x 32 per example hold
    more elements than SAP's exact threshold takes (the sampled path); the linear layer's take the exact one."""
    n = 2 if quick else 8
    fmap = (n, 16, 32, 32)
    return {
        "SparseConv2d 3x3, SAP 0.9": (
            lambda: _masked(SparseConv2d(16, 32, 3, padding=1, act_sparsity=0.9)),
            fmap,
            LAYER_TOLERANCE,
        ),
        "NSConv2d 3x3 + gain, SAP 0.9": (
            lambda: _masked(NSConv2d(16, 32, 3, padding=1, act_sparsity=0.9, gamma=RELU_GAMMA)),
            fmap,
            LAYER_TOLERANCE,
        ),
        "NSConv2d 1x1 stride 2, SAP 0.9": (
            lambda: _masked(NSConv2d(16, 32, 1, stride=2, act_sparsity=0.9, gamma=RELU_GAMMA)),
            fmap,
            LAYER_TOLERANCE,
        ),
        "SparseLinear, SAP 0.9": (lambda: _masked(SparseLinear(256, 10, act_sparsity=0.9)), (n, 256), LAYER_TOLERANCE),
        "ReLU, 1-bit mask": (lambda: ReLU(bitmask=True), fmap, 0.0),
        "ReLU6, 1-bit mask": (lambda: ReLU(upper=6.0, bitmask=True), fmap, 0.0),
        "max pool 2, lean": (lambda: Pool2d("max", 2, lean=True), fmap, 0.0),
        "avg pool 2, lean": (lambda: Pool2d("avg", 2, lean=True), fmap, LAYER_TOLERANCE),
        "ResNet18 w8, NSConv, SAP 0.9 (whole model)": (
            lambda: _masked(build_model("resnet18", "nsconv", 0.9, width=8), density=0.1),
            (n, 3, 32, 32),
            MODEL_TOLERANCE,
        ),
    }


def sap_consistency(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """Check 1: every SAP case on ``device`` against the CPU (see the module docstring)."""
    rows = []
    for name, (factory, shape, tolerance) in sap_cases(quick).items():
        torch.manual_seed(SEED)
        module = factory().train()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED + 1))
        reference, cpu_bytes = _forward_backward(module, x, torch.device("cpu"))
        with _no_tf32():
            result, device_bytes = _forward_backward(module, x, device)
        abs_diff = {key: float((result[key] - ref).abs().max()) for key, ref in reference.items()}
        rel_diff = {key: abs_diff[key] / max(float(ref.abs().max()), 1e-30) for key, ref in reference.items()}
        worst = max(rel_diff, key=lambda key: rel_diff[key])
        rows.append(
            {
                "case": name,
                "compared": sorted(reference),
                "max_abs_diff": max(abs_diff.values()),
                "max_rel_diff": rel_diff[worst],
                "worst_tensor": worst,
                "tolerance": tolerance,
                "held_bytes_cpu": cpu_bytes,
                "held_bytes_device": device_bytes,
                "ok": rel_diff[worst] <= tolerance,
            }
        )
    return rows


def training_data(data_dir: Path | None, examples: int) -> tuple[Split, str]:
    """``examples`` CIFAR-10 training images from ``data_dir``, or synthetic ones (None)."""
    if data_dir is not None:
        train = load_dataset("cifar10", data_dir).train
        return train.subset(slice(0, examples)), str(data_dir)
    generator = torch.Generator().manual_seed(SEED)
    pixels = torch.randint(0, 256, (examples, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (examples,), generator=generator)
    return Split(pixels, labels, STANDARDISATIONS["cifar10"]), "synthetic"


def local_rounds(
    device: torch.device, data: Split, overrides: dict[str, Any], rounds: int, steps: int, batch: int
) -> list[dict[str, Any]]:
    """Check 2: ``rounds`` FedMef client rounds on ``device`` under the CIFAR preset, each from the last
    one's weights, under the server's first masks (ERK, s_tm 0.9); every second round is an adjustment
    round with BaE and the top-K pass, its counts ξ those of the FedMef server's schedule."""
    preset = tomllib.loads((ROOT / "conf" / "cifar10_cpu.toml").read_text())
    cfg = parse_run_config(
        {**preset, "delta-r": 2, "max-local-steps": steps, "batch-size": batch, "grad-batches": 2, **overrides}
    )
    torch.manual_seed(SEED)
    model = build_local_model(round_instructions(cfg, 1, cfg.method.mode, 0), 10, 3)
    masks = random_masks(weight_shapes(model), cfg.s_tm, generator=torch.Generator().manual_seed(SEED))
    load_masks(model, masks)
    model.to(device)
    on_device = {name: m.to(device) for name, m in masks.items()}
    rows = []
    for server_round in range(1, rounds + 1):
        ins = round_instructions(cfg, server_round, cfg.method.mode, 0)
        if is_adjustment_round(server_round, cfg.delta_r, cfg.r_stop):
            xi = adjust_counts(masks, adjust_fraction(server_round, cfg.local_epochs, cfg.r_stop, cfg.adjust_alpha))
            ins = replace(ins, counts=[xi[name] for name in masks], topk=True, bae=cfg.bae_on)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        result = local_train(model, on_device, data, ins)
        rows.append(
            {
                "round": server_round,
                "adjustment": ins.adjusting,
                "bae": ins.bae,
                "topk": result.topk is not None,
                "steps": result.steps,
                "step_ms": 1000 * result.train_time_s / max(result.steps, 1),
                "loss": result.loss,
                "held_bytes": result.activation_bytes,
                "topk_held_bytes": result.topk_activation_bytes,
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                "bae_norm": [result.marked_norm_start, result.marked_norm_end] if result.marked else None,
            }
        )
    return rows


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def print_report(report: dict[str, Any]) -> None:
    print(f"device: {report['device']}; torch {report['torch']}; data: {report['data']}")
    print("\n| SAP case | compared | max abs diff | max rel diff | tolerance | held MiB cpu / device | ok |")
    print("|---|---|---|---|---|---|---|")
    for r in report["sap"]:
        print(
            f"| {r['case']} | {len(r['compared'])} tensors | {r['max_abs_diff']:.2e} | {r['max_rel_diff']:.2e} "
            f"({r['worst_tensor']}) | {r['tolerance']:.0e} | {_mib(r['held_bytes_cpu'])} / "
            f"{_mib(r['held_bytes_device'])} | {'yes' if r['ok'] else 'NO'} |"
        )
    print(f"\nms / step: of the round, an adjustment round's top-K pass included; steady: {report['steady_step_ms']}")
    print("\n| training | round | BaE + top-K | steps | ms / step | loss | held MiB | top-K pass MiB | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, rows in report["train"].items():
        for r in rows:
            print(
                f"| {label} | {r['round']} | {'yes' if r['topk'] else '-'} | {r['steps']} | {r['step_ms']:.1f} "
                f"| {r['loss']:.3f} | {_mib(r['held_bytes'])} | {_mib(r['topk_held_bytes'] or None)} "
                f"| {_mib(r['peak_allocated_bytes'])} |"
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the device checked against the CPU")
    p.add_argument("--quick", action="store_true", help="tiny sizes and synthetic data (a CPU test of the script)")
    p.add_argument("--data-dir", type=Path, default=None, help=f"CIFAR-10 (default: {CIFAR} where present)")
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        sys.exit(
            f"gpu_check: no CUDA device here (torch {torch.__version__}, {build}): run it on a machine with an "
            "NVIDIA GPU and the CUDA build of torch ('make TORCH=cuda'), or try it on the CPU with "
            "'--device cpu --quick'"
        )
    device = torch.device(a.device)
    data_dir = a.data_dir or (CIFAR if CIFAR.exists() and not a.quick else None)
    rounds, steps, batch = (2, 1, 8) if a.quick else (6, 20, 64)
    data, source = training_data(data_dir, 4 * batch if a.quick else 20 * batch)
    report: dict[str, Any] = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "host": platform.node(),
        "cpu_sap_kernels": bitkernels.status(),
        "quick": a.quick,
        "data": source,
        "sap": sap_consistency(device, a.quick),
        "train": {
            "fedmef, SAP 0.9": local_rounds(device, data, {}, rounds, steps, batch),
            "fedmef without SAP": local_rounds(device, data, {"sap": "off"}, rounds, steps, batch),
        },
        # check 2 ran with torch's defaults, as training does (cuDNN convolutions in TF32 on Ampere and later)
        "train_tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }
    # after the first round (CUDA's warm-up), in plain rounds: an adjustment round's time includes its top-K pass
    plain = [r["step_ms"] for r in report["train"]["fedmef, SAP 0.9"][1:] if not r["adjustment"]]
    report["steady_step_ms"] = statistics.median(plain) if plain else None
    report["ok"] = all(r["ok"] for r in report["sap"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    print(f"\n{a.out}")
    if not report["ok"]:
        failed = ", ".join(r["case"] for r in report["sap"] if not r["ok"])
        print(f"gpu_check: SAP on {device} differs from the CPU beyond tolerance: {failed}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
