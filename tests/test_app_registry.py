"""deploy/app_registry.py: releases signed so that flwr's own SuperNode verification accepts them, and
refuses them when the key, the bundle or the release is not the operator's."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.supercore.fab import Fab
from flwr.superlink.servicer.control.control_handlers import _format_verification
from flwr.supernode.start_client_internal import _verify_fab

from deploy import app_registry


def _fab(version: str = "1.2.3", body: str = "print('hi')") -> bytes:
    """A minimal bundle: a pyproject.toml as `flwr build` writes it, and one module."""
    pyproject = f'[project]\nname = "fedmef"\nversion = "{version}"\n[tool.flwr.app]\npublisher = "fedmef"\n'
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as bundle:
        bundle.writestr("pyproject.toml", pyproject)
        bundle.writestr("app.py", body)
    return out.getvalue()


def _trusted(key: ed25519.Ed25519PrivateKey) -> dict[str, str]:
    line = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return {app_registry.key_id(line): line}


def _as_supernode_sees(registry: Path, app: str, version: str | None) -> Fab:
    """The lookup answer, turned into the Fab a SuperNode receives by the SuperLink's own code."""
    status, answer = app_registry.lookup(registry, "http://registry:9093", app, version)
    assert status == 200, answer
    publisher, name, found = answer["fab_url"].split("/fab/")[1].split("/")[:3]
    content = (registry / publisher / name / found / "app.fab").read_bytes()
    return Fab("", content, _format_verification(answer["verifications"]))


def test_a_published_release_passes_flwrs_supernode_verification(tmp_path):
    operator = ed25519.Ed25519PrivateKey.generate()
    app_registry.publish(tmp_path, _fab(), operator, signed_at=1_700_000_000)
    fab = _as_supernode_sees(tmp_path, "@fedmef/fedmef", "1.2.3")
    assert _verify_fab(fab, _trusted(operator))
    # a SuperNode trusting another key refuses it
    assert not _verify_fab(fab, _trusted(ed25519.Ed25519PrivateKey.generate()))


def test_a_bundle_changed_after_signing_is_refused(tmp_path):
    operator = ed25519.Ed25519PrivateKey.generate()
    app_registry.publish(tmp_path, _fab(), operator)
    (tmp_path / "fedmef" / "fedmef" / "1.2.3" / "app.fab").write_bytes(_fab(body="steal()"))
    assert not _verify_fab(_as_supernode_sees(tmp_path, "@fedmef/fedmef", "1.2.3"), _trusted(operator))


def test_the_signature_covers_time_then_digest_as_flwr_rebuilds_it():
    key = ed25519.Ed25519PrivateKey.generate()
    record = app_registry.sign(b"bundle", key, signed_at=258)
    message = (258).to_bytes(8, "big") + hashlib.sha256(b"bundle").digest()
    signature = base64.urlsafe_b64decode(record["signature"] + "==")
    key.public_key().verify(signature, message)  # raises if not
    assert record["signed_at"] == 258 and "=" not in record["signature"]


def test_a_rebuild_of_the_same_files_is_the_same_release(tmp_path):
    """flwr build stamps the build time into the zip: a rebuild adds a signature of the released bytes."""
    first, second = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    app_registry.publish(tmp_path, _fab(), first)
    released = (tmp_path / "fedmef" / "fedmef" / "1.2.3" / "app.fab").read_bytes()
    rebuilt = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(released)) as old, zipfile.ZipFile(rebuilt, "w") as new:
        for info in old.infolist():
            new.writestr(zipfile.ZipInfo(info.filename, date_time=(2030, 1, 1, 0, 0, 0)), old.read(info))
    assert rebuilt.getvalue() != released
    app_registry.publish(tmp_path, rebuilt.getvalue(), second)
    fab = _as_supernode_sees(tmp_path, "@fedmef/fedmef", "1.2.3")
    assert fab.content == released and _verify_fab(fab, _trusted(second)) and _verify_fab(fab, _trusted(first))


def test_a_second_key_adds_its_signature_and_a_released_version_is_immutable(tmp_path):
    first, second = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    app_registry.publish(tmp_path, _fab(), first)
    app_registry.publish(tmp_path, _fab(), second)
    app_registry.publish(tmp_path, _fab(), second)  # signing again renews, it does not duplicate
    records = json.loads((tmp_path / "fedmef" / "fedmef" / "1.2.3" / "verifications.json").read_text())
    assert len(records) == 2
    with pytest.raises(app_registry.RegistryError, match="already released with other content"):
        app_registry.publish(tmp_path, _fab(body="other"), first)


def test_lookup_gives_the_latest_version_or_lists_the_known_ones(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    for version in ("1.2.3", "1.10.0", "1.9.9"):
        app_registry.publish(tmp_path, _fab(version), key)
    status, answer = app_registry.lookup(tmp_path, "http://r", "@fedmef/fedmef", None)
    assert status == 200 and answer["fab_url"] == "http://r/fab/fedmef/fedmef/1.10.0/app.fab"
    status, answer = app_registry.lookup(tmp_path, "http://r", "@fedmef/fedmef", "2.0.0")
    assert status == 404 and answer["detail"]["available_app_versions"] == ["1.2.3", "1.9.9", "1.10.0"]
    for bad in ("fedmef/fedmef", "@../etc", "@fedmef/../../x"):
        assert app_registry.lookup(tmp_path, "http://r", bad, None)[0] == 404


@pytest.mark.parametrize(
    ("bundle", "says"),
    [(b"not a zip", "not a Flower app bundle"), (_fab(version="1.0"), "x.y.z")],
)
def test_a_bundle_without_a_proper_identity_is_refused(tmp_path, bundle, says):
    with pytest.raises(app_registry.RegistryError, match=says):
        app_registry.publish(tmp_path, bundle, ed25519.Ed25519PrivateKey.generate())


def test_only_ed25519_keys_can_sign(tmp_path):

    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", tmp_path / "k"], check=True)
    with pytest.raises(app_registry.RegistryError, match="Ed25519"):
        app_registry.load_signing_key(tmp_path / "k")
    with pytest.raises(app_registry.RegistryError, match="Ed25519"):
        app_registry.key_id((tmp_path / "k.pub").read_text())
