"""The prepared GPU check: run quick on each device here (the CPU always), and refused without CUDA."""

import json

import pytest
import torch

from bench import gpu_check

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_quick_run_writes_the_report_and_sap_agrees_with_the_cpu(device, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--device", device.type, "--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["ok"] and report["quick"] and report["data"] == "synthetic"
    assert {r["case"] for r in report["sap"]} == set(gpu_check.sap_cases(quick=True))
    for row in report["sap"]:
        assert row["max_rel_diff"] <= row["tolerance"], row
        if "whole model" not in row["case"]:  # one layer keeps the same entries in the same formats
            assert row["held_bytes_device"] == row["held_bytes_cpu"], row
        if device.type == "cpu":  # the same code on the same device: no difference at all
            assert row["max_abs_diff"] == 0.0 and row["held_bytes_device"] == row["held_bytes_cpu"]
    for rows in report["train"].values():
        assert [r["round"] for r in rows] == [1, 2] and all(r["steps"] == 1 for r in rows)
        assert [r["topk"] and r["bae"] for r in rows] == [False, True]  # round 2 adjusts: BaE and top-K
        assert all((r["peak_allocated_bytes"] is None) == (device.type == "cpu") for r in rows)
    sap, dense = report["train"]["fedmef, SAP 0.9"], report["train"]["fedmef without SAP"]
    assert sap[0]["held_bytes"] < dense[0]["held_bytes"]
    assert "| SAP case |" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_check_stops_at_once_and_says_what_to_do(tmp_path):
    out = tmp_path / "gpu_check.json"
    with pytest.raises(SystemExit, match="no CUDA device here.*--device cpu --quick"):
        gpu_check.main(["--out", str(out)])
    assert not out.exists()
