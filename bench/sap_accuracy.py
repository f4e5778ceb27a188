"""What SAP costs in accuracy without federation: the CIFAR protocol's model trained centrally for a
fixed number of steps with BatchNorm, NSConv, NSConv + SAP on the convolutions (the paper's scope) and
NSConv + SAP on every layer, and SAP on the convolutions with each lossy cache format (``sap-format``
fp16, bf16, int8), three seeds each. A format's cost is its accuracy against fp32 SAP, paired by seed
(same initial weights, masks, batches, augmentation and threshold samples, so only the cache differs).

    python -m bench.sap_accuracy                 # writes bench/results/sap_accuracy/cosine-600/
    python -m bench.sap_accuracy --configs nsconv+sap-conv,nsconv+sap-conv-int8 --seeds 3,4
    python -m bench.sap_accuracy --schedule constant --steps 200 --seeds 0

``--gradients`` measures instead what each cache does to one step: how far (cosine, relative error)
the weight gradient a format gives lies from the one fp32 SAP gives, and fp32 SAP's from the exact one
(no SAP), on the same model, masks and batches (``gradients.json``, seconds to run). It prices the formats
where the accuracy runs cannot, below their seed noise.

The learning rate falls to 0 along a half cosine by default: at a constant rate two paired seeds
ended up to 7 points apart after 600 steps (BatchNorm 34.8-49.6 %), which buries a format's cost
under where each trajectory happened to stop. Each (configuration, seed) is a JSON file of its own
in a folder per schedule and length; a finished one is skipped, so the bench can stop and go on. The
summary (mean ± std over seeds, and min/max) is computed from the files of the folder.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.train import SCHEDULES, run
from common.data.datasets import DataError, load_dataset
from common.nn.models import build_model
from common.nn.sap import seed_threshold_sampler
from common.nn.sapcache import SAP_FORMATS
from common.nn.training import batches
from common.pruning.masks import load_masks, random_masks, weight_shapes

RESULTS = Path(__file__).resolve().parent / "results" / "sap_accuracy"
CONFIGS: dict[str, dict] = {  # label -> bench.train.run arguments
    "batchnorm": {"norm": "batchnorm", "act_sparsity": None},
    "nsconv": {"norm": "nsconv", "act_sparsity": None},
    "nsconv+sap-conv": {"norm": "nsconv", "act_sparsity": 0.9},
    "nsconv+sap-all": {"norm": "nsconv", "act_sparsity": 0.9, "sap_linear": True},
    **{
        f"nsconv+sap-conv-{fmt}": {"norm": "nsconv", "act_sparsity": 0.9, "sap_format": fmt}
        for fmt in SAP_FORMATS
        if fmt != "fp32"
    },
    # fp32 SAP with another stream of threshold samples: a perturbation that changes no precision, so
    # its paired difference is what the bench reads for a format that costs nothing
    "nsconv+sap-conv-resampled": {"norm": "nsconv", "act_sparsity": 0.9, "threshold_seed_offset": 1000},
}
#: the configuration whose accuracy the lossy formats are compared with
REFERENCE = "nsconv+sap-conv"


def _run_arguments(config: dict, seed: int) -> dict:
    """``bench.train.run``'s keywords for a configuration at ``seed``: an offset becomes a threshold seed."""
    args = {k: v for k, v in config.items() if k != "threshold_seed_offset"}
    if "threshold_seed_offset" in config:
        args["threshold_seed"] = seed + config["threshold_seed_offset"]
    return args


def _weight_gradient(
    width: int, images: torch.Tensor, labels: torch.Tensor, sap_format: str | None, seed: int
) -> torch.Tensor:
    """The flat weight gradient of one batch: ResNet18 (NSConv, ERK masks at 90 %) seeded by ``seed``,
    SAP at s_ta 0.9 in ``sap_format`` (None: no SAP), the threshold samples seeded alike."""
    torch.manual_seed(seed)
    model = build_model(
        "resnet18",
        norm="nsconv",
        act_sparsity=None if sap_format is None else 0.9,
        width=width,
        sap_format=sap_format or "fp32",
    )
    load_masks(model, random_masks(weight_shapes(model), 0.9, generator=torch.Generator().manual_seed(seed)))
    seed_threshold_sampler(seed)
    F.cross_entropy(model(images), labels).backward()
    return torch.cat([p.grad.reshape(-1) for name, p in model.named_parameters() if name.endswith("weight")])


def _distance(g: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    return {
        "cosine": float(F.cosine_similarity(g, reference, dim=0)),
        "relative_error": float(torch.linalg.vector_norm(g - reference) / torch.linalg.vector_norm(reference)),
    }


def gradient_fidelity(data_dir: str | None, width: int, n_batches: int = 4, seed: int = 0) -> dict:
    """Per format, how far its weight gradient lies from fp32 SAP's (cosine, and ``|g - g_fp32| /
    |g_fp32|``), and fp32 SAP's from the exact one, over ``n_batches`` training batches of 64 at
    initialisation: mean and worst of each."""
    data = load_dataset("cifar10", data_dir)
    gen = torch.Generator().manual_seed(seed)
    per_batch: dict[str, list[dict[str, float]]] = {}
    for images, labels in islice(batches(data.train, 64, gen), n_batches):
        exact = _weight_gradient(width, images, labels, None, seed)
        fp32 = _weight_gradient(width, images, labels, "fp32", seed)
        per_batch.setdefault("fp32 SAP vs exact", []).append(_distance(fp32, exact))
        for fmt in SAP_FORMATS:
            if fmt != "fp32":
                lossy = _weight_gradient(width, images, labels, fmt, seed)
                per_batch.setdefault(f"{fmt} vs fp32 SAP", []).append(_distance(lossy, fp32))
    return {
        pair: {
            "batches": len(rows),
            "cosine_mean": statistics.fmean(r["cosine"] for r in rows),
            "cosine_min": min(r["cosine"] for r in rows),
            "relative_error_mean": statistics.fmean(r["relative_error"] for r in rows),
            "relative_error_max": max(r["relative_error"] for r in rows),
        }
        for pair, rows in per_batch.items()
    }


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile, by the Cornish-Fisher expansion around the normal one (four terms; at 0.975
    it is 0.032 below the exact value at 2 degrees of freedom, 0.004 at 3, 0.001 at 4, under 5e-4 from
    5 on), since numpy has none."""
    z = statistics.NormalDist().inv_cdf(p)
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / df ** (k + 1) for k, term in enumerate(terms))


def mean_interval(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """The t interval of the mean of ``xs`` at ``level``: where a format's paired cost may lie given its
    seeds, which the bare mean ± std does not say (issue 11 bounds that cost by 0.3 points)."""
    half = t_quantile((1 + level) / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    mean = statistics.fmean(xs)
    return mean - half, mean + half


def summary_table(results: dict[str, list[dict]], title: str) -> str:
    lines = [
        title,
        "",
        f"| configuration | seeds | test accuracy (%) mean ± std | min–max | minus {REFERENCE}, paired (points) "
        "| 95 % interval of that mean | below it in | s per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reference = {r["seed"]: 100 * r["test_accuracy"] for r in results.get(REFERENCE, [])}
    for label, runs in results.items():
        accs = [100 * r["test_accuracy"] for r in runs]
        diffs = [100 * r["test_accuracy"] - reference[r["seed"]] for r in runs if r["seed"] in reference]
        paired = interval = below = "-"
        if label != REFERENCE and diffs:
            paired = _mean_std(diffs, signed=True)
            below = f"{sum(d < 0 for d in diffs)} of {len(diffs)}"
            if len(diffs) > 2:
                interval = "[{:+.2f}, {:+.2f}]".format(*mean_interval(diffs))
        lines.append(
            f"| {label} | {len(runs)} | {_mean_std(accs)} | {min(accs):.2f}–{max(accs):.2f} | {paired} "
            f"| {interval} | {below} | {statistics.fmean(r['train_seconds'] for r in runs):.0f} |"
        )
    return "\n".join(lines) + "\n"


def _mean_std(xs: list[float], signed: bool = False) -> str:
    return f"{statistics.fmean(xs):{'+' if signed else ''}.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="learning rate over the steps")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configurations (default: all)")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))
    p.add_argument("--gradients", action="store_true", help="only the one-step gradient cosines (gradients.json)")
    a = p.parse_args(argv)
    if a.gradients:
        try:
            result = gradient_fidelity(a.data_dir, a.width)
        except DataError as exc:
            sys.exit(f"bench.sap_accuracy: {exc}")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "gradients.json").write_text(json.dumps({"width": a.width, "pairs": result}, indent=1))
        print("| weight gradient | cosine, mean (worst) | relative error, mean (worst) |\n|---|---|---|")
        for pair, v in result.items():
            print(
                f"| {pair} | {v['cosine_mean']:.6f} ({v['cosine_min']:.6f}) "
                f"| {v['relative_error_mean']:.2e} ({v['relative_error_max']:.2e}) |"
            )
        return
    seeds = [int(s) for s in a.seeds.split(",")]
    unknown = sorted(set(a.configs.split(",")) - set(CONFIGS))
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    folder = RESULTS / f"{a.schedule}-{a.steps}"
    folder.mkdir(parents=True, exist_ok=True)
    for label in a.configs.split(","):
        for seed in seeds:
            path = folder / f"{label}-s{seed}.json"
            if not path.exists():
                print(f"[sap_accuracy] {label}, seed {seed}: {a.steps} steps ...", flush=True)
                try:
                    result = run(
                        "resnet18",
                        "cifar10",
                        a.data_dir,
                        param_sparsity=0.9,
                        steps=a.steps,
                        seed=seed,
                        log_every=max(a.steps // 4, 1),
                        width=a.width,
                        augment=True,
                        schedule=a.schedule,
                        **_run_arguments(CONFIGS[label], seed),
                    )
                except DataError as exc:
                    sys.exit(f"bench.sap_accuracy: {exc}")
                path.write_text(json.dumps(result, indent=1))
    # every finished file of the folder, not only this invocation's, in the table's order
    results: dict[str, list[dict]] = {}
    for label in CONFIGS:
        files = sorted(folder.glob(f"{label}-s*.json"), key=lambda f: int(f.stem.rsplit("-s", 1)[1]))
        if files:
            results[label] = [json.loads(f.read_text()) for f in files]
    lr = "lr 0.05 falling to 0 along a half cosine" if a.schedule == "cosine" else "lr 0.05"
    # the whole test split of the copy read: 10,000 images, or 9,980 from ../shared/data's offline copy
    tested = "/".join(f"{n:,}" for n in sorted({r["test_examples"] for rs in results.values() for r in rs}))
    title = (
        f"ResNet18 (width {a.width}) on CIFAR-10, centralised: {a.steps} steps of batch 64, {lr}, momentum 0.9, "
        f"random crop + flip, ERK masks at 90 % parameter sparsity, SAP s_ta 0.9; tested on all {tested} test images."
    )
    table = summary_table(results, title)
    (folder / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
