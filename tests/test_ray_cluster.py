"""The simulation on a Ray cluster it joins (``--ray-address``) instead of a Ray of its own: two Ray nodes
on loopback stand for two machines."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from common.data.datasets import CACHE_DIR, FASHION_MNIST_DIRS, FASHION_MNIST_HELP, DataNotFound, load_fashion_mnist
from common.measure.runtime import TRAINING_ENV
from server.simulation import ROOT, SimulationError, free_port, run_simulation

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).parent / "ray"

# Asks the cluster which nodes it has and on which node each ClientApp call ran. Ray's state API
# (`ray list`, ray.util.state) needs the full dashboard, which the minimal ray that flwr[simulation]
# installs lacks; the timeline comes from the GCS and names the node by its IP address.
QUERY = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
runs = [e["pid"] for e in ray.timeline() if e["cat"] == "task::ClientAppActor.run"]
print(json.dumps({"nodes": nodes, "runs": runs}))
"""


def _start_node(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    """``ray start --block`` (its Ray processes are its descendants, so they can be stopped by pid), once
    it says the node is up."""
    ports = {
        "--dashboard-agent-listen-port": free_port(),  # the defaults may be taken by another Ray here
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    with open(log, "w") as out:
        node = subprocess.Popen(
            [str(RAY), "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args]
            + [f"{k}={v}" for k, v in ports.items()],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            # the caller's RAY_ADDRESS or other Ray settings are not this cluster's; the training
            # environment is what the README tells a node to start with
            env={**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **TRAINING_ENV},
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        assert node.poll() is None, f"ray start {' '.join(args)} exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"ray start {' '.join(args)} not up in 180 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    return node


def _fashion_mnist_dir() -> Path:
    for folder in (*FASHION_MNIST_DIRS, CACHE_DIR / "fashion-mnist"):
        with contextlib.suppress(DataNotFound):
            load_fashion_mnist(folder)
            return folder
    pytest.fail(FASHION_MNIST_HELP)


def _stop(nodes: list[subprocess.Popen], temp_root: Path) -> None:
    """Stop this cluster's processes by pid: ``ray stop`` would stop every Ray on the machine."""
    procs: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid in {n.pid for n in nodes} or str(temp_root) in " ".join(proc.info["cmdline"] or []):
                for p in [proc, *proc.children(recursive=True)]:
                    procs[p.pid] = p
    for proc in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=20)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    for node in nodes:
        node.wait(timeout=10)


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[str]:
    """A head and a second node at another loopback address, each with 1 CPU and its own temp dir, both
    started outside the repository, as on other machines. Yields the head's address."""
    # short: Ray puts Unix sockets under the temp dir, and a socket path has at most 107 bytes
    temp_root = Path(tempfile.mkdtemp(prefix="fm-ray-", dir="/tmp"))
    port = free_port()
    nodes: list[subprocess.Popen] = []
    try:
        head_args = [f"--temp-dir={temp_root / 'head'}", "--head", f"--port={port}"]
        head_args += [f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
        nodes.append(_start_node(head_args, tmp_path / "head.log", cwd=tmp_path))
        node_args = [f"--temp-dir={temp_root / 'node'}", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.2"]
        nodes.append(_start_node(node_args, tmp_path / "node.log", cwd=tmp_path))
        yield f"127.0.0.1:{port}"
    finally:
        _stop(nodes, temp_root)
        shutil.rmtree(temp_root, ignore_errors=True)


def test_a_simulation_on_a_two_node_ray_cluster_runs_clients_on_both_nodes(two_node_cluster, tmp_path):
    # relative to the repository, as the CIFAR presets give it, and found only from there
    data_dir = Path("tests", os.path.relpath(_fashion_mnist_dir(), ROOT / "tests"))
    data = run_simulation(
        {"num-server-rounds": 2, "max-local-steps": 3, "max-test-examples": 200, "data-dir": str(data_dir)},
        num_supernodes=2,
        results_dir=tmp_path,
        run_name="cluster",
        log_path=tmp_path / "flwr.log",
        timeout=600,
        ray_address=two_node_cluster,
    )
    rounds = data["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    # a node whose clients fail (no repository, no data) costs the rounds its clients, not the run
    assert [len(r["clients"]) for r in rounds] == [2, 2], [r["rejected"] for r in rounds]
    # the clients have their node's environment (the driver's does not reach them on a cluster)
    assert {c["device"]["allocator"] for c in rounds[0]["clients"]} == {"thp+mmap"}

    seen = subprocess.run(
        [sys.executable, "-c", QUERY, two_node_cluster], capture_output=True, text=True, timeout=120, check=True
    )
    cluster = json.loads(seen.stdout.strip().splitlines()[-1])
    assert len(set(cluster["nodes"])) == 2, cluster
    assert set(cluster["runs"]) == set(cluster["nodes"]), cluster


def test_a_ray_address_nobody_answers_at_is_refused_before_flower_starts(tmp_path):
    """Flower would wait for clients that never come."""
    with pytest.raises(SimulationError, match="no Ray cluster answers at 127.0.0.1:.*ray start --head --port="):
        run_simulation({}, num_supernodes=2, results_dir=tmp_path, run_name="r", ray_address=f"127.0.0.1:{free_port()}")
    with pytest.raises(SimulationError, match="is not HOST:PORT"):
        run_simulation({}, num_supernodes=2, results_dir=tmp_path, run_name="r", ray_address="head-node")
    assert not (tmp_path / "r").exists()
