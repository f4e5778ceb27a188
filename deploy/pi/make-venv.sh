#!/usr/bin/env bash
# The Pi's Python venv from requirements-aarch64.txt: every package pinned and hash-checked, wheels only,
# nothing beyond the lock; then proof that torch computes on this CPU. install.sh runs it on a Pi, and
# deploy/podman/Dockerfile.pi in the emulated Pi's image, so both get exactly the same packages.
#
# Usage: make-venv.sh VENV   (made with python3 -m venv when missing, else brought to the pins)
# PIP_INDEX_URL may name a mirror of the package registry; PIP_CONFIG_FILE a pip configuration to use
# (default none: Raspberry Pi OS's /etc/pip.conf adds piwheels, whose builds are not the wheels checked
# by check-wheels.sh).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "make-venv.sh: $*" >&2; exit 1; }
[[ $# -eq 1 ]] || die "usage: $0 VENV"
venv=$1
[[ -f $here/requirements-aarch64.txt ]] || die "$here/requirements-aarch64.txt is missing: copy the whole deploy/pi folder"

[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
export PIP_CONFIG_FILE=${PIP_CONFIG_FILE:-/dev/null}
# --require-hashes: every wheel must have one of the sha256 digests of its pin (pin-hashes.py), so a
# mirror or proxy serving other bytes is refused. --no-deps with the full lock: nothing unpinned comes
# in, and `pip check` below catches a dependency the lock would lack.
"$venv/bin/python" -m pip install -q --no-cache-dir --only-binary=:all: --no-deps --require-hashes \
    -r "$here/requirements-aarch64.txt"
"$venv/bin/python" -m pip check
# torch >= 2.10 from the registry dies on a Pi 4 with SIGILL on a Cortex-A72; prove this one computes.
"$venv/bin/python" -c '
import torch, flwr
x = torch.randn(8, 1, 28, 28)
y = torch.nn.Conv2d(1, 6, 5)(x).relu().sum()
y.backward()
print(f"torch {torch.__version__} and flwr {flwr.__version__} work on this CPU")'
