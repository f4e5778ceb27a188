"""End to end: `flwr run` in Flower's simulation engine, 4 SuperNodes, a few rounds of FedMef."""

import pytest

from common.protocol.config import ConfigError
from server.simulation import SimulationError, run_simulation

pytestmark = pytest.mark.slow


def test_flwr_run_fedmef_in_simulation(tmp_path):
    data = run_simulation(
        {"num-server-rounds": 4, "max-local-steps": 25, "delta-r": 2, "r-stop": 3, "max-test-examples": 1000},
        num_supernodes=4,
        results_dir=tmp_path,
        run_name="e2e",
        log_path=tmp_path / "flwr.log",
        timeout=600,
    )
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
