"""A short centralised training run of a sparse NSConv + SAP model: does it learn?

Run as ``python -m bench.train`` (defaults: LeNet-5 on Fashion-MNIST, NSConv, SAP s_ta 0.9,
parameter sparsity 0.9 with ERK masks, 300 steps of batch 64). Prints the loss every 50 steps and
the test accuracy, and writes ``bench/results/train.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common.data.augment import random_crop_flip
from common.data.datasets import DataError, load_dataset
from common.nn.models import NORMS, build_model
from common.nn.sap import seed_threshold_sampler
from common.nn.sapcache import DEFAULT_SAP_FORMAT
from common.nn.training import TrainStats, batches, evaluate, train_step
from common.pruning.masks import keep_pruned_at_zero, load_masks, model_masks, random_masks, sparsity, weight_shapes

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULES = ("constant", "cosine")


def run(
    model_name: str = "lenet5",
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    norm: str = "nsconv",
    act_sparsity: float | None = 0.9,
    param_sparsity: float = 0.9,
    steps: int = 300,
    batch: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    log_every: int = 50,
    test_limit: int | None = None,
    width: int | None = None,
    sap_linear: bool = False,
    augment: bool = False,
    sap_format: str = DEFAULT_SAP_FORMAT,
    schedule: str = "constant",
    threshold_seed: int | None = None,
) -> dict:
    """Train ``steps`` SGD steps of ``batch`` and test. ``schedule``: the learning rate stays ``lr``
    (``constant``) or falls from it to 0 along a half cosine (``cosine``), which ends every seed at a
    settled model instead of wherever a constant step size leaves it. ``threshold_seed``: where SAP's
    threshold samples start (default ``seed``); another value perturbs a run and nothing else."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    torch.manual_seed(seed)
    # else a run's SAP thresholds depend on the runs before it in this process
    seed_threshold_sampler(seed if threshold_seed is None else threshold_seed)
    data = load_dataset(dataset, data_dir)
    model = build_model(
        model_name,
        norm=norm,
        act_sparsity=act_sparsity,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        sap_linear=sap_linear,
        width=width,
        sap_format=sap_format,
    )
    masks = random_masks(weight_shapes(model), param_sparsity, generator=torch.Generator().manual_seed(seed))
    load_masks(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    keep_pruned_at_zero(optimizer, model, masks)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if schedule == "cosine" else None
    gen = torch.Generator().manual_seed(seed)
    test = data.test if test_limit is None else data.test.subset(slice(0, test_limit))
    curve, stats, window = [], TrainStats(), TrainStats()
    start = time.perf_counter()
    while stats.steps < steps:
        for images, labels in batches(data.train, batch, gen):
            train_step(model, optimizer, random_crop_flip(images, gen) if augment else images, labels, window)
            stats.steps += 1
            if decay is not None:
                decay.step()
            if stats.steps % log_every == 0 or stats.steps == steps:
                curve.append(
                    {"step": stats.steps, "train_loss": window.mean_loss, "lr": optimizer.param_groups[0]["lr"]}
                )
                print(
                    f"[bench.train] step {stats.steps}/{steps} loss {window.mean_loss:.4f}", file=sys.stderr, flush=True
                )
                window = TrainStats()
            if stats.steps == steps:
                break
    seconds = time.perf_counter() - start
    test_loss, test_acc = evaluate(model, test)
    return {
        "model": model_name,
        "dataset": dataset,
        "norm": norm,
        "act_sparsity": act_sparsity,
        "sap_linear": sap_linear,
        "sap_format": sap_format,
        "width": width,
        "augment": augment,
        "param_sparsity_target": param_sparsity,
        "param_sparsity": sparsity(model_masks(model)),
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "schedule": schedule,
        "seed": seed,
        "threshold_seed": seed if threshold_seed is None else threshold_seed,
        "curve": curve,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "test_examples": len(test),
        "train_seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet5")
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "cifar10"])
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (CIFAR-10 needs one)")
    p.add_argument("--norm", default="nsconv", choices=NORMS)
    p.add_argument("--act-sparsity", type=float, default=0.9, help="SAP s_ta; negative turns SAP off")
    p.add_argument("--param-sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "train.json")
    a = p.parse_args()
    try:
        result = run(
            a.model,
            a.dataset,
            a.data_dir,
            a.norm,
            None if a.act_sparsity < 0 else a.act_sparsity,
            a.param_sparsity,
            a.steps,
            a.batch,
            a.lr,
            a.seed,
        )
    except (DataError, ValueError) as exc:
        sys.exit(f"bench.train: {exc}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print("| step | train loss |\n|---|---|")
    for point in result["curve"]:
        print(f"| {point['step']} | {point['train_loss']:.4f} |")
    print(
        f"\n{result['model']} on {result['dataset']}, norm {result['norm']}, SAP s_ta {result['act_sparsity']}, "
        f"parameter sparsity {result['param_sparsity']:.3f}: test accuracy {result['test_accuracy']:.4f} "
        f"on {result['test_examples']} images after {result['steps']} steps ({result['train_seconds']:.1f} s); "
        f"written to {a.out}"
    )


if __name__ == "__main__":
    main()
