"""End to end on Flower's Deployment Engine, as deploy/README.md sets it up, with a device network.

The server side runs in this network namespace: deploy/server/start-superlink.sh (TLS, SuperNode
authentication, a database file, listening on 127.0.0.1 only), deploy/server/start-fleet-proxy.sh
(nginx, the only listener on the device network, forwarding the Fleet API alone) and the app registry
(`python -m deploy.app_registry serve`). The devices live in a network namespace of their own joined
by a veth pair, so they reach the server only at its device-network address, as Pis on a LAN do.

The operator follows the documented workflow: make the PKI, register three devices, publish the app
signed with the app-signing key, run it. Three SuperNodes with `--trusted-entities` take part. A
stranger on the device network holding only ca.crt and its own keys tries everything the Control API
would let it do, and to join as a SuperNode; the legitimate run must finish untouched. Apps that are
unsigned, or signed by the stranger's key, must be refused by every SuperNode. Then the server crashes
(SIGKILL of the SuperLink and everything it started) in the middle of a run; restarted on its database,
it takes the devices back, and the run resumed from its checkpoint ends with the model of the
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from deploy import app_registry
from deploy.prepare_partitions import prepare, run_config
from server.simulation import ROOT, flower_env, free_port, stop_flower_processes

pytestmark = pytest.mark.slow

SERVER = ROOT / "deploy" / "server"
BIN = Path(sys.executable).parent
#: every Control API call the stranger tries is refused; each try is bounded by this (s)
CLI_TIMEOUT = 60


def _missing(reason: str) -> None:
    # CI sets REQUIRE_DEPLOY=1 and installs nginx: there a missing piece is a failure, not a skip
    if os.environ.get("REQUIRE_DEPLOY"):
        pytest.fail(reason)
    pytest.skip(reason)


def _run(cmd: list, env: dict[str, str], timeout: float = CLI_TIMEOUT, netns: str | None = None):
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, *map(str, cmd)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


class Network:
    """A device network: a namespace joined to this one by a veth pair; removed by :meth:`close`."""

    def __init__(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            _missing("the device network needs root and iproute2 (ip netns)")
        tag = os.getpid() % 100000
        self.netns, self.host_if, self.dev_if = f"fedmef-e2e-{tag}", f"fmh{tag}", f"fmd{tag}"
        self.server_ip, self.device_ip = f"10.213.{tag % 250}.1", f"10.213.{tag % 250}.2"
        steps = [
            ["ip", "netns", "add", self.netns],
            ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.dev_if],
            ["ip", "link", "set", self.dev_if, "netns", self.netns],
            ["ip", "addr", "add", f"{self.server_ip}/30", "dev", self.host_if],
            ["ip", "link", "set", self.host_if, "up"],
            ["ip", "-n", self.netns, "addr", "add", f"{self.device_ip}/30", "dev", self.dev_if],
            ["ip", "-n", self.netns, "link", "set", self.dev_if, "up"],
            ["ip", "-n", self.netns, "link", "set", "lo", "up"],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                self.close()
                _missing(f"cannot make the device network ({' '.join(step)}): {done.stderr.strip()}")

    def close(self) -> None:
        # deleting the namespace removes its end of the pair, and with it this end
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


class Processes:
    """Long-running processes with a log each; :meth:`close` stops every one by pid."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, {}

    def start(self, name: str, cmd: list, env: dict[str, str], netns: str | None = None) -> subprocess.Popen:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        with open(self.log(name), "w") as out:
            proc = subprocess.Popen([*prefix, *map(str, cmd)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def tails(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n).read_text()[-2000:]}" for n in self.procs if self.log(n).exists())

    def wait_for_port(self, name: str, host: str, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                pytest.fail(f"{name} exited with {self.procs[name].returncode}:\n{self.tails()}")
            with socket.socket() as s:
                if s.connect_ex((host, port)) == 0:
                    return
            time.sleep(0.3)
        pytest.fail(f"{name} did not listen on {host}:{port} within {timeout:.0f} s:\n{self.tails()}")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _connection(name: str, address: str, ca: Path) -> str:
    return f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'


def test_operator_alone_controls_a_signed_app_federation_on_a_device_network(tmp_path):
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        _missing("nginx is not installed (apt-get install nginx-light); .ci/run installs it")
    net = Network()
    procs = Processes(tmp_path)
    homes = {n: tmp_path / f"home-{n}" for n in ("superlink", "operator", "stranger", "pi-1", "pi-2", "pi-3", "pi-4")}
    try:
        _scenario(tmp_path, net, procs, homes)
    finally:
        procs.close()
        # the SuperExecs and app processes they started carry their FLWR_HOME
        for home in homes.values():
            stop_flower_processes(home)
        net.close()


def _scenario(tmp_path: Path, net: Network, procs: Processes, homes: dict[str, Path]) -> None:
    pki, state, parts, results, registry = (tmp_path / d for d in ("pki", "state", "parts", "results", "registry"))
    ca = pki / "ca.crt"

    # --- the operator's documented workflow: PKI, server processes, devices, a signed release
    made = subprocess.run([SERVER / "make-pki.sh", "-o", pki, "-n", "4", net.server_ip], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    # Small partitions: two rounds of 10 steps of 32 need 320 examples per device.
    prepare(parts, 3, run_config(), max_examples=400)
    link_port, fleet_port, registry_port = free_port(), free_port(), free_port()

    def env(home: str, **extra: str) -> dict[str, str]:
        # one intra-op thread per process: the machine has 2 cores and several Flower processes
        return {**flower_env(homes[home]), "OMP_NUM_THREADS": "1", **extra}

    server_env = {
        "FEDMEF_PKI": str(pki),
        "FEDMEF_STATE_DIR": str(state),
        "FEDMEF_PROXY_STATE_DIR": str(state / "fleet-proxy"),
        "FEDMEF_PORT": str(link_port),
        "FEDMEF_FLEET_HOST": net.server_ip,
        "FEDMEF_FLEET_PORT": str(fleet_port),
        "FEDMEF_REGISTRY_PORT": str(registry_port),
    }
    procs.start("superlink", [SERVER / "start-superlink.sh"], env("superlink", **server_env))
    procs.start("fleet-proxy", [SERVER / "start-fleet-proxy.sh"], env("superlink", **server_env))
    procs.start(
        "registry",
        [sys.executable, "-m", "deploy.app_registry", "serve", "--registry", registry, "--port", registry_port],
        env("superlink"),
    )
    procs.wait_for_port("superlink", "127.0.0.1", link_port)
    procs.wait_for_port("fleet-proxy", net.server_ip, fleet_port)
    procs.wait_for_port("registry", "127.0.0.1", registry_port)

    homes["operator"].mkdir()
    (homes["operator"] / "config.toml").write_text(_connection("op", f"127.0.0.1:{link_port}", ca))
    registered = _run(
        [SERVER / "register-devices.sh", "op"] + [pki / "devices" / f"pi-{i}.pub" for i in (1, 2, 3)], env("operator")
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    node_ids = {int(n) for n in re.findall(r"registered as node (\d+)", registered.stdout)}
    assert len(node_ids) == 3, registered.stdout
    again = _run([SERVER / "register-devices.sh", "op", pki / "devices" / "pi-1.pub"], env("operator"))
    assert again.returncode == 0 and "already registered" in again.stdout, again.stdout + again.stderr

    for i in (1, 2, 3):
        procs.start(
            f"pi-{i}",
            [
                BIN / "flower-supernode",
                "--superlink",
                f"{net.server_ip}:{fleet_port}",
                "--root-certificates",
                ca,
                "--auth-supernode-private-key",
                pki / "devices" / f"pi-{i}",
                "--trusted-entities",
                pki / "trusted-entities.yaml",
                "--port",
                free_port(),
                "--node-config",
                f'data-path="{parts / f"pi-{i}.npz"}"',
            ],
            env(f"pi-{i}"),
            netns=net.netns,
        )

    def run_command(app: str, name: str, rounds: int, more: str = "") -> list:
        """The operator's `flwr run` of ``app``, small enough for a test, results under ``name``."""
        overrides = (
            f"num-server-rounds={rounds} max-local-steps=10 min-train-nodes=3 max-test-examples=500 "
            f"results-dir='{results}' run-name='{name}' {more}"
        )
        return [BIN / "flwr", "run", app, "op", "--stream", "--run-config", overrides]

    def operator_run(app: str, name: str, rounds: int, more: str = "") -> tuple[subprocess.CompletedProcess, dict]:
        try:
            done = _run(run_command(app, name, rounds, more), env("operator"), 240)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"flwr run {app} did not finish in 240 s:\n{exc.stdout}\n{procs.tails()}")
        results_file = results / name / "results.json"
        # flwr run exits 0 even when the run failed: the results file is the proof
        assert done.returncode == 0 and results_file.exists(), done.stdout[-3000:] + done.stderr + procs.tails()
        return done, json.loads(results_file.read_text())

    def refused_everywhere(done: subprocess.CompletedProcess, data: dict, why: str) -> None:
        # every device refuses round 1, so the run ends there, saying so in the operator's stream
        assert data["rounds"] == [], data["rounds"]
        assert "run failed: every one of the 3 nodes asked failed round 1" in done.stdout, done.stdout[-3000:]
        for i in (1, 2, 3):
            assert why in procs.log(f"pi-{i}").read_text(), procs.tails()

    # --- an unsigned app (what `flwr run .` uploads) runs on no device
    refused_everywhere(*operator_run(".", "unsigned", 1), "The FAB could not be verified")

    # --- a release signed only by the stranger's key runs on no device
    stranger_key = tmp_path / "stranger-signing"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger_key], check=True)
    fab = app_registry.build_fab(ROOT)
    _, _, version = app_registry.fab_identity(fab)
    app_registry.publish(registry, fab, app_registry.load_signing_key(stranger_key))
    refused_everywhere(*operator_run(f"@fedmef/fedmef=={version}", "forged", 1), "FAB verification failed")

    # --- the operator signs the same release; the stranger attacks while it runs
    published = _run(
        [
            sys.executable,
            "-m",
            "deploy.app_registry",
            "publish",
            "--registry",
            registry,
            "--key",
            pki / "app-signing" / "operator",
        ],
        env("operator"),
        120,
    )
    assert published.returncode == 0, published.stdout + published.stderr

    def signed_run(name: str, stdout: int) -> subprocess.Popen:
        """The operator's `flwr run` of the signed release, 2 rounds, left running."""
        return subprocess.Popen(
            [str(c) for c in run_command(f"@fedmef/fedmef=={version}", name, 2)],
            env=env("operator"),
            cwd=ROOT,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            text=True,
        )

    legit = signed_run("signed", subprocess.PIPE)
    runs = json.loads(_run([BIN / "flwr", "ls", "op", "--format", "json"], env("operator")).stdout)["runs"]
    legit_run_id = max(int(r["run-id"]) for r in runs)

    _stranger_attacks(tmp_path, net, procs, homes, pki, link_port, fleet_port, legit_run_id, min(node_ids))

    out, _ = legit.communicate(timeout=300)
    data = json.loads((results / "signed" / "results.json").read_text())
    assert legit.returncode == 0 and [r["round"] for r in data["rounds"]] == [1, 2], out[-3000:] + procs.tails()
    for r in data["rounds"]:
        assert len(r["clients"]) == 3 and not r["rejected"], r
        assert {c["node_id"] for c in r["clients"]} == node_ids
        # the partition files' own ids (their metadata), in node order: aggregation does not follow arrival
        assert [c["partition_id"] for c in r["clients"]] == [0, 1, 2] and all(c["examples"] > 0 for c in r["clients"])

    # --- the server crashes after round 1 of the same run; restarted on its database, the run resumes
    crash = signed_run("crash", subprocess.DEVNULL)
    checkpoint = results / "crash" / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert crash.poll() is None and time.monotonic() < deadline, "the run ended before the crash:\n" + procs.tails()
        time.sleep(0.1)
    superlink = psutil.Process(procs.procs["superlink"].pid)
    tree = [superlink, *superlink.children(recursive=True)]  # SuperExec and the run's ServerApp with it
    for proc in tree:
        proc.kill()
    psutil.wait_procs(tree, timeout=10)
    try:
        crash.wait(timeout=60)  # its stream lost the SuperLink
    except subprocess.TimeoutExpired:
        crash.kill()
        crash.wait()
    assert not (results / "crash" / "model.pt").exists()
    procs.start("superlink-restarted", [SERVER / "start-superlink.sh"], env("superlink", **server_env))
    procs.wait_for_port("superlink-restarted", "127.0.0.1", link_port)
    _, resumed = operator_run(f"@fedmef/fedmef=={version}", "crash", 2, "resume=true")
    assert [r["round"] for r in resumed["rounds"]] == [1, 2] and resumed["run"]["resumed"][0]["after_round"] == 1
    assert resumed["rounds"][-1]["accuracy"] == data["rounds"][-1]["accuracy"]
    uninterrupted, again = (torch.load(results / n / "model.pt", weights_only=True) for n in ("signed", "crash"))
    assert all(torch.equal(again["state"][k], v) for k, v in uninterrupted["state"].items())

    # after all of it: the same three devices, only the operator's three runs, the state on disk
    listed = _run([BIN / "flwr", "supernode", "list", "op", "--format", "json"], env("operator"))
    assert {int(n["node-id"]) for n in json.loads(listed.stdout)["nodes"]} == node_ids, listed.stdout
    runs = json.loads(_run([BIN / "flwr", "ls", "op", "--format", "json"], env("operator")).stdout)["runs"]
    assert len(runs) == 5, runs  # unsigned, forged, signed, crash and its resumption
    assert (state / "superlink.db").stat().st_size > 0
    # the proxy let Fleet API calls through and nothing else (nginx' combined log format)
    requests = []
    for line in (state / "fleet-proxy" / "access.log").read_text().splitlines():
        fields = line.split('"')
        requests.append((fields[1].split()[1], int(fields[2].split()[0])))
    assert any(status == 403 for _, status in requests) and any(status == 200 for _, status in requests)
    assert all(path.startswith("/v1/fleet/") for path, status in requests if status != 403), requests


def _stranger_attacks(
    tmp_path: Path,
    net: Network,
    procs: Processes,
    homes: dict[str, Path],
    pki: Path,
    link_port: int,
    fleet_port: int,
    run_id: int,
    node_id: int,
) -> None:
    """Everything a process on the device network holding ca.crt and its own keys would try."""
    ca = pki / "ca.crt"
    home = homes["stranger"]
    home.mkdir()
    targets = {"proxy": f"{net.server_ip}:{fleet_port}", "direct": f"{net.server_ip}:{link_port}"}
    (home / "config.toml").write_text("".join(_connection(n, a, ca) for n, a in targets.items()))
    key = tmp_path / "stranger-node"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", key], check=True)
    env = {**flower_env(home), "OMP_NUM_THREADS": "1"}

    # the SuperLink's own port is closed to the device network; the proxy refuses all but the Fleet API
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/control/stop-run", "/docs", "/health"):
        via_proxy = _run([sys.executable, "-c", _PROBE, f"https://{targets['proxy']}{path}", ca], env, netns=net.netns)
        assert via_proxy.stdout.strip() == "403", (path, via_proxy.stdout, via_proxy.stderr)
    direct = _run(
        [sys.executable, "-c", _PROBE, f"https://{targets['direct']}/v1/control/list-runs", ca], env, netns=net.netns
    )
    assert direct.stdout.strip() == "ConnectionRefusedError", direct.stdout + direct.stderr

    # through the proxy Flower's CLI gets 403 for every Control API call; the SuperLink's own port is closed
    why = {"proxy": "403 Forbidden", "direct": "Connection to the SuperLink is unavailable"}
    for target in targets:
        attempts = {
            "register a key": ["supernode", "register", "--format", "json", f"{key}.pub", target],
            "list the fleet": ["supernode", "list", target, "--format", "json"],
            "list runs": ["ls", target, "--format", "json"],
            "stop the run": ["stop", str(run_id), target, "--format", "json"],
            "unregister a device": ["supernode", "unregister", str(node_id), target, "--format", "json"],
            "start a run": ["run", ".", target, "--format", "json"],
        }
        for what, args in attempts.items():
            done = _run([BIN / "flwr", *args], env, netns=net.netns)
            reply = json.loads(done.stdout)
            assert reply["success"] is False and why[target] in reply["error-message"], (what, target, done.stdout)

    # joining as a SuperNode with its own, unregistered key
    intruder = procs.start(
        "pi-4",
        [
            BIN / "flower-supernode",
            "--superlink",
            targets["proxy"],
            "--root-certificates",
            ca,
            "--auth-supernode-private-key",
            key,
            "--port",
            free_port(),
        ],
        {**flower_env(homes["pi-4"]), "OMP_NUM_THREADS": "1"},
        netns=net.netns,
    )
    try:
        intruder.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the SuperNode with the stranger's key was not refused:\n" + procs.log("pi-4").read_text())
    assert intruder.returncode != 0
    assert "Failed to activate SuperNode" in procs.log("pi-4").read_text()


#: run inside the device network: prints what a bare POST to argv[1] got (an HTTP status, or the
#: name of the error when there was no answer); argv[2] is ca.crt
_PROBE = """
import ssl, sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1], data=b"", method="POST")
try:
    urllib.request.urlopen(request, context=ssl.create_default_context(cafile=sys.argv[2]), timeout=10)
    print(200)
except urllib.error.HTTPError as exc:
    print(exc.code)
except (urllib.error.URLError, OSError) as exc:
    print(type(getattr(exc, "reason", exc)).__name__)
"""
