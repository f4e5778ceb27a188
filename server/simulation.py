"""Run the app in Flower's simulation engine with ``flwr run``, offline and cleaned up afterwards.

``python -m server.simulation`` is the project's main job: a short FedMef run with the embedded default
config (``[tool.flwr.app.config]``) on 4 simulated SuperNodes, ending with the result table. Other
benchmarks and the end-to-end test call :func:`run_simulation` the same way.

``flwr run`` starts a local SuperLink that outlives it and exits 0 even when the run failed, so this
module stops every Flower process that belongs to its private ``FLWR_HOME`` and treats a run as
successful only when the ServerApp wrote its results file.

Ray shows a simulated client no GPU unless it asks for a share of one: with ``--gpus-per-client``
(0.25: four clients share a GPU) the clients can train on CUDA (run-config ``device``); without it they
train on the CPU, while the ServerApp, outside Ray, evaluates on CUDA where there is one.

With ``--ray-address`` the clients run on an existing Ray cluster (several machines) instead of a Ray
started for the run. Flower's federation config has no field for that: its Ray backend calls
``ray.init()`` without an address, which joins the cluster named by ``RAY_ADDRESS``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import psutil

from common.measure import runtime
from common.protocol.config import ConfigError, parse_run_config
from server.server_app import RUN_FAILED

ROOT = Path(__file__).resolve().parent.parent


class SimulationError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Offline Flower: no telemetry, no update check, no run-time `uv sync`, a private FLWR_HOME;
    plus :data:`common.measure.runtime.TRAINING_ENV` for the processes that train.

    The local SuperLink gets free ports: on its fixed default (39091) a second ``flwr run`` would
    silently submit to another run's SuperLink."""
    env = runtime.training_env()
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if commit := source_commit():
        env["FEDMEF_COMMIT"] = commit  # for results.json: Flower runs a bundle that has no git history
    return env


def source_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")


def toml_overrides(values: Mapping[str, Any]) -> str:
    """``k=v`` pairs as ``--run-config`` reads them (TOML values: strings quoted)."""
    return " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
        for k, v in values.items()
    )


def stop_flower_processes(flwr_home: Path) -> int:
    """Stop the SuperLink/SuperExec/simulation processes started under ``flwr_home``; returns how many."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("FLWR_HOME") == str(flwr_home):
                # Ray's agents may not carry FLWR_HOME, so take every descendant too
                for p in [proc, *proc.children(recursive=True)]:
                    found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    mine = list(found.values())
    for proc in mine:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=10)
    for proc in alive:
        proc.kill()
    return len(mine)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUPERLINK_START = re.compile(r"Failed to start local SuperLink within \d+ ?s\.")
# The ServerApp's lines worth a terminal while a run goes on: each round's summary, a resumption, a
# skipped round and a rejected reply (server/server_app.py, server/strategy.py).
_PROGRESS = re.compile(
    r"^(INFO|WARNING)\s*:\s*(\[[\w-]+\] round \d+/\d+:|\[[\w-]+\] resuming|round \d+ skipped|round \d+: reply)"
)


# The ServerApp's line when the run cannot go on, and Flower's once the ServerApp has raised: the run
# is over, though Flower takes another 15-30 s to wind the simulation down and then exits 0.
_FAILED = (RUN_FAILED, "Simulation raised an exception")


def _follow(
    proc: subprocess.Popen, log_path: Path | None, progress: Callable[[str], None] | None, timeout: float
) -> int:
    """Wait for ``proc`` at most ``timeout`` seconds, handing each progress line that appears in
    ``log_path`` to ``progress`` as it comes; returns the exit code, or 1 as soon as the log says
    the ServerApp failed (the caller stops Flower's processes)."""
    deadline, position = time.monotonic() + timeout, 0
    while True:
        finished = proc.poll() is not None
        if log_path is not None and log_path.exists():
            with open(log_path, "rb") as f:
                f.seek(position)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for its end
            position += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                if progress is not None and _PROGRESS.match(plain := _ANSI.sub("", line)):
                    progress(plain.split(":", 1)[1].strip())
                if any(text in line for text in _FAILED) and not finished:
                    proc.terminate()
                    proc.wait()
                    return 1
        if finished:
            return cast(int, proc.returncode)
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise SimulationError(f"flwr run did not finish in {timeout:.0f} s")
        time.sleep(0.5)


def check_ray_address(address: str) -> None:
    """Refuse a Ray address nobody answers at before Flower starts: Flower's ``ray.init`` keeps trying
    while the ServerApp waits in round 1 for clients that never come."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SimulationError(
            f"Ray address {address!r} is not HOST:PORT: give the head node's address and the --port of its "
            "`ray start --head`"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise SimulationError(
            f"no Ray cluster answers at {address} ({exc}): start its head with `ray start --head --port={port}` "
            "or correct the address"
        ) from exc


def failure_cause(log_path: Path | None) -> str:
    """The ServerApp's own error lines from Flower's log (ANSI colours stripped), so the cause of a
    failed run reaches the terminal, not only the log file; empty when there are none."""
    if log_path is None or not log_path.exists():
        return ""
    plain = [_ANSI.sub("", line) for line in log_path.read_text(errors="replace").splitlines()]
    errors = [line.split(":", 1)[1].strip() for line in plain if line.startswith("ERROR") and ":" in line]
    # flwr's own CLI errors come in a box (│ ... │) and before any ServerApp runs: the one a busy
    # machine meets is the managed SuperLink missing its fixed start-up limit (15 s in flwr 1.41-1.42)
    cli = " ".join(line.strip(" │╭╮╰╯─") for line in plain if line.startswith("│"))
    if match := _SUPERLINK_START.search(cli):
        errors.append(
            f"{match.group(0)} flwr's local SuperLink did not start within flwr's fixed limit, "
            "which happens on a machine too busy to start a Python process that fast: run again when it is quieter"
        )
    return "".join(f"\n  {line}" for line in dict.fromkeys(errors))


def run_simulation(
    run_config: Mapping[str, Any],
    num_supernodes: int,
    results_dir: Path,
    run_name: str,
    preset: Path | None = None,
    timeout: float = 3600,
    log_path: Path | None = None,
    cpus_per_client: int = 1,
    progress: Callable[[str], None] | None = None,
    ray_address: str | None = None,
    gpus_per_client: float = 0.0,
) -> dict:
    """``flwr run . --stream`` with the given overrides; returns the results the ServerApp wrote.

    With a ``log_path``, ``progress`` gets each round's line of the ServerApp as it comes.
    ``ray_address`` (``HOST:PORT`` of a Ray cluster's head) runs the clients on that cluster's nodes
    instead of a Ray started for this run; this machine must be one of its nodes. ``gpus_per_client``
    is the share of a GPU Ray gives each client (0: none, so the clients compute on the CPU)."""
    results_dir = results_dir.resolve()
    # flwr run takes either a TOML file or k=v pairs, not both: merge the preset in here
    preset_values = tomllib.loads(preset.read_text()) if preset is not None else {}
    overrides = {**preset_values, **run_config, "results-dir": str(results_dir), "run-name": run_name}
    data_dir = str(overrides.get("data-dir", ""))
    if ray_address is not None and data_dir and not Path(data_dir).is_absolute():
        # a Ray worker resolves it from the folder its node's `ray start` ran in, not from here
        overrides["data-dir"] = str(ROOT / data_dir)
    # Checked here, before Flower sees it: Flower rejects an unknown key with only "[code: 15] Invalid
    # run configuration", and a ServerApp that fails takes a minute to be reported.
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    parse_run_config({**defaults, **overrides})
    if ray_address is not None:
        check_ray_address(ray_address)
    resources = f"client-resources-num-cpus={cpus_per_client}"
    if gpus_per_client > 0:
        resources += f" client-resources-num-gpus={gpus_per_client}"
    cmd = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(ROOT),
        "--stream",
        "--run-config",
        toml_overrides(overrides),
        "--federation-config",
        f"num-supernodes={num_supernodes} {resources}",
    ]
    results = results_dir / run_name / "results.json"
    if results.exists() and not overrides.get("resume"):
        raise SimulationError(f"{results} exists already: choose another run name, move it away or resume it")
    flwr_home = Path(tempfile.mkdtemp(prefix="fedmef-flwr-home-"))
    env = flower_env(flwr_home)
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    log_file = open(log_path, "w") if log_path else None
    log = log_file if log_file is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        returncode = _follow(proc, log_path, progress, timeout)
    finally:
        stop_flower_processes(flwr_home)
        shutil.rmtree(flwr_home, ignore_errors=True)
        if log_file is not None:
            log_file.close()
    where = f"; see {log_path}" if log_path else ""
    if returncode != 0 or not results.exists():
        raise SimulationError(
            f"flwr run failed (exit {returncode}, results file "
            f"{'present' if results.exists() else 'missing'}){where}{failure_cause(log_path)}"
        )
    data = json.loads(results.read_text())
    if not data.get("summary"):
        raise SimulationError(f"{results} has no summary: the run stopped early{where}")
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--supernodes", type=int, default=4)
    p.add_argument("--preset", type=Path, default=None, help="a conf/*.toml file of run-config overrides")
    p.add_argument("--set", default="", help="more overrides, e.g. \"strategy='fedtiny' num-server-rounds=3\"")
    p.add_argument("--results-dir", type=Path, default=ROOT / "runs")
    p.add_argument("--name", default=None)
    p.add_argument("--resume", action="store_true", help="continue the killed run --name from its last checkpoint")
    p.add_argument("--timeout", type=float, default=3600, help="seconds the run may take before it is stopped")
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="run the clients on this Ray cluster (its head's `ray start --head --port`), of which this machine "
        "is a node, instead of on a Ray started for the run",
    )
    p.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="the share of a GPU each simulated client gets (0.25: four per GPU), so device = 'auto' or 'cuda' "
        "trains the clients on CUDA; 0 (default): the clients see no GPU",
    )
    a = p.parse_args()
    overrides = {}
    if a.set:
        overrides = tomllib.loads("\n".join(a.set.split()))
    if a.resume:
        if not a.name:
            sys.exit("simulation: --resume needs the --name of the run to continue")
        overrides["resume"] = True
    name = a.name or f"{overrides.get('strategy', 'fedmef')}-{time.strftime('%Y%m%d-%H%M%S')}"
    log_path = a.results_dir.resolve() / f"{name}{'-resumed' if a.resume else ''}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cluster = f" on the Ray cluster at {a.ray_address}" if a.ray_address else ""
    print(f"flwr run: {a.supernodes} simulated SuperNodes{cluster}; Flower's log goes to {log_path}", flush=True)
    start = time.time()
    try:
        data = run_simulation(
            overrides,
            a.supernodes,
            a.results_dir,
            name,
            a.preset,
            log_path=log_path,
            timeout=a.timeout,
            progress=lambda line: print(line, flush=True),
            ray_address=a.ray_address,
            gpus_per_client=a.gpus_per_client,
        )
    except (ConfigError, SimulationError) as exc:
        sys.exit(f"simulation: {exc}")
    from server.results import markdown_table

    print(markdown_table({data["run"]["strategy"]: data}))
    print(f"\n{len(data['rounds'])} rounds in {time.time() - start:.0f} s; results in {a.results_dir.resolve() / name}")


if __name__ == "__main__":
    main()
