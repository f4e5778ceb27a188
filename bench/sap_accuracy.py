"""What SAP costs in accuracy without federation: the CIFAR protocol's model trained centrally for a
fixed number of steps with BatchNorm, NSConv, NSConv + SAP on the convolutions (the paper's scope) and
NSConv + SAP on every layer, and SAP on the convolutions with each lossy cache format (``sap-format``
fp16, bf16, int8), three seeds each. A format's cost is its accuracy against fp32 SAP, paired by seed
(same initial weights, masks, batches, augmentation and threshold samples, so only the cache differs).

    python -m bench.sap_accuracy                 # writes bench/results/sap_accuracy/
    python -m bench.sap_accuracy --steps 200 --seeds 0

Each (configuration, seed) is a JSON file of its own; a finished one is skipped, so the bench can stop
and go on. The summary (mean ± std over seeds, and min/max) is computed from those files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.train import run
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
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"))
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for label, config in CONFIGS.items():
        for seed in seeds:
            path = RESULTS / f"{label}-s{seed}.json"
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
                        **config,
                    )
                except DataError as exc:
                    sys.exit(f"bench.sap_accuracy: {exc}")
                path.write_text(json.dumps(result, indent=1))
            results.setdefault(label, []).append(json.loads(path.read_text()))
    title = (
        f"ResNet18 (width {a.width}) on CIFAR-10, centralised: {a.steps} steps of batch 64, lr 0.05, momentum 0.9, "
        "random crop + flip, ERK masks at 90 % parameter sparsity, SAP s_ta 0.9; the full 10,000 test images."
    )
    table = summary_table(results, title)
    (RESULTS / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
