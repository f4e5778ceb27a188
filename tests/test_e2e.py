"""End to end: `flwr run` in Flower's simulation engine, 4 SuperNodes, a few rounds of FedMef."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from common.protocol.config import ConfigError
from server.checkpoint import load_checkpoint
from server.simulation import (
    ROOT,
    SimulationError,
    run_simulation,
    source_commit,
    stop_flower_processes,
    toml_overrides,
)

pytestmark = pytest.mark.slow


def test_flwr_run_fedmef_in_simulation(tmp_path):
    progress: list[str] = []
    data = run_simulation(
        {"num-server-rounds": 4, "max-local-steps": 25, "delta-r": 2, "r-stop": 3, "max-test-examples": 1000},
        num_supernodes=4,
        results_dir=tmp_path,
        run_name="e2e",
        log_path=tmp_path / "flwr.log",
        timeout=600,
        progress=progress.append,
    )
    # one line per round as it finishes, what `make run` prints
    assert [line.split(":")[0] for line in progress] == [f"[fedmef] round {r}/4" for r in (1, 2, 3, 4)], progress
    assert all("test acc" in line and "ETA" in line for line in progress)
    run = data["run"]
    assert run["nodes_at_start"] == 4 and run["app"]["fab_hash"] and run["flwr"] and run["allocator"] == "thp+mmap"
    assert run["commit"] == source_commit() and run["commit"] is not None  # the tests run in a git checkout
    rounds = data["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[1]["adjusted"] and not rounds[0]["adjusted"]
    assert all(len(r["clients"]) == 4 and not r["rejected"] for r in rounds)
    assert rounds[-1]["accuracy"] > 0.3  # 10 classes: chance is 0.1
    client = rounds[-1]["clients"][0]
    for key in (
        "examples",
        "loss",
        "train_time_s",
        "cpu_time_s",
        "peak_rss_mb",
        "pid",
        "activation_bytes",
        "bytes_down",
        "bytes_up",
    ):
        assert client[key] > 0, key
    assert abs(rounds[-1]["sparsity"] - 0.9) < 1e-3
    assert data["summary"]["bytes_ratio_vs_dense"] < 0.2
    for suffix in ("png", "md"):
        assert (tmp_path / "e2e" / f"results.{suffix}").stat().st_size > 0
    assert (tmp_path / "e2e" / "model.pt").exists()
    assert "Strategy execution finished" in (tmp_path / "flwr.log").read_text()


def test_the_driver_refuses_a_wrong_config_before_flower_starts(tmp_path):
    """Flower itself would answer only "[code: 15] Invalid run configuration"."""
    with pytest.raises(ConfigError, match="unknown key 'dirichlet-alpa' \\(did you mean 'dirichlet-alpha'\\?\\)"):
        run_simulation({"dirichlet-alpa": 0.3}, num_supernodes=2, results_dir=tmp_path, run_name="typo")
    assert not (tmp_path / "typo").exists()


def test_a_data_error_in_the_server_app_fails_the_run_with_its_cause(tmp_path):
    """The ServerApp raises (a SystemExit was reported by nobody): the driver fails, naming the cause."""
    with pytest.raises(SimulationError, match="CIFAR-10 not found in /nonexistent/cifar: put the extracted"):
        run_simulation(
            {"dataset": "cifar10", "data-dir": "/nonexistent/cifar"},
            num_supernodes=2,
            results_dir=tmp_path,
            run_name="nodata",
            log_path=tmp_path / "flwr.log",
            timeout=300,
        )


def _kill_flower(homes: Path) -> None:
    """SIGKILL every process of the Flower homes under ``homes``, as a crash would, and wait for them."""
    victims = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("FLWR_HOME", "").startswith(str(homes)):
                victims += [proc, *proc.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(victims, timeout=10)
    for home in homes.glob("*"):
        stop_flower_processes(home)  # whatever Ray started anew while dying


def test_a_simulation_killed_after_a_round_resumes_to_the_uninterrupted_runs_model_bit_for_bit(tmp_path):
    config = {
        "num-server-rounds": 5,
        "max-local-steps": 5,
        "delta-r": 1,
        "r-stop": 4,
        "fraction-train": 0.5,
        "max-test-examples": 200,
        "augment": True,
    }
    run_simulation(config, num_supernodes=4, results_dir=tmp_path / "whole", run_name="r", timeout=600)

    # the driver makes its FLWR_HOME under TMPDIR, so its processes are findable; a short path, as Ray
    # puts its sockets there and a Unix socket's path has at most 107 bytes
    homes = Path(tempfile.mkdtemp(prefix="fedmef-kill-", dir="/tmp"))
    output = tmp_path / "driver.out"
    with open(output, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "server.simulation", "--supernodes", "4", "--results-dir", str(tmp_path / "killed")]
            + ["--name", "r", "--set", toml_overrides(config)],
            cwd=ROOT,
            env={**os.environ, "TMPDIR": str(homes)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run = tmp_path / "killed" / "r"
    deadline = time.monotonic() + 600
    try:
        while not ((run / "checkpoint.pt").exists() and load_checkpoint(run)["round"] >= 2):
            assert driver.poll() is None, "the run ended before it could be killed:\n" + output.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of round 2 within 600 s"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        _kill_flower(homes)
        shutil.rmtree(homes, ignore_errors=True)
    done = load_checkpoint(run)["round"]
    assert 2 <= done < 5 and not (run / "model.pt").exists()

    resumed = run_simulation(
        {**config, "resume": True}, num_supernodes=4, results_dir=tmp_path / "killed", run_name="r", timeout=600
    )
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4, 5]
    assert resumed["run"]["resumed"][0]["after_round"] == done
    assert not (run / "checkpoint.pt").exists()
    whole, again = (
        torch.load(d / "r" / "model.pt", weights_only=True) for d in (tmp_path / "whole", tmp_path / "killed")
    )
    for name, value in whole["state"].items():
        assert torch.equal(again["state"][name], value), name
    for name, mask in whole["masks"].items():
        assert torch.equal(again["masks"][name], mask), name
