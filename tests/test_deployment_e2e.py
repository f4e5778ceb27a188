"""End to end on Flower's Deployment Engine, on loopback, as deploy/README.md sets it up for real devices.

deploy/server/make-pki.sh makes the CA, the SuperLink's certificate and four device keys;
deploy/server/start-superlink.sh starts the SuperLink (TLS, SuperNode authentication, a database
file); deploy/server/register-devices.sh registers three keys; three SuperNodes read Fashion-MNIST
partitions written by deploy.prepare_partitions; `flwr run` runs two FedMef rounds through a
connection in FLWR_HOME/config.toml. A fourth SuperNode, with the unregistered key, must be refused.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.prepare_partitions import prepare, run_config
from server.simulation import ROOT, flower_env, free_port, stop_flower_processes

pytestmark = pytest.mark.slow

SERVER = ROOT / "deploy" / "server"
BIN = Path(sys.executable).parent


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the SuperLink exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"the SuperLink did not listen on {port} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())


def test_tls_node_auth_deployment_runs_fedmef_and_refuses_unknown_key(tmp_path):
    pki, state, parts, results = (tmp_path / d for d in ("pki", "state", "parts", "results"))
    subprocess.run([SERVER / "make-pki.sh", "-o", pki, "-n", "4"], check=True, capture_output=True)
    # Small partitions: two rounds of 10 steps of 32 need 320 examples per device.
    partition_files = prepare(parts, 3, run_config(), max_examples=400)

    port = free_port()
    homes = {name: tmp_path / f"home-{name}" for name in ("superlink", "cli", "pi-1", "pi-2", "pi-3", "pi-4")}
    (homes["cli"]).mkdir()
    (homes["cli"] / "config.toml").write_text(
        f'[superlink.e2e]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{pki / "ca.crt"}"\n'
    )
    logs: list[Path] = []
    procs: list[subprocess.Popen] = []

    def env(home: str) -> dict[str, str]:
        # one intra-op thread per process: the machine has 2 cores and several Flower processes
        return {**flower_env(homes[home]), "OMP_NUM_THREADS": "1"}

    def start(name: str, cmd: list, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        logs.append(log)
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                env={**env(name), **(extra_env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        procs.append(proc)
        return proc

    def supernode(name: str) -> subprocess.Popen:
        return start(
            name,
            [
                BIN / "flower-supernode",
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-certificates",
                pki / "ca.crt",
                "--auth-supernode-private-key",
                pki / "devices" / name,
                "--port",
                free_port(),
                "--node-config",
                f'data-path="{parts / f"{name}.npz"}"',
            ],
        )

    try:
        superlink = start(
            "superlink",
            [SERVER / "start-superlink.sh"],
            {
                "FEDMEF_PKI": str(pki),
                "FEDMEF_STATE_DIR": str(state),
                "FEDMEF_HOST": "127.0.0.1",
                "FEDMEF_PORT": str(port),
            },
        )
        _wait_for_port(port, superlink, tmp_path / "superlink.log")

        registered = subprocess.run(
            [SERVER / "register-devices.sh", "e2e"] + [pki / "devices" / f"pi-{i}.pub" for i in (1, 2, 3)],
            env=env("cli"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr
        node_ids = {int(n) for n in re.findall(r"registered as node (\d+)", registered.stdout)}
        assert len(node_ids) == 3, registered.stdout
        again = subprocess.run(
            [SERVER / "register-devices.sh", "e2e", pki / "devices" / "pi-1.pub"],
            env=env("cli"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 0 and "already registered" in again.stdout, again.stdout + again.stderr

        for name in ("pi-1", "pi-2", "pi-3"):
            supernode(name)
        intruder = supernode("pi-4")

        overrides = (
            f"num-server-rounds=2 max-local-steps=10 min-train-nodes=3 max-test-examples=500 "
            f"results-dir='{results}' run-name='deploy'"
        )
        run = subprocess.run(
            [BIN / "flwr", "run", ".", "e2e", "--stream", "--run-config", overrides],
            env=env("cli"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=150,
        )
        results_file = results / "deploy" / "results.json"
        # flwr run exits 0 even when the run failed: the results file is the proof
        assert run.returncode == 0 and results_file.exists(), run.stdout[-3000:] + _tails(logs)
        data = json.loads(results_file.read_text())
        assert [r["round"] for r in data["rounds"]] == [1, 2]
        for r in data["rounds"]:
            assert len(r["clients"]) == 3 and not r["rejected"], r
            # every reply came from a registered device, none from the refused one
            assert {c["node_id"] for c in r["clients"]} == node_ids
            # partition files, not simulation partitions (client.data marks them -1)
            assert all(c["partition_id"] == -1 and c["examples"] > 0 for c in r["clients"])
        assert all(p.exists() for p in partition_files)

        # refused at once (it exits well before the run ends; the timeout only bounds a failure)
        try:
            intruder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the SuperNode with the unregistered key was not refused:\n" + _tails([tmp_path / "pi-4.log"]))
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in (tmp_path / "pi-4.log").read_text()

        listed = subprocess.run(
            [BIN / "flwr", "supernode", "list", "e2e", "--format", "json"],
            env=env("cli"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        nodes = json.loads(listed.stdout)["nodes"]
        assert {int(n["node-id"]) for n in nodes} == node_ids, listed.stdout
        # the database file the SuperLink keeps its state in
        assert (state / "superlink.db").stat().st_size > 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # the SuperExecs and app processes they started carry their FLWR_HOME
        for home in homes.values():
            stop_flower_processes(home)
