#!/usr/bin/env bash
# Check, from any machine, that every pin of requirements-aarch64.txt has a wheel in the package
# registry for a Raspberry Pi (Linux aarch64) on Python 3.11 (Raspberry Pi OS bookworm) and 3.13
# (trixie), and that it matches one of the pin's sha256 digests (--require-hashes, as install.sh). pip
# resolves each pin without installing, but downloads each wheel whole to check its digest (torch:
# ~100 MB per Python version).
#
# Usage: check-wheels.sh [PYTHON_VERSION ...]   (default: 3.11 3.13; PYTHON=python3 by default)
#
# --no-deps because pip evaluates environment markers on the machine it runs on, not the target
# (--python-version included): resolving torch's dependencies here would ask for its x86_64-only
# nvidia-* packages, and a pin with a marker that fails here is skipped (reported, not counted).
# Both manylinux tags are named because the newer wheels (torch, numpy) are manylinux_2_28 only.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
requirements=$here/requirements-aarch64.txt
versions=("$@")
[[ ${#versions[@]} -gt 0 ]] || versions=(3.11 3.13)
pins=$(grep -cE '^[A-Za-z0-9._-]+==' "$requirements")
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT

status=0
for version in "${versions[@]}"; do
    if out=$("${PYTHON:-python3}" -m pip install --dry-run --ignore-installed --no-deps --require-hashes --only-binary=:all: \
            --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --python-version "$version" \
            --target "$target" -r "$requirements" 2>&1); then
        # "Would install" and one word per package
        found=$(($(grep -E '^Would install' <<<"$out" | wc -w) - 2))
        skipped=$(grep -cE '^Ignoring ' <<<"$out" || true)
        echo "Python $version aarch64: $found of $pins pinned wheels found ($skipped skipped by a marker on this machine)"
        grep -E '^Ignoring ' <<<"$out" | sed 's/^/  /' || true
        [[ $((found + skipped)) -eq $pins ]] || status=1
    else
        echo "Python $version aarch64: MISSING WHEELS" >&2
        grep -E '^ERROR' <<<"$out" >&2
        status=1
    fi
done
exit $status
