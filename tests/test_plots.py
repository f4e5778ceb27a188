"""Tests for server.plots: the PNG figure of one or more runs (and of several seeds per run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from server.plots import _series, _zoom_accuracy, group_runs, main, plot_runs, plot_seed_values

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _client(rss: float | None, act: float | None) -> dict:
    return {"node_id": 1, "examples": 10, "train_time_s": 1.0, "peak_rss_mb": rss, "activation_bytes": act}


def _run(accuracies, bytes_per_client=2048.0, rss=900.0, act=2.0 * 1024**2) -> dict:
    rounds = [
        {
            "round": i + 1,
            "accuracy": a,
            "bytes_per_client": bytes_per_client * (1 + 0.1 * i),
            "dense_bytes_per_client": 10 * bytes_per_client,
            "clients": [_client(rss, act)],
            "rejected": [],
        }
        for i, a in enumerate(accuracies)
    ]
    return {"run": {}, "rounds": rounds, "summary": {}}


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert 0 < len(data) < 200 * 1024
    with Image.open(path) as image:
        image.verify()
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file is gone


def test_two_runs_write_a_png(tmp_path):
    runs = {
        "FedMef": _run([0.30, 0.52, 0.61], 50 * 1024.0, rss=800.0, act=0.15 * 1024**2),
        "FedAvg": _run([0.35, 0.58, 0.66], 480 * 1024.0, rss=1350.0),
    }
    path = plot_runs(runs, tmp_path / "out" / "fig.png", title="LeNet-5 <on> FMNIST & co")
    assert path == tmp_path / "out" / "fig.png"
    _assert_png(path)
    with Image.open(path) as image:
        assert image.size == (1500, 1900)  # 7.5 x 9.5 in at 200 dpi


def test_a_label_with_three_seeds_draws(tmp_path):
    seeds = [_run([0.30 + d, 0.50 + d, 0.60 + d], rss=900.0 + 100 * d) for d in (0.0, 0.01, 0.02)]
    path = plot_runs({"FedMef": seeds, "FedAvg": _run([0.4, 0.6, 0.7])}, tmp_path / "seeds.png")
    _assert_png(path)


def test_missing_accuracy_and_memory_still_plot(tmp_path):
    runs = {
        "no eval": _run([None, None, math.nan], rss=None, act=None),
        "gappy": _run([0.5, None, 0.6, math.nan, 0.7], act=math.nan),
        "no rounds": {"run": {}, "rounds": []},
        "lone point": _run([None, 0.4, None], bytes_per_client=0.0),
    }
    _assert_png(plot_runs(runs, tmp_path / "gaps.png"))


def test_bytes_spanning_more_than_10x_plot(tmp_path):
    runs = {f"m{i}": _run([0.1 * i, 0.1 * i + 0.05], 1024.0 * 3**i) for i in range(9)}  # more runs than colours
    _assert_png(plot_runs(runs, tmp_path / "log.png"))


def test_replaces_an_existing_file(tmp_path):
    path = tmp_path / "fig.png"
    path.write_bytes(b"old")
    _assert_png(plot_runs({"a": _run([0.5])}, path))


def test_needs_runs_and_results(tmp_path):
    with pytest.raises(ValueError):
        plot_runs({}, tmp_path / "fig.png")
    with pytest.raises(ValueError):
        plot_runs({"a": []}, tmp_path / "fig.png")
    assert not (tmp_path / "fig.png").exists()


def test_series_over_seeds_skips_missing_values():
    seeds = [_run([0.2, None, 0.6]), _run([0.4, math.nan]), {"rounds": [{"round": 3, "accuracy": 0.8}]}]
    x, mean, lo, hi = _series(seeds, "accuracy", 100.0)
    assert x.tolist() == [1.0, 2.0, 3.0]
    assert mean[0] == pytest.approx(30.0) and (lo[0], hi[0]) == pytest.approx((20.0, 40.0))
    assert math.isnan(mean[1]) and math.isnan(lo[1]) and math.isnan(hi[1])  # no seed has round 2
    assert mean[2] == pytest.approx(70.0) and (lo[2], hi[2]) == pytest.approx((60.0, 80.0))


def test_accuracy_axis_is_zoomed_past_the_first_rounds():
    values = np.r_[10.0, 40.0, np.linspace(80.0, 88.0, 58)]  # two warm-up rounds, then 1-point differences
    ax = Figure().subplots()
    ax.plot(values)
    _zoom_accuracy(ax, values, values, " %")
    bottom, top = ax.get_ylim()
    assert 70.0 < bottom < 80.0 and 88.0 < top < 90.0
    assert any("2 lower points" in t.get_text() for t in ax.texts)
    # Few rounds, or no stretch: the axis stays fitted to all of the data.
    ax = Figure().subplots()
    ax.plot([30.0, 60.0, 70.0, 75.0])
    before = ax.get_ylim()
    _zoom_accuracy(ax, np.array([30.0, 60.0, 70.0, 75.0]), np.array([30.0, 60.0, 70.0, 75.0]), " %")
    assert ax.get_ylim() == before and not ax.texts


def test_the_plot_command_draws_existing_runs_with_their_seeds_on_one_line(tmp_path):
    for name, accuracies in {"fedmef-s0": [0.3, 0.5], "fedmef-s1": [0.35, 0.55], "fedtiny-s0": [0.2, 0.4]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_run(accuracies)))
    folders = sorted(tmp_path.iterdir())
    groups = group_runs(folders)
    assert {label: len(seeds) for label, seeds in groups.items()} == {"fedmef": 2, "fedtiny": 1}
    main([*map(str, folders), "-o", str(tmp_path / "both.png")])
    _assert_png(tmp_path / "both.png")


def test_the_plot_command_names_a_folder_without_results(tmp_path):
    with pytest.raises(SystemExit, match="plots: .*empty.*results.json"):
        (tmp_path / "empty").mkdir()
        main([str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")])


def test_the_seed_figure_draws_runs_with_missing_seeds_and_without_values(tmp_path):
    values = {"fedmef": {0: 32.7, 1: 32.9, 2: 32.9}, "fedtiny": {0: 34.9, 2: 37.8}, "empty": {}, "nan": {0: math.nan}}
    _assert_png(plot_seed_values(values, tmp_path / "final.png", title="t", ylabel="%"))
    with pytest.raises(ValueError, match="no runs"):
        plot_seed_values({}, tmp_path / "none.png")
