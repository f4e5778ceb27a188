"""What SAP costs in accuracy without federation: the CIFAR protocol's model trained centrally for a
fixed number of steps with BatchNorm, NSConv, NSConv + SAP on the convolutions (the paper's scope) and
NSConv + SAP on every layer, and SAP on the convolutions with each lossy cache format (``sap-format``
fp16, bf16, int8), three seeds each. A format's cost is its accuracy against fp32 SAP, paired by seed
(same initial weights, masks, batches, augmentation and threshold samples, so only the cache differs).

    python -m bench.sap_accuracy                 # writes bench/results/sap_accuracy/cosine-600/
    python -m bench.sap_accuracy --configs nsconv+sap-conv,nsconv+sap-conv-int8 --seeds 3,4
    python -m bench.sap_accuracy --schedule constant --steps 200 --seeds 0

The learning rate falls to 0 along a half cosine by default: at a constant rate two paired seeds
ended up to 7 points apart after 600 steps (BatchNorm 34.8-49.6 %), which buries a format's cost
under where each trajectory happened to stop. Each (configuration, seed) is a JSON file of its own
in a folder per schedule and length; a finished one is skipped, so the bench can stop and go on. The
summary (mean ± std over seeds, and min/max) is computed from the files of the folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.train import SCHEDULES, run
from common.data.datasets import DataError
from common.nn.sapcache import SAP_FORMATS

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
}
#: the configuration whose accuracy the lossy formats are compared with
REFERENCE = "nsconv+sap-conv"


def summary_table(results: dict[str, list[dict]], title: str) -> str:
    lines = [
        title,
        "",
        f"| configuration | seeds | test accuracy (%) mean ± std | min–max | minus {REFERENCE}, paired (points) "
        "| s per run |",
        "|---|---|---|---|---|---|",
    ]
    reference = {r["seed"]: 100 * r["test_accuracy"] for r in results.get(REFERENCE, [])}
    for label, runs in results.items():
        accs = [100 * r["test_accuracy"] for r in runs]
        diffs = [100 * r["test_accuracy"] - reference[r["seed"]] for r in runs if r["seed"] in reference]
        paired = "-" if label == REFERENCE or not diffs else _mean_std(diffs, signed=True)
        lines.append(
            f"| {label} | {len(runs)} | {_mean_std(accs)} | {min(accs):.2f}–{max(accs):.2f} | {paired} "
            f"| {statistics.fmean(r['train_seconds'] for r in runs):.0f} |"
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
    a = p.parse_args(argv)
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
                        **CONFIGS[label],
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
    title = (
        f"ResNet18 (width {a.width}) on CIFAR-10, centralised: {a.steps} steps of batch 64, {lr}, momentum 0.9, "
        "random crop + flip, ERK masks at 90 % parameter sparsity, SAP s_ta 0.9; the full 10,000 test images."
    )
    table = summary_table(results, title)
    (folder / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
