#!/usr/bin/env bash
# The compose federation of tests/test_compose_e2e.py with a fourth SuperNode, pi-4, an emulated
# Raspberry Pi 4B (FEDMEF_ARM64=1: compose.arm64.yml, the Pi's own wheels, qemu-user on a Cortex-A72
# model): the images (the arm64 ones too), PKI, partitions, signed release, up, register, a 3-round run
# with min-train-nodes=4, down, and the host as before (binfmt_misc included). Its log is
# deploy/podman/arm64-federation.log. Apart from `make test-compose` because Flower's SuperNode fails a
# task that no ClientApp process has fetched within 30 s, which an emulated ClientApp process on a loaded
# 2-core host misses (it passed on a quiet one, see the log); run it with a core to spare.
#
# Usage, as root from anywhere:  deploy/podman/arm64-federation.sh 2>&1 | tee deploy/podman/arm64-federation.log
# Needs what the test needs (.ci/run installs it): podman, buildah, runc, debootstrap, qemu-user-static,
# binfmt-support, and the project's venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
die() { echo "arm64-federation.sh: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "run it as root (podman, binfmt_misc)"
[[ -x $root/.venv/bin/python ]] || die "$root/.venv is missing: make .venv/.installed"
echo "compose federation with an emulated arm64 SuperNode, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(uname -srm), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "repository $root ($(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
cd "$root"
export FEDMEF_ARM64=1 REQUIRE_DEPLOY=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_HOME=${FLWR_HOME:-$root/.flwr}
exec .venv/bin/python -m pytest -q -s -m compose tests/test_compose_e2e.py
