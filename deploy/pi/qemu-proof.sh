#!/usr/bin/env bash
# The Pi 4 wheel proof, without a Pi: on an x86_64 Debian/Ubuntu host, build a Debian arm64 root
# filesystem, emulate a Raspberry Pi 4B's CPU (Cortex-A72, ARMv8.0: no LSE atomics) with qemu-user, and
# in it
#   1. install requirements-aarch64.txt exactly as install.sh does on a Pi (wheels only, no deps
#      beyond the pins, `pip check`);
#   2. run one FedMef round of this project's ClientApp: the server's strategy builds round 2's train
#      message (LeNet-5, NSConv + SAP s_ta 0.9, masked, BaE with per-layer counts, top-K requested,
#      5 steps of batch 32), and the ClientApp's train handler trains
#      on a Fashion-MNIST partition file made by deploy.prepare_partitions, with SAP's C kernels
#      compiled by the chroot's gcc; then the same round on SAP's torch code must give a
#      bit-identical reply;
#   3. (control) show that the registry's torch 2.10.0 dies with SIGILL on the same CPU model and
#      imports fine on QEMU's `max` CPU, so the emulator does reproduce the Pi 4 failure.
# Any failure (a SIGILL included) makes the script exit non-zero.
#
# Usage: sudo deploy/pi/qemu-proof.sh 2>&1 | tee deploy/pi/qemu-proof.log
# Settings (environment): ROOTFS (default /var/tmp/fedmef-pi-rootfs, reused when complete),
#   SUITE (bookworm = Python 3.11 as Raspberry Pi OS bookworm; trixie = 3.13), DEBIAN_MIRROR,
#   WHEELS (default /var/tmp/fedmef-pi-wheels: each wheel is downloaded once), CONTROL_TORCH
#   (default 2.10.0; empty skips the control), PYTHON (the host's project venv, for the partition).
# Time under emulation is not a Pi timing: qemu-user runs arm64 code many times slower.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
root=${ROOTFS:-/var/tmp/fedmef-pi-rootfs}
suite=${SUITE:-bookworm}
# HTTPS like every download of the project (apt checks the signed Release files in any case)
mirror=${DEBIAN_MIRROR:-https://deb.debian.org/debian}
wheels=${WHEELS:-/var/tmp/fedmef-pi-wheels}
control_torch=${CONTROL_TORCH-2.10.0}
host_python=${PYTHON:-$repo/.venv/bin/python}
venv=/opt/fedmef-venv
# The CPU model for every arm64 program, debootstrap's second stage included. qemu-user reads it from
# the environment of each process it starts, so it is passed into the chroot's clean environment too.
cpu=cortex-a72
source "$here/qemu-binfmt.sh"

die() { echo "qemu-proof.sh: $*" >&2; exit 1; }
began=$SECONDS
step() { echo; echo "== [$(date -u +%H:%M:%S), +$((SECONDS - began)) s] $*"; }

[[ $(id -u) -eq 0 ]] || die "run it as root (debootstrap, chroot and mounts need it): sudo $0"
[[ $(uname -m) == x86_64 ]] || die "this host is $(uname -m); the script emulates arm64 on an x86_64 host"
[[ -x $host_python ]] || die "$host_python is missing: make the project's venv first (make .venv/.installed) or set PYTHON"

# ---------------------------------------------------------------- cleanup: only what this run changed
ulimit -c 0         # a SIGILL (the control) makes qemu write a core file otherwise
mounts=()           # chroot mounts, unmounted in reverse order
binfmt_state=$(mktemp)  # what qemu_binfmt_on changed
cleanup() {
    local status=$? i
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        umount "${mounts[i]}" 2>/dev/null || umount -l "${mounts[i]}" \
            || echo "qemu-proof.sh: could not unmount ${mounts[i]}" >&2
    done
    qemu_binfmt_off "$binfmt_state"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM   # through the EXIT trap, so the mounts go in every case

mount_in() {  # mount_in TARGET MOUNT-ARGS...: mount and remember it for cleanup
    local target=$1; shift
    mount "$@" "$target"
    mounts+=("$target")
}

# Run an arm64 program in the chroot with a clean environment; QEMU_CPU must already be set for
# chroot's exec of /usr/bin/env, which is itself an arm64 program.
in_chroot() {
    QEMU_CPU=$cpu chroot "$root" /usr/bin/env -i QEMU_CPU="$cpu" HOME=/root LANG=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin PIP_CONFIG_FILE=/dev/null \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/host-ca-certificates.crt \
        ${PIP_INDEX_URL:+PIP_INDEX_URL="$PIP_INDEX_URL"} "$@"
}

echo "Pi 4 wheel proof under qemu, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(uname -srm), $(nproc) cores"
echo "repository $repo ($(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"

step "host tools: debootstrap, qemu-user-static, binfmt-support"
if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null \
        || ! command -v update-binfmts >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap qemu-user-static binfmt-support
fi
qemu-aarch64-static --version | head -1

step "binfmt_misc: the kernel hands arm64 programs to qemu-aarch64-static"
qemu_binfmt_on "$binfmt_state" || die "cannot run arm64 programs through qemu (above)"
sed -n '1,3p' "$QEMU_BINFMT/qemu-aarch64"

step "Debian $suite arm64 root filesystem in $root"
if [[ -f $root/.fedmef-rootfs ]]; then
    [[ $(cat "$root/.fedmef-rootfs") == "$suite" ]] \
        || die "$root holds Debian $(cat "$root/.fedmef-rootfs"), not $suite: remove it or set ROOTFS"
    echo "reusing it (complete since $(date -u -r "$root/.fedmef-rootfs" '+%Y-%m-%d %H:%M UTC'))"
else
    if [[ -e $root ]]; then  # an interrupted debootstrap: start again, but never through a live mount
        findmnt -rn -o TARGET | grep -q "^$root/" && die "something is still mounted under $root; unmount it first"
        echo "removing an incomplete $root"
        rm -rf "$root"
    fi
    QEMU_CPU=$cpu debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates,gcc,libc6-dev \
        "$suite" "$root" "$mirror"
    echo "$suite" >"$root/.fedmef-rootfs"
fi
# pip reaches the registry as the host does: its resolver, and its CA certificates (a TLS-inspecting
# proxy's CA included, which the chroot's fresh ca-certificates lacks).
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/host-ca-certificates.crt"

step "a Raspberry Pi 4B's /proc/cpuinfo; /proc, /sys, /dev and the wheel folder mounted"
# qemu-user 7.2 passes the x86_64 host's /proc/cpuinfo through. torch imports with it all the same,
# but its cpuinfo library tells the cores' type (which some kernels are chosen by) from this file, so
# the chroot sees what a Pi 4B's 64-bit kernel shows: four Cortex-A72 (0x41/0xd08), no crypto features.
cp "$here/pi4b-cpuinfo" "$root/etc/fedmef-pi4-cpuinfo"
mount_in "$root/proc" -t proc proc
mount_in "$root/sys" -t sysfs sysfs
mount_in "$root/dev" --bind /dev
mount_in "$root/proc/cpuinfo" --bind "$root/etc/fedmef-pi4-cpuinfo"
mkdir -p "$wheels" "$root/var/cache/fedmef-wheels"
mount_in "$root/var/cache/fedmef-wheels" --bind "$wheels"
in_chroot sh -c 'uname -m; grep -m1 ^Model /proc/cpuinfo; python3 -V'

step "the project's code into /opt/fedmef-src, a partition file into /var/lib/fedmef"
rm -rf "$root/opt/fedmef-src"
mkdir -p "$root/opt/fedmef-src" "$root/var/lib/fedmef"
# The packages the ClientApp and the server's strategy import; keys and partitions stay out.
tar -C "$repo" --exclude=__pycache__ --exclude='*.npz' --exclude=deploy/pki --exclude=deploy/partitions \
    -cf - pyproject.toml common client server deploy | tar -C "$root/opt/fedmef-src" -xf -
# Cut on the host (Flower Datasets is not on a Pi, by design): Pi 1 of 10, at most 200 examples.
parts=$(mktemp -d)
(cd "$repo" && "$host_python" -m deploy.prepare_partitions --partitions 10 --max-examples 200 --out "$parts" \
    | sed -n '1,3p')
install -m 644 "$parts/pi-1.npz" "$root/var/lib/fedmef/partition.npz"
rm -rf "$parts"

step "venv $venv from requirements-aarch64.txt (as install.sh: --only-binary=:all: --no-deps --require-hashes, pip check)"
# pip in the chroot picks the wheels for this platform (aarch64, the chroot's Python) from the registry
# and keeps them in the wheel folder: a rerun downloads nothing new (pip's HTTP cache would not do:
# it stores only what the registry's answer allows, and a proxy may strip that). The venv itself is
# made afresh every run, as on a new Pi.
requirements=/opt/fedmef-src/deploy/pi/requirements-aarch64.txt
pip_get=(-m pip download -q --progress-bar off --only-binary=:all: --no-deps -d /var/cache/fedmef-wheels)
pip_put=(-m pip install --progress-bar off --only-binary=:all: --no-deps --no-index
         --find-links /var/cache/fedmef-wheels)
rm -rf "${root:?}$venv"
in_chroot python3 -m venv "$venv"
# The pins' sha256 digests are checked on download and again on install, as install.sh does (the
# control torch below has none: it is not installed on a Pi).
in_chroot "$venv/bin/python" "${pip_get[@]}" --require-hashes -r "$requirements"
in_chroot "$venv/bin/python" "${pip_put[@]}" --require-hashes -r "$requirements"
in_chroot "$venv/bin/python" -m pip check
in_chroot "$venv/bin/python" -m pip list --format=freeze | grep -iE '^(torch|flwr|numpy)=='

step "gcc for SAP's kernels (as install.sh)"
# A root filesystem made before the kernels existed lacks it.
in_chroot sh -c 'command -v cc >/dev/null || { apt-get update -q && apt-get install -y -q gcc libc6-dev; }'
in_chroot cc --version | sed -n 1p

step "one FedMef round of the ClientApp under QEMU_CPU=$cpu"
# Python's exit status is the step's status; -X faulthandler names the Python line if it dies of a signal.
in_chroot sh -c "cd /opt/fedmef-src && PYTHONPATH=/opt/fedmef-src exec $venv/bin/python -X faulthandler - \
    pyproject.toml /var/lib/fedmef/partition.npz" <<'PY'
import math, os, platform, struct, sys, time, tomllib

start = time.perf_counter()
import flwr
import torch
from flwr.app import Context, Message, Metadata, RecordDict

from client.client_app import train
from common.nn import bitkernels, sap
from common.protocol.config import parse_run_config
from common.nn.models import build_model
from common.protocol.wire import content_bytes
from server.strategy import make_strategy
imported = time.perf_counter() - start

# The CPU the emulator presents: AT_HWCAP (type 16) from the auxiliary vector; bit 8 = LSE atomics.
auxv = open("/proc/self/auxv", "rb").read()
hwcap = dict(struct.iter_unpack("<QQ", auxv)).get(16, 0)
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("Model")), "?")
print(f"python {platform.python_version()} on {platform.machine()}, QEMU_CPU={os.environ.get('QEMU_CPU')}, "
      f"/proc/cpuinfo: {model}")
print(f"AT_HWCAP {hwcap:#x}: LSE atomics (ARMv8.1) {'PRESENT' if hwcap & 1 << 8 else 'absent'}")
print(f"torch {torch.__version__}, flwr {flwr.__version__}, imports took {imported:.1f} s")
if platform.machine() != "aarch64" or hwcap & 1 << 8:
    sys.exit("not an emulated ARMv8.0 CPU: the proof would prove nothing")

# The server: FedMef's strategy builds round 2's train message (with delta-r 2 an adjustment round:
# BaE counts per layer, top-K asked for). It is handed over as records, not through Flower's wire
# encoding (flwr has no public serialiser); a real transport to an arm64 node is the compose federation's.
base = tomllib.load(open(sys.argv[1], "rb"))["tool"]["flwr"]["app"]["config"]
base.update({"strategy": "fedmef", "model": "lenet5", "norm": "nsconv", "sap": "on", "s-ta": 0.9,
             "bae": "on", "max-local-steps": 5, "batch-size": 32, "min-train-nodes": 1})


def arrays(reply):
    return {(name, key): array.numpy().tobytes() for name, record in reply.content.array_records.items()
            for key, array in record.items()}


print(f"SAP kernels: {bitkernels.status()}")
if bitkernels.library() is None:
    sys.exit("the SAP kernels did not build")
native_usable = bitkernels.usable
# the default cache and int8, whose scaling has kernels of its own
for sap_format in ("fp32", "int8"):
    values = {**base, "sap-format": sap_format}
    cfg = parse_run_config(values)
    torch.manual_seed(cfg.seed)  # the initial model, as the ServerApp seeds it
    strategy = make_strategy(cfg, build_model(cfg.model, norm=cfg.resolved_norm, gamma=cfg.gamma))
    ins = strategy.instructions(2)
    if not (ins.counts and ins.bae and ins.topk and ins.mode == "masked"):
        sys.exit(f"round 2 is not a masked BaE/top-K round: {ins}")
    content = strategy.content_for(1, ins)
    print(f"server: {cfg.model} {ins.norm}, SAP s_ta {ins.s_ta} in {sap_format}, mode {ins.mode}, "
          f"BaE on {sum(ins.counts)} weights, top-K {ins.topk}, {ins.max_local_steps} steps of batch "
          f"{ins.batch_size}; message {content_bytes(content)} bytes")

    # The SuperNode: the ClientApp's train handler on this device's partition file.
    msg = Message(content=content, metadata=Metadata(
        run_id=1, message_id="qemu-proof", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="2",
        created_at=time.time(), ttl=3600, message_type="train"))

    def client_round():
        """The handler on a fresh node state, with the same random draws (SAP's threshold samples)."""
        torch.manual_seed(0)
        sap._sampler.manual_seed(0x5A9)
        context = Context(run_id=1, node_id=1, node_config={"data-path": sys.argv[2]}, state=RecordDict(),
                          run_config=values)
        began = time.perf_counter()
        return train(msg, context), time.perf_counter() - began

    bitkernels.usable = native_usable
    reply, took = client_round()
    m = reply.content["metrics"]
    print(f"client ({sap_format}): {int(m['steps'])} steps on {int(m['num-examples'])} examples, "
          f"loss {m['train-loss']:.4f}, BaE marked {int(m['bae-marked'])}, top-K in reply {'topk' in reply.content}, "
          f"train {m['train-time-s']:.1f} s, handler {took:.1f} s, peak RSS {m['peak-rss-mb']:.0f} MiB")
    if not (m["steps"] == ins.max_local_steps and math.isfinite(m["train-loss"]) and "topk" in reply.content):
        sys.exit("the client round did not complete as instructed")
    bitkernels.usable = lambda *tensors: False  # the same round on SAP's torch code
    fallback, took_torch = client_round()
    same = arrays(reply) == arrays(fallback) and fallback.content["metrics"]["train-loss"] == m["train-loss"]
    print(f"the same round on the torch fallback ({sap_format}): handler {took_torch:.1f} s, reply arrays and "
          f"loss {'bit-identical' if same else 'DIFFERENT'}")
    if not same:
        sys.exit(f"the native SAP kernels and the torch code disagree on aarch64 ({sap_format} cache)")
print("OK: the pinned wheels run the ClientApp on an emulated Cortex-A72, SAP's kernels included")
PY

if [[ -n $control_torch ]]; then
    step "control: the registry's torch $control_torch on the same CPU model"
    # Its own venv, torch alone; the .pth lets it find torch's small dependencies in the main venv
    # (a venv's own site-packages come first, so this torch shadows 2.9.1).
    control=/opt/torch-$control_torch-venv
    rm -rf "${root:?}$control"
    in_chroot python3 -m venv "$control"
    in_chroot "$control/bin/python" "${pip_get[@]}" "torch==$control_torch"
    in_chroot "$control/bin/python" "${pip_put[@]}" -q "torch==$control_torch"
    site=$(in_chroot "$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    csite=$(in_chroot "$control/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "$site" >"$root$csite/fedmef-main-venv.pth"
    probe='import torch; x = torch.randn(8, 1, 28, 28, requires_grad=True); torch.nn.Conv2d(1, 6, 5)(x).relu().sum().backward(); print("torch", torch.__version__, "computes")'
    set +e
    in_chroot "$control/bin/python" -X faulthandler -c "$probe"
    rc=$?
    set -e
    echo "exit status under QEMU_CPU=$cpu: $rc"
    [[ $rc -eq 132 ]] || die "torch $control_torch did not die with SIGILL (status 132) on $cpu: the emulation would not catch the Pi 4 failure"
    # the same wheel on QEMU's `max` CPU (ARMv8.1+ atomics and more); cpu=max holds for this call only
    cpu=max in_chroot "$control/bin/python" -c "$probe" \
        || die "torch $control_torch fails on QEMU's max CPU too: the SIGILL above is not about the CPU model"
    echo "as expected: SIGILL on $cpu (ARMv8.0), fine on QEMU's max CPU (ARMv8.1+ atomics)"
fi

step "done in $((SECONDS - began)) s (emulated: not a Pi timing)"
