"""Experiment runner: methods × seeds of one protocol in Flower's simulation engine, then their summary.

    python -m bench.compare --protocol cifar10              # the whole matrix, 3 seeds
    python -m bench.compare --protocol fmnist --runs fedmef,fedtiny --seeds 0
    python -m bench.compare --protocol cifar10 --summary-only

A protocol is a preset (``conf/*.toml``), a federation size and a matrix of named runs (run-config
overrides). Each run writes ``bench/results/<protocol>/<run>-s<seed>/results.json``; a run whose
file holds a summary is finished and skipped, so a matrix started with ``nice`` in the background
can stop at any time and go on in a later session. An unfinished run with a checkpoint goes on from
its last finished round (``resume``); one without is moved aside to ``<run>-s<seed>.partial``
(ignored by git) and starts again. The summary (``summary.json``,
``summary.md``, ``summary.png`` beside the runs) is computed from the run files only: mean ± std and
min/max over seeds per run, per-round curves with seed bands, the accuracy drop at each server
adjustment, BaE's squeeze of the marked weights, bytes and memory.
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.checkpoint import NAME as CHECKPOINT
from server.plots import plot_runs, plot_seed_values
from server.results import FINAL_ROUNDS, read_results, summarize, write_json_atomic
from server.simulation import ROOT, SimulationError, toml_overrides

RESULTS = ROOT / "bench" / "results"

# The paper's ablations (§4.3) beside its baselines: FedMef without BaE, without SAP (NSConv only),
# and dense FedAvg with NSConv + SAP.
ABLATIONS: dict[str, dict[str, Any]] = {
    "fedmef": {"strategy": "fedmef"},
    "fedmef-no-bae": {"strategy": "fedmef", "bae": "off"},
    "fedmef-no-sap": {"strategy": "fedmef", "sap": "off"},
    "fedtiny": {"strategy": "fedtiny"},
    "feddst": {"strategy": "feddst"},
    "fedavg": {"strategy": "fedavg"},
    "fedavg-sap": {"strategy": "fedavg", "norm": "nsconv", "sap": "on"},
}


@dataclass(frozen=True)
class Protocol:
    preset: str  # conf/<preset>
    supernodes: int
    title: str
    runs: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(ABLATIONS))
    seeds: tuple[int, ...] = (0, 1, 2)
    timeout_s: float = 5400
    overrides: dict[str, Any] = field(default_factory=dict)  # on top of the preset, for every run


# BaE's settings are chosen on runs of their own: a seed the comparison never uses and the clients'
# validation splits (fraction-evaluate), never the test set.
BAE_LAMBDAS = (0.001, 0.01, 0.1, 0.3, 1.0)
# The CIFAR protocol's BaE before the L1 selection (python -m bench.compare --protocol cifar10-bae)
SQUARED_BAE = {"bae-penalty": "l2", "bae-step": "loss", "bae-lambda": 3.0}
SELECTION_SEED = 100
# The L1 penalty as a soft threshold of lambda * mu per step: mu is 0.02-0.05 here, and the marks' RMS
# runs from about 0.02 (round 3) down to 1e-4 (round 42). 0.3 was added after 0.1 failed four rounds,
# each to a client whose steps moved its marks by more than 0.1 * mu (one grew them 3.7x)
BAE_L1_LAMBDAS = (0.003, 0.01, 0.03, 0.1, 0.3)


PROTOCOLS: dict[str, Protocol] = {
    "cifar10": Protocol(
        "cifar10_cpu.toml",
        100,
        "ResNet18 (width 8) on CIFAR-10, 100 clients, 10 per round, E = 1",
        runs={
            **ABLATIONS,
            # BaE as eq. 2 prints it, the squared penalty in the loss, at the lambda cifar10-bae chose for
            # it; the protocol's FedMef before the L1 selection (its seeds 0 and 1 ran as "fedmef")
            "fedmef-l2": {"strategy": "fedmef", **SQUARED_BAE},
            "fedmef-no-sap-l2": {"strategy": "fedmef", "sap": "off", **SQUARED_BAE},
            # the squared penalty as a proximal step: the extrusion without momentum's swing
            "fedmef-prox": {"strategy": "fedmef", **SQUARED_BAE, "bae-step": "proximal"},
            # magnitude measured from each NSConv filter's mean, where pruning and growing change nothing
            # (common.pruning.masks.filter_centres), with and without BaE: whether the post-prune drop
            # then falls with BaE. BaE's lambda is the protocol's, not selected again.
            "fedmef-centred": {"strategy": "fedmef", "prune-centre": "filter-mean"},
            "fedmef-no-bae-centred": {"strategy": "fedmef", "bae": "off", "prune-centre": "filter-mean"},
        },
    ),
    # The same matrix run twice as long: at 60 rounds every curve still climbed 1-3 points from rounds
    # 41-50 to 51-60 (the summary's late gain), so the protocol's verdict is checked where they flatten.
    # R_stop keeps its place at three quarters of the run.
    "cifar10-120": Protocol(
        "cifar10_cpu.toml",
        100,
        "ResNet18 (width 8) on CIFAR-10, 100 clients, 10 per round, E = 1, 120 rounds",
        overrides={"num-server-rounds": 120, "r-stop": 90},
        timeout_s=10800,
    ),
    # The same 60 rounds with the learning rate decaying by the paper's 0.95 per round instead of 0.99,
    # so that it ends at 5 % of its start (0.99: 55 %) and the last 10 rounds take 3 % of the run's
    # summed learning rate (0.99: 13 %), where 120 rounds at 0.99 still climbed a point per 10 rounds.
    # Whether the curves then flatten is for the runs to show (the summary's late gain). BaE's lambda
    # is the protocol's, not selected again.
    "cifar10-decay95": Protocol(
        "cifar10_cpu.toml",
        100,
        "ResNet18 (width 8) on CIFAR-10, 100 clients, 10 per round, E = 1, lr decaying 0.95 per round",
        overrides={"lr-decay": 0.95},
    ),
    "fmnist": Protocol(
        "compare_fmnist.toml",
        10,
        "LeNet-5 on Fashion-MNIST, 10 clients, Dirichlet 0.5",
        runs={
            **ABLATIONS,
            "pqsu": {"strategy": "pqsu"},
            "feddip": {"strategy": "feddip"},
            # the accuracy cost of half-precision weights on the wire, paired with fedmef seed by seed
            "fedmef-fp16-wire": {"strategy": "fedmef", "wire-format": "fp16"},
        },
    ),
    "cifar10-bae": Protocol(
        "cifar10_cpu.toml",
        100,
        "BaE's lambda on the CIFAR-10 protocol (selection seed, 12 rounds, validation accuracy)",
        # E = 1 leaves each client about 7 steps per round: the squeeze needs a larger lambda than above
        runs={
            f"lambda-{lam:g}": {"strategy": "fedmef", **SQUARED_BAE, "bae-lambda": lam}
            for lam in (*BAE_LAMBDAS, 3.0, 10.0)
        },
        seeds=(SELECTION_SEED,),
        overrides={"num-server-rounds": 12, "fraction-evaluate": 0.1},
    ),
    "cifar10-bae-l1": Protocol(
        "cifar10_cpu.toml",
        100,
        "BaE's L1 penalty as a proximal step on the CIFAR-10 protocol (selection seed, through R_stop = 45, "
        "validation accuracy)",
        runs={
            f"l1-lambda-{lam:g}": {"strategy": "fedmef", "bae-penalty": "l1", "bae-step": "proximal", "bae-lambda": lam}
            for lam in BAE_L1_LAMBDAS
        },
        seeds=(SELECTION_SEED,),
        # the squared penalty failed in the late adjustment rounds (30-42), which the 12 rounds of
        # cifar10-bae never reached: these runs go through the last one
        overrides={"num-server-rounds": 45, "fraction-evaluate": 0.1},
    ),
    "fmnist-bae": Protocol(
        "compare_fmnist.toml",
        10,
        "BaE's lambda on the Fashion-MNIST comparison (selection seed, 18 rounds, validation accuracy)",
        runs={f"lambda-{lam:g}": {"strategy": "fedmef", "bae-lambda": lam} for lam in BAE_LAMBDAS},
        seeds=(SELECTION_SEED,),
        overrides={"num-server-rounds": 18, "fraction-evaluate": 1.0},
    ),
}


def run_folder(protocol: str, run: str, seed: int) -> Path:
    return RESULTS / protocol / f"{run}-s{seed}"


# A finished run that lost more of its replies than this to client errors measured its environment
# (e.g. Ray killing workers when another job filled the memory), not its method: it is redone.
MAX_LOST_REPLIES = 0.05


def lost_replies(results: Mapping[str, Any]) -> float:
    """The share of the replies a run asked for that came back as client errors."""
    rounds = results.get("rounds", [])
    lost = sum(1 for r in rounds for x in r.get("rejected", []) if str(x.get("reason", "")).startswith("client error"))
    asked = sum(len(r.get("clients", [])) + len(r.get("rejected", [])) for r in rounds)
    return lost / asked if asked else 0.0


def finished(folder: Path) -> bool:
    """A run is finished when its results file parses, holds the ServerApp's final summary and lost at
    most :data:`MAX_LOST_REPLIES` of its replies to client errors."""
    try:
        results = read_results(folder / "results.json")
    except (OSError, ValueError):
        return False
    return bool(results.get("summary")) and lost_replies(results) <= MAX_LOST_REPLIES


def run_simulation(
    run_config: Mapping[str, Any], supernodes: int, results_dir: Path, run_name: str, *, preset: Path, timeout: float
) -> dict:
    """One run through ``python -m server.simulation`` in a fresh interpreter, its rounds printed as they
    come. A matrix spans hours and sessions: each run then runs the tree's code as it is when the run
    starts, as the app bundle ``flwr run`` builds does, instead of the runner's own, which read a newer
    pyproject's defaults with an older config parser and stopped the matrix."""
    config = dict(run_config)
    resume = bool(config.pop("resume", False))
    cmd = [
        *(sys.executable, "-m", "server.simulation", "--supernodes", str(supernodes), "--preset", str(preset)),
        *("--set", toml_overrides(config), "--results-dir", str(results_dir), "--name", run_name),
        *("--timeout", str(timeout), *(["--resume"] if resume else [])),
    ]
    done = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        # the driver's own message ("simulation: ...", possibly several lines) ends its stderr
        err = done.stderr.strip()
        raise SimulationError(err[err.rfind("simulation: ") :] if "simulation: " in err else f"exit {done.returncode}")
    return read_results(results_dir / run_name / "results.json")


def run_matrix(name: str, runs: Iterable[str], seeds: Iterable[int]) -> list[str]:
    """Run what is not finished yet; returns the runs that failed (the others go on without them)."""
    protocol = PROTOCOLS[name]
    todo = [(run, seed) for seed in seeds for run in runs]  # seed by seed: a partial matrix has every run
    failed = []
    for i, (run, seed) in enumerate(todo, start=1):
        folder = run_folder(name, run, seed)
        if finished(folder):
            print(f"[{i}/{len(todo)}] {folder.name}: finished, skipped", flush=True)
            continue
        resume = (folder / CHECKPOINT).exists()
        if (folder / "results.json").exists() and not resume:
            try:
                lost = lost_replies(read_results(folder / "results.json"))
            except (OSError, ValueError):
                lost = 0.0
            if lost > MAX_LOST_REPLIES:
                print(
                    f"[{i}/{len(todo)}] {folder.name}: {lost:.0%} of its replies were client errors, redone", flush=True
                )
        if folder.exists() and not resume:
            aside = folder.with_name(folder.name + ".partial")
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
            print(f"[{i}/{len(todo)}] {folder.name}: unfinished run moved to {aside.name}", flush=True)
        start = time.time()
        how = "resumed from its checkpoint" if resume else "flwr run"
        print(f"[{i}/{len(todo)}] {folder.name}: {how} with {protocol.supernodes} SuperNodes ...", flush=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            results = run_simulation(
                {**protocol.overrides, **protocol.runs[run], "seed": seed, **({"resume": True} if resume else {})},
                protocol.supernodes,
                folder.parent,
                folder.name,
                preset=ROOT / "conf" / protocol.preset,
                timeout=protocol.timeout_s,
            )
        except SimulationError as exc:
            print(f"[{i}/{len(todo)}] {folder.name}: failed: {exc}", flush=True)
            failed.append(folder.name)
            continue
        s = results["summary"]
        print(
            f"[{i}/{len(todo)}] {folder.name}: {s['rounds']} rounds in {time.time() - start:.0f} s, "
            f"final acc {s['final_accuracy']:.4f}",
            flush=True,
        )
    return failed


# ---------------------------------------------------------------------------------------------- summary


def _stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def adjustment_drops(results: Mapping[str, Any]) -> list[float]:
    """Per adjustment round: test accuracy just before the server's prune/grow minus just after."""
    return _finite(
        r["accuracy_before_adjustment"] - r["accuracy"]
        for r in results.get("rounds", [])
        if r.get("accuracy_before_adjustment") is not None and r.get("accuracy") is not None
    )


LATE_ROUNDS = 10


def _late_change(values: list[float], window: int) -> float:
    if len(values) < 2 * window:
        return math.nan
    return statistics.fmean(values[-window:]) - statistics.fmean(values[-2 * window : -window])


def late_gain(results: Mapping[str, Any], window: int = LATE_ROUNDS) -> float:
    """Mean test accuracy of the last ``window`` rounds minus that of the ``window`` before them: near 0
    when the curve has flattened by the end; NaN for a run shorter than two windows."""
    return _late_change(_finite(r.get("accuracy") for r in results.get("rounds", [])), window)


def late_loss_change(results: Mapping[str, Any], window: int = LATE_ROUNDS) -> tuple[float, float]:
    """As :func:`late_gain`, for the server's test loss and for the clients' training loss (per round,
    the mean over its clients). Side by side they tell a run whose clients still fit their data better
    (both fall) from one whose aggregate improves while the clients' local fit does not (the test loss
    falls, the training loss stays)."""
    rounds = results.get("rounds", [])
    train = [
        statistics.fmean(losses) for r in rounds if (losses := _finite(c.get("loss") for c in r.get("clients", [])))
    ]
    return _late_change(_finite(r.get("loss") for r in rounds), window), _late_change(train, window)


def examples_processed(results: Mapping[str, Any]) -> int:
    """Training examples the clients went through over the whole run (an example seen twice counts
    twice): how much training a protocol buys, to set against the size of the training set."""
    return sum(int(c.get("examples") or 0) for r in results.get("rounds", []) for c in r.get("clients", []))


def validation_accuracy(results: Mapping[str, Any]) -> float | None:
    """The clients' validation accuracy in the last round that has one (``fraction-evaluate`` > 0)."""
    evals = [r["client_eval"]["eval-acc"] for r in results.get("rounds", []) if r.get("client_eval")]
    return evals[-1] if evals else None


def bae_squeeze(results: Mapping[str, Any]) -> list[float]:
    """Per adjustment round with BaE: ‖θ_low‖ of the aggregated model over ‖θ_low‖ of the model sent
    (the server prunes the aggregate), or the clients' mean ratio where the server did not record it."""
    ratios = []
    for r in results.get("rounds", []):
        if r.get("bae_norm_start"):
            ratios.append(r["bae_norm_end"] / r["bae_norm_start"])
            continue
        clients = [
            c["bae_norm_end"] / c["bae_norm_start"]
            for c in r.get("clients", [])
            if c.get("bae_marked") and c.get("bae_norm_start")
        ]
        if clients:
            ratios.append(statistics.fmean(clients))
    return ratios


#: the run every other run is compared with, seed by seed, where a protocol has it
REFERENCE_RUN = "fedmef"


def paired_differences(table: Mapping[str, Any], reference: str = REFERENCE_RUN) -> dict[str, Any]:
    """``reference`` minus every other run in last-10 accuracy (points), seed by seed over the seeds
    both finished: within a protocol a seed fixes the initial model, the partitions and, from seed 1
    on, the clients of each round, so the paired difference leaves out what the seeds share."""
    if reference not in table:
        return {}
    ref = table[reference]["final10_by_seed"]
    paired = {}
    for run, row in table.items():
        seeds = sorted(set(ref) & set(row["final10_by_seed"])) if run != reference else []
        if seeds:
            by_seed = {seed: ref[seed] - row["final10_by_seed"][seed] for seed in seeds}
            paired[run] = {"reference": reference, "by_seed": by_seed, **_stats(list(by_seed.values()))}
    return paired


def summarize_protocol(name: str) -> dict[str, Any]:
    """Mean ± std and min/max over the finished seeds of every run of ``name``, from the run files."""
    protocol = PROTOCOLS[name]
    table: dict[str, Any] = {}
    curves: dict[str, list[dict]] = {}
    for run in protocol.runs:
        seeds = sorted(
            (int(p.name.rsplit("-s", 1)[1]), p)
            for p in (RESULTS / name).glob(f"{run}-s*")
            # "fedavg-s*" also matches fedavg-sap's folders: the name before the seed must be the run's
            if p.is_dir() and p.name.rsplit("-s", 1)[0] == run and p.name.rsplit("-s", 1)[1].isdigit() and finished(p)
        )
        if not seeds:
            continue
        files = [read_results(p / "results.json") for _, p in seeds]
        summaries = [summarize(f) for f in files]
        curves[run] = files
        squeezes = [bae_squeeze(f) for f in files]
        late = {
            seed: summarize(f, last=LATE_ROUNDS)["final_accuracy"] for (seed, _), f in zip(seeds, files, strict=True)
        }
        squeeze = [max(q, default=math.nan) for q in squeezes]  # the round that squeezed least
        losses = [late_loss_change(f) for f in files]
        table[run] = {
            "seeds": [s for s, _ in seeds],
            "final_accuracy": _stats(_finite(s["final_accuracy"] for s in summaries)),
            "last_accuracy": _stats(_finite(s["last_accuracy"] for s in summaries)),
            # A steadier reading than the headline's 5 rounds, and whether the curve had flattened: a run's
            # test accuracy swings by 2-6 points from round to round here (10 skewed clients per round).
            "final10_accuracy": _stats(_finite(late.values())),
            "final10_by_seed": {seed: 100 * v for seed, v in late.items() if v is not None},
            "late_gain": _stats(_finite(late_gain(f) for f in files)),
            "late_test_loss_change": _stats(_finite(test for test, _ in losses)),
            "late_train_loss_change": _stats(_finite(train for _, train in losses)),
            "examples_processed": _stats([float(examples_processed(f)) for f in files]),
            "val_accuracy": _stats(_finite(validation_accuracy(f) for f in files)),
            "best_accuracy": _stats(_finite(s["best_accuracy"] for s in summaries)),
            "adjustment_drop": _stats([statistics.fmean(d) for f in files if (d := adjustment_drops(f))]),
            # drops of both signs cancel in the mean; how far the prunes move accuracy at all
            "adjustment_change": _stats([statistics.fmean(map(abs, d)) for f in files if (d := adjustment_drops(f))]),
            "bae_worst_squeeze": _stats(_finite(squeeze)),
            # issue 10's check: the aggregate's marks at most halved, counted per run over its BaE rounds
            "bae_rounds_halved": _stats([float(sum(r <= 0.5 for r in q)) for q in squeezes if q]),
            "bae_rounds": max((len(q) for q in squeezes), default=0),
            "bytes_ratio_vs_dense": _stats(_finite(s["bytes_ratio_vs_dense"] for s in summaries)),
            "activation_mib": _stats(_finite((s["activation_bytes_mean"] or math.nan) / 2**20 for s in summaries)),
            "peak_rss_mb": _stats(_finite(s["peak_rss_mb_max"] for s in summaries)),
            "wall_time_s": _stats(_finite(f["run"].get("wall_time_s") for f in files)),
        }
    out = RESULTS / name
    summary = {
        "protocol": name,
        "preset": f"conf/{protocol.preset}",
        "supernodes": protocol.supernodes,
        "title": protocol.title,
        "final_means_last_rounds": FINAL_ROUNDS,
        "computed": datetime.now(UTC).isoformat(),
        "host": platform.node(),
        "runs": table,
        "paired_vs_reference": paired_differences(table),
    }
    write_json_atomic(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown_summary(summary))
    if curves:
        plot_runs(curves, out / "summary.png", title=protocol.title)
        plot_seed_values(
            {run: r["final10_by_seed"] for run, r in table.items()},
            out / "summary_final.png",
            title=f"{protocol.title}\ntest accuracy, mean of the last {LATE_ROUNDS} rounds of each seed",
            ylabel="test accuracy (%)",
        )
    return summary


def _cell(stats: Mapping[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if not stats.get("n"):
        return "n/a"
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def _range(stats: Mapping[str, Any], scale: float = 100.0) -> str:
    return "n/a" if not stats.get("n") else f"{stats['min'] * scale:.2f}–{stats['max'] * scale:.2f}"


def _halved(run: Mapping[str, Any]) -> str:
    """Adjustment rounds per seed whose aggregate kept at most half of ‖θ_low‖, as "mean ± std of N"."""
    stats = run.get("bae_rounds_halved", {})
    return "n/a" if not stats.get("n") else f"{_cell(stats, 1, 1)} of {run['bae_rounds']}"


def markdown_summary(summary: Mapping[str, Any]) -> str:
    lines = [
        f"{summary['title']} (`{summary['preset']}`, {summary['supernodes']} SuperNodes). Accuracy in %: "
        f"final = mean of the last {summary['final_means_last_rounds']} rounds, mean ± std over seeds; "
        f"last-{LATE_ROUNDS} = mean of the last {LATE_ROUNDS} rounds, late gain = that minus the mean of the "
        f"{LATE_ROUNDS} rounds before (points; near 0 once the curve has flattened).",
        "",
        f"| run | seeds | final acc | min–max | last-{LATE_ROUNDS} acc | late gain | last acc | validation acc "
        "| accuracy drop at adjustment (points) | its absolute value (points) "
        "| worst BaE ‖θ_low‖ end/start | BaE rounds halving ‖θ_low‖ | bytes vs dense | activations MiB | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run, r in summary["runs"].items():
        lines.append(
            f"| {run} | {len(r['seeds'])} | {_cell(r['final_accuracy'], 100)} | {_range(r['final_accuracy'])} "
            f"| {_cell(r.get('final10_accuracy', {}), 100)} | {_cell(r.get('late_gain', {}), 100)} "
            f"| {_cell(r['last_accuracy'], 100)} | {_cell(r['val_accuracy'], 100)} "
            f"| {_cell(r['adjustment_drop'], 100)} | {_cell(r.get('adjustment_change', {}), 100)} "
            f"| {_cell(r['bae_worst_squeeze'])} | {_halved(r)} | {_cell(r['bytes_ratio_vs_dense'], 1, 3)} "
            f"| {_cell(r['activation_mib'])} | {_cell(r['peak_rss_mb'], 1, 0)} |"
        )
    lines += [
        "",
        f"How far training got: examples the clients trained on per run (mean over seeds), and the change "
        f"of the server's test loss and of the clients' training loss from the {LATE_ROUNDS} rounds before "
        f"the last {LATE_ROUNDS} to the last {LATE_ROUNDS}.",
        "",
        "| run | examples trained on | late change, test loss | late change, training loss |",
        "|---|---|---|---|",
    ]
    for run, r in summary["runs"].items():
        examples = r.get("examples_processed", {})
        trained = f"{examples['mean']:,.0f}" if examples.get("n") else "n/a"
        lines.append(
            f"| {run} | {trained} | {_cell(r.get('late_test_loss_change', {}), 1, 3)} "
            f"| {_cell(r.get('late_train_loss_change', {}), 1, 3)} |"
        )
    paired = summary.get("paired_vs_reference", {})
    if paired:
        reference = next(iter(paired.values()))["reference"]
        lines += [
            "",
            f"{reference} minus each run, paired by seed: last-{LATE_ROUNDS} accuracy, points.",
            "",
            "| run | seeds | mean ± std | by seed |",
            "|---|---|---|---|",
        ]
        for run, d in paired.items():
            by_seed = ", ".join(f"{seed}: {v:+.2f}" for seed, v in d["by_seed"].items())
            lines.append(f"| {run} | {d['n']} | {_cell(d)} | {by_seed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="fmnist")
    p.add_argument("--runs", default="", help="comma-separated runs of the protocol's matrix (default: all)")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the protocol's)")
    p.add_argument("--summary-only", action="store_true", help="only recompute the summary from the run files")
    a = p.parse_args(argv)
    protocol = PROTOCOLS[a.protocol]
    runs = a.runs.split(",") if a.runs else list(protocol.runs)
    unknown = sorted(set(runs) - set(protocol.runs))
    if unknown:
        p.error(f"unknown runs {unknown}; the {a.protocol} matrix has {', '.join(protocol.runs)}")
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(protocol.seeds)
    failed = [] if a.summary_only else run_matrix(a.protocol, runs, seeds)
    summary = summarize_protocol(a.protocol)
    print(markdown_summary(summary))
    print(f"command: {Path(sys.executable).name} -m bench.compare {' '.join(sys.argv[1:])}")
    if failed:
        sys.exit(f"compare: {len(failed)} run(s) failed: {', '.join(failed)}; their logs lie beside their folders")


if __name__ == "__main__":
    main()
