"""Tests for server.results: the per-run results file, its summary and the table (the figure: test_plots)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from server.results import ResultsLog, markdown_table, summarize, write_json_atomic


def _strict_load(path: Path) -> dict:
    """Parse as JSON that any reader accepts: NaN / Infinity tokens are an error."""

    def reject(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def _round(n: int, accuracy: float | None = 0.5, bytes_per_client: float = 2048.0, clients=(), rejected=()) -> dict:
    return {
        "round": n,
        "accuracy": accuracy,
        "loss": 1.0,
        "sparsity": 0.8,
        "layer_sparsity": {"conv1": 0.5},
        "adjusted": False,
        "bytes_down": bytes_per_client / 2,
        "bytes_up": bytes_per_client / 2,
        "bytes_per_client": bytes_per_client,
        "dense_bytes_per_client": 10 * bytes_per_client,
        "clients": list(clients),
        "rejected": list(rejected),
        "round_time_s": 1.0,
        "eval_time_s": 0.1,
    }


def _client(rss: float, train: float, act: int) -> dict:
    return {
        "node_id": 1,
        "partition_id": 0,
        "examples": 10,
        "loss": 0.5,
        "train_time_s": train,
        "cpu_time_s": train,
        "peak_rss_mb": rss,
        "activation_bytes": act,
        "bytes_down": 100,
        "bytes_up": 100,
    }


def _run(accuracies, bytes_per_client=2048.0) -> dict:
    return {"run": {}, "rounds": [_round(i + 1, a, bytes_per_client) for i, a in enumerate(accuracies)]}


# ---------------------------------------------------------------------------------------------- files


def test_file_is_valid_json_after_each_round_and_after_finish(tmp_path):
    log = ResultsLog(tmp_path / "run.json", {"strategy": "fedmef", "config": {"rounds": 3}})
    assert _strict_load(log.path) == {
        "run": {"strategy": "fedmef", "config": {"rounds": 3}},
        "rounds": [],
        "summary": {},
    }
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
    write_json_atomic(
        path,
        {
            "a": math.nan,
            "b": [math.inf, -math.inf, 1.5],
            "c": np.float32("nan"),
            "d": np.int64(3),
            "e": np.float64(2.5),
            "f": (True, None),
            "g": tmp_path,
        },
    )
    assert _strict_load(path) == {
        "a": None,
        "b": [None, None, 1.5],
        "c": None,
        "d": 3,
        "e": 2.5,
        "f": [True, None],
        "g": str(tmp_path),
    }


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


def test_data_is_a_copy_and_set_initial_writes_the_file(tmp_path):
    log = ResultsLog(tmp_path / "run.json", {"config": {"rounds": 2}})
    record = _round(1, clients=[_client(10.0, 1.0, 1000)])
    log.add_round(record)
    record["clients"][0]["peak_rss_mb"] = -1.0  # the caller's dict is not the log's
    view = log.data
    view["run"]["config"]["rounds"] = 99
    view["rounds"].clear()
    assert log.data["run"] == {"config": {"rounds": 2}}
    assert log.data["rounds"][0]["clients"][0]["peak_rss_mb"] == 10.0
    log.set_initial({"round": 0, "accuracy": 0.1})
    assert _strict_load(log.path)["run"]["initial"] == {"round": 0, "accuracy": 0.1}
    assert log.data["run"]["initial"] == {"round": 0, "accuracy": 0.1}


def test_existing_file_is_not_clobbered(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("precious")
    first, second = ResultsLog(path, {"n": 1}), ResultsLog(path, {"n": 2})
    assert path.read_text() == "precious"
    assert (first.path.name, second.path.name) == ("run-1.json", "run-2.json")
    assert _strict_load(first.path)["run"] == {"n": 1} and _strict_load(second.path)["run"] == {"n": 2}


# -------------------------------------------------------------------------------------------- summary


def test_summarize_by_hand():
    rounds = [
        _round(1, 0.50, 100.0, clients=[_client(10.0, 1.0, 1000), _client(30.0, 3.0, 3000)]),
        _round(2, None, 200.0, clients=[_client(20.0, 2.0, 2000)], rejected=[{"node_id": 4, "reason": "x"}]),
        _round(3, 0.70, 300.0, rejected=[{"node_id": 5, "reason": "y"}, {"node_id": 6, "reason": "z"}]),
    ]
    rounds[2]["sparsity"] = 0.9
    for r, dense in zip(rounds, (1000.0, 1000.0, 4000.0), strict=True):
        r["dense_bytes_per_client"] = dense
    s = summarize({"run": {}, "rounds": rounds})
    assert s["final_accuracy"] == pytest.approx(0.6)  # (0.5 + 0.7) / 2, the null skipped
    assert s["last_accuracy"] == pytest.approx(0.7)
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
    assert summarize({"rounds": rounds[:2]})["last_accuracy"] is None  # the last round has no accuracy


def test_summarize_without_data_gives_none():
    s = summarize({"run": {}, "rounds": []})
    assert s["rounds"] == 0 and s["rejected"] == 0
    assert all(s[k] is None for k in s if k not in ("rounds", "rejected"))
    with pytest.raises(ValueError):
        summarize({"rounds": []}, last=0)


# ---------------------------------------------------------------------------------------------- table


def test_markdown_table_has_header_and_one_row_per_run():
    runs = {"FedMef": _run([0.5, 0.7]), "Fed|Tiny": _run([None, None]), "FedAvg": _run([0.6])}
    lines = markdown_table(runs).splitlines()
    assert lines[0].startswith("| method | rounds | final acc (mean last 5) | last acc | best acc |")
    assert set(lines[1].replace("|", "")) == {"-"}
    assert len(lines) == 2 + len(runs)
    columns = lines[0].count(" | ")
    assert all(line.replace("\\|", "").count(" | ") == columns for line in lines[2:])
    assert lines[2].split(" | ")[1:6] == ["2", "0.6000", "0.7000", "0.7000", "2.0"]  # 2048 B = 2.0 KiB
    assert lines[4].split(" | ")[1:5] == ["1", "0.6000", "0.6000", "0.6000"]
    assert "Fed\\|Tiny" in lines[3] and "n/a" in lines[3]
