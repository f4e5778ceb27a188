"""Why BaE's squeeze of θ_low varies from client to client: the extrusion penalty under SGD momentum.

    python -m bench.bae_squeeze bench/results/cifar10/fedmef-l2-s0 [more run folders]

Reads finished runs only (their ``results.json``) and, per adjustment round, sets what each client's
extrusion did (‖θ_low‖ after over before its local steps) beside what the penalty alone would do to
the same weights in the same number of steps: the client's loss is ``L + λ‖θ_low‖²`` (eq. 2), so
without the task gradient each marked weight follows SGD with momentum on ``λθ²``, a heavy ball
whose optimizer (and so momentum buffer) starts empty every round. Where ``2λμ`` is well above
``(1 - √m)²`` it oscillates, shrinking by at most ``√m`` per step: a client that stops at the trough
squeezes its marks to almost nothing, one that stops half a period later keeps them.
Writes ``bae_squeeze.json`` beside the runs and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.pruning.bae import budget_lr
from common.pruning.schedules import round_learning_rate
from server.results import read_results


def penalty_only_ratio(
    steps: int,
    eta_t: float,
    eta0: float,
    momentum: float,
    lam: float,
    weight_decay: float,
    start_norm: float,
    proximal: bool = False,
) -> float:
    """‖θ_low‖ after ``steps`` steps over before, under the penalty and weight decay alone, with the
    learning rate of eq. 4 (``budget_lr``) and PyTorch's SGD momentum from an empty buffer.

    Every marked weight scales alike (the penalty's gradient is ``2λθ``), so one scalar follows them;
    the sign is kept: a negative ratio is an overshoot through zero. ``proximal``: ``bae-step =
    proximal``, the penalty's proximal step after the optimizer's (which then sees weight decay only)."""
    theta, velocity = 1.0, 0.0
    for step in range(steps):
        lr = budget_lr(eta_t, eta0, step, steps, abs(theta) * start_norm)
        velocity = momentum * velocity + (weight_decay if proximal else 2 * lam + weight_decay) * theta
        theta -= lr * velocity
        if proximal:
            theta /= 1 + 2 * lam * lr
    return theta


def squeeze_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per adjustment round with BaE: marks, norms, the aggregate's ratio and each client's
    measured ratio beside the penalty-only prediction for its step count (None under ``bae-penalty =
    l1``, whose shrink depends on each mark's size, not one scalar)."""
    cfg = results["run"]["config"]
    scalar = cfg.get("bae-penalty", "l2") == "l2"  # runs before the key were l2
    rows = []
    for r in results["rounds"]:
        clients = [c for c in r.get("clients", []) if c.get("bae_marked") and c.get("bae_norm_start")]
        if not clients:
            continue
        eta_t = round_learning_rate(cfg["lr"], cfg["lr-decay"], r["round"])
        pairs = [
            (
                c["steps"],
                c["bae_norm_end"] / c["bae_norm_start"],
                None
                if not scalar
                else penalty_only_ratio(
                    c["steps"],
                    eta_t,
                    cfg["lr"],
                    cfg["momentum"],
                    cfg["bae-lambda"],
                    cfg["weight-decay"],
                    c["bae_norm_start"],
                    cfg.get("bae-step") == "proximal",
                ),
            )
            for c in clients
        ]
        measured = [m for _, m, _ in pairs]
        rows.append(
            {
                "round": r["round"],
                "marked": clients[0]["bae_marked"],
                "norm_start": clients[0]["bae_norm_start"],
                "aggregate_ratio": r["bae_norm_end"] / r["bae_norm_start"] if r.get("bae_norm_start") else None,
                "clients_halving": sum(m <= 0.5 for m in measured),
                "clients": len(measured),
                "client_ratio_median": statistics.median(measured),
                "clients_by_steps": [
                    {"steps": s, "measured": round(m, 3), "penalty_only": None if p is None else round(p, 3)}
                    for s, m, p in sorted(pairs, key=lambda pair: pair[:2])
                ],
            }
        )
    return rows


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders (each with results.json)")
    p.add_argument("-o", "--out", type=Path, help="JSON output (default: bae_squeeze.json beside the runs)")
    a = p.parse_args(argv)
    report = {}
    for folder in a.runs:
        results = read_results(folder / "results.json")
        rows = squeeze_rows(results)
        # Clients that stopped near the heavy ball's trough (|penalty-only ratio| <= 0.25) against the rest.
        near, far = [], []
        for row in rows:
            for c in row["clients_by_steps"]:
                if c["penalty_only"] is not None:
                    (near if abs(c["penalty_only"]) <= 0.25 else far).append(c["measured"])
        report[folder.name] = {
            "rounds": rows,
            "measured_median_near_trough": statistics.median(near) if near else math.nan,
            "measured_median_elsewhere": statistics.median(far) if far else math.nan,
        }
        print(f"\n{folder.name}: ‖θ_low‖ after / before (aggregate; clients: median, halving)")
        print(
            "| round | marked | ‖θ_low‖ sent | aggregate | clients median | clients ≤ 0.5 "
            "| steps: measured (penalty only) |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            detail = ", ".join(
                f"{c['steps']}: {c['measured']:.2f} ({_fmt(c['penalty_only'])})" for c in row["clients_by_steps"]
            )
            print(
                f"| {row['round']} | {row['marked']} | {row['norm_start']:.4f} | {_fmt(row['aggregate_ratio'])} "
                f"| {row['client_ratio_median']:.2f} | {row['clients_halving']}/{row['clients']} | {detail} |"
            )
        print(
            f"median measured ratio of clients whose step count ends near the penalty's trough: "
            f"{report[folder.name]['measured_median_near_trough']:.2f}, elsewhere: "
            f"{report[folder.name]['measured_median_elsewhere']:.2f}"
        )
    out = a.out or a.runs[0].parent / "bae_squeeze.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
