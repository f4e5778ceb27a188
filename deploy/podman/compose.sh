#!/usr/bin/env bash
# deploy/compose.yml, for real, on podman and podman-compose, with the images of deploy/podman/build.sh
# (compose.podman.yml puts them in place of Docker Hub's). Run from anywhere, as root:
#
#   deploy/podman/compose.sh up          record the host's state, then `podman-compose up -d` (no build)
#   deploy/podman/compose.sh down        `podman-compose down -v`, then put the host back as it was:
#                                        no container, volume or network left, the deployment's storage
#                                        removed, netavark's iptables chains gone, ip_forward restored
#   deploy/podman/compose.sh ps | logs SERVICE | ...   any other podman-compose command
#
# compose.yml's settings come from the environment: PKI_DIR, PARTITIONS_DIR, RELEASES_DIR, FMNIST_DIR,
# SUPERLINK_PORT (the Control API on the host's 127.0.0.1, default 8000), CLIENTAPP_MEM_LIMIT (each
# SuperNode's ClientApp container, default 1g), FLWR_VERSION; relative paths are relative to deploy/.
# FEDMEF_ARM64=1 (for every command of the deployment) adds compose.arm64.yml, a fourth SuperNode pi-4 as
# an emulated Raspberry Pi 4B: `up` then enables qemu-user's binfmt handler where the host lacks it,
# and `down` disables it again.
# COMPOSE_PROJECT_NAME (default fedmef) names the containers (fedmef_supernode-1_1), volumes and networks.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
export FEDMEF_PODMAN_STORE=run
source "$here/env.sh"
source "$root/deploy/pi/qemu-binfmt.sh"

project=${COMPOSE_PROJECT_NAME:-fedmef}
files=(-p "$project" -f "$root/deploy/compose.yml" -f "$here/compose.podman.yml")
[[ $FEDMEF_ARM64 == 1 ]] && files+=(-f "$here/compose.arm64.yml")
saved=$FEDMEF_PODMAN_RUN/host-state
sysctls=(net/ipv4/ip_forward net/ipv6/conf/all/forwarding net/ipv6/conf/default/forwarding)

# What the deployment changes outside its folders: the forwarding sysctls and iptables (netavark), the
# paths of env.sh's absent_host_paths and binfmt_misc (qemu_binfmt_on's own record). Recorded once, before the first `up` of a deployment; `down`
# restores it.
save_host_state() {
    [[ -d $saved ]] && return
    mkdir -p "$saved.new"
    local s
    for s in "${sysctls[@]}"; do
        [[ -r /proc/sys/$s ]] && cat "/proc/sys/$s" >"$saved.new/${s//\//.}"
    done
    if command -v nft >/dev/null; then nft list tables >"$saved.new/nft-tables" 2>/dev/null || true; fi
    absent_host_paths >"$saved.new/absent-paths"
    mv "$saved.new" "$saved"
}

restore_host() {
    # whatever the compose project left (a container started by hand, a failed `up`)
    podman rm -af -t 5 >/dev/null 2>&1 || true
    podman pod rm -af >/dev/null 2>&1 || true
    podman volume rm -af >/dev/null 2>&1 || true
    local net
    for net in $(podman network ls --format '{{.Name}}' 2>/dev/null); do
        [[ $net == podman ]] || podman network rm -f "$net" >/dev/null 2>&1 || true
    done
    # processes of this deployment that outlived it (conmon): by pid, found by the deployment's folders
    # in their command line; nothing else is touched
    local pid
    for pid in $(pgrep -f -- "$FEDMEF_PODMAN_RUN/"; pgrep -f -- "$FEDMEF_PODMAN_RUNROOT/"); do
        [[ $pid != "$$" ]] && kill "$pid" 2>/dev/null || true
    done
    # the deployment's storage: unmount what overlay and podman mounted there, then remove it
    local mnt
    for mnt in $(findmnt -rn -o TARGET | grep -e "^$FEDMEF_PODMAN_RUN/" -e "^$FEDMEF_PODMAN_RUNROOT/" | sort -r || true); do
        umount -l "$mnt" 2>/dev/null || true
    done
    # netavark's iptables chains and the rules that jump to them: it removes a network's own chains and
    # rules with the network but leaves its shared top-level chains behind. Those stay while any other
    # netavark network on the host still has rules in them (another deployment, the host's own podman).
    local cmd table rule chain
    for cmd in iptables ip6tables; do
        command -v "$cmd" >/dev/null || continue
        if "$cmd" -t nat -S 2>/dev/null | grep -qE '^-N NETAVARK-[0-9A-F]+$' \
            || "$cmd" -t filter -S 2>/dev/null | grep -qE '^-A NETAVARK_FORWARD '; then
            echo "compose.sh: other netavark networks are in use: their $cmd chains stay" >&2
            continue
        fi
        for table in filter nat mangle; do
            "$cmd" -t "$table" -S >/dev/null 2>&1 || continue
            while read -r rule; do
                eval "\"$cmd\" -t $table -D ${rule#-A }" 2>/dev/null || true
            done < <("$cmd" -t "$table" -S | grep -E '^-A ' | grep -E 'NETAVARK' | grep -vE '^-A NETAVARK')
            for chain in $("$cmd" -t "$table" -S | sed -n 's/^-N \(NETAVARK[^ ]*\).*/\1/p'); do
                "$cmd" -t "$table" -F "$chain" 2>/dev/null || true
            done
            for chain in $("$cmd" -t "$table" -S | sed -n 's/^-N \(NETAVARK[^ ]*\).*/\1/p'); do
                "$cmd" -t "$table" -X "$chain" 2>/dev/null || true
            done
        done
    done
    if [[ -d $saved ]]; then
        restore_saved
    fi
    rm -rf "$FEDMEF_PODMAN_RUN" "$FEDMEF_PODMAN_RUNROOT"
    rmdir /run/fedmef-podman 2>/dev/null || true
}

restore_saved() {
    # tables that iptables-nft created for netavark and that are empty again (no rule, no own chain)
    if [[ -r $saved/nft-tables ]]; then
        local family name
        nft list tables 2>/dev/null | while read -r _ family name; do
            grep -qx "table $family $name" "$saved/nft-tables" && continue
            if ! nft list table "$family" "$name" | grep -qvE '^\s*(table |chain |type |policy |\}|$)'; then
                nft delete table "$family" "$name"
            fi
        done
    fi
    local s
    for s in "${sysctls[@]}"; do
        if [[ -r $saved/${s//\//.} ]]; then cat "$saved/${s//\//.}" >"/proc/sys/$s"; fi
    done
    # what podman wrote outside its folders (env.sh), where the host had none of it
    # shellcheck disable=SC2046
    remove_host_paths $(cat "$saved/absent-paths")
    qemu_binfmt_off "$saved/binfmt"
}

case ${1:-} in
    up)
        shift
        save_host_state
        if [[ $FEDMEF_ARM64 == 1 ]]; then
            qemu_binfmt_on "$saved/binfmt" || { echo "compose.sh: cannot run the arm64 SuperNode (above)" >&2; exit 1; }
        fi
        podman_compose "${files[@]}" up -d --no-build "$@"
        ;;
    down)
        shift
        podman_compose "${files[@]}" down -v -t 10 "$@" || true
        restore_host
        ;;
    restore-host)
        restore_host
        ;;
    "")
        echo "usage: $0 up | down | restore-host | <podman-compose command>" >&2
        exit 2
        ;;
    *)
        podman_compose "${files[@]}" "$@"
        ;;
esac
