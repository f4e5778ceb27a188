"""Per-run results file, its summary, and the comparison table across runs.

A run's file is one JSON object ``{"run": {...}, "rounds": [...], "summary": {...}}``, rewritten
atomically after every round so a crash keeps each finished round and the file always parses.
:func:`markdown_table` puts the runs' summaries side by side; the figure is :func:`server.plots.plot_runs`.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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

    An existing file is never overwritten: :attr:`path` is the name actually used. What is passed in is
    copied and :attr:`data` hands out a copy, so nothing outside changes the log without rewriting the file.
    """

    def __init__(self, path: Path, run_info: dict):
        self._path = _claim_fresh_path(Path(path))
        self._data: dict[str, Any] = {"run": copy.deepcopy(dict(run_info)), "rounds": [], "summary": {}}
        self._started = time.monotonic()
        write_json_atomic(self._path, self._data)

    @classmethod
    def resumed(cls, path: Path, data: dict, elapsed_s: float) -> ResultsLog:
        """Go on with ``data``, a checkpoint's copy of a log that had run ``elapsed_s`` seconds, in
        ``path``. The file is rewritten from it: a run killed between writing the file and its
        checkpoint has a round in the file that the resumed run repeats."""
        log = cls.__new__(cls)
        log._path = Path(path)
        log._data = copy.deepcopy(data)
        log._data["run"].setdefault("resumed", []).append({"after_round": len(data["rounds"]), "elapsed_s": elapsed_s})
        log._started = time.monotonic() - elapsed_s
        write_json_atomic(log._path, log._data)
        return log

    @property
    def path(self) -> Path:
        return self._path

    def plain(self) -> dict:
        """The results as the file holds them: JSON types only (what a checkpoint can store safely)."""
        return json.loads(json.dumps(_json_safe(self._data), allow_nan=False, default=str))

    @property
    def elapsed_s(self) -> float:
        """Seconds the run has taken so far, over all its starts."""
        return time.monotonic() - self._started

    @property
    def data(self) -> dict:
        """A deep copy of the results as kept in memory (non-finite floats still as NaN/Inf)."""
        return copy.deepcopy(self._data)

    def set_initial(self, record: dict) -> None:
        """Store the record of the initial model (round 0) as ``run["initial"]`` and rewrite the file."""
        self._data["run"]["initial"] = copy.deepcopy(record)
        write_json_atomic(self._path, self._data)

    def add_round(self, record: dict) -> None:
        """Append one round's record and rewrite the file."""
        self._data["rounds"].append(copy.deepcopy(record))
        write_json_atomic(self._path, self._data)

    def finish(self) -> dict:
        """Compute the summary and the run's wall time, store them in the file and return the summary."""
        self._data["run"]["wall_time_s"] = self.elapsed_s
        self._data["summary"] = summarize(self._data)
        write_json_atomic(self._path, self._data)
        return self._data["summary"]


def read_results(path: Path) -> dict:
    """A results file as :class:`ResultsLog` wrote it; OSError if unreadable, ValueError if not one."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not {"run", "rounds", "summary"} <= set(data):
        raise ValueError(f"{path} is not a results file (expected the keys run, rounds and summary)")
    return data


# -------------------------------------------------------------------------------------------- summary


def _finite(values: Iterable[Any]) -> list[float]:
    """The values that are real finite numbers (null and NaN entries are missing data)."""
    return [float(v) for v in values if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)]


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


FINAL_ROUNDS = 5  # final_accuracy averages this many last rounds unless told otherwise


def summarize(results: dict, last: int = FINAL_ROUNDS) -> dict:
    """Headline numbers of one run's results; a number with no data behind it is None.

    ``final_accuracy`` averages the non-null accuracies within the last ``last`` rounds;
    ``last_accuracy`` is the last round's own accuracy (None if that round has none).
    """
    if last < 1:
        raise ValueError(f"last must be at least 1, got {last}")
    rounds = results.get("rounds", [])
    clients = [c for r in rounds for c in r.get("clients", [])]
    bytes_mean = _mean(r.get("bytes_per_client") for r in rounds)
    dense_mean = _mean(r.get("dense_bytes_per_client") for r in rounds)
    return {
        "final_accuracy": _mean(r.get("accuracy") for r in rounds[-last:]),
        "last_accuracy": _number(rounds[-1].get("accuracy")) if rounds else None,
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


_TABLE_COLUMNS = (
    "method",
    "rounds",
    f"final acc (mean last {FINAL_ROUNDS})",
    "last acc",
    "best acc",
    "KiB/client/round",
    "ratio vs dense",
    "client peak RSS MB (mean/max)",
    "train s/client-round",
    "activations MiB",
)


def _cell(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def markdown_table(runs: Mapping[str, dict]) -> str:
    """A Markdown table with one row of :func:`summarize` numbers per run."""
    lines = ["| " + " | ".join(_TABLE_COLUMNS) + " |", "|---" * len(_TABLE_COLUMNS) + "|"]
    for name, results in runs.items():
        s = summarize(results)
        rss = f"{_cell(s['peak_rss_mb_mean'], '.1f')} / {_cell(s['peak_rss_mb_max'], '.1f')}"
        cells = [
            name.replace("|", "\\|"),
            str(s["rounds"]),
            _cell(s["final_accuracy"], ".4f"),
            _cell(s["last_accuracy"], ".4f"),
            _cell(s["best_accuracy"], ".4f"),
            _cell(s["bytes_per_client"], ".1f", 1 / 1024),
            _cell(s["bytes_ratio_vs_dense"], ".3f"),
            rss,
            _cell(s["train_time_s_mean"], ".2f"),
            _cell(s["activation_bytes_mean"], ".2f", 1 / 1024**2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
