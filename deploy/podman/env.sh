# shellcheck shell=bash
# Sourced by the other scripts of deploy/podman: a private podman that touches nothing of the host's own
# container set-up (/etc/containers, /var/lib/containers, /run/containers stay as they are; the
# network namespaces of a deployment's containers are in /run/netns while it runs).
#
#   FEDMEF_PODMAN_DIR   everything lives here (default /var/tmp/fedmef-podman):
#     venv/             podman-compose (pip, pinned), apart from the project's .venv
#     images/           the image cache: the debootstrap base and the built images, kept between runs
#                       (`base-image.sh --force` makes a new base; removing the folder empties the cache)
#     build/            the builds' containers.conf, storage.conf and pip.conf
#   FEDMEF_PODMAN_RUN   one deployment: its containers, volumes, networks, conmon state, logs, its
#                       containers.conf and storage.conf (default $FEDMEF_PODMAN_DIR/run;
#                       `deploy/podman/compose.sh down` removes it)
#   FEDMEF_PODMAN_STORE build: podman works on the image cache itself (build.sh, base-image.sh);
#                       run (default): a deployment, which reads the cache's images and writes nothing there
#   FLWR_VERSION        the images' tag (default: the flwr pin of pyproject.toml), exported for the
#                       compose files, so a new pin needs no other change here
#   FEDMEF_ARM64=1      with the emulated Pi (compose.arm64.yml): build.sh builds its image, compose.sh
#                       adds its services and runs them through qemu-user
#
# Why each containers.conf setting (this project's machines; harmless elsewhere):
#   cgroup_manager=cgroupfs   no systemd as PID 1, so no systemd cgroup manager
#   events_logger=file        no journald
#   runtime=runc              crun fails on a hybrid cgroup v1/v2 host ("cgroups in hybrid mode not supported")
#   network_backend=netavark  bridge networks with service-name DNS (aardvark-dns)
#   default_ulimits           podman otherwise raises nofile/nproc above what the host allows and every
#                             container fails to start ("error setting rlimit type 7 ... permission denied")
set -euo pipefail

FEDMEF_PODMAN_DIR=${FEDMEF_PODMAN_DIR:-/var/tmp/fedmef-podman}
FEDMEF_PODMAN_STORE=${FEDMEF_PODMAN_STORE:-run}
PODMAN_COMPOSE_VERSION=1.6.0
FLWR_VERSION=${FLWR_VERSION:-$(sed -n 's/.*"flwr\[simulation\]==\([0-9.]*\)".*/\1/p' \
    "$(dirname "${BASH_SOURCE[0]}")/../../pyproject.toml")}
[[ -n $FLWR_VERSION ]] || { echo "no flwr pin in pyproject.toml: set FLWR_VERSION" >&2; return 2; }
export FLWR_VERSION
FEDMEF_ARM64=${FEDMEF_ARM64:-0}

FEDMEF_PODMAN_RUN=${FEDMEF_PODMAN_RUN:-$FEDMEF_PODMAN_DIR/run}
_podman_dir=$FEDMEF_PODMAN_DIR
mkdir -p "$_podman_dir/images"

# containers.conf and storage.conf for podman's state in $1: the image cache itself ("build"), or a
# deployment's own graph root with the cache's images beside it, read-only ("run")
_podman_conf() {
    local state=$1 mode=$2
    mkdir -p "$state/tmp" "$state/networks"
    cat >"$state/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$state/events.log"
runtime = "runc"
tmp_dir = "$state/tmp"

[network]
network_backend = "netavark"
network_config_dir = "$state/networks"
CONF
    # podman refuses a run root longer than 50 characters when it is given on its command line, as
    # conmon's exit command (`podman --runroot ... container cleanup`, which also restarts a container
    # under restart: unless-stopped) gives it: a long one moves to /run, named after the state folder
    local runroot=$state/runroot
    if ((${#runroot} > 50)); then
        runroot=/run/fedmef-podman/$(printf %s "$state" | sha256sum | cut -c1-12)
    fi
    FEDMEF_PODMAN_RUNROOT=$runroot
    if [[ $mode == build ]]; then
        printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' \
            "$_podman_dir/images" "$runroot" >"$state/storage.conf"
    else
        printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n\n[storage.options]\nadditionalimagestores = ["%s"]\n' \
            "$state/storage" "$runroot" "$_podman_dir/images" >"$state/storage.conf"
    fi
    export CONTAINERS_CONF=$state/containers.conf CONTAINERS_STORAGE_CONF=$state/storage.conf
}
case $FEDMEF_PODMAN_STORE in
    build) _podman_conf "$_podman_dir/build" build ;;
    run) _podman_conf "$FEDMEF_PODMAN_RUN" run ;;
    *) echo "FEDMEF_PODMAN_STORE must be build or run, not '$FEDMEF_PODMAN_STORE'" >&2; return 2 ;;
esac

# What podman 4.3 writes outside its configured folders whatever the configuration: a cache of blob
# digests (/var/lib/containers/cache), runc's state folder (/run/runc, empty once no container runs) and
# netavark's address database and aardvark-dns configuration (/run/containers/networks, and its parent,
# left empty). The scripts note which of them the host did not have (absent_host_paths) and remove
# those when they end.
PODMAN_HOST_PATHS=(/var/lib/containers /run/runc /run/containers/networks /run/containers)
absent_host_paths() {
    local path
    for path in "${PODMAN_HOST_PATHS[@]}"; do
        [[ -e $path ]] || echo "$path"
    done
}
remove_host_paths() {
    local path
    for path in "$@"; do
        case $path in
            /run/runc | /run/containers) rmdir "$path" 2>/dev/null || true ;;  # only when nothing is left in it
            /var/lib/containers | /run/containers/networks) rm -rf "$path" ;;
        esac
    done
}

# The venv with the pinned podman-compose, made on first use. build.sh needs its pip before any compose
# command has run (on a new host, its first), so making it is a step of its own.
podman_venv() {
    local venv=$_podman_dir/venv
    if [[ ! -x $venv/bin/podman-compose ]] || ! "$venv/bin/podman-compose" --version 2>/dev/null | grep -q "^podman-compose version $PODMAN_COMPOSE_VERSION$"; then
        /usr/bin/python3 -m venv "$venv" >&2
        "$venv/bin/python" -m pip install -q "podman-compose==$PODMAN_COMPOSE_VERSION" >&2
    fi
}
podman_compose() {
    podman_venv
    "$_podman_dir/venv/bin/podman-compose" "$@"
}
