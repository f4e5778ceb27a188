"""Tests for server.results: the per-run results file, its summary, the SVG figure and the table."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from server.results import ResultsLog, markdown_table, plot_runs, summarize, write_json_atomic

SVG = "{http://www.w3.org/2000/svg}"


def _strict_load(path: Path) -> dict:
    """Parse as JSON that any reader accepts: NaN / Infinity tokens are an error."""
    def reject(token: str):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def _round(n: int, accuracy: float | None = 0.5, bytes_per_client: float = 2048.0, clients=(), rejected=()) -> dict:
    return {"round": n, "accuracy": accuracy, "loss": 1.0, "sparsity": 0.8, "layer_sparsity": {"conv1": 0.5},
            "adjusted": False, "bytes_down": bytes_per_client / 2, "bytes_up": bytes_per_client / 2,
            "bytes_per_client": bytes_per_client, "dense_bytes_per_client": 10 * bytes_per_client,
            "clients": list(clients), "rejected": list(rejected), "round_time_s": 1.0, "eval_time_s": 0.1}


def _client(rss: float, train: float, act: int) -> dict:
    return {"node_id": 1, "partition_id": 0, "examples": 10, "loss": 0.5, "train_time_s": train, "cpu_time_s": train,
            "peak_rss_mb": rss, "activation_bytes": act, "bytes_down": 100, "bytes_up": 100}


def _run(accuracies, bytes_per_client=2048.0) -> dict:
    return {"run": {}, "rounds": [_round(i + 1, a, bytes_per_client) for i, a in enumerate(accuracies)]}


# ---------------------------------------------------------------------------------------------- files


def test_file_is_valid_json_after_each_round_and_after_finish(tmp_path):
    log = ResultsLog(tmp_path / "run.json", {"strategy": "fedmef", "config": {"rounds": 3}})
    assert _strict_load(log.path) == {"run": {"strategy": "fedmef", "config": {"rounds": 3}}, "rounds": [],
                                      "summary": {}}
    for n in range(1, 4):
        log.add_round(_round(n, accuracy=0.1 * n, clients=[_client(50.0, 1.0, 1000)]))
        on_disk = _strict_load(log.path)
        assert [r["round"] for r in on_disk["rounds"]] == list(range(1, n + 1))
    summary = log.finish()
    on_disk = _strict_load(log.path)
    assert on_disk["summary"] == summary == log.data["summary"]
    assert summary["rounds"] == 3 and summary["best_accuracy"] == pytest.approx(0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temp files left behind


def test_non_finite_numbers_are_written_as_null(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json_atomic(path, {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": np.float32("nan"),
                             "d": np.int64(3), "e": np.float64(2.5), "f": (True, None), "g": tmp_path})
    assert _strict_load(path) == {"a": None, "b": [None, None, 1.5], "c": None, "d": 3, "e": 2.5,
                                  "f": [True, None], "g": str(tmp_path)}


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    log = ResultsLog(tmp_path / "run.json", {})
    log.add_round(_round(1))

    def crash(src, dst):
        raise OSError("disk gone")
    monkeypatch.setattr("server.results.os.replace", crash)
    with pytest.raises(OSError):
        log.add_round(_round(2))
    assert [r["round"] for r in _strict_load(log.path)["rounds"]] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_nan_in_a_round_is_null_on_disk_but_kept_in_memory(tmp_path):
    log = ResultsLog(tmp_path / "run.json", {})
    log.add_round(_round(1, accuracy=math.nan))
    assert _strict_load(log.path)["rounds"][0]["accuracy"] is None
    assert math.isnan(log.data["rounds"][0]["accuracy"])


def test_existing_file_is_not_clobbered(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("precious")
    first, second = ResultsLog(path, {"n": 1}), ResultsLog(path, {"n": 2})
    assert path.read_text() == "precious"
    assert (first.path.name, second.path.name) == ("run-1.json", "run-2.json")
    assert _strict_load(first.path)["run"] == {"n": 1} and _strict_load(second.path)["run"] == {"n": 2}


# -------------------------------------------------------------------------------------------- summary


def test_summarize_by_hand():
    rounds = [_round(1, 0.50, 100.0, clients=[_client(10.0, 1.0, 1000), _client(30.0, 3.0, 3000)]),
              _round(2, None, 200.0, clients=[_client(20.0, 2.0, 2000)], rejected=[{"node_id": 4, "reason": "x"}]),
              _round(3, 0.70, 300.0, rejected=[{"node_id": 5, "reason": "y"}, {"node_id": 6, "reason": "z"}])]
    rounds[2]["sparsity"] = 0.9
    for r, dense in zip(rounds, (1000.0, 1000.0, 4000.0)):
        r["dense_bytes_per_client"] = dense
    s = summarize({"run": {}, "rounds": rounds})
    assert s["final_accuracy"] == pytest.approx(0.6)  # (0.5 + 0.7) / 2, the null skipped
    assert s["best_accuracy"] == pytest.approx(0.7)
    assert s["rounds"] == 3
    assert s["bytes_per_client"] == pytest.approx(200.0)
    assert s["bytes_ratio_vs_dense"] == pytest.approx(200.0 / 2000.0)
    assert s["peak_rss_mb_mean"] == pytest.approx(20.0) and s["peak_rss_mb_max"] == pytest.approx(30.0)
    assert s["train_time_s_mean"] == pytest.approx(2.0)
    assert s["activation_bytes_mean"] == pytest.approx(2000.0)
    assert s["rejected"] == 3
    assert s["final_sparsity"] == pytest.approx(0.9)
    assert summarize({"rounds": rounds}, last=2)["final_accuracy"] == pytest.approx(0.7)  # round 2 is null
    assert summarize({"rounds": rounds}, last=1)["final_accuracy"] == pytest.approx(0.7)


def test_summarize_without_data_gives_none():
    s = summarize({"run": {}, "rounds": []})
    assert s["rounds"] == 0 and s["rejected"] == 0
    assert all(s[k] is None for k in s if k not in ("rounds", "rejected"))
    with pytest.raises(ValueError):
        summarize({"rounds": []}, last=0)


# ---------------------------------------------------------------------------------------------- figure


def _svg(runs: dict, tmp_path: Path, title: str = "") -> ET.Element:
    path = tmp_path / "fig.svg"
    plot_runs(runs, path, title=title)
    return ET.parse(path).getroot()


def _panel(root: ET.Element, panel_id: str) -> ET.Element:
    return next(g for g in root.iter(f"{SVG}g") if g.get("id") == panel_id)


def _series(panel: ET.Element) -> dict[str, ET.Element]:
    """Run name -> its line in the panel; there must be exactly one line per run."""
    groups = [g for g in panel.iter(f"{SVG}g") if g.get("class") == "run"]
    lines = {g.get("data-run"): g.findall(f"{SVG}path[@class='series']") for g in groups}
    assert all(len(paths) == 1 for paths in lines.values())
    return {name: paths[0] for name, paths in lines.items()}


def _legend_labels(root: ET.Element) -> list[str]:
    legend = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "legend")
    return [t.text for t in legend.iter(f"{SVG}text")]


def test_svg_has_one_line_per_run_per_panel_and_legend(tmp_path):
    runs = {"FedMef <s=0.9> & \"co\"": _run([0.3, 0.5, 0.6], 300 * 1024.0), "FedAvg": _run([0.4, 0.6, 0.7], 3e6)}
    root = _svg(runs, tmp_path, title="CIFAR-10 <ResNet-18> & friends")
    for panel_id in ("accuracy", "bytes"):
        assert list(_series(_panel(root, panel_id))) == list(runs)
    assert _legend_labels(root) == list(runs)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "CIFAR-10 <ResNet-18> & friends" in texts
    assert {"Round", "Accuracy (%)", "MiB per client"} <= set(texts)  # largest value 3e6 B: MiB reads best
    assert root.find(f"{SVG}title").text == "CIFAR-10 <ResNet-18> & friends"


def test_svg_breaks_lines_at_null_and_nan(tmp_path):
    runs = {"gappy": _run([0.5, None, 0.6, 0.7, math.nan, 0.8]), "empty": _run([None, None, None, None, None, None])}
    root = _svg(runs, tmp_path)
    lines = _series(_panel(root, "accuracy"))
    assert lines["gappy"].get("d").count("M") == 3  # [0.5], [0.6, 0.7], [0.8]
    assert lines["empty"].get("d") == ""
    assert lines["gappy"].get("d").count("L") == 1
    bytes_lines = _series(_panel(root, "bytes"))
    assert all(p.get("d").count("M") == 1 for p in bytes_lines.values())


def test_svg_single_round_draws_a_marker(tmp_path):
    root = _svg({"one": _run([0.42])}, tmp_path)
    for panel_id in ("accuracy", "bytes"):
        group = _panel(root, panel_id)
        assert len(_series(group)) == 1
        (marker,) = [c for g in group.iter(f"{SVG}g") if g.get("class") == "run" for c in g.iter(f"{SVG}circle")]
        frame = group.find(f"{SVG}rect")
        x0, y0 = float(frame.get("x")), float(frame.get("y"))
        assert x0 < float(marker.get("cx")) < x0 + float(frame.get("width"))
        assert y0 < float(marker.get("cy")) < y0 + float(frame.get("height"))


def test_svg_with_many_runs_keeps_them_apart(tmp_path):
    runs = {f"method {i}": _run([0.1 * i, 0.1 * i + 0.05], 1024.0 * (i + 1)) for i in range(10)}
    root = _svg(runs, tmp_path)
    lines = _series(_panel(root, "accuracy"))
    assert list(lines) == list(runs)
    styles = {(p.get("stroke"), p.get("stroke-dasharray")) for p in lines.values()}
    assert len(styles) == len(runs)
    assert _legend_labels(root) == list(runs)
    assert "KiB per client" in [t.text for t in root.iter(f"{SVG}text")]


def _y_tick_values(panel: ET.Element) -> list[float]:
    """The numbers on the y axis (its labels are the only right-aligned text)."""
    return [float(t.text) for t in panel.iter(f"{SVG}text") if t.get("text-anchor") == "end"]


def test_svg_axes_stay_within_what_the_quantity_can_reach(tmp_path):
    root = _svg({"a": _run([0.01, 0.995], bytes_per_client=0.0), "b": _run([0.5, 0.6], bytes_per_client=0.0)}, tmp_path)
    accuracy_ticks = _y_tick_values(_panel(root, "accuracy"))
    assert min(accuracy_ticks) == 0 and max(accuracy_ticks) == 100
    assert min(_y_tick_values(_panel(root, "bytes"))) == 0


def test_svg_without_any_accuracy_says_so(tmp_path):
    root = _svg({"no eval": _run([None, None])}, tmp_path)
    assert "no data" in [t.text for t in _panel(root, "accuracy").iter(f"{SVG}text")]
    assert "no data" not in [t.text for t in _panel(root, "bytes").iter(f"{SVG}text")]


def test_plot_needs_a_run(tmp_path):
    with pytest.raises(ValueError):
        plot_runs({}, tmp_path / "fig.svg")


# ---------------------------------------------------------------------------------------------- table


def test_markdown_table_has_header_and_one_row_per_run():
    runs = {"FedMef": _run([0.5, 0.7]), "Fed|Tiny": _run([None, None]), "FedAvg": _run([0.6])}
    lines = markdown_table(runs).splitlines()
    assert lines[0].startswith("| method | rounds | final acc")
    assert set(lines[1].replace("|", "")) == {"-"}
    assert len(lines) == 2 + len(runs)
    columns = lines[0].count(" | ")
    assert all(line.replace("\\|", "").count(" | ") == columns for line in lines[2:])
    assert lines[2].split(" | ")[1:5] == ["2", "0.6000", "0.7000", "2.0"]  # 2048 B = 2.0 KiB
    assert "Fed\\|Tiny" in lines[3] and "n/a" in lines[3]
