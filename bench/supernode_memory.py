"""Peak memory of a real SuperNode's ClientApp process, per method and model, in a normal and an adjustment round.

    python -m bench.supernode_memory                      # writes bench/results/supernode_memory.{json,md}
    python -m bench.supernode_memory --models resnet18 --steps 3

A Flower deployment on this machine's loopback, as ``deploy/README.md`` sets one up for Pis but without
TLS: ``flower-superlink --insecure`` (its state in a database file) and one ``flower-supernode
--insecure`` holding a CIFAR-10 partition file, in a private FLWR_HOME on free ports. The SuperNode
starts a fresh ``flwr-clientapp`` process for every message it is sent (subprocess isolation, Flower's
default), so each round's training runs in a process of its own: the process a Pi must hold. For each
model and method (FedMef, FedMef without SAP, FedTiny, dense FedAvg; :data:`bench.compare.ABLATIONS`)
the operator's ``flwr run`` asks for three rounds with ``delta-r = 2``, ``r-stop = 4``: round 2 is an
adjustment round (FedMef's BaE, and the top-K gradient pass of FedMef and FedTiny), round 3 a normal
one. Round 1, also normal, is reported apart: its process can peak lower than later normal rounds,
so adjustment and normal rounds are compared on rounds 2 and 3.

A sampler polls the SuperNode's ``flwr-clientapp`` processes every 10 ms and keeps, per process, the
largest VmHWM it read (``/proc/PID/status``: the kernel's high-water mark of that process's resident
memory since its exec, so a spike between two polls still counts, and the SuperNode's memory, which
``ru_maxrss`` would carry across the fork, does not). Only a rise in the last 10 ms before the process
exits could be missed. Each round's reply names the process that trained (its ``pid`` metric), so the
peak is that process's own: a SuperNode may start more ClientApp processes than it gets messages (five
for four were seen here beside a busy runner), and their order is no guide.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.compare import ABLATIONS
from common.measure import runtime
from server.simulation import ROOT, flower_env, free_port, stop_flower_processes, toml_overrides

RESULTS = ROOT / "bench" / "results"
MODELS = ("resnet18", "mobilenetv2")
METHODS = ("fedmef", "fedmef-no-sap", "fedtiny", "fedavg")
ROUNDS = {1: "first", 2: "adjustment", 3: "normal"}
POLL_S = 0.01
#: what the SuperNode logs for each message it receives, e.g. "Receiving: train message (ID: ...)"
RECEIVED = re.compile(r"Receiving: (\w+) message")


class ClientAppSampler:
    """Largest VmHWM (bytes) seen per ``flwr-clientapp`` process under ``parent``, polled in a thread."""

    def __init__(self, parent: int):
        self.parent = psutil.Process(parent)
        self.peaks: dict[int, int] = {}
        self.started: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ClientAppSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                children = self.parent.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    if "flwr-clientapp" not in " ".join(child.cmdline()[:2]):
                        continue
                    hwm = runtime.high_water_mark(child.pid)
                    self.started.setdefault(child.pid, child.create_time())
                except (psutil.Error, OSError):
                    continue  # gone between the listing and the read: its last poll stands
                if hwm is not None:
                    self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), hwm)
            time.sleep(POLL_S)

    def in_order(self) -> list[int]:
        """The peaks of the processes seen, oldest first."""
        return [self.peaks[pid] for pid in sorted(self.peaks, key=lambda p: self.started[p])]

    def peak_of(self, pid: int | None, what: str) -> int:
        """The peak of process ``pid``, which ``what`` (a round, for the error) says trained."""
        if pid is None or int(pid) not in self.peaks:
            raise RuntimeError(
                f"{what}: the reply names ClientApp process {pid}, which the sampler never saw; it saw "
                f"{sorted(self.peaks)} (peaks, MiB: {[round(p / 2**20) for p in self.in_order()]})"
            )
        return self.peaks[int(pid)]


class Deployment:
    """A SuperLink and one SuperNode on loopback, in ``work``; :meth:`close` stops them by pid."""

    def __init__(self, work: Path, partition: Path):
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.homes = {name: work / name for name in ("superlink", "supernode", "operator")}
        for home in self.homes.values():
            home.mkdir(parents=True)
        link = free_port()
        self._start(
            "superlink",
            ["flower-superlink", "--insecure", "--database", work / "state.db", "--port", link],
        )
        self._wait_for_port(link)
        self.node = self._start(
            "supernode",
            [
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                "--port",
                free_port(),
                "--node-config",
                f'data-path="{partition}"',
            ],
        )
        (self.homes["operator"] / "config.toml").write_text(
            f'[superlink.bench]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
        )

    def _start(self, name: str, cmd: list) -> subprocess.Popen:
        binary = Path(sys.executable).parent / cmd[0]
        with open(self.work / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [binary, *map(str, cmd[1:])],
                env=flower_env(self.homes[name]),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self.procs.append(proc)
        return proc

    def _wait_for_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(c.laddr and c.laddr.port == port for c in psutil.net_connections("tcp")):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        raise RuntimeError(f"the SuperLink did not listen on {port}:\n{self.tail('superlink')}")

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def received(self) -> list[str]:
        return RECEIVED.findall(self.tail("supernode", 10**9))

    def run(self, overrides: dict[str, Any], timeout: float) -> subprocess.CompletedProcess:
        cmd = [Path(sys.executable).parent / "flwr", "run", ROOT, "bench", "--stream"]
        cmd += ["--run-config", toml_overrides(overrides)]
        try:
            return subprocess.run(
                cmd, env=flower_env(self.homes["operator"]), cwd=ROOT, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"{overrides['run-name']}: flwr run took over {timeout:.0f} s; on a loaded machine give it more "
                f"with --timeout (an adjustment round's top-K pass alone took 292 s here without load)"
            ) from exc

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for home in self.homes.values():  # the ServerApp / ClientApp processes they started
            stop_flower_processes(home)


def measure(dep: Deployment, model: str, method: str, base: dict[str, Any], timeout: float) -> dict[str, Any]:
    name = f"{model}-{method}"
    overrides = {**base, **ABLATIONS[method], "model": model, "run-name": name}
    seen = len(dep.received())
    with ClientAppSampler(dep.node.pid) as sampler:
        done = dep.run(overrides, timeout)
        time.sleep(1.0)  # the last ClientApp's exit after its reply
    results_file = Path(base["results-dir"]) / name / "results.json"
    if done.returncode != 0 or not results_file.exists():  # flwr run exits 0 on a failed run: the file decides
        raise RuntimeError(
            f"{name}: the run failed (flwr run exit {done.returncode}, results file "
            f"{'present' if results_file.exists() else 'missing'}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}\n"
            f"SuperNode log:\n{dep.tail('supernode')}"
        )
    messages = dep.received()[seen:]
    rounds = json.loads(results_file.read_text())["rounds"]
    if len(rounds) != len(ROUNDS) or any(len(r.get("clients") or []) != 1 for r in rounds):
        got = [(len(r.get("clients") or []), r.get("rejected")) for r in rounds]
        raise RuntimeError(
            f"{name}: expected {len(ROUNDS)} rounds of one accepted reply each; (replies, rejected) per round: "
            f"{got}; messages {messages}"
        )
    adjusted = [bool(r.get("adjusted")) for r in rounds]
    if method != "fedavg" and adjusted != [ROUNDS[i] == "adjustment" for i in ROUNDS]:
        raise RuntimeError(f"{name}: rounds adjusted {adjusted}, expected round 2 only")
    client = [r["clients"][0] for r in rounds]
    train = [sampler.peak_of(c.get("pid"), f"{name}, round {i}") for i, c in enumerate(client, 1)]
    return {
        "model": model,
        "method": method,
        "messages": messages,
        "peak_mib": {ROUNDS[i]: train[i - 1] / 2**20 for i in ROUNDS},
        # the process's own VmHWM when it built its reply: below the sampled peak by what encoding the
        # reply and sending it took
        "reported_peak_mib": [c.get("peak_rss_mb") for c in client],
        "activation_mib": [c.get("activation_bytes", 0) / 2**20 for c in client],
        "topk_activation_mib": [c.get("topk_activation_bytes", 0) / 2**20 for c in client],
        "train_s": [c.get("train_time_s", 0.0) for c in client],
    }


def table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [
        title,
        "",
        "| model | method | ClientApp peak, normal round (MiB) | adjustment round (MiB) | first round (MiB) "
        "| normal vs FedTiny's | activations held (MiB), rounds 1-3 | top-K pass held (MiB) | train s, rounds 1-3 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tiny = {r["model"]: r["peak_mib"]["normal"] for r in rows if r["method"] == "fedtiny"}
    for r in rows:
        peak = r["peak_mib"]
        versus = f"{peak['normal'] / tiny[r['model']] - 1:+.0%}" if r["model"] in tiny else "-"
        acts = ", ".join(f"{a:.1f}" for a in r["activation_mib"])
        times = ", ".join(f"{t:.1f}" for t in r["train_s"])
        topk = max(r["topk_activation_mib"])
        lines.append(
            f"| {r['model']} | {r['method']} | {peak['normal']:.0f} | {peak['adjustment']:.0f} | {peak['first']:.0f} "
            f"| {versus} | {acts} | {f'{topk:.1f}' if topk else '-'} | {times} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(ABLATIONS))
    p.add_argument("--steps", type=int, default=5, help="local steps of batch 64 per round")
    p.add_argument("--examples", type=int, default=640, help="training examples in the SuperNode's partition")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--timeout", type=float, default=1200, help="seconds one run may take")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    from deploy.prepare_partitions import prepare, run_config

    with tempfile.TemporaryDirectory(prefix="fedmef-supernode-memory-") as tmp:
        work = Path(tmp)
        base: dict[str, Any] = {
            "dataset": "cifar10",
            "data-dir": a.data_dir,
            "width": 64,
            "batch-size": 64,
            "max-local-steps": a.steps,
            "num-server-rounds": len(ROUNDS),
            "delta-r": 2,
            "r-stop": 4,
            "min-train-nodes": 1,
            "fraction-evaluate": 0.0,
            "max-test-examples": 256,
            # The bench measures memory, not learning: at lr 0.05 FedTiny's MobileNetV2 on 576 examples sent
            # an update 20x the model's norm after its prune/grow, which the server's bound rightly rejects,
            # and a rejected reply is not in the results file that names the round's process.
            "max-update-ratio": 1e6,
            "results-dir": str(work / "runs"),
        }
        cfg = run_config(overrides=toml_overrides({k: base[k] for k in ("dataset", "data-dir")}))
        partition = prepare(work / "parts", 10, cfg, prefix="node", max_examples=a.examples)[0]
        dep = Deployment(work / "deployment", partition)
        rows: list[dict[str, Any]] = []
        title = (
            f"One flower-supernode's ClientApp processes (Flower's subprocess isolation, a process per message) on "
            f"CIFAR-10, batch 64, {a.steps} local steps, s_tm = s_ta = 0.9, ResNet18 at base width 64, MobileNetV2 at "
            f"full width; peak = largest "
            f"VmHWM of the round's process (`python -m bench.supernode_memory {' '.join(argv or sys.argv[1:])}`); "
            f"training processes started with {runtime.TRAINING_ENV}."
        )
        try:
            for model in a.models:
                for method in a.methods:
                    print(f"[supernode_memory] {model}, {method}: {len(ROUNDS)} rounds ...", flush=True)
                    rows.append(measure(dep, model, method, base, a.timeout))
                    # a later run's failure keeps the finished ones, beside the last complete table
                    write(rows, title, a.out, "supernode_memory.partial")
                    peak = rows[-1]["peak_mib"]
                    print(
                        f"[supernode_memory] {model}, {method}: ClientApp peak (MiB) "
                        + ", ".join(f"{kind} {mib:.0f}" for kind, mib in peak.items()),
                        flush=True,
                    )
        finally:
            dep.close()
    write(rows, title, a.out, "supernode_memory")
    for suffix in (".json", ".md"):
        (a.out / f"supernode_memory.partial{suffix}").unlink(missing_ok=True)
    print(table(rows, title))


def write(rows: list[dict[str, Any]], title: str, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {"title": title, "date": time.strftime("%Y-%m-%d"), "training_env": runtime.TRAINING_ENV, "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(table(rows, title))


if __name__ == "__main__":
    main()
