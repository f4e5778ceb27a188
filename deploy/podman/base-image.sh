#!/usr/bin/env bash
# The base image of every image that deploy/podman/build.sh makes, where no container registry is
# reachable (Docker Hub's flwr/* and nginx images cannot be pulled): Debian bookworm (Python 3.11, as
# Raspberry Pi OS bookworm), from the Debian mirror with debootstrap, imported into podman as
# localhost/fedmef-debian:bookworm. It carries what the images need from apt, so building them needs
# no apt: python3 with venv, ca-certificates, gcc for SAP's kernels, nginx-light for the Fleet API proxy.
# Kept in the image cache; made again only when it is missing (or with --force). Needs root.
#
# Settings: DEBIAN_MIRROR (default http://deb.debian.org/debian: apt checks the signatures), FEDMEF_PODMAN_DIR.
set -euo pipefail
export FEDMEF_PODMAN_STORE=build
source "$(dirname "$0")/env.sh"

image=localhost/fedmef-debian:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv,ca-certificates,passwd,gcc,libc6-dev,nginx-light

if [[ ${1:-} != --force ]] && podman image exists "$image"; then
    echo "base-image.sh: $image is in the cache ($FEDMEF_PODMAN_DIR/images)"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "base-image.sh: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "base-image.sh: apt-get install debootstrap" >&2; exit 1; }

rootfs=$(mktemp -d "$FEDMEF_PODMAN_DIR/rootfs.XXXXXX")
absent=$(absent_host_paths)
trap 'rm -rf "$rootfs"; remove_host_paths $absent' EXIT
start=$SECONDS
debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# apt's lists and package cache are not part of the image; the mirror stays the one it came from
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" -c . | podman import -q --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase --include=$packages bookworm $mirror" - "$image" >/dev/null
echo "base-image.sh: $image made in $((SECONDS - start)) s"
