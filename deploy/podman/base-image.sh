#!/usr/bin/env bash
# The base image of every image that deploy/podman/build.sh makes, where no container registry is
# reachable (Docker Hub's flwr/* and nginx images cannot be pulled): Debian bookworm (Python 3.11, as
# Raspberry Pi OS bookworm), from the Debian mirror with debootstrap, imported into podman as
# localhost/fedmef-debian:bookworm. It carries what the images need from apt, so building them needs
# no apt: python3 with venv, ca-certificates, gcc for SAP's kernels, nginx-light for the Fleet API proxy.
# With --arch arm64: localhost/fedmef-debian:bookworm-arm64, the emulated Pi's base (no nginx), made
# under qemu-user (deploy/pi/qemu-binfmt.sh) with the Pi 4's CPU model.
# Kept in the image cache; made again only when it is missing (or with --force). Needs root.
#
# Usage: base-image.sh [--force] [--arch amd64|arm64]
# Settings: DEBIAN_MIRROR (default http://deb.debian.org/debian: apt checks the signatures), FEDMEF_PODMAN_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export FEDMEF_PODMAN_STORE=build
source "$here/env.sh"
source "$here/../pi/qemu-binfmt.sh"

die() { echo "base-image.sh: $*" >&2; exit 1; }
force=0 arch=amd64
while [[ $# -gt 0 ]]; do
    case $1 in
        --force) force=1 ;;
        --arch) arch=${2:-}; shift ;;
        *) die "usage: $0 [--force] [--arch amd64|arm64]" ;;
    esac
    shift
done
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
case $arch in
    amd64) image=localhost/fedmef-debian:bookworm packages=python3,python3-venv,ca-certificates,passwd,gcc,libc6-dev,nginx-light ;;
    arm64) image=localhost/fedmef-debian:bookworm-arm64 packages=python3,python3-venv,ca-certificates,passwd,gcc,libc6-dev ;;
    *) die "--arch must be amd64 or arm64, not '$arch'" ;;
esac

if ((!force)) && podman image exists "$image"; then
    echo "base-image.sh: $image is in the cache ($FEDMEF_PODMAN_DIR/images)"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "apt-get install debootstrap"

rootfs=$(mktemp -d "$FEDMEF_PODMAN_DIR/rootfs.XXXXXX")
absent=$(absent_host_paths)
trap 'rm -rf "$rootfs"; remove_host_paths $absent; qemu_binfmt_off "$rootfs.binfmt"' EXIT
if [[ $arch == arm64 ]]; then
    # debootstrap's second stage runs the arm64 packages' own programs, each through qemu
    qemu_binfmt_on "$rootfs.binfmt" || exit 1
    export QEMU_CPU=cortex-a72
fi
start=$SECONDS
debootstrap --arch="$arch" --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" \
    >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# apt's lists and package cache are not part of the image; the mirror stays the one it came from
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" -c . | podman import -q --arch "$arch" --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --arch=$arch --variant=minbase --include=$packages bookworm $mirror" - "$image" >/dev/null
echo "base-image.sh: $image made in $((SECONDS - start)) s"
