"""Side-by-side comparison of every method in Flower's simulation engine.

``python -m bench.compare`` runs fedmef, fedtiny, feddst, pqsu, fedavg and feddip one after the other
with the same preset (``conf/compare_fmnist.toml``: LeNet-5, Fashion-MNIST, 10 clients, Dirichlet 0.5,
s_tm 0.9) and writes ``compare.json`` (the summaries, the command and each run's rounds), ``compare.md`` (the
table) and ``compare.png`` (accuracy, bytes and memory, all methods) into ``--summary-dir``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from common.methods import METHODS
from server.plots import plot_runs
from server.results import markdown_table, summarize, write_json_atomic
from server.simulation import ROOT, run_simulation

RESULTS = ROOT / "bench" / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--preset", type=Path, default=ROOT / "conf" / "compare_fmnist.toml")
    p.add_argument("--supernodes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=None, help="override the preset's num-server-rounds")
    p.add_argument("--out", type=Path, default=RESULTS / "compare", help="folder for the runs")
    p.add_argument("--summary-dir", type=Path, default=RESULTS, help="folder for compare.json, .md and .png")
    a = p.parse_args()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    runs: dict[str, dict] = {}
    overrides = {} if a.rounds is None else {"num-server-rounds": a.rounds}
    for method in a.methods.split(","):
        start = time.time()
        print(f"[{method}] flwr run with {a.supernodes} SuperNodes ...", flush=True)
        runs[method] = run_simulation(
            {**overrides, "strategy": method},
            a.supernodes,
            a.out,
            f"{method}-{stamp}",
            preset=a.preset,
            log_path=a.out / f"{method}-{stamp}.log",
            timeout=5400,
        )
        s = runs[method]["summary"]
        print(
            f"[{method}] {len(runs[method]['rounds'])} rounds in {time.time() - start:.0f} s: final acc "
            f"{s['final_accuracy']:.4f}, {s['bytes_ratio_vs_dense']:.3f}x dense bytes",
            flush=True,
        )
    table = markdown_table(runs)
    write_json_atomic(
        a.summary_dir / "compare.json",
        {
            "command": " ".join([Path(sys.executable).name, "-m", "bench.compare", *sys.argv[1:]]),
            "preset": str(a.preset.relative_to(ROOT)),
            "supernodes": a.supernodes,
            "host": platform.node(),
            "finished": datetime.now(UTC).isoformat(),
            "summaries": {m: summarize(r) for m, r in runs.items()},
            "runs": runs,
        },
    )
    (a.summary_dir / "compare.md").write_text(table + "\n")
    plot_runs(
        runs, a.summary_dir / "compare.png", title="LeNet-5 on Fashion-MNIST, 10 clients, Dirichlet 0.5, s_tm 0.9"
    )
    print(table)


if __name__ == "__main__":
    main()
