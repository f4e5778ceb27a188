"""deploy/: compose files and systemd units against the pinned Flower's own CLI parsers, the PKI script,
the SuperLink start script, the Pi's pinned requirements, and the partition files the ClientApp reads.
(tests/test_deployment_e2e.py runs it all on the real Deployment Engine.)"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import flwr
import numpy as np
import pytest
import torch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.common.config import parse_config_args
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink_parser
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode_parser

import deploy.prepare_partitions as prep
from client.data import load_client_data
from common.data import partition_files
from common.data.datasets import STANDARDISATIONS, Dataset, Split
from common.data.partition import client_data
from common.measure import runtime
from common.protocol.config import parse_run_config
from deploy import app_registry

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PARSERS = {
    "flower-superlink": superlink_parser,
    "flower-supernode": supernode_parser,
    "flower-superexec": superexec_parser,
}


def parse(cli: str, args: list[str]) -> argparse.Namespace:
    """``args`` as the installed Flower's own parser for ``cli`` reads them; fails on any unknown flag,
    bad choice or missing required argument, with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return PARSERS[cli]().parse_args(args)
    except SystemExit:
        pytest.fail(f"{cli} {shlex.join(args)}: {err.getvalue().strip()}")


# ---------------------------------------------------------------- compose


def _compose(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _cli_of(service: dict) -> str | None:
    """Which Flower CLI a service runs: the image's entrypoint, or deploy/Dockerfile's (flower-superexec);
    None for the project's own services (the proxy, the registry, the volume's one-shot chown, the
    devices' network holders)."""
    if "entrypoint" in service or service.get("build", {}).get("target") == "fleet-proxy":
        return None
    if "build" in service:
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        return "flower-superexec"
    image = service["image"].split(":")[0]
    return {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode"}[image]


def _node_config(args: argparse.Namespace) -> dict:
    return parse_config_args([args.node_config])


def _secret_targets(service: dict) -> set[str]:
    return {s["target"].removeprefix("/app/") for s in service.get("secrets", [])}


def test_compose_commands_are_valid_for_the_pinned_flower():
    services = _compose("compose.yml")["services"]
    clis = {name: _cli_of(s) for name, s in services.items()}
    assert sorted(c for c in clis.values() if c) == (
        ["flower-superexec"] * 4 + ["flower-superlink"] + ["flower-supernode"] * 3
    )
    for name, service in services.items():
        if "image" in service and service["image"].startswith("flwr/"):
            tag = service["image"].split(":", 1)[1]
            assert tag == f"${{FLWR_VERSION:-{flwr.__version__}}}", f"{name}: not pinned to flwr {flwr.__version__}"
        if name == "superlink-state":  # the one-shot job that hands the state volume to the image's user
            assert service["entrypoint"][0] == "chown" and "restart" not in service
            continue
        assert service["restart"] == "unless-stopped", name
        if clis[name] is None:
            continue
        args = parse(clis[name], [str(a) for a in service["command"]])
        if clis[name] == "flower-superlink":
            assert args.isolation == "process" and args.host == "0.0.0.0"
            assert any(v.endswith(":/app/state") for v in service["volumes"])  # the state volume
            assert args.database == "state/superlink.db"
        elif clis[name] == "flower-supernode":
            assert args.isolation == "process" and args.superlink == "fleet-proxy:9092"
            path = _node_config(args)["data-path"]
            # the ClientApp reads the file, so its SuperExec is the one that mounts the partitions; it
            # shares the SuperNode's network namespace, which a device-N container holds for both
            device = service["network_mode"].removeprefix("service:")
            assert services[device]["entrypoint"] == ["sleep", "infinity"] and services[device]["networks"] == ["fleet"]
            executor = next(
                s for n, s in services.items() if s.get("network_mode") == service["network_mode"] and n != name
            )
            assert path.startswith("/data/") and any(v.endswith(":/data:ro") for v in executor["volumes"])
            assert parse("flower-superexec", executor["command"]).runtime_api_address == f"127.0.0.1:{args.port}"
        else:
            assert args.runtime_api_address.startswith("127.0.0.1:")
            assert runtime.TRAINING_ENV.items() <= service["environment"].items(), name


def test_compose_is_secure_by_default():
    """TLS, SuperNode authentication, signed apps and the SuperExec secret everywhere; the SuperLink off
    the device network; nothing published but the operator's TLS port on the host's loopback."""
    compose = _compose("compose.yml")
    services = compose["services"]
    assert "--insecure" not in (DEPLOY / "compose.yml").read_text()
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert published == {"superlink": ["127.0.0.1:${SUPERLINK_PORT:-8000}:8000"]}
    assert compose["networks"]["fleet"]["internal"] is True
    for name, service in services.items():
        cli = _cli_of(service)
        if cli is None:
            continue
        args = parse(cli, [str(a) for a in service["command"]])
        secrets = _secret_targets(service)
        assert args.superexec_auth_secret_file in secrets, name
        if cli == "flower-superlink":
            assert args.enable_supernode_auth and not args.insecure
            assert {args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile} <= secrets
            assert service["networks"] == ["server"]  # not on the device network
            assert service["environment"]["FLWR_SUPERGRID_API_URL"] == "http://registry:9093"
        elif cli == "flower-supernode":
            assert not args.insecure and args.host == "127.0.0.1"
            assert {args.root_certificates, args.auth_supernode_private_key, str(args.trusted_entities)} <= secrets
            assert {args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile} <= secrets  # its Runtime API
            assert services[service["network_mode"].removeprefix("service:")]["networks"] == ["fleet"]
        else:
            assert not args.insecure and args.root_certificates in secrets
            assert service["network_mode"].startswith("service:")  # the Runtime API on loopback
    proxy = services["fleet-proxy"]
    assert (
        set(proxy["networks"]) == {"server", "fleet"} and proxy["environment"]["FEDMEF_SUPERLINK_HOST"] == "superlink"
    )
    assert services["registry"]["networks"] == ["server"]


def test_compose_secrets_name_the_pki_files():
    compose = _compose("compose.yml")
    used = {s["source"] for service in compose["services"].values() for s in service.get("secrets", [])}
    assert used == set(compose["secrets"])
    files = {secret["file"].replace("${PKI_DIR:-./pki}", "pki") for secret in compose["secrets"].values()}
    made = {"ca.crt", "server.pem", "server.key", "local.pem", "local.key", "superexec.secret", "trusted-entities.yaml"}
    assert files == {f"pki/{f}" for f in made} | {f"pki/devices/pi-{i}" for i in (1, 2, 3)}


def test_compose_holds_each_clientapp_to_a_pi_memory():
    """Each SuperNode's ClientApp runs in its SuperExec's container, which gets a Pi 4B's memory."""
    services = _compose("compose.yml")["services"]
    limited = {name: s["mem_limit"] for name, s in services.items() if "mem_limit" in s}
    assert limited == {f"superexec-clientapp-{i}": "${CLIENTAPP_MEM_LIMIT:-1g}" for i in (1, 2, 3)}
    for name, service in services.items():
        if name != "superlink-state":  # the one-shot chown exits by itself
            assert service.get("init") is True, f"{name}: no init to reap the apps' processes"


class _ComposeLoader(yaml.SafeLoader):
    """YAML with the compose spec's `!reset` tag (which removes what the file it overrides sets)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: "!reset")


def test_podman_override_replaces_docker_hub_images_and_the_one_shot_job():
    """deploy/podman/compose.podman.yml swaps Flower's images for build.sh's stand-ins and drops the one-shot
    chown of the state volume (podman hands new volumes to the container's user itself), nothing else."""
    services = _compose("compose.yml")["services"]
    override = yaml.load((DEPLOY / "podman" / "compose.podman.yml").read_text(), _ComposeLoader)["services"]
    assert override.pop("superlink-state") == "!reset"
    assert override["superlink"].pop("depends_on") == "!reset" and services["superlink"]["depends_on"] == {
        "superlink-state": {"condition": "service_completed_successfully"}
    }
    hub = {name for name, s in services.items() if s.get("image", "").startswith("flwr/")} - {"superlink-state"}
    assert set(override) == hub and all(set(s) == {"image"} for s in override.values())
    for name in hub:
        role = services[name]["image"].split(":")[0].removeprefix("flwr/")
        assert override[name]["image"] == f"localhost/fedmef-flwr-{role}:${{FLWR_VERSION:-{flwr.__version__}}}"
    stand_ins = (DEPLOY / "podman" / "Dockerfile.flwr").read_text()
    for role in ("superlink", "supernode", "superexec"):
        assert f'FROM flwr AS {role}\nENTRYPOINT ["flower-{role}"]' in stand_ins
    build = (DEPLOY / "podman" / "build.sh").read_text()
    assert "--build-arg SUPEREXEC_BASE=" in build and "--build-arg PROXY_BASE=" in build


def test_arm64_override_is_pi_3_again_on_an_emulated_pi():
    """deploy/podman/compose.arm64.yml's pi-4 is compose.yml's device-3, supernode-3 and
    superexec-clientapp-3 with pi-4's key and partition, in arm64 containers of the Pi's image (its venv
    made as on a Pi, the Pi unit's environment, qemu on the Pi 4's CPU model) with a Pi 4B's /proc/cpuinfo."""
    services = _compose("compose.yml")["services"]
    arm64 = _compose("podman/compose.arm64.yml")
    assert set(arm64["services"]) == {"device-4", "supernode-4", "superexec-clientapp-4"}
    assert arm64["secrets"] == {"pi-4-key": {"file": "${PKI_DIR:-./pki}/devices/pi-4"}}
    cpuinfo = "./pi/pi4b-cpuinfo:/proc/cpuinfo:ro"
    assert "Raspberry Pi 4 Model B" in (DEPLOY / "pi" / "pi4b-cpuinfo").read_text()
    for name, pi in arm64["services"].items():
        x86 = yaml.safe_load(yaml.safe_dump(services[name.replace("-4", "-3")]).replace("-3", "-4"))
        x86.pop("image")
        x86.pop("build", None)  # the ClientApp's SuperExec: the Pi's image instead, and its environment
        assert x86.pop("environment", {}).items() <= runtime.TRAINING_ENV.items()
        assert pi.pop("image") == f"localhost/fedmef-pi:${{FLWR_VERSION:-{flwr.__version__}}}"
        assert pi.pop("platform") == "linux/arm64"
        if name == "device-4":
            assert pi == x86
            continue
        assert pi.pop("volumes") == x86.pop("volumes", []) + [cpuinfo]
        assert pi.pop("entrypoint") == ["flower-supernode" if name == "supernode-4" else "flower-superexec"]
        assert pi == x86, name
    image = (DEPLOY / "podman" / "Dockerfile.pi").read_text()
    assert "/opt/fedmef-pi/make-venv.sh /python/venv" in image and "QEMU_CPU=cortex-a72" in image
    env = dict(pair.split("=", 1) for pair in re.search(r"^ENV (.*?)\n(?!\s)", image, re.M | re.S)[1].split()
               if "=" in pair)  # fmt: skip
    unit = _unit(DEPLOY / "pi" / "flower-supernode.service")
    unit_env = dict(pair.split("=", 1) for line in unit["Environment"] for pair in shlex.split(line))
    for key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"):
        assert env[key] == unit_env[key], key
    assert runtime.TRAINING_ENV.items() <= env.items()


def test_dockerfile_pins_flower_and_cpu_torch():
    text = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={flwr.__version__}" in text
    assert "ARG SUPEREXEC_BASE=flwr/superexec:${FLWR_VERSION}" in text and "FROM ${SUPEREXEC_BASE}\n" in text
    # torch from PyTorch's CPU index by default; build.sh's local CPU wheel where that index is out of reach
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert f"ARG TORCH=torch=={torch.__version__.split('+')[0]}" in text
    assert '${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH"' in text
    # Docker Hub's images by default; the same Dockerfile on deploy/podman's bases with build arguments
    assert "ARG PROXY_BASE=nginx:" in text and "FROM ${PROXY_BASE} AS fleet-proxy" in text
    assert 'ENTRYPOINT ["flower-superexec"]' in text
    assert "gcc" in text and "bitkernels.library()" in text  # the SAP kernels are built into the image
    # what the image copies is what the build context lets through
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for copied in re.findall(r"^COPY (?:--chown=app:app )?(.+?) \S+$", text, re.M):
        assert all(f"!{c}" in ignore for c in copied.split()), copied


# ---------------------------------------------------------------- systemd units and scripts


def _unit(path: Path) -> dict[str, list[str]]:
    """Key -> values of a systemd unit, with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    entries: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            entries.setdefault(key, []).append(value)
    return entries


def test_supernode_unit_runs_a_valid_supernode_command():
    unit = _unit(DEPLOY / "pi" / "flower-supernode.service")
    env = dict(pair.split("=", 1) for line in unit["Environment"] for pair in shlex.split(line))
    assert {
        "FLWR_TELEMETRY_ENABLED",
        "FLWR_DISABLE_UPDATE_CHECK",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION",
        "FLWR_HOME",
    } <= set(env)
    assert env["PATH"].startswith("/opt/fedmef/venv/bin:")  # flower-superexec is started by name
    assert runtime.TRAINING_ENV.items() <= env.items()  # inherited by the ClientApp processes
    assert env["FEDMEF_CACHE"].startswith("/var/lib/flower-supernode/")  # StateDirectory: writable by flower
    # back after a reboot or a refusal, however often: no start limit
    assert unit["Restart"] == ["always"] and unit["RestartSec"] == ["15"]
    assert unit["StartLimitIntervalSec"] == ["0"]
    # the memory limits are set for the unit's budget (the comment says how to change them with it)
    assert env["MEMORY_BUDGET_MB"] == "1024"
    assert unit["MemoryHigh"] == ["1536M"] and unit["MemoryMax"] == ["2G"]
    # systemd unquotes the words first, then substitutes ${VAR} inside them
    words = shlex.split(unit["ExecStart"][0])
    assert words[0] == "/opt/fedmef/venv/bin/flower-supernode"
    values = {"SUPERLINK": "192.168.1.10:9092", "MEMORY_BUDGET_MB": env["MEMORY_BUDGET_MB"]}
    args = parse("flower-supernode", [re.sub(r"\$\{(\w+)\}", lambda m: values[m[1]], w) for w in words[1:]])
    assert args.superlink == "192.168.1.10:9092" and not args.insecure
    assert args.root_certificates and args.auth_supernode_private_key
    # only apps signed by the operator's key run on the Pi
    assert str(args.trusted_entities) == "/etc/fedmef/trusted-entities.yaml"
    assert _node_config(args) == {"data-path": "/var/lib/fedmef/partition.npz", "memory-budget-mb": 1024}


def test_superlink_unit_starts_the_script():
    unit = _unit(DEPLOY / "server" / "flower-superlink.service")
    assert unit["ExecStart"] == ["/opt/fedmef/deploy/server/start-superlink.sh"]
    assert unit["Restart"] == ["on-failure"]
    assert (DEPLOY / "server" / "start-superlink.sh").stat().st_mode & 0o111


@pytest.mark.parametrize(
    ("path", "state"),
    [
        ("server/flower-superlink.service", "flower-superlink"),
        ("server/flower-fleet-proxy.service", "flower-fleet-proxy"),
        ("server/flower-app-registry.service", "flower-app-registry"),
        ("pi/flower-supernode.service", "flower-supernode"),
    ],
)
def test_units_are_sandboxed(path, state):
    unit = _unit(DEPLOY / path)
    sandbox = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "UMask": "0077",
    }
    assert {key: unit.get(key, [None])[-1] for key in sandbox} == sandbox
    assert "@system-service" in unit["SystemCallFilter"]
    assert unit["RestrictAddressFamilies"][-1] in ("AF_INET AF_INET6 AF_UNIX", "AF_INET AF_UNIX")
    assert unit["StateDirectory"] == [state]
    if state == "flower-app-registry":
        # it only serves what the operator copied in; python -m deploy... runs from the project root
        assert unit["ReadOnlyPaths"] == [f"/var/lib/{state}"] and "ReadWritePaths" not in unit
        assert unit["WorkingDirectory"] == ["/opt/fedmef"] and unit["IPAddressDeny"] == ["any"]
    else:
        # the only writable place is the state directory, which is also where relative paths land
        assert unit["ReadWritePaths"] == unit["WorkingDirectory"] == [f"/var/lib/{state}"]
    # PyTorch's JIT-compiled kernels need to make written memory executable; nginx and the registry do not
    runs_torch = state in ("flower-superlink", "flower-supernode")
    assert ("MemoryDenyWriteExecute" not in unit) is runs_torch


@pytest.fixture
def fake_flower(tmp_path):
    """A PATH whose flower-superlink prints its arguments (one per line) instead of serving."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("flower-superlink", 'printf "%s\\n" "$@"'), ("flower-superexec", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _make_pki(tmp_path: Path) -> Path:
    pki = tmp_path / "pki"
    subprocess.run([DEPLOY / "server" / "make-pki.sh", "-o", pki, "-n", "0"], check=True, capture_output=True)
    return pki


@pytest.fixture
def superlink_env(tmp_path, fake_flower):
    """What start-superlink.sh needs: the fake Flower first on PATH, a PKI, a state folder."""
    return {
        "PATH": f"{fake_flower}:/usr/bin:/bin",
        "FEDMEF_PKI": str(_make_pki(tmp_path)),
        "FEDMEF_STATE_DIR": str(tmp_path / "state"),
    }


@pytest.mark.parametrize("node_auth", ["1", "0"])
def test_start_superlink_passes_tls_database_and_auth(tmp_path, superlink_env, node_auth):
    env = {**superlink_env, "FEDMEF_NODE_AUTH": node_auth}
    out = subprocess.run(
        [DEPLOY / "server" / "start-superlink.sh"], env=env, capture_output=True, text=True, check=True
    ).stdout
    args = parse("flower-superlink", out.splitlines())
    assert args.enable_supernode_auth is (node_auth == "1") and not args.insecure
    # loopback: the Control API shares the port, so the devices come in through the Fleet API proxy
    assert args.host == "127.0.0.1" and args.port == 8000 and not args.runtime_dependency_install
    assert args.database == str(tmp_path / "state" / "superlink.db")
    assert args.ssl_certfile == str(tmp_path / "pki" / "server.pem")


def test_start_superlink_refuses_to_put_the_control_api_on_the_network(superlink_env):
    env = {**superlink_env, "FEDMEF_HOST": "0.0.0.0"}
    run = subprocess.run([DEPLOY / "server" / "start-superlink.sh"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "Control API" in run.stderr and "start-fleet-proxy.sh" in run.stderr
    # an explicit, named override for an isolated test network
    exposed = subprocess.run(
        [DEPLOY / "server" / "start-superlink.sh"],
        env={**env, "FEDMEF_EXPOSE_CONTROL_API": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert parse("flower-superlink", exposed.stdout.splitlines()).host == "0.0.0.0"


def test_start_superlink_says_what_is_missing(tmp_path, fake_flower):
    env = {"PATH": f"{fake_flower}:/usr/bin:/bin", "FEDMEF_PKI": str(tmp_path / "nope")}
    run = subprocess.run([DEPLOY / "server" / "start-superlink.sh"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "make-pki.sh" in run.stderr and "ca.crt" in run.stderr


def test_register_devices_rejects_a_wrong_key(tmp_path, fake_flower):
    (fake_flower / "flwr").write_text("#!/bin/sh\nexit 0\n")
    (fake_flower / "flwr").chmod(0o755)
    bad = tmp_path / "rsa.pub"
    bad.write_text("ssh-rsa AAAAB3NzaC1yc2E rsa\n")
    run = subprocess.run(
        [DEPLOY / "server" / "register-devices.sh", "conn", bad],
        capture_output=True,
        text=True,
        env={"PATH": f"{fake_flower}:/usr/bin:/bin"},
    )
    assert run.returncode != 0 and "not an OpenSSH ECDSA P-384 public key" in run.stderr


def test_shell_scripts_parse():
    for script in sorted(DEPLOY.glob("*/*.sh")):
        subprocess.run(["bash", "-n", script], check=True)
        assert script.stat().st_mode & 0o111, f"{script} is not executable"


# ---------------------------------------------------------------- the Fleet API proxy


def _proxy_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/bin",
        "FEDMEF_PKI": str(_make_pki(tmp_path)),
        "FEDMEF_PROXY_STATE_DIR": str(tmp_path / "proxy"),
        **extra,
    }


@pytest.mark.skipif(shutil.which("nginx", path="/usr/sbin:/usr/bin") is None, reason="nginx is not installed")
def test_fleet_proxy_forwards_exactly_the_fleet_api(tmp_path):
    """The rendered configuration passes `nginx -t`, and its allow-list is the installed flwr's Fleet
    API: a route flwr adds or renames makes this fail instead of silently breaking the SuperNodes."""
    from flwr.superlink.routers.fleet.router import router as fleet_router

    env = _proxy_env(tmp_path, FEDMEF_FLEET_PORT="19092", FEDMEF_PORT="18000")
    # `nginx -t` runs first: a fake nginx that stops there leaves the rendered file to inspect
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nginx").write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = "daemon off;" ] && exit 0; done\nexec /usr/sbin/nginx "$@"\n'
    )
    (fake / "nginx").chmod(0o755)
    run = subprocess.run(
        [DEPLOY / "server" / "start-fleet-proxy.sh"],
        env={**env, "PATH": f"{fake}:{env['PATH']}"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    conf = (tmp_path / "proxy" / "fleet-proxy.conf").read_text()
    assert "@" not in re.sub(r"#.*", "", conf)  # every field filled in
    allowed = re.search(r"location ~ \^/v1/fleet/\(([^)]*)\)\$", conf)[1].split("|")
    assert sorted(allowed) == sorted(route.path.removeprefix("/v1/fleet/") for route in fleet_router.routes)
    assert "listen 0.0.0.0:19092 ssl;" in conf and "server 127.0.0.1:18000;" in conf
    assert "proxy_ssl_verify on;" in conf and "proxy_ssl_name localhost;" in conf and "return 403;" in conf


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("FEDMEF_FLEET_PORT", "80a", "port numbers"),
        ("FEDMEF_FLEET_PORT", "8000", "must differ"),
        ("FEDMEF_PROXY_MAX_BODY", "lots", "512m"),
        ("FEDMEF_SUPERLINK_HOST", "a b", "host name"),
    ],
)
def test_fleet_proxy_says_what_is_wrong(tmp_path, setting, value, says):
    run = subprocess.run(
        [DEPLOY / "server" / "start-fleet-proxy.sh"],
        env=_proxy_env(tmp_path, **{setting: value}),
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and says in run.stderr, run.stderr


def test_fleet_proxy_says_what_is_missing(tmp_path):
    env = {"PATH": "/usr/sbin:/usr/bin:/bin", "FEDMEF_PKI": str(tmp_path / "nope")}
    run = subprocess.run([DEPLOY / "server" / "start-fleet-proxy.sh"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "make-pki.sh" in run.stderr


# ---------------------------------------------------------------- PKI


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake in memory: raises ssl.SSLError if the client rejects the server's certificate."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {client: False, server: False}
    for _ in range(20):
        for side, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_make_pki_makes_ca_server_cert_and_device_keys(tmp_path):
    pki = tmp_path / "pki"
    script = DEPLOY / "server" / "make-pki.sh"
    subprocess.run(
        [script, "-o", pki, "-n", "2", "192.168.1.10", "superlink.lan", "127.0.0.1"], check=True, capture_output=True
    )
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"192.168.1.10", "127.0.0.1"}
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "superlink.lan"]
    assert (pki / "ca.key").stat().st_mode & 0o077 == 0 and (pki / "server.key").stat().st_mode & 0o077 == 0

    # Raspberry Pi OS trixie's Python 3.13 verifies with X509_STRICT; so does this client
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    client_ctx = ssl.create_default_context(cafile=pki / "ca.crt")
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    for hostname in ("192.168.1.10", "superlink.lan", "127.0.0.1"):
        _handshake(server_ctx, client_ctx, hostname)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, client_ctx, "10.9.9.9")

    for i in (1, 2):
        private = serialization.load_ssh_private_key((pki / "devices" / f"pi-{i}").read_bytes(), password=None)
        public = serialization.load_ssh_public_key((pki / "devices" / f"pi-{i}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (pki / "devices" / f"pi-{i}").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")

    # the loopback certificate of a SuperNode's Runtime API names nothing else
    local = x509.load_pem_x509_certificate((pki / "local.pem").read_bytes())
    local.verify_directly_issued_by(ca)
    local_sans = local.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in local_sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert len((pki / "superexec.secret").read_text()) == 64 and (pki / "superexec.secret").stat().st_mode & 0o077 == 0
    # the app-signing key is Ed25519 and trusted-entities.yaml names it by the registry's key id
    signing = serialization.load_ssh_private_key((pki / "app-signing" / "operator").read_bytes(), password=None)
    assert isinstance(signing, ed25519.Ed25519PrivateKey)
    public_line = (pki / "app-signing" / "operator.pub").read_text().strip()
    assert yaml.safe_load((pki / "trusted-entities.yaml").read_text()) == {
        app_registry.key_id(public_line): public_line
    }

    # re-run: the CA and the keys stay, missing device keys are added
    before = {p: p.read_bytes() for p in pki.rglob("*") if p.is_file()}
    subprocess.run([script, "-o", pki, "-n", "3", "127.0.0.1"], check=True, capture_output=True)
    assert all(p.read_bytes() == b for p, b in before.items())
    assert (pki / "devices" / "pi-3.pub").exists()
    # a certificate that does not cover a new address is an error that says what to do
    run = subprocess.run([script, "-o", pki, "10.0.0.7"], capture_output=True, text=True)
    assert run.returncode != 0 and "does not cover IP:10.0.0.7" in run.stderr and "delete" in run.stderr
    assert (pki / "ca.crt").read_bytes() == before[pki / "ca.crt"]


def test_make_pki_refuses_half_a_ca(tmp_path):
    (tmp_path / "ca.crt").write_text("x")
    run = subprocess.run([DEPLOY / "server" / "make-pki.sh", "-o", tmp_path], capture_output=True, text=True)
    assert run.returncode != 0 and "half a CA" in run.stderr
    assert (tmp_path / "ca.crt").read_text() == "x"


# ---------------------------------------------------------------- the Pi's packages


def _pins_and_hashes() -> dict[str, tuple[str, list[str]]]:
    """Name -> (version, sha256 digests) of each requirement, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "pi" / "requirements-aarch64.txt").read_text())
    pins = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            requirement, *options = re.split(r"\s+(?=--)", line.strip())
            name, version = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)(\s*;.*)?", requirement).group(1, 2)
            hashes = [re.fullmatch(r"--hash=sha256:([0-9a-f]{64})", option)[1] for option in options]
            pins[name.lower().replace("_", "-")] = (version, hashes)
    return pins


def _pins() -> dict[str, str]:
    return {name: version for name, (version, _) in _pins_and_hashes().items()}


def test_pi_requirements_are_hash_pinned():
    # every pin has a digest (pip's --require-hashes would refuse the whole file otherwise), and
    # make-venv.sh, which install.sh runs on a Pi, insists on them
    assert all(hashes for _, hashes in _pins_and_hashes().values())
    venv = (DEPLOY / "pi" / "make-venv.sh").read_text()
    assert re.search(r"pip install [^\n]*--require-hashes[^\n]*\\\n\s*-r \"\$here/requirements-aarch64.txt\"", venv)
    assert '"$here/make-venv.sh" "$venv"' in (DEPLOY / "pi" / "install.sh").read_text()


def test_pi_requirements_pin_what_the_clientapp_imports():
    pins = _pins()
    assert pins["torch"] == "2.9.1" and pins["flwr"] == flwr.__version__
    assert {"numpy", "psutil", "pillow"} <= set(pins)
    # Import the ClientApp in a fresh interpreter where only the pinned distributions (and the standard
    # library and this project) can be imported, as on the Pi; optional imports (torch tries dill, for
    # one) fail there as they would on the Pi.
    code = """
import importlib.abc, importlib.metadata as md, json, sys
allowed = set(json.loads(sys.argv[1])) | {"fedmef"}
owners = md.packages_distributions()
class OnlyPinned(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        dists = {d.lower().replace("_", "-") for d in owners.get(name.split(".")[0], [])}
        if dists and not dists & allowed:
            raise ModuleNotFoundError(f"{name} is not pinned for the Pi", name=name)
sys.meta_path.insert(0, OnlyPinned())
import client.client_app
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""
    run = subprocess.run(
        [sys.executable, "-c", code, json.dumps(sorted(pins))], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, f"the ClientApp needs more than the Pi's pins:\n{run.stderr[-2000:]}"
    # what only the simulation needs stays off the Pi
    assert not {"datasets", "flwr_datasets", "ray", "pyarrow", "pandas", "torchvision"} & set(json.loads(run.stdout))


# ---------------------------------------------------------------- partition files


@pytest.fixture
def tiny_dataset(monkeypatch):
    g = torch.Generator().manual_seed(0)
    fashion = STANDARDISATIONS["fashion-mnist"]
    train = Split(
        torch.randint(0, 256, (300, 1, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 4, (300,), generator=g),
        fashion,
    )
    test = Split(
        torch.randint(0, 256, (20, 1, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 4, (20,), generator=g),
        fashion,
    )
    dataset = Dataset("fashion-mnist", train, test, 4)
    monkeypatch.setattr(partition_files, "load_dataset", lambda *a, **k: dataset)
    return dataset


def test_partition_files_hold_the_simulation_partitions(tmp_path, tiny_dataset, capsys):
    cfg = prep.run_config(overrides="dirichlet-alpha=1.0 seed=3")
    paths = prep.prepare(tmp_path / "parts", 3, cfg)
    assert [p.name for p in paths] == ["pi-1.npz", "pi-2.npz", "pi-3.npz"]
    assert not [p for p in (tmp_path / "parts").iterdir() if p not in paths]  # no temp files left
    total = 0
    for i, path in enumerate(paths):
        node = load_client_data(parse_run_config({}), {"data-path": str(path)})
        sim_train, sim_val = client_data(
            tiny_dataset, i, 3, scheme="dirichlet", alpha=1.0, seed=3, val_fraction=cfg.val_fraction
        )
        assert torch.equal(node.train.images, sim_train.images) and torch.equal(node.train.labels, sim_train.labels)
        assert torch.equal(node.val.images, sim_val.images) and torch.equal(node.val.labels, sim_val.labels)
        assert node.num_classes == 4 and node.in_channels == 1 and node.partition_id == i  # pi-1 holds partition 0
        with np.load(path) as f:
            assert f["x_train"].dtype == np.uint8 and f["y_train"].dtype == np.int64
        total += len(node.train) + len(node.val)
    assert total == 300
    printed = capsys.readouterr().out
    assert "alpha 1.0" in printed and "seed 3" in printed and "pi-3.npz" in printed


def test_partition_cap_and_errors(tmp_path, tiny_dataset):
    cfg = prep.run_config()
    paths = prep.prepare(tmp_path, 2, cfg, prefix="dev", max_examples=50)
    assert [p.name for p in paths] == ["dev-1.npz", "dev-2.npz"]
    sizes = [len(load_client_data(cfg, {"data-path": str(p)}).train) for p in paths]
    assert sizes == [45, 45]  # 50 minus the 10% validation share
    with pytest.raises(SystemExit, match="unknown key 'dirichlet-alpa'.*did you mean 'dirichlet-alpha'"):
        prep.main(["--partitions", "2", "--out", str(tmp_path), "--set", "dirichlet-alpa=0.1"])
    with pytest.raises(SystemExit, match="cannot split 300 samples into 40 partitions"):
        prep.main(["--partitions", "40", "--out", str(tmp_path)])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(
    "path",
    [
        "server/flower-superlink.service",
        "server/flower-fleet-proxy.service",
        "server/flower-app-registry.service",
        "pi/flower-supernode.service",
    ],
)
def test_units_pass_systemd_analyze_verify(tmp_path, path):
    """The unit as systemd reads it: with /opt/fedmef moved to a folder holding stub executables, so the
    only thing left to complain about would be the unit itself."""
    opt = tmp_path / "opt"
    text = (DEPLOY / path).read_text().replace("/opt/fedmef", str(opt))
    for command in re.findall(r"^ExecStart=(\S+)", text, re.M):
        stub = Path(command)
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    opt.mkdir(exist_ok=True)  # WorkingDirectory of the registry
    unit = tmp_path / Path(path).name
    unit.write_text(text)
    run = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr.strip() == "", run.stderr
