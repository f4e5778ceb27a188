"""Write the sha256 of every wheel a Raspberry Pi could install into requirements-aarch64.txt.

For each `name==version` pin, asks the package registry's simple index (JSON, PEP 691) for the files of
that release and keeps every wheel a Pi can install: Linux aarch64 (manylinux up to the glibc of the
OS) or pure, on CPython 3.11 (Raspberry Pi OS bookworm, glibc 2.36) and 3.13 (trixie, glibc 2.41), as
check-wheels.sh checks. The file is rewritten in place, pins as `name==version \\` followed by one
`--hash=sha256:...` line per wheel; comments and markers are kept, and old hashes are replaced, so a
rerun after changing a pin is all it takes. install.sh then installs with --require-hashes.

Usage: python deploy/pi/pin-hashes.py [REQUIREMENTS]   (INDEX=https://pypi.org/simple by default)
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.request
from pathlib import Path

from packaging import tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

INDEX = os.environ.get("INDEX", "https://pypi.org/simple").rstrip("/")
# (Python version, glibc minor version) of the Pi's OS releases
TARGETS = [((3, 11), 36), ((3, 13), 41)]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)\s*(;[^\\]*?)?\s*$")


def supported_tags() -> set:
    """The wheel tags pip accepts on a Pi running one of TARGETS."""
    found = set()
    for version, glibc in TARGETS:
        platforms = [f"manylinux_2_{n}_aarch64" for n in range(glibc, 16, -1)]
        platforms += ["manylinux2014_aarch64", "linux_aarch64"]
        abi = f"cp{version[0]}{version[1]}"
        found |= set(tags.cpython_tags(version, abis=[abi], platforms=platforms))
        found |= set(tags.compatible_tags(version, interpreter=abi, platforms=platforms))
    return found


def release_files(name: str) -> list[dict]:
    request = urllib.request.Request(
        f"{INDEX}/{canonicalize_name(name)}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)["files"]


def wheel_hashes(name: str, version: str, accepted: set) -> list[str]:
    hashes = []
    for file in release_files(name):
        filename = file["filename"]
        if not filename.endswith(".whl"):
            continue
        _, wheel_version, _, wheel_tags = parse_wheel_filename(filename)
        if wheel_version == Version(version) and wheel_tags & accepted:
            hashes.append(file["hashes"]["sha256"])
            print(f"  {filename}{'  (yanked)' if file.get('yanked') else ''}")
    return sorted(set(hashes))


def logical_lines(text: str) -> list[str]:
    """The file's lines with backslash continuations joined and any --hash option dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [re.sub(r"\s*--hash=\S+", "", line).rstrip() for line in joined.splitlines()]


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("requirements-aarch64.txt"))
    accepted = supported_tags()
    out, missing = [], []
    for line in logical_lines(path.read_text()):
        match = PIN.match(line)
        if not match:
            out.append(line)
            continue
        name, version, marker = match.groups()
        print(f"{name}=={version}")
        hashes = wheel_hashes(name, version, accepted)
        if not hashes:
            missing.append(f"{name}=={version}")
        pin = f"{name}=={version}" + (f" {marker.strip()}" if marker else "")
        out.append(" \\\n".join([pin] + [f"    --hash=sha256:{digest}" for digest in hashes]))
    if missing:
        print(f"no Pi wheel in {INDEX} for: {', '.join(missing)}; {path} left as it was", file=sys.stderr)
        return 1
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
