#!/usr/bin/env bash
# Make a Raspberry Pi (4B, Raspberry Pi OS Lite 64-bit) a SuperNode of the federation:
#   - a Python venv in /opt/fedmef/venv with the pinned wheels of requirements-aarch64.txt
#     (torch 2.9.1 CPU, flwr 1.42.0, ...), nothing compiled on the Pi;
#   - the system user `flower`, /etc/fedmef (CA, device key) and /var/lib/fedmef (data partition);
#   - the systemd unit flower-supernode.service and its settings file /etc/default/flower-supernode.
# The ClientApp's code itself comes from the SuperLink with each run.
#
# Usage: sudo ./install.sh SUPERLINK_ADDRESS [MEMORY_BUDGET_MB]   (the server's Fleet API proxy, port 9092)
#   e.g.  sudo ./install.sh 192.168.1.10:9092 1024
# Run it from a copy of deploy/pi/. Safe to re-run (an existing venv is brought to the pins, an
# existing settings file is kept). PIP_INDEX_URL may name a mirror of the package registry (make-venv.sh).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
venv=/opt/fedmef/venv

die() { echo "install.sh: $*" >&2; exit 1; }
[[ $# -ge 1 && $# -le 2 ]] || die "usage: sudo $0 SUPERLINK_ADDRESS [MEMORY_BUDGET_MB], e.g. 192.168.1.10:9092 1024"
superlink=$1
budget=${2:-1024}
[[ $superlink =~ ^[^[:space:]]+:[0-9]+$ ]] || die "SUPERLINK_ADDRESS must be host:port, e.g. 192.168.1.10:9092, got '$superlink'"
[[ $budget =~ ^[0-9]+$ ]] || die "MEMORY_BUDGET_MB must be a number of MiB, got '$budget'"
[[ $(id -u) -eq 0 ]] || die "run it as root: sudo $0 $*"
[[ $(uname -m) == aarch64 ]] \
    || die "this is $(uname -m), not aarch64: flash Raspberry Pi OS Lite (64-bit); the 32-bit OS has no torch wheels"
for file in requirements-aarch64.txt make-venv.sh flower-supernode.service; do
    [[ -f $here/$file ]] || die "$here/$file is missing: copy the whole deploy/pi folder to the Pi"
done

echo "== system packages"
apt-get update -q
# gcc: the ClientApp compiles its SAP kernels (common/nn/bitkernels.py) on first use; without a
# compiler it falls back to torch code that makes a SAP step up to 2x slower.
apt-get install -y -q python3 python3-venv gcc libc6-dev
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "Python $(python3 -V) is too old: Flower 1.42 needs 3.10 or newer (Raspberry Pi OS bookworm has 3.11)"

echo "== user and folders"
id flower >/dev/null 2>&1 || useradd --system --user-group --home-dir /var/lib/flower-supernode --shell /usr/sbin/nologin flower
install -d -o root -g flower -m 750 /etc/fedmef
install -d -o flower -g flower -m 750 /var/lib/fedmef

echo "== Python packages into $venv"
"$here/make-venv.sh" "$venv"

echo "== systemd unit"
install -m 644 "$here/flower-supernode.service" /etc/systemd/system/flower-supernode.service
if [[ -f /etc/default/flower-supernode ]]; then
    echo "keeping /etc/default/flower-supernode"
else
    printf 'SUPERLINK=%s\nMEMORY_BUDGET_MB=%s\n' "$superlink" "$budget" >/etc/default/flower-supernode
fi
systemctl daemon-reload

missing=()
for file in /etc/fedmef/ca.crt /etc/fedmef/device.key /etc/fedmef/trusted-entities.yaml /var/lib/fedmef/partition.npz; do
    [[ -f $file ]] || missing+=("$file")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "done: start it with  sudo systemctl enable --now flower-supernode"
else
    echo "done; before  sudo systemctl enable --now flower-supernode  put in place: ${missing[*]}"
    echo "(see deploy/README.md: the CA certificate, this device's private key, the operator's app-signing public key, its data partition)"
fi
