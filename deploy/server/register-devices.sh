#!/usr/bin/env bash
# Register device public keys with a running SuperLink, so their SuperNodes pass authentication.
#
# Usage: register-devices.sh CONNECTION KEY.pub|DIR [...]
#   CONNECTION  a [superlink.CONNECTION] section of $FLWR_HOME/config.toml (default FLWR_HOME:
#               ~/.flwr), e.g.  address = "192.168.1.10:8000"  root-certificates = "/abs/pki/ca.crt"
#   KEY.pub     an OpenSSH ECDSA P-384 public key (make-pki.sh writes them to pki/devices/);
#               a folder stands for every *.pub in it
#
# Safe to re-run: a key the SuperLink already holds is reported and skipped. Each call is
# `flwr supernode register KEY.pub CONNECTION` (flwr 1.42).
set -euo pipefail

die() { echo "register-devices.sh: $*" >&2; exit 1; }
[[ $# -ge 2 ]] || die "usage: $0 CONNECTION KEY.pub|DIR [...] (see the top of this script)"
command -v flwr >/dev/null || die "flwr is not on PATH: activate the venv that has flwr==1.42.0"
connection=$1
shift

keys=()
for arg in "$@"; do
    if [[ -d $arg ]]; then
        found=("$arg"/*.pub)
        [[ -e ${found[0]} ]] || die "$arg holds no *.pub files"
        keys+=("${found[@]}")
    elif [[ -f $arg ]]; then
        keys+=("$arg")
    else
        die "$arg is neither a public key file nor a folder of them"
    fi
done

failed=0
for key in "${keys[@]}"; do
    head -c 19 "$key" | grep -qx "ecdsa-sha2-nistp384" \
        || die "$key is not an OpenSSH ECDSA P-384 public key (make it with: ssh-keygen -t ecdsa -b 384 -N \"\")"
    name=$(basename "$key" .pub)
    # --format json: the reply says why a registration failed. Note that flwr exits 0 in json mode
    # even on failure, so success is read from the reply, not from the exit status.
    reply=$(flwr supernode register --format json --name "$name" "$key" "$connection" 2>&1) || true
    if grep -q '"success": true' <<<"$reply"; then
        echo "$name: registered as node $(grep -o '"node-id": [0-9]*' <<<"$reply" | grep -o '[0-9]*$')"
    elif grep -q "already in use" <<<"$reply"; then
        echo "$name: already registered"
    else
        echo "$name: FAILED: $reply" >&2
        failed=1
    fi
done
exit $failed
