"""deploy/compose.yml on a real container engine: podman and podman-compose, as deploy/podman/ runs it.

The images are built as deploy/podman/build.sh builds them where no registry is reachable (a debootstrap
base, Flower and the project on it, CPU torch; podman's cache makes a rebuild of unchanged sources take
seconds). The operator then follows deploy/README.md's compose steps: the PKI with make-pki.sh, the
partitions, a signed release, `compose.sh up`, register-devices.sh, `flwr run` of the release from the
host. Everything is as secure as compose.yml makes it: TLS on every hop, SuperNode authentication, signed
apps only, the SuperLink off the device network. Three SuperNodes, each ClientApp container held to a
Raspberry Pi 4B's 1 GiB (mem_limit), run a 3-round FedMef federation (LeNet-5, Fashion-MNIST).

With FEDMEF_ARM64=1 (deploy/podman/arm64-federation.sh) a fourth SuperNode, pi-4, is an emulated
Raspberry Pi 4B (deploy/podman/compose.arm64.yml): arm64 containers with the Pi's own pinned wheels, run by
qemu-user on a Cortex-A72 CPU model, and every round must include its reply (its timings are qemu's, not
a Pi's). It passed on a quiet host (deploy/podman/arm64-federation.log). Not by default: Flower's SuperNode
fails a task whose ClientApp process has not fetched it within 30 s (HEARTBEAT_DEFAULT_INTERVAL), which an
emulated one on a loaded 2-core host misses, and the arm64 images take 20-55 min to build from nothing.

After round 1 one SuperNode container is killed, as a crash or the OOM killer would (SIGKILL from the
host: `podman kill` counts as a user's stop, after which podman restarts nothing). It restarts by itself
(restart: unless-stopped), with the same key so as the same node, and takes part again. `compose.sh down`
then leaves the host as it was: no container, volume or network, the deployment's storage removed, the
same nftables ruleset, forwarding sysctls and binfmt_misc handlers as before.

It prints the timings (build, up, each round, down), the emulated SuperNode's train time per round and
each SuperNode's and ClientApp container's peak memory from its cgroup. It skips where podman or qemu-user
cannot run (not root, podman, runc, debootstrap or qemu-user-static missing), and fails instead where
REQUIRE_DEPLOY is set (CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_deployment_e2e import _connection, _missing, _run

from deploy import app_registry
from deploy.prepare_partitions import prepare, run_config
from server.simulation import ROOT, flower_env, free_port

pytestmark = [pytest.mark.slow, pytest.mark.compose]

PODMAN = ROOT / "deploy" / "podman"
SERVER = ROOT / "deploy" / "server"
BIN = Path(sys.executable).parent
ROUNDS = 3
#: a round's limit: Flower reports the killed SuperNode's lost reply by itself (its heartbeat stops), so
#: this only bounds a round on a busy host (3 ClientApps on 2 shared cores: about 2 min each here)
ROUND_TIMEOUT = 600
#: images from nothing: debootstrap, Flower, torch and the project's dependencies on a busy 2-core host
BUILD_TIMEOUT = 3600
#: the ClientApp containers' memory limit: a Raspberry Pi 4B with 1 GiB
MEM_LIMIT = 1 << 30
SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/ipv6/conf/default/forwarding")
#: pi-4, the emulated Raspberry Pi of compose.arm64.yml, with FEDMEF_ARM64=1; pi-1..pi-3 on the host's CPU
ARM64 = os.environ.get("FEDMEF_ARM64") == "1"
ARM64_PI = 4
PIS = (1, 2, 3, ARM64_PI) if ARM64 else (1, 2, 3)
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def _host_state() -> dict:
    """What the engine may change outside its private folder; equal before and after the test."""
    state: dict = {s: (Path("/proc/sys") / s).read_text().strip() for s in SYSCTLS if (Path("/proc/sys") / s).exists()}
    if shutil.which("nft"):
        state["nft ruleset"] = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    # what podman writes outside its own folders whatever its configuration (deploy/podman/env.sh)
    for path in ("/var/lib/containers", "/run/runc", "/run/containers/networks"):
        state[path] = Path(path).exists()
    # binfmt_misc (deploy/pi/qemu-binfmt.sh): whether it is mounted, and each handler's state
    state["binfmt_misc"] = (
        {p.name: _read(p).split("\n", 1)[0] for p in BINFMT.iterdir()} if (BINFMT / "status").exists() else None
    )
    return state


def _check_podman() -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        _missing("the compose deployment on podman needs root on Linux (overlay storage, bridge networks)")
    for tool in ("podman", "runc", "debootstrap", "iptables", "nft"):
        if shutil.which(tool) is None:
            _missing(f"{tool} is missing: apt-get install podman buildah runc debootstrap (.ci/run installs them)")
    for tool in ("qemu-aarch64-static", "update-binfmts") if ARM64 else ():
        if shutil.which(tool) is None:
            _missing(
                f"{tool} is missing, so no emulated arm64 SuperNode: apt-get install qemu-user-static binfmt-support"
                " (.ci/run installs them)"
            )
    if not (Path("/sys/fs/cgroup/memory").is_dir() or "memory" in _read("/sys/fs/cgroup/cgroup.controllers")):
        _missing("no cgroup memory controller: the containers' mem_limit cannot be applied")


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


class Compose:
    """deploy/podman/compose.sh and podman, on this test's own deployment folder and project."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.project = f"fedmef-e2e-{os.getpid()}"
        self.run_dir = tmp_path / "podman"
        self.env = {**env, "COMPOSE_PROJECT_NAME": self.project, "FEDMEF_PODMAN_RUN": str(self.run_dir)}
        # podman's own configuration for this deployment, as compose.sh writes it (env.sh)
        self.podman_env = {
            **self.env,
            "CONTAINERS_CONF": str(self.run_dir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.run_dir / "storage.conf"),
        }

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PODMAN / "compose.sh", *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    def podman(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(["podman", *args], env=self.podman_env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr}"
        return done.stdout

    def container(self, service: str) -> str:
        names = self.podman(
            "ps", "-a", "--format", "{{.Names}}", "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).split()  # fmt: skip
        assert len(names) == 1, (service, names)
        return names[0]

    def inspect(self, service: str) -> dict:
        return json.loads(self.podman("inspect", self.container(service)))[0]

    def cgroup_memory(self, service: str) -> tuple[int, int]:
        """(peak, limit) in bytes of the service's container, from its memory cgroup (v1 or v2)."""
        pid = self.inspect(service)["State"]["Pid"]
        lines = _read(f"/proc/{pid}/cgroup").splitlines()
        v1 = next((line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"), None)
        if v1 is not None:
            base = Path("/sys/fs/cgroup/memory") / v1.lstrip("/")
            return int(_read(base / "memory.max_usage_in_bytes")), int(_read(base / "memory.limit_in_bytes"))
        base = Path("/sys/fs/cgroup") / lines[0].split(":", 2)[2].lstrip("/")
        peak = _read(base / "memory.peak") or _read(base / "memory.current")
        limit = _read(base / "memory.max").strip()
        return int(peak), (int(limit) if limit.isdigit() else -1)

    def logs(self) -> str:
        out = []
        emulated = (f"supernode-{ARM64_PI}", f"superexec-clientapp-{ARM64_PI}") if ARM64 else ()
        for service in (
            "superlink",
            "superexec-serverapp",
            "fleet-proxy",
            "supernode-2",
            "superexec-clientapp-2",
            *emulated,
        ):
            try:
                text = self.podman("logs", self.container(service))
            except AssertionError as exc:
                text = str(exc)
            out.append(f"--- {service}\n{text[-2500:]}")
        return "\n".join(out)


def test_compose_federation_on_podman(tmp_path):
    _check_podman()
    before = _host_state()
    timings: dict[str, float] = {}

    start = time.monotonic()
    built = subprocess.run([PODMAN / "build.sh"], cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    timings["build"] = time.monotonic() - start
    print("\n" + built.stdout.splitlines()[-1])  # build.sh's timings, the arm64 image's among them

    # --- the operator's steps of deploy/README.md ("The same federation with Docker Compose")
    pki, parts, releases, results = (tmp_path / d for d in ("pki", "parts", "releases", "results.json"))
    made = subprocess.run(
        [SERVER / "make-pki.sh", "-o", pki, "-n", str(len(PIS)), "superlink", "fleet-proxy"],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    prepare(parts, len(PIS), run_config(), max_examples=400)
    fab = app_registry.build_fab(ROOT)
    _, _, version = app_registry.fab_identity(fab)
    app_registry.publish(releases, fab, app_registry.load_signing_key(pki / "app-signing" / "operator"))
    # the images run as uid 49999: it owns the PKI (keys stay 0600), the rest is world-readable
    subprocess.run(["chown", "-R", "49999:49999", pki], check=True)
    subprocess.run(["chmod", "-R", "a+rX", parts, releases], check=True)
    tmp_path.chmod(0o755)

    port = free_port()
    home = tmp_path / "operator"
    home.mkdir()
    (home / "config.toml").write_text(_connection("compose", f"127.0.0.1:{port}", pki / "ca.crt"))
    env = {
        **flower_env(home),
        "OMP_NUM_THREADS": "1",
        "PKI_DIR": str(pki),
        "PARTITIONS_DIR": str(parts),
        "RELEASES_DIR": str(releases),
        "SUPERLINK_PORT": str(port),
        "CLIENTAPP_MEM_LIMIT": "1g",
        "FEDMEF_ARM64": "1" if ARM64 else "0",
    }
    deployment = Compose(tmp_path, env)
    try:
        _scenario(deployment, env, version, results, timings)
    finally:
        start = time.monotonic()
        down = deployment.compose("down")
        timings["down"] = time.monotonic() - start
        print(f"\ncompose on podman, timings (s): { {k: round(v, 1) for k, v in timings.items()} }")
    assert down.returncode == 0, down.stdout + down.stderr
    # the host as before: the same ruleset and sysctls, no storage, no process of the deployment
    assert _host_state() == before
    assert not deployment.run_dir.exists()
    assert not [line for line in _read("/proc/self/mountinfo").splitlines() if str(deployment.run_dir) in line]
    left = subprocess.run(["pgrep", "-f", "--", f"{deployment.run_dir}/"], capture_output=True, text=True).stdout
    assert not left.split(), left


def _scenario(deployment: Compose, env: dict[str, str], version: str, results: Path, timings: dict) -> None:
    start = time.monotonic()
    up = deployment.compose("up")
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    timings["up"] = time.monotonic() - start

    # every ClientApp container is held to the Pi's memory (its cgroup's limit, not only the compose file)
    for i in PIS:
        assert deployment.cgroup_memory(f"superexec-clientapp-{i}")[1] == MEM_LIMIT
    # the emulated Pi: arm64 containers, qemu on the Pi 4's CPU model, a Pi 4B's /proc/cpuinfo
    for service in (f"supernode-{ARM64_PI}", f"superexec-clientapp-{ARM64_PI}") if ARM64 else ():
        config = deployment.inspect(service)
        assert config["ImageName"].startswith("localhost/fedmef-pi:"), config["ImageName"]
        assert "QEMU_CPU=cortex-a72" in config["Config"]["Env"], config["Config"]["Env"]
        emulated = deployment.podman(
            "exec", deployment.container(service), "sh", "-c", "uname -m; grep ^Model /proc/cpuinfo"
        )
        assert emulated.split("\n")[0] == "aarch64" and "Raspberry Pi 4 Model B" in emulated, emulated

    start = time.monotonic()
    deadline = time.monotonic() + 120
    while not _answers(_run([BIN / "flwr", "ls", "compose", "--format", "json"], env)):  # the Control API is up
        assert time.monotonic() < deadline, "the SuperLink's Control API did not answer in 120 s:\n" + deployment.logs()
        time.sleep(2)
    keys = [Path(env["PKI_DIR"]) / "devices" / f"pi-{i}.pub" for i in PIS]
    registered = _run([SERVER / "register-devices.sh", "compose", *keys], env)
    assert registered.returncode == 0, registered.stdout + registered.stderr + deployment.logs()
    nodes = {int(pi): int(node) for pi, node in re.findall(r"pi-(\d): registered as node (\d+)", registered.stdout)}
    assert sorted(nodes) == list(PIS), registered.stdout
    node_ids = set(nodes.values())
    timings["register"] = time.monotonic() - start

    overrides = (
        f"num-server-rounds={ROUNDS} max-local-steps=10 min-train-nodes={len(PIS)} max-test-examples=500 "
        f"round-timeout={ROUND_TIMEOUT} node-wait-timeout=300 results-dir='/app/runs' run-name='compose'"
    )
    start = time.monotonic()
    run = subprocess.Popen(
        [str(BIN / "flwr"), "run", f"@fedmef/fedmef=={version}", "compose", "--stream", "--run-config", overrides],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _kill_a_supernode_after_round_1(deployment, run)
        out, _ = run.communicate(timeout=1800)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    timings["run"] = time.monotonic() - start
    volume = deployment.podman("volume", "inspect", "--format", "{{.Mountpoint}}", f"{deployment.project}_results")
    results_file = Path(volume.strip()) / "compose" / "results.json"
    # flwr run exits 0 even when the run failed: the results file is the proof
    assert run.returncode == 0 and results_file.exists(), out[-3000:] + deployment.logs()
    data = json.loads(results_file.read_text())
    assert [r["round"] for r in data["rounds"]] == list(range(1, ROUNDS + 1)), out[-3000:] + deployment.logs()
    killed_node = nodes[2]  # pi-2's key: supernode-2
    for r in data["rounds"]:
        timings[f"round {r['round']}"] = r["round_time_s"]
        assert {c["node_id"] for c in r["clients"]} <= node_ids
        # the only failure: the killed SuperNode's reply in the round it died in. Flower reports it as
        # unavailable, or, when the node is back within that round, the node answers that it lost the
        # mask it held (its state died with it) and the server resends the mask next round
        assert all(x["node_id"] == killed_node and _lost_reply(x["reason"]) for x in r["rejected"]), r
    assert sum(len(r["rejected"]) for r in data["rounds"]) <= 1, data["rounds"]
    # every SuperNode took part; the killed one again after its restart, in the last round
    assert {c["node_id"] for r in data["rounds"] for c in r["clients"]} == node_ids
    last = data["rounds"][-1]["clients"]
    assert {c["node_id"] for c in last} == node_ids and sorted(c["partition_id"] for c in last) == list(range(len(PIS)))
    shutil.copy(results_file, results)

    if ARM64:
        _emulated_pi_took_part(data, nodes[ARM64_PI])
    else:
        print("\narm64 SuperNode: not run (FEDMEF_ARM64=1 adds it: deploy/podman/arm64-federation.sh)")

    killed = deployment.inspect("supernode-2")
    assert killed["RestartCount"] >= 1 and killed["State"]["Running"], killed["State"]
    peaks = {}
    for i in PIS:
        for service in (f"supernode-{i}", f"superexec-clientapp-{i}"):
            peaks[service] = round(deployment.cgroup_memory(service)[0] / 2**20)
    print(f"\npeak memory per container (MiB, from its memory cgroup): {peaks}")
    print(f"clients per round: {[len(r['clients']) for r in data['rounds']]}")
    assert all(peaks[f"superexec-clientapp-{i}"] < MEM_LIMIT >> 20 for i in PIS)


def _emulated_pi_took_part(data: dict, pi: int) -> None:
    """pi-4 replied in every round, on the Pi's own aarch64 wheels, with SAP's kernels built by its gcc."""
    took_part = [r["round"] for r in data["rounds"] if pi in {c["node_id"] for c in r["clients"]}]
    print(f"\narm64 SuperNode took part in rounds {took_part} of {ROUNDS}")
    replies = [c for r in data["rounds"] for c in r["clients"] if c["node_id"] == pi]
    print(
        "arm64 SuperNode per round: "
        + ", ".join(
            f"round {r['round']}: round {r['round_time_s']:.0f} s, train {c['train_time_s']:.1f} s, "
            f"peak RSS {c['peak_rss_mb']:.0f} MiB"
            for r in data["rounds"] for c in r["clients"] if c["node_id"] == pi
        )
    )  # fmt: skip
    device = next(c["device"] for c in replies if "device" in c)
    print(f"arm64 SuperNode's device report: {device}")
    assert took_part == list(range(1, ROUNDS + 1)), took_part
    assert device["arch"] == "aarch64" and device["sap-kernels"] == "native", device
    assert device["torch"].split("+")[0] == _pi_pin("torch"), device


def _pi_pin(name: str) -> str:
    """The version deploy/pi/requirements-aarch64.txt pins ``name`` to."""
    text = (ROOT / "deploy" / "pi" / "requirements-aarch64.txt").read_text()
    return re.search(rf"^{name}==(\S+)", text, re.M)[1]


def _lost_reply(reason: str) -> bool:
    return "Node Unavailable" in reason or "StaleMask" in reason


def _answers(done: subprocess.CompletedProcess) -> bool:
    """Whether a `flwr ... --format json` call succeeded: it exits 0 either way."""
    try:
        return done.returncode == 0 and json.loads(done.stdout)["success"] is True
    except (json.JSONDecodeError, KeyError):
        return False


def _kill_a_supernode_after_round_1(deployment: Compose, run: subprocess.Popen) -> None:
    """SIGKILL supernode-2's container once round 1 is in the results; it must come back by itself."""
    volume = None
    deadline = time.monotonic() + 600
    while True:
        assert run.poll() is None, "the run ended before round 1 was recorded:\n" + deployment.logs()
        assert time.monotonic() < deadline, "round 1 took more than 600 s:\n" + deployment.logs()
        if volume is None:
            mounted = subprocess.run(
                ["podman", "volume", "inspect", "--format", "{{.Mountpoint}}", f"{deployment.project}_results"],
                env=deployment.podman_env,
                capture_output=True,
                text=True,
            )
            volume = Path(mounted.stdout.strip()) if mounted.returncode == 0 else None
        results_file = volume / "compose" / "results.json" if volume else None
        if results_file and results_file.exists():
            try:
                if json.loads(results_file.read_text())["rounds"]:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(1)
    state = deployment.inspect("supernode-2")["State"]
    started = state["StartedAt"]
    os.kill(state["Pid"], signal.SIGKILL)  # the container's init: the kernel then kills all of it
    deadline = time.monotonic() + 120
    while True:
        state = deployment.inspect("supernode-2")["State"]
        if state["Running"] and state["StartedAt"] != started:
            break
        assert time.monotonic() < deadline, f"supernode-2 was not restarted: {state}"
        time.sleep(1)
