"""The top-K gradient pass of an adjustment round, two ways: through the SAP layers at the full batch,
or exact over micro-batches that hold no more than a SAP training step. Which positions each grows,
against the exact full-batch top-K, and the activation bytes each holds for backward.

    python -m bench.topk_pass        # writes bench/results/topk_pass.json and prints the table

The model is the CIFAR protocol's (ResNet18 at base width 8, NSConv, 90 % ERK masks, SAP s_ta 0.9),
trained centrally for ``--steps`` steps first so the gradients are those of a model that has learnt
something; ξ per layer is the paper's first adjustment (α = 0.2: ζ = 0.4 of the active weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from client.trainer import _fitting_micro_batch, _held_activation_bytes, effective_weight_gradients
from common.data.augment import random_crop_flip
from common.data.datasets import load_dataset
from common.nn.layers import set_activation_sparsity
from common.nn.models import build_model
from common.nn.training import TrainStats, batches, train_step
from common.pruning.masks import keep_pruned_at_zero, load_masks, random_masks, weight_shapes
from common.pruning.schedules import adjust_counts
from common.pruning.topk import topk_pruned_gradients

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="central training steps before the pass")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--grad-batches", type=int, default=4)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    data = load_dataset("cifar10", a.data_dir)
    model = build_model("resnet18", "nsconv", 0.9, width=8)
    masks = random_masks(weight_shapes(model), 0.9, generator=torch.Generator().manual_seed(0))
    load_masks(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    keep_pruned_at_zero(optimizer, model, masks)
    gen, stats = torch.Generator().manual_seed(0), TrainStats()
    for images, labels in batches(data.train, a.batch, gen):
        train_step(model, optimizer, random_crop_flip(images, gen), labels, stats)
        if stats.steps >= a.steps:
            break
    counts = adjust_counts(masks, 0.4)
    step_bytes = _held_activation_bytes(model, None, data.train.inputs(slice(0, a.batch)))

    def run(micro: int | None, sap: bool) -> tuple[dict, int]:
        set_activation_sparsity(model, 0.9 if sap else None)
        grads, held = effective_weight_gradients(
            model, data.train, a.batch, a.grad_batches, torch.Generator().manual_seed(1), micro_batch=micro
        )
        set_activation_sparsity(model, 0.9)
        return topk_pruned_gradients(grads, masks, counts), held

    reference, full_bytes = run(None, sap=False)
    set_activation_sparsity(model, None)
    micro = _fitting_micro_batch(model, data.train, a.batch, step_bytes)
    set_activation_sparsity(model, 0.9)
    rows = {}
    for label, (topk, held) in {
        "exact, full batch (reference)": (reference, full_bytes),
        "SAP layers, full batch (topk-pass = sap)": run(None, sap=True),
        f"exact, micro-batches of {micro} (topk-pass = exact)": run(micro, sap=False),
    }.items():
        overlap = [
            len(set(topk[n][0].tolist()) & set(reference[n][0].tolist())) / len(reference[n][0])
            for n in reference
            if len(reference[n][0])
        ]
        rows[label] = {
            "held_activation_bytes": held,
            "vs_training_step": held / step_bytes,
            "overlap_mean": statistics.fmean(overlap),
            "overlap_min": min(overlap),
        }
    out = {"steps": a.steps, "batch": a.batch, "grad_batches": a.grad_batches, "step_bytes": step_bytes, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "topk_pass.json").write_text(json.dumps(out, indent=1))
    print(f"SAP training step at batch {a.batch}: {step_bytes / 2**20:.2f} MiB held for backward")
    print("| pass | held MiB | x training step | overlap with exact top-K: mean | min over layers |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['held_activation_bytes'] / 2**20:.2f} | {r['vs_training_step']:.2f} "
            f"| {100 * r['overlap_mean']:.1f} % | {100 * r['overlap_min']:.1f} % |"
        )


if __name__ == "__main__":
    main()
