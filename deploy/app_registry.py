"""Signed app releases for a federation that runs only the operator's code.

A SuperNode started with ``--trusted-entities FILE`` runs an app only if the app bundle (FAB) carries
a signature by one of the Ed25519 keys in FILE. In flwr 1.41/1.42 those signatures reach a SuperNode
only with an app the SuperLink fetched from an app hub (``flwr run @publisher/app==x.y.z``): a FAB
uploaded by ``flwr run .`` carries none and every such SuperNode refuses it. The hub is whatever
``FLWR_SUPERGRID_API_URL`` names, so this module is the federation's own hub, offline:

- ``publish`` (the operator, with the signing key): builds the FAB with ``flwr build``, signs it the
  way SuperNodes verify (Ed25519 over the 8-byte big-endian signing time followed by SHA-256 of the
  FAB) and stores ``<registry>/<publisher>/<name>/<version>/{app.fab,verifications.json}``;
- ``serve`` (the server, on 127.0.0.1 only, for the SuperLink): answers the hub's two calls, the
  release lookup ``POST <base>/hub/fetch-fab`` and the download of the bundle;
- ``trust`` prints the ``--trusted-entities`` YAML line for a public key.

The registry holds no secret and decides nothing: it serves what the operator signed, and each
SuperNode checks the signature itself. A released version is immutable.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
    load_ssh_public_key,
)

#: ``[tool.flwr.app] publisher`` and ``[project] name`` as flwr accepts them in ``@publisher/name``
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
VERSION = re.compile(r"^\d+\.\d+\.\d+$")
#: the path under ``FLWR_SUPERGRID_API_URL`` at which the SuperLink looks a release up
FETCH_PATH = "/hub/fetch-fab"
FAB_PATH = "/fab/"


class RegistryError(Exception):
    """A release that cannot be published or served; the message says what to do."""


def key_id(public_key_line: str) -> str:
    """The trusted-entity id of an OpenSSH public key: ``fpk_`` and 16 hex digits of SHA-256 over the
    key blob (the second field). make-pki.sh computes the same with base64 and sha256sum."""
    fields = public_key_line.split()
    if len(fields) < 2 or fields[0] != "ssh-ed25519":
        raise RegistryError("the app-signing key must be an OpenSSH Ed25519 key (ssh-keygen -t ed25519)")
    return "fpk_" + hashlib.sha256(base64.b64decode(fields[1])).hexdigest()[:16]


def signed_message(fab: bytes, signed_at: int) -> bytes:
    """What the signature covers, as flwr's SuperNode rebuilds it before verifying."""
    return signed_at.to_bytes(8, "big") + hashlib.sha256(fab).digest()


def sign(fab: bytes, private_key: ed25519.Ed25519PrivateKey, signed_at: int) -> dict[str, Any]:
    """One verification record of the hub's reply: key id, unpadded base64url signature, time."""
    public_line = private_key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    signature = private_key.sign(signed_message(fab, signed_at))
    return {
        "public_key_id": key_id(public_line),
        "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
        "signed_at": signed_at,
    }


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read the app-signing key {path}: {exc} (make it with make-pki.sh)") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise RegistryError(f"{path} is not an Ed25519 key: flwr's SuperNodes verify Ed25519 signatures only")
    return key


def fab_identity(fab: bytes) -> tuple[str, str, str]:
    """(publisher, name, version) from the bundle's own pyproject.toml, as the SuperLink reads them."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            config = tomllib.loads(bundle.read("pyproject.toml").decode())
        publisher = config["tool"]["flwr"]["app"]["publisher"]
        name, version = config["project"]["name"], config["project"]["version"]
    except (zipfile.BadZipFile, KeyError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"not a Flower app bundle with [project] name/version and a publisher: {exc}") from exc
    if not (NAME.match(publisher) and NAME.match(name) and VERSION.match(version)):
        raise RegistryError(f"publisher {publisher!r}, name {name!r}, version {version!r}: flwr wants x.y.z versions")
    return publisher, name, version


def _contents(fab: bytes) -> dict[str, bytes]:
    """The bundle's files, without the zip's timestamps: what makes two builds the same release."""
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        return {info.filename: bundle.read(info) for info in bundle.infolist()}


def build_fab(app: Path) -> bytes:
    """``flwr build --app APP`` in a scratch folder (it writes the bundle to its working directory)."""
    with tempfile.TemporaryDirectory() as scratch:
        flwr = Path(sys.executable).with_name("flwr")
        done = subprocess.run(
            [str(flwr), "build", "--app", str(app.resolve())], cwd=scratch, capture_output=True, text=True
        )
        fabs = list(Path(scratch).glob("*.fab"))
        if done.returncode != 0 or len(fabs) != 1:
            raise RegistryError(f"flwr build --app {app} failed:\n{done.stdout}{done.stderr}")
        return fabs[0].read_bytes()


def publish(registry: Path, fab: bytes, key: ed25519.Ed25519PrivateKey, signed_at: int | None = None) -> Path:
    """Store ``fab`` signed by ``key`` as a release; returns its folder. Publishing the same files
    again adds (or renews) this key's signature of the released bundle; other files under a released
    version are refused."""
    publisher, name, version = fab_identity(fab)
    folder = registry / publisher / name / version
    bundle, records_file = folder / "app.fab", folder / "verifications.json"
    if bundle.exists():
        released = bundle.read_bytes()
        if _contents(released) != _contents(fab):
            raise RegistryError(
                f"@{publisher}/{name}=={version} is already released with other content: "
                "raise [project] version in pyproject.toml and publish again"
            )
        # the same files rebuilt (flwr build stamps times into the zip): sign the released bytes
        fab = released
    record = sign(fab, key, int(time.time()) if signed_at is None else signed_at)
    records = json.loads(records_file.read_text()) if records_file.exists() else []
    records = [r for r in records if r["public_key_id"] != record["public_key_id"]] + [record]
    folder.mkdir(parents=True, exist_ok=True)
    for path, data in ((bundle, fab), (records_file, json.dumps(records, indent=1).encode())):
        # write-then-rename: the registry never serves half a file
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        partial.replace(path)
    return folder


def versions(registry: Path, publisher: str, name: str) -> list[str]:
    folder = registry / publisher / name
    found = [p.name for p in folder.iterdir() if (p / "app.fab").exists()] if folder.is_dir() else []
    return sorted((v for v in found if VERSION.match(v)), key=lambda v: tuple(map(int, v.split("."))))


def lookup(registry: Path, base_url: str, app_id: str, app_version: str | None) -> tuple[int, dict[str, Any]]:
    """The hub's answer to a release lookup, as (HTTP status, JSON body) in the shape flwr reads."""
    match = re.fullmatch(r"@([^/]+)/([^/]+)", app_id or "")
    if not match or not (NAME.match(match[1]) and NAME.match(match[2])):
        return HTTPStatus.NOT_FOUND, {"detail": f"{app_id!r} is not @publisher/name"}
    publisher, name = match[1], match[2]
    known = versions(registry, publisher, name)
    if app_version is None and known:
        app_version = known[-1]
    if app_version not in known:
        return HTTPStatus.NOT_FOUND, {"detail": {"available_app_versions": known}}
    records = json.loads((registry / publisher / name / app_version / "verifications.json").read_text())
    url = f"{base_url}{FAB_PATH}{publisher}/{name}/{app_version}/app.fab"
    return HTTPStatus.OK, {"fab_url": url, "verifications": records}


def serve(registry: Path, port: int, host: str = "127.0.0.1") -> None:
    """Serve the registry on ``host:port`` until interrupted (the SuperLink is its only client).
    The download address in a lookup's answer is the one the SuperLink asked at (its Host header),
    so the same registry serves a SuperLink on this host and one in another container."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if not self.path.endswith(FETCH_PATH):
                self._reply(HTTPStatus.NOT_FOUND, b'{"detail": "unknown path"}', "application/json")
                return
            try:
                body = json.loads(self.rfile.read(min(int(self.headers.get("Content-Length", 0)), 65536)))
                base_url = f"http://{self.headers.get('Host') or f'{host}:{port}'}"
                status, answer = lookup(registry, base_url, str(body.get("app_id")), body.get("app_version"))
            except (ValueError, AttributeError):
                status, answer = HTTPStatus.BAD_REQUEST, {"detail": "expected a JSON object with app_id"}
            self._reply(status, json.dumps(answer).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802
            parts = self.path.removeprefix(FAB_PATH).split("/")
            ok = self.path.startswith(FAB_PATH) and len(parts) == 4 and parts[3] == "app.fab"
            ok = ok and NAME.match(parts[0]) is not None and NAME.match(parts[1]) is not None
            bundle = registry.joinpath(*parts) if ok and VERSION.match(parts[2]) else None
            if bundle is None or not bundle.is_file():
                self._reply(HTTPStatus.NOT_FOUND, b"no such release", "text/plain")
                return
            self._reply(HTTPStatus.OK, bundle.read_bytes(), "application/octet-stream")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class' name)
            print(f"app registry: {self.address_string()} {format % args}", file=sys.stderr, flush=True)

    with ThreadingHTTPServer((host, port), Handler) as server:
        print(f"app registry: serving {registry} on http://{host}:{port}", file=sys.stderr, flush=True)
        server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.app_registry", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="build, sign and store the app as a release")
    pub.add_argument("--registry", type=Path, required=True, help="the registry folder")
    pub.add_argument("--key", type=Path, required=True, help="the OpenSSH Ed25519 app-signing key")
    pub.add_argument("--app", type=Path, default=Path("."), help="the app to build (default: .)")
    srv = sub.add_parser("serve", help="serve the registry to the SuperLink on 127.0.0.1")
    srv.add_argument("--registry", type=Path, required=True)
    srv.add_argument("--port", type=int, default=9093)
    srv.add_argument("--host", default="127.0.0.1", help="keep 127.0.0.1 unless the SuperLink is in another container")
    trust = sub.add_parser("trust", help="print the --trusted-entities YAML line of a public key")
    trust.add_argument("public_key", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "publish":
            fab = build_fab(args.app)
            folder = publish(args.registry, fab, load_signing_key(args.key))
            publisher, name, version = fab_identity(fab)
            print(f"published @{publisher}/{name}=={version} in {folder}")
            print(f"run it with: flwr run @{publisher}/{name}=={version} CONNECTION --stream")
        elif args.command == "serve":
            # an empty registry is valid: the server starts before the first release is published
            args.registry.mkdir(parents=True, exist_ok=True)
            serve(args.registry, args.port, args.host)
        else:
            line = args.public_key.read_text().strip()
            load_ssh_public_key(line.encode())
            print(f"{key_id(line)}: '{line}'")
    except (RegistryError, OSError, ValueError) as exc:
        print(f"app_registry: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
