"""A memory-capped client: one ClientApp training round inside a 1 GiB memory cgroup (v1).

``python -m bench.cgroup_client`` (as root, on a machine with the cgroup v1 memory controller) prepares
one CIFAR-10 partition file as a SuperNode would hold it (``deploy.prepare_partitions``), builds the
server's real train Message for that round (the strategy's ``configure_train``), and runs the
ClientApp's train handler on it in a child process that puts itself into a fresh memory cgroup before
importing torch, so everything it touches is charged. It does so for ResNet18 with NSConv + SAP (FedMef),
NSConv without SAP, and the BatchNorm model (FedTiny), all at batch 64 and s_tm 0.9, and reports the
cgroup's peak memory, OOM kills and the client's own metrics in ``bench/results/cgroup_client.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

from common.measure import runtime
from server.simulation import ROOT

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
RESULTS = ROOT / "bench" / "results"
CONFIGS = {  # label -> run-config overrides
    "fedmef (nsconv + SAP 0.9)": {"strategy": "fedmef"},
    "nsconv, no SAP": {"strategy": "fedmef", "sap": "off", "bae": "off"},
    "fedtiny (batchnorm)": {"strategy": "fedtiny"},
}


def _base_config(steps: int) -> dict:
    import tomllib

    values = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    values.update(
        {
            "model": "resnet18",
            "dataset": "cifar10",
            "data-dir": str(ROOT.parent / "shared/data/cifar10"),
            "batch-size": 64,
            "s-tm": 0.9,
            "s-ta": 0.9,
            "max-local-steps": steps,
            "delta-r": 100,
            "min-train-nodes": 1,
        }
    )
    return values


def _train_message(run_config: dict, out: Path) -> Path:
    """The content of the round-1 train message the server would send to this node, pickled for the
    child process this script starts itself (flwr's public API has no record serialiser)."""
    from common.protocol.config import parse_run_config
    from server.server_app import global_model
    from server.strategy import make_strategy

    cfg = parse_run_config(run_config)
    strategy = make_strategy(cfg, global_model(cfg, 10, 3))
    out.write_bytes(pickle.dumps(strategy.content_for(1, strategy.instructions(1))))
    return out


def _child(cgroup: Path, message: Path, partition: Path, run_config: dict) -> None:
    """Join the cgroup first, then import torch and run the ClientApp's train handler once."""
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    from flwr.app import Context, Message, Metadata, RecordDict

    from client.client_app import train

    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600,
        message_type="train",
    )
    msg = Message(content=pickle.loads(message.read_bytes()), metadata=metadata)
    context = Context(
        run_id=1, node_id=1, node_config={"data-path": str(partition)}, state=RecordDict(), run_config=run_config
    )
    reply = train(msg, context)
    print(json.dumps(dict(reply.content["metrics"])))


def _measure(label: str, overrides: dict, partition: Path, limit_mb: int, steps: int, work: Path) -> dict:
    run_config = {**_base_config(steps), **overrides}
    message = _train_message(run_config, work / "train-message.bin")
    cgroup = CGROUP_ROOT / f"fedmef-bench-{os.getpid()}"
    cgroup.mkdir()
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(limit_mb * 2**20))
        if (cgroup / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
            (cgroup / "memory.memsw.limit_in_bytes").write_text(str(limit_mb * 2**20))
        start = time.time()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.cgroup_client",
                "--child",
                str(cgroup),
                str(message),
                str(partition),
                json.dumps(run_config),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=runtime.training_env(),
        )
        oom = dict(line.split() for line in (cgroup / "memory.oom_control").read_text().splitlines())
        row = {
            "config": label,
            "limit_mb": limit_mb,
            "exit_code": proc.returncode,
            "peak_mb": int((cgroup / "memory.max_usage_in_bytes").read_text()) / 2**20,
            "failcnt": int((cgroup / "memory.failcnt").read_text()),
            "oom_kills": int(oom.get("oom_kill", 0)),
            "wall_s": time.time() - start,
        }
        if proc.returncode == 0:
            row["client"] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            row["stderr_tail"] = proc.stderr[-2000:]
        return row
    finally:
        for pid in (cgroup / "cgroup.procs").read_text().split():
            os.kill(int(pid), 9)
        time.sleep(0.5)
        cgroup.rmdir()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, cgroup, message, partition, run_config = sys.argv
        return _child(Path(cgroup), Path(message), Path(partition), json.loads(run_config))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit-mb", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8, help="local steps of batch 64 in the round")
    p.add_argument("--examples", type=int, default=600, help="examples in the client's partition")
    a = p.parse_args()
    if not (CGROUP_ROOT / "memory.limit_in_bytes").exists() or not os.access(CGROUP_ROOT, os.W_OK):
        sys.exit(f"needs a writable cgroup v1 memory controller at {CGROUP_ROOT} (run as root)")
    from common.data.partition_files import prepare
    from common.protocol.config import parse_run_config

    work = RESULTS / "cgroup_client-work"
    work.mkdir(parents=True, exist_ok=True)
    partition = prepare(work, 100, parse_run_config(_base_config(a.steps)), prefix="client", max_examples=a.examples)[0]
    rows = []
    for label, overrides in CONFIGS.items():
        print(f"[{label}] one round in a {a.limit_mb} MiB cgroup ...", flush=True)
        rows.append(_measure(label, overrides, partition, a.limit_mb, a.steps, work))
        r = rows[-1]
        print(f"[{label}] exit {r['exit_code']}, peak {r['peak_mb']:.0f} MiB, OOM kills {r['oom_kills']}", flush=True)
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    lines = [
        f"ResNet18, CIFAR-10 partition of {a.examples} examples, batch 64, s_tm 0.9, {a.steps} local steps, "
        f"memory cgroup limit {a.limit_mb} MiB (v1, swap included), client started with {runtime.TRAINING_ENV}",
        "",
        # not the client's own ru_maxrss: after fork + exec it still holds this parent's high-water mark
        "| configuration | finished | peak cgroup memory (MiB) | OOM kills | activation bytes held (MiB) "
        "| train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r.get("client", {})
        status = "yes" if r["exit_code"] == 0 else f"no (exit {r['exit_code']})"
        lines.append(
            f"| {r['config']} | {status} | "
            f"{r['peak_mb']:.0f} | {r['oom_kills']} | {c.get('activation-bytes', 0) / 2**20:.1f} | "
            f"{c.get('train-time-s', 0):.1f} |"
        )
    (RESULTS / "cgroup_client.json").write_text(
        json.dumps(
            {
                "command": "python -m bench.cgroup_client " + " ".join(sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d"),
                "rows": rows,
            },
            indent=1,
        )
    )
    (RESULTS / "cgroup_client.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
