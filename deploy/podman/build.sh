#!/usr/bin/env bash
# Builds the images of deploy/compose.yml with podman where no container registry is reachable, into the
# image cache ($FEDMEF_PODMAN_DIR/images) that deploy/podman/compose.sh reads:
#   localhost/fedmef-debian:bookworm              base-image.sh (debootstrap), made once
#   localhost/fedmef-flwr-{superlink,supernode,superexec}:V   Dockerfile.flwr: stand-ins for flwr/*:V
#   localhost/fedmef-superexec:V                  deploy/Dockerfile, on the stand-in superexec
#   localhost/fedmef-fleet-proxy                  deploy/Dockerfile, target fleet-proxy, on the base
# and with FEDMEF_ARM64=1 the emulated Raspberry Pi 4B of compose.arm64.yml, under qemu-user:
#   localhost/fedmef-debian:bookworm-arm64        base-image.sh --arch arm64, made once
#   localhost/fedmef-pi:V                         Dockerfile.pi: the Pi's venv (deploy/pi/make-venv.sh)
# V is FLWR_VERSION (default: the pin of pyproject.toml, which requirements-aarch64.txt must share). podman's layer cache makes a second build of
# unchanged sources take seconds; a change of the code rebuilds only the layers after its COPY.
#
# pip in the builds reaches the package registry with the host's CA bundle (a TLS-inspecting proxy's
# CA included), mounted with a pip.conf for the build steps only: nothing of it stays in an image.
# torch must be the CPU build: from PyTorch's CPU index when it answers, else the CPU wheel this host's
# own pip would install (its find-links, e.g. /opt/wheels), else TORCH_WHEELS=folder holding one.
# Needs root (podman with overlay storage). Settings: FLWR_VERSION, FEDMEF_ARM64, TORCH_WHEELS, FEDMEF_PODMAN_DIR,
# HOST_CA_BUNDLE (default: $PIP_CERT, $SSL_CERT_FILE or /etc/ssl/certs/ca-certificates.crt).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
export FEDMEF_PODMAN_STORE=build
source "$here/env.sh"
source "$root/deploy/pi/qemu-binfmt.sh"

die() { echo "build.sh: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "run it as root (podman with overlay storage)"
version=$FLWR_VERSION
torch_pin=$(sed -n 's/.*"torch==\([0-9.]*\)".*/\1/p' "$root/pyproject.toml")
ca=${HOST_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
[[ -r $ca ]] || die "no CA bundle at $ca: set HOST_CA_BUNDLE"
absent=$(absent_host_paths)
binfmt_state=$FEDMEF_PODMAN_DIR/build/binfmt.$$
trap 'remove_host_paths $absent; qemu_binfmt_off "$binfmt_state"' EXIT
timings=()
step() { echo "== build.sh: $*"; }

start=$SECONDS
"$here/base-image.sh"
timings+=("base $((SECONDS - start)) s")

# --- where torch comes from
build_conf=$FEDMEF_PODMAN_DIR/build
mkdir -p "$build_conf/wheels"
torch_index=https://download.pytorch.org/whl/cpu
torch_req="torch==$torch_pin"
wheels=${TORCH_WHEELS:-}
if [[ -z $wheels ]] && ! python3 -c "import urllib.request; urllib.request.urlopen('$torch_index/torch/', timeout=10)" 2>/dev/null; then
    # the wheel this host's pip takes for the CPU build (a dry run: nothing is downloaded or installed)
    podman_venv || die "cannot make the podman-compose venv in $FEDMEF_PODMAN_DIR/venv (above)"
    report=$(mktemp)
    "$FEDMEF_PODMAN_DIR/venv/bin/python" -m pip install -q --dry-run --ignore-installed --no-deps \
        --report "$report" "torch==$torch_pin+cpu" >/dev/null 2>&1 || true
    url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["install"][0]["download_info"]["url"])' "$report" 2>/dev/null || true)
    rm -f "$report"
    [[ $url == file://* ]] || die "PyTorch's CPU index ($torch_index) does not answer and this host's pip has no local CPU wheel of torch $torch_pin (got '${url:-nothing}'): set TORCH_WHEELS to a folder holding torch-$torch_pin+cpu-cp311-*.whl"
    wheels=$(dirname "${url#file://}")
fi
if [[ -n $wheels ]]; then
    compgen -G "$wheels/torch-$torch_pin+cpu-cp311-*.whl" >/dev/null || die "no torch-$torch_pin+cpu-cp311 wheel in $wheels"
    torch_index=  # the CPU wheel from the folder, never the registry's CUDA build
    torch_req="torch==$torch_pin+cpu"
fi
cat >"$build_conf/pip.conf" <<CONF
[global]
cert = /run/host-ca.crt
disable-pip-version-check = true
progress-bar = off
${wheels:+find-links = /wheels}
CONF
build_mounts=(-v "$ca:/run/host-ca.crt:ro" -v "$build_conf/pip.conf:/etc/pip.conf:ro")
[[ -n $wheels ]] && build_mounts+=(-v "$wheels:/wheels:ro")
build() { nice -n "${BUILD_NICE:-15}" podman build --network host --layers "${build_mounts[@]}" "$@"; }

# --- Flower's images, rebuilt on the base
start=$SECONDS
for target in superlink supernode superexec; do
    step "localhost/fedmef-flwr-$target:$version"
    build -q --build-arg FLWR_VERSION="$version" --target "$target" -t "localhost/fedmef-flwr-$target:$version" \
        -f "$here/Dockerfile.flwr" "$here" >/dev/null
done
timings+=("flwr $((SECONDS - start)) s")

# --- the project's images: deploy/Dockerfile, as compose.yml builds them, on those bases
start=$SECONDS
common=(--build-arg FLWR_VERSION="$version" --build-arg SUPEREXEC_BASE="localhost/fedmef-flwr-superexec:$version"
    --build-arg PROXY_BASE=localhost/fedmef-debian:bookworm --build-arg TORCH_INDEX="$torch_index"
    --build-arg TORCH="$torch_req" -f "$root/deploy/Dockerfile" --ignorefile "$root/deploy/Dockerfile.dockerignore")
step "localhost/fedmef-superexec:$version (torch: ${torch_index:-$torch_req from $wheels})"
build "${common[@]}" -t "localhost/fedmef-superexec:$version" "$root"
timings+=("superexec $((SECONDS - start)) s")
start=$SECONDS
step "localhost/fedmef-fleet-proxy"
build -q "${common[@]}" --target fleet-proxy -t localhost/fedmef-fleet-proxy "$root" >/dev/null
timings+=("fleet-proxy $((SECONDS - start)) s")

# --- the emulated Pi: its base and its venv are made by arm64 programs, through qemu
if [[ $FEDMEF_ARM64 == 1 ]]; then
    start=$SECONDS
    pi_flwr=$(sed -n 's/^flwr==\([0-9.]*\).*/\1/p' "$root/deploy/pi/requirements-aarch64.txt")
    [[ $pi_flwr == "$version" ]] || die "deploy/pi/requirements-aarch64.txt pins flwr ${pi_flwr:-nothing}, the images are $version: re-lock it (deploy/pi/pin-hashes.py, check-wheels.sh)"
    qemu_binfmt_on "$binfmt_state" || die "cannot run arm64 programs through qemu (above)"
    "$here/base-image.sh" --arch arm64
    step "localhost/fedmef-pi:$version (arm64, emulated)"
    build -q --arch arm64 -t "localhost/fedmef-pi:$version" -f "$here/Dockerfile.pi" "$root/deploy/pi" >/dev/null
    timings+=("arm64 $((SECONDS - start)) s")
fi

# layers of earlier builds that no tag uses any more
podman image prune -f >/dev/null
podman images --filter reference='localhost/fedmef-*' --format '{{.Repository}}:{{.Tag}} {{.Size}}'
echo "build.sh: done (${timings[*]})"
