"""Per-run results file, its summary, and the comparison figure and table across runs.

A run's file is one JSON object ``{"run": {...}, "rounds": [...], "summary": {...}}``, rewritten
atomically after every round so a crash keeps each finished round and the file always parses.
:func:`plot_runs` draws accuracy and bytes per client against the round as a hand-written SVG;
:func:`markdown_table` puts the runs' summaries side by side.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

# ---------------------------------------------------------------------------------------------- files


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600) whatever the umask, and would stay so once renamed.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            # Without this a power loss after os.replace can leave an empty file under the final name.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as None and numpy-like scalars as Python numbers."""
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON, atomically; NaN and ±Inf become null, which every JSON reader accepts.

    Values JSON has no type for (paths, enums in a run's config) are written as their ``str``.
    """
    text = json.dumps(_json_safe(obj), indent=1, allow_nan=False, default=str)
    _write_text_atomic(Path(path), text + "\n")


def _claim_fresh_path(path: Path) -> Path:
    """Create and return ``path``, or ``stem-1.ext``, ``stem-2.ext``... if taken.

    Creating with ``x`` claims the name atomically, so two runs started together do not share one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 0
    while True:
        try:
            with open(candidate, "x", encoding="utf-8"):
                return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")


class ResultsLog:
    """One run's results file, rewritten after each round and once more with the summary.

    An existing file is never overwritten: :attr:`path` is the name actually used.
    """

    def __init__(self, path: Path, run_info: dict):
        self._path = _claim_fresh_path(Path(path))
        self._data: dict[str, Any] = {"run": dict(run_info), "rounds": [], "summary": {}}
        write_json_atomic(self._path, self._data)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def data(self) -> dict:
        """The results as kept in memory (non-finite floats still as NaN/Inf); do not mutate."""
        return self._data

    def add_round(self, record: dict) -> None:
        """Append one round's record and rewrite the file."""
        self._data["rounds"].append(dict(record))
        write_json_atomic(self._path, self._data)

    def finish(self) -> dict:
        """Compute the summary, store it in the file and return it."""
        self._data["summary"] = summarize(self._data)
        write_json_atomic(self._path, self._data)
        return self._data["summary"]


# -------------------------------------------------------------------------------------------- summary


def _finite(values: Iterable[Any]) -> list[float]:
    """The values that are real finite numbers (null and NaN entries are missing data)."""
    return [float(v) for v in values
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)]


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None."""
    xs = _finite([value])
    return xs[0] if xs else None


def _mean(values: Iterable[Any]) -> float | None:
    xs = _finite(values)
    return sum(xs) / len(xs) if xs else None


def _max(values: Iterable[Any]) -> float | None:
    xs = _finite(values)
    return max(xs) if xs else None


def summarize(results: dict, last: int = 5) -> dict:
    """Headline numbers of one run's results; a number with no data behind it is None.

    ``final_accuracy`` averages the non-null accuracies within the last ``last`` rounds.
    """
    if last < 1:
        raise ValueError(f"last must be at least 1, got {last}")
    rounds = results.get("rounds", [])
    clients = [c for r in rounds for c in r.get("clients", [])]
    bytes_mean = _mean(r.get("bytes_per_client") for r in rounds)
    dense_mean = _mean(r.get("dense_bytes_per_client") for r in rounds)
    return {
        "final_accuracy": _mean(r.get("accuracy") for r in rounds[-last:]),
        "best_accuracy": _max(r.get("accuracy") for r in rounds),
        "rounds": len(rounds),
        "bytes_per_client": bytes_mean,
        "bytes_ratio_vs_dense": bytes_mean / dense_mean if bytes_mean is not None and dense_mean else None,
        "peak_rss_mb_mean": _mean(c.get("peak_rss_mb") for c in clients),
        "peak_rss_mb_max": _max(c.get("peak_rss_mb") for c in clients),
        "train_time_s_mean": _mean(c.get("train_time_s") for c in clients),
        "activation_bytes_mean": _mean(c.get("activation_bytes") for c in clients),
        "rejected": sum(len(r.get("rejected", [])) for r in rounds),
        "final_sparsity": _number(rounds[-1].get("sparsity")) if rounds else None,
    }


# ---------------------------------------------------------------------------------------------- table


_TABLE_COLUMNS = ("method", "rounds", "final acc", "best acc", "KiB/client/round", "ratio vs dense",
                  "client peak RSS MB (mean/max)", "train s/client-round", "activations MiB")


def _cell(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def markdown_table(runs: Mapping[str, dict]) -> str:
    """A Markdown table with one row of :func:`summarize` numbers per run."""
    lines = ["| " + " | ".join(_TABLE_COLUMNS) + " |", "|---" * len(_TABLE_COLUMNS) + "|"]
    for name, results in runs.items():
        s = summarize(results)
        rss = f"{_cell(s['peak_rss_mb_mean'], '.1f')} / {_cell(s['peak_rss_mb_max'], '.1f')}"
        cells = [name.replace("|", "\\|"), str(s["rounds"]), _cell(s["final_accuracy"], ".4f"),
                 _cell(s["best_accuracy"], ".4f"), _cell(s["bytes_per_client"], ".1f", 1 / 1024),
                 _cell(s["bytes_ratio_vs_dense"], ".3f"), rss, _cell(s["train_time_s_mean"], ".2f"),
                 _cell(s["activation_bytes_mean"], ".2f", 1 / 1024**2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- figure

# Okabe-Ito colours, told apart with colour-vision deficiencies, without the yellow that barely shows
# on white; past them the lines turn dashed.
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_DASHES = ("", "7 4", "2 3")
_WIDTH, _LEFT, _RIGHT = 760, 78, 24
_PLOT_HEIGHT = 190
_FONT = 12
_CHAR_WIDTH = 7  # rough width of one character at _FONT px, for laying out the legend
_MARK_ALL_SPACING = 16  # px between rounds from which every point gets a marker (denser, markers would merge)


@dataclass(frozen=True)
class _Scale:
    """Maps data values in ``[lo, hi]`` linearly onto pixels ``[px0, px1]``."""

    lo: float
    hi: float
    ticks: tuple[float, ...]
    decimals: int
    px0: float
    px1: float

    def __call__(self, value: float) -> float:
        return self.px0 + (value - self.lo) / (self.hi - self.lo) * (self.px1 - self.px0)

    def label(self, value: float) -> str:
        return f"{value:.{self.decimals}f}"


def _nice_scale(lo: float, hi: float, px0: float, px1: float, target: int, min_step: float = 0.0) -> _Scale:
    """A scale over ``[lo, hi]`` widened to ticks at 1, 2 or 5 times a power of ten."""
    if hi <= lo:
        pad = max(abs(lo) * 0.1, min_step, 0.5)
        # Zero stays the bottom: an all-zero series should not get a negative axis.
        lo, hi = (lo - pad if lo else lo), hi + pad
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = max(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw), min_step)
    # The tolerance keeps float noise (0.3 / 0.1 = 2.999...) from adding an empty tick interval.
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    ticks = tuple(round(i * step, 10) for i in range(first, last + 1))
    decimals = max(0, math.ceil(-math.log10(step) - 1e-9))
    return _Scale(ticks[0], ticks[-1], ticks, decimals, px0, px1)


def _xml_text(text: str) -> str:
    """``text`` escaped for XML, without the control characters XML 1.0 cannot hold at all."""
    return escape("".join(ch for ch in text if ch >= " " or ch in "\t\n\r"))


def _xml_attr(text: str) -> str:
    return quoteattr("".join(ch for ch in text if ch >= " "))


def _points(results: dict, key: str, scale: float) -> list[tuple[float, float | None]]:
    """(round, value × scale) for each round; the value is None where missing or not finite."""
    out = []
    for r in results.get("rounds", []):
        x, y = _number(r.get("round")), _number(r.get(key))
        if x is not None:
            out.append((x, None if y is None else y * scale))
    return sorted(out, key=lambda p: p[0])


def _segments(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """The runs of consecutive points with a value; a missing value breaks the line."""
    segments: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None:
            if segments[-1]:
                segments.append([])
        else:
            segments[-1].append((x, y))
    return [s for s in segments if s]


def _style(index: int) -> tuple[str, str]:
    """Colour and dash pattern of the ``index``-th run."""
    return _COLOURS[index % len(_COLOURS)], _DASHES[(index // len(_COLOURS)) % len(_DASHES)]


def _dash_attr(dash: str) -> str:
    return f' stroke-dasharray="{dash}"' if dash else ""


def _series_svg(name: str, index: int, points: Sequence[tuple[float, float | None]], sx: _Scale, sy: _Scale) -> str:
    """One run's line (a single path, broken at missing values) and its point markers."""
    colour, dash = _style(index)
    segments = _segments(points)
    d = " ".join("M" + " L".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in seg) for seg in segments)
    # A lone point has no line through it, so it always needs its marker.
    sparse = abs(sx(1.0) - sx(0.0)) >= _MARK_ALL_SPACING
    marked = [p for seg in segments if sparse or len(seg) == 1 for p in seg]
    circles = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in marked)
    path = (f'<path class="series" d="{d}" fill="none" stroke="{colour}" stroke-width="2" '
            f'stroke-linejoin="round"{_dash_attr(dash)}/>')
    return f'<g class="run" data-run={_xml_attr(name)}>{path}{circles}</g>'


def _axes_svg(sx: _Scale, sy: _Scale, x_labels: bool) -> list[str]:
    """Grid, frame, ticks and tick labels of one panel."""
    top, bottom, left, right = sy.px1, sy.px0, sx.px0, sx.px1
    out = []
    for t in sy.ticks:
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<line x1="{left - 5}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#333"/>')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{sy.label(t)}</text>')
    for t in sx.ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#e4e4e4"/>')
        out.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 5}" stroke="#333"/>')
        if x_labels:
            out.append(f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{sx.label(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#333"/>')
    return out


@dataclass(frozen=True)
class _Panel:
    """What one panel shows: which round field, scaled how, under which titles."""

    panel_id: str
    title: str
    y_title: str
    key: str
    scale: float
    from_zero: bool
    upper: float | None  # the largest value the quantity can take, if it has one


def _accuracy_panel(runs: Mapping[str, dict]) -> _Panel:
    values = _finite(r.get("accuracy") for res in runs.values() for r in res.get("rounds", []))
    as_percent = bool(values) and all(0 <= v <= 1 for v in values)
    return _Panel("accuracy", "Test accuracy per round", "Accuracy (%)" if as_percent else "Accuracy",
                  "accuracy", 100.0 if as_percent else 1.0, False, 100.0 if as_percent else None)


def _bytes_panel(runs: Mapping[str, dict]) -> _Panel:
    values = _finite(r.get("bytes_per_client") for res in runs.values() for r in res.get("rounds", []))
    peak = max(values, default=0.0)
    unit, size = next(((u, s) for u, s in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)) if peak >= s),
                      ("B", 1))
    return _Panel("bytes", "Bytes exchanged per client per round (down + up)", f"{unit} per client",
                  "bytes_per_client", 1 / size, True, None)


def _y_range(values: Sequence[float], panel: _Panel) -> tuple[float, float]:
    """The values' range plus some headroom, which keeps extreme points off the frame (half hidden
    there) but does not stretch the axis past what the quantity can reach (below 0, above 100 %)."""
    lo = 0.0 if panel.from_zero else min(values, default=0.0)
    hi = max(values, default=1.0)
    margin = 0.05 * (hi - lo)
    top = hi + margin if panel.upper is None else max(min(hi + margin, panel.upper), hi)
    return max(lo - margin, min(lo, 0.0)), top


def _panel_svg(panel: _Panel, runs: Mapping[str, dict], sx: _Scale, top: float, x_labels: bool) -> list[str]:
    """A panel: title, axes, y-axis title and one series per run."""
    series = [_points(res, panel.key, panel.scale) for res in runs.values()]
    values = [y for pts in series for _, y in pts if y is not None]
    sy = _nice_scale(*_y_range(values, panel), top + _PLOT_HEIGHT, top, target=5)
    mid = top + _PLOT_HEIGHT / 2
    out = [f'<g class="panel" id="{panel.panel_id}">',
           f'<text x="{_LEFT}" y="{top - 8}" font-size="{_FONT + 2}" font-weight="bold">'
           f'{_xml_text(panel.title)}</text>',
           *_axes_svg(sx, sy, x_labels),
           f'<text x="18" y="{mid}" text-anchor="middle" transform="rotate(-90 18 {mid})">'
           f'{_xml_text(panel.y_title)}</text>']
    if not values:
        out.append(f'<text x="{(sx.px0 + sx.px1) / 2}" y="{mid}" text-anchor="middle" fill="#888">no data</text>')
    out += [_series_svg(name, i, pts, sx, sy) for i, (name, pts) in enumerate(zip(runs, series))]
    out.append("</g>")
    return out


def _legend_rows(names: Sequence[str]) -> list[list[tuple[int, str, float]]]:
    """(run index, name, x offset) per legend entry, flowed into rows that fit the plot width."""
    rows: list[list[tuple[int, str, float]]] = [[]]
    x = 0.0
    for i, name in enumerate(names):
        width = 40 + _CHAR_WIDTH * len(name)
        if rows[-1] and x + width > _WIDTH - _LEFT - _RIGHT:
            rows.append([])
            x = 0.0
        rows[-1].append((i, name, x))
        x += width + 16
    return rows


def _legend_svg(rows: Sequence[Sequence[tuple[int, str, float]]], top: float) -> list[str]:
    """Each run's line style, marker and name, row by row below the panels."""
    out = ['<g class="legend">']
    for r, row in enumerate(rows):
        y = top + 20 * r
        for i, name, dx in row:
            colour, dash = _style(i)
            x = _LEFT + dx
            out.append(f'<line x1="{x}" y1="{y}" x2="{x + 28}" y2="{y}" stroke="{colour}" stroke-width="2"'
                       f'{_dash_attr(dash)}/><circle cx="{x + 14}" cy="{y}" r="3" fill="{colour}"/>'
                       f'<text x="{x + 36}" y="{y + 4}">{_xml_text(name)}</text>')
    out.append("</g>")
    return out


def plot_runs(runs: Mapping[str, dict], svg_path: Path, title: str = "") -> None:
    """Write a standalone SVG: test accuracy (top) and bytes per client (bottom) against the round.

    One line per run (key = legend label); a null or NaN value breaks that run's line.
    """
    if not runs:
        raise ValueError("no runs to plot")
    rounds = _finite(r.get("round") for res in runs.values() for r in res.get("rounds", []))
    title_height = 36 if title else 10
    acc_top = title_height + 26
    bytes_top = acc_top + _PLOT_HEIGHT + 44
    legend_top = bytes_top + _PLOT_HEIGHT + 62
    legend = _legend_rows(list(runs))
    height = legend_top + 20 * len(legend)
    sx = _nice_scale(min(rounds, default=0.0), max(rounds, default=1.0), _LEFT, _WIDTH - _RIGHT, target=8,
                     min_step=1.0)
    x_mid = (_LEFT + _WIDTH - _RIGHT) / 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
             f'viewBox="0 0 {_WIDTH} {height}" font-family="sans-serif" font-size="{_FONT}">',
             f"<title>{_xml_text(title or 'Accuracy and bytes per client by round')}</title>",
             f'<rect width="{_WIDTH}" height="{height}" fill="white"/>']
    if title:
        parts.append(f'<text x="{_WIDTH / 2}" y="24" text-anchor="middle" font-size="{_FONT + 4}" '
                     f'font-weight="bold">{_xml_text(title)}</text>')
    parts += _panel_svg(_accuracy_panel(runs), runs, sx, acc_top, x_labels=False)
    parts += _panel_svg(_bytes_panel(runs), runs, sx, bytes_top, x_labels=True)
    parts.append(f'<text x="{x_mid}" y="{bytes_top + _PLOT_HEIGHT + 36}" text-anchor="middle">Round</text>')
    parts += _legend_svg(legend, legend_top)
    parts.append("</svg>")
    _write_text_atomic(Path(svg_path), "\n".join(parts) + "\n")
