"""The figure of one or more runs, drawn with matplotlib into a PNG.

Three panels: (a) test accuracy per round, (b) bytes exchanged per client per round, (c) memory per client
(activations held for backward, process peak RSS). Each label maps to one results dict as
:class:`server.results.ResultsLog` writes it, or to a list of them (seeds): the line is then the mean over
the seeds with their min-max range shaded, and the bars get min-max error bars.

Drawn with the object-oriented API on the Agg canvas, never pyplot: no GUI backend and no global figure
state, so it works headless, in Ray workers and from several threads. Existing runs together::

    python -m server.plots runs/fedmef-s0 runs/fedmef-s1 runs/fedtiny-s0 -o both.png

Run folders named ``<label>-s<seed>`` share one line with its seed band.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from server.results import read_results, summarize

# Okabe-Ito, told apart with colour-vision deficiencies (without the yellow that barely shows on white).
# Colour, line style and marker all change from one run to the next, so lines that lie on top of each
# other stay distinguishable, in grey print too.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MAX_MARKERS = 12  # per line; a marker on each of 60 rounds would bury the lines
DPI = 200
LOG_SPAN = 10.0  # bytes get a log axis when the largest value is more than this times the smallest

Results = Mapping[str, Any]


def _value(v: Any) -> float:
    """``v`` as a float, NaN where it is missing or not a finite number."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else math.nan


def _series(seeds: Sequence[Results], key: str, scale: float) -> tuple[np.ndarray, ...]:
    """Rounds and, per round, the mean, min and max of ``key`` × ``scale`` over the seeds (NaN: no data)."""
    by_round: dict[float, list[float]] = {}
    for results in seeds:
        for r in results.get("rounds", []):
            x, y = _value(r.get("round")), _value(r.get(key)) * scale
            if not math.isnan(x):
                by_round.setdefault(x, []).extend([] if math.isnan(y) else [y])
    xs = sorted(by_round)
    stat = [[f(by_round[x]) if by_round[x] else math.nan for x in xs] for f in (np.mean, min, max)]
    return np.array(xs, dtype=float), *(np.array(s, dtype=float) for s in stat)


def _line(ax: Axes, index: int, x: np.ndarray, mean: np.ndarray, lo: np.ndarray, hi: np.ndarray, band: bool) -> Any:
    """One run's line (broken where a value is missing), a few markers and the seeds' band; its legend handle."""
    colour, style, marker = (s[index % len(s)] for s in (COLOURS, LINESTYLES, MARKERS))
    step = max(1, math.ceil(len(x) / MAX_MARKERS))
    # Markers of different runs sit on different rounds, so they do not hide each other.
    (line,) = ax.plot(
        x,
        mean,
        color=colour,
        linestyle=style,
        linewidth=1.5,
        marker=marker,
        markersize=4,
        markevery=(index % step, step),
    )
    if len(x):
        # A value with missing neighbours has no line through it: give it a marker of its own.
        finite = np.isfinite(mean)
        lone = finite & ~np.r_[False, finite[:-1]] & ~np.r_[finite[1:], False]
        ax.plot(x[lone], mean[lone], color=colour, linestyle="none", marker=marker, markersize=4)
    return (ax.fill_between(x, lo, hi, color=colour, alpha=0.25, linewidth=0), line) if band else line


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")


def _round_panel(
    ax: Axes, groups: Mapping[str, list[Results]], key: str, scale: float
) -> tuple[np.ndarray, np.ndarray, list[Any], list[str]]:
    """A line per label of ``key`` against the round; the values drawn (per-round min and max over the
    seeds), the legend handles and labels."""
    lows, highs, handles, labels = [], [], [], []
    for i, (label, seeds) in enumerate(groups.items()):
        x, mean, lo, hi = _series(seeds, key, scale)
        handles.append(_line(ax, i, x, mean, lo, hi, band=len(seeds) > 1))
        labels.append(label if len(seeds) == 1 else f"{label} (mean of {len(seeds)} seeds, shaded: min-max)")
        lows += [v for v in lo if math.isfinite(v)]
        highs += [v for v in hi if math.isfinite(v)]
    if not lows:
        _no_data(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=(1, 2, 5, 10)))
    ax.grid(True, color="0.9")
    return np.array(lows), np.array(highs), handles, labels


def _zoom_accuracy(ax: Axes, lows: np.ndarray, highs: np.ndarray, unit: str) -> None:
    """Keep the first rounds' low accuracies from squashing the rest of the curves into a thin strip.

    Matplotlib already fits the axis to the data rather than 0-100 %; when the lowest tenth of the values
    would still take more than half of it, the axis starts there instead and says how many points it cut.
    """
    if len(lows) < 10:
        return
    low, top = np.percentile(lows, 10), highs.max()
    if lows.min() >= low - (top - low) or top <= low:
        return
    bottom = low - 0.1 * (top - low)
    ax.set_ylim(bottom, top + 0.08 * (top - low))
    cut = int((lows < bottom).sum())
    ax.text(
        0.99,
        0.02,
        f"axis cut at {bottom:.1f}{unit}: {cut} lower points not shown",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=7,
        color="0.4",
    )


def _memory_panel(ax: Axes, groups: Mapping[str, list[Results]], note: str | None) -> None:
    """Per label, mean activations held for backward and mean client peak RSS as bars on two y axes."""
    metrics = (
        ("activation_bytes_mean", 1 / 1024**2, "activations held for backward (MiB, left axis)", "MiB"),
        ("peak_rss_mb_mean", 1.0, "client process peak RSS (MB, right axis)", "MB"),
    )
    summaries = [[summarize(dict(s)) for s in seeds] for seeds in groups.values()]  # summarize is typed for a dict
    width, bars = 0.38, []
    for k, ((key, scale, name, unit), axis) in enumerate(zip(metrics, (ax, ax.twinx()), strict=True)):
        xs: list[float] = []
        means: list[float] = []
        err: tuple[list[float], list[float]] = ([], [])
        for j, per_seed in enumerate(summaries):
            vals = [v * scale for v in (_value(s[key]) for s in per_seed) if math.isfinite(v)]
            if vals:  # no bar where the value is missing
                xs.append(j + (k - 0.5) * width)
                means.append(float(np.mean(vals)))
                err[0].append(means[-1] - min(vals))
                err[1].append(max(vals) - means[-1])
        yerr = err if note else None
        bars.append(
            axis.bar(
                xs,
                means,
                width,
                yerr=yerr,
                capsize=3,
                label=name,
                color=("0.35", "0.8")[k],
                hatch=("", "///")[k],
                edgecolor="black",
                linewidth=0.6,
            )
        )
        axis.bar_label(bars[-1], fmt=lambda v: f"{v:.0f}" if v >= 100 else f"{v:.3g}", fontsize=7, padding=2)
        axis.set_ylabel(("activations", "peak RSS")[k] + f" ({unit})")
        axis.margins(y=0.18)
        if not xs:
            axis.set_yticks([])
    if not any(len(b) for b in bars):
        _no_data(ax)
    long = max(map(len, groups)) > 12 or len(groups) > 4
    ax.set_xticks(range(len(groups)), list(groups), rotation=20 if long else 0, ha="right" if long else "center")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.figure.legend(
        handles=bars, loc="outside lower center", ncols=2, frameon=False, fontsize=8, title=note, title_fontsize=8
    )


def plot_runs(runs: Mapping[str, Results | Sequence[Results]], path: Path, title: str = "") -> Path:
    """Write the runs' figure as a PNG to ``path`` (replaced whole, never half-written) and return it.

    A null or NaN value leaves a gap in that run's line, or no bar.
    """
    groups = {label: [value] if isinstance(value, Mapping) else list(value) for label, value in runs.items()}
    if not groups or not all(groups.values()):
        raise ValueError("no runs to plot, or a label without results")
    fig = Figure(figsize=(7.5, 9.5), dpi=DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    acc, sent, memory = fig.subplots(3, 1, height_ratios=(1.0, 1.0, 0.85))
    sent.sharex(acc)

    accuracies = [_value(r.get("accuracy")) for seeds in groups.values() for s in seeds for r in s.get("rounds", [])]
    percent = all(0 <= a <= 1 for a in accuracies if math.isfinite(a))
    # Fitted to the data, not 0-100 %: the differences between methods are a point or two.
    lows, highs, handles, labels = _round_panel(acc, groups, "accuracy", 100.0 if percent else 1.0)
    _zoom_accuracy(acc, lows, highs, " %" if percent else "")
    acc.set_ylabel("test accuracy (%)" if percent else "test accuracy")
    acc.set_title("(a) Test accuracy per round", loc="left", fontsize=10)

    kib_low, kib_high = _round_panel(sent, groups, "bytes_per_client", 1 / 1024)[:2]
    if len(kib_low) and kib_low.min() > 0 and kib_high.max() > LOG_SPAN * kib_low.min():
        sent.set_yscale("log")
    sent.set_ylabel("KiB per client (down + up)")
    sent.set_xlabel("round")
    sent.set_title("(b) Bytes exchanged per client per round", loc="left", fontsize=10)

    seeded = any(len(seeds) > 1 for seeds in groups.values())
    _memory_panel(memory, groups, "whiskers: min-max over seeds" if seeded else None)
    memory.set_title("(c) Memory per client (mean over clients and rounds)", loc="left", fontsize=10)
    # The title is the legend's: a suptitle and a legend outside the top would overlap.
    fig.legend(
        handles,
        labels,
        loc="outside upper center",
        ncols=min(len(labels), 2 if seeded else 3),
        frameon=False,
        fontsize=8,
        title=title or None,
        title_fontproperties={"size": 11, "weight": "bold"},
    )
    return _save(canvas, path)


def plot_seed_values(values: Mapping[str, Mapping[int, float]], path: Path, title: str = "", ylabel: str = "") -> Path:
    """One bar per run at the mean of its seeds' values (written at its foot), whiskers ±1 std, and each
    seed's own value as a dot coloured by seed, so that a seed's runs can be compared with each other
    across bars. Written like :func:`plot_runs`; a run without values gets no bar."""
    if not values:
        raise ValueError("no runs to plot")
    fig = Figure(figsize=(7.5, 4.0), dpi=DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    finite = [v for per_seed in values.values() for v in per_seed.values() if math.isfinite(v)]
    # The differences are a point or two: the axis is fitted to the values, not started at 0.
    span = max(max(finite) - min(finite), 1.0) if finite else 1.0
    low = min(finite) - 0.4 * span if finite else 0.0
    ax.set_ylim(low, max(finite) + 0.4 * span if finite else 1.0)
    for j, per_seed in enumerate(values.values()):
        vals = [v for v in per_seed.values() if math.isfinite(v)]
        if not vals:
            continue
        mean, std = float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        ax.bar(j, mean - low, 0.6, bottom=low, yerr=std, capsize=4, color="0.85", edgecolor="black", linewidth=0.6)
        ax.text(j, low + 0.04 * span, f"{mean:.1f}", ha="center", va="bottom", fontsize=7)
    seeds = sorted({seed for per_seed in values.values() for seed in per_seed})
    for k, seed in enumerate(seeds):
        offset = (k - (len(seeds) - 1) / 2) * 0.12
        points = [(j + offset, per_seed[seed]) for j, per_seed in enumerate(values.values()) if seed in per_seed]
        xs, ys = zip(*points, strict=True)
        ax.scatter(
            xs,
            ys,
            s=18,
            zorder=3,
            color=COLOURS[k % len(COLOURS)],
            marker=MARKERS[k % len(MARKERS)],
            label=f"seed {seed}",
        )
    ax.set_xticks(range(len(values)), list(values), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color="0.9")
    ax.set_title(title, loc="left", fontsize=9)
    if seeds:
        ax.legend(fontsize=7, ncols=len(seeds), loc="upper left", title="bar: mean, whiskers: ±1 std", title_fontsize=7)
    return _save(canvas, path)


def _save(canvas: FigureCanvasAgg, path: Path) -> Path:
    """The canvas as a PNG at ``path``, replaced whole, never half-written."""
    canvas.draw()
    # 256 colours look the same for line art and take a third of the bytes of full RGBA.
    image = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB").quantize(256)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def group_runs(folders: Sequence[Path]) -> dict[str, list[Results]]:
    """The results of each run folder (or results file), grouped by name without its ``-s<seed>``."""
    groups: dict[str, list[Results]] = {}
    for folder in folders:
        path = Path(folder)
        path = path / "results.json" if path.is_dir() else path
        label = re.sub(r"-s\d+$", "", path.parent.name)
        groups.setdefault(label, []).append(read_results(path))
    return groups


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Plot existing runs together (one line per name, seeds as a band).")
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or their results.json)")
    p.add_argument("-o", "--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    try:
        groups = group_runs(a.runs)
    except (OSError, ValueError) as exc:
        sys.exit(f"plots: {exc}")
    print(plot_runs(groups, a.out, a.title))


if __name__ == "__main__":
    main()
