#!/usr/bin/env bash
# The keys and certificates of one federation:
#   OUT/ca.crt, OUT/ca.key                 a private CA (P-384); ca.crt goes to every device
#   OUT/server.pem, OUT/server.key         the SuperLink's TLS certificate, signed by the CA
#   OUT/devices/NAME, OUT/devices/NAME.pub one ECDSA P-384 OpenSSH key pair per device, for
#                                          SuperNode authentication (the .pub is registered)
#   OUT/app-signing/operator[.pub]         the operator's Ed25519 app-signing key: the private half
#                                          signs releases (python -m deploy.app_registry publish)
#                                          and never leaves the operator's machine
#   OUT/trusted-entities.yaml              its public half, for every SuperNode's --trusted-entities
#   OUT/local.pem, OUT/local.key           a certificate for 127.0.0.1 only: a SuperNode's Runtime API
#   OUT/superexec.secret                   the SuperExecs' shared secret (compose.yml)
#
# Usage: make-pki.sh [-o OUT] [-n DEVICES] [-p PREFIX] [SAN ...]
#   -o OUT      output folder (default: ./pki)
#   -n DEVICES  number of device key pairs, named PREFIX-1 .. PREFIX-N (default: 3)
#   -p PREFIX   device name prefix (default: pi)
#   SAN         IP addresses and DNS names the devices reach the server by. 127.0.0.1 and localhost
#               are always added: the Fleet API proxy and the SuperLink's own SuperExec connect to
#               the SuperLink there.
#
# Safe to re-run: what exists is kept (an existing CA is never overwritten), what is missing is made,
# so `-n 5` after `-n 3` adds two device keys. A server certificate that does not cover the SANs asked
# for is an error: delete server.pem and server.key to have it reissued.
set -euo pipefail

out=./pki devices=3 prefix=pi
while getopts "o:n:p:h" opt; do
    case $opt in
        o) out=$OPTARG ;;
        n) devices=$OPTARG ;;
        p) prefix=$OPTARG ;;
        h) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "usage: $0 [-o OUT] [-n DEVICES] [-p PREFIX] [SAN ...] (-h for help)" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
sans=("$@")
# loopback always: the Fleet API proxy (which checks the name "localhost": nginx matches DNS names
# only) and the SuperLink's own SuperExec connect to the SuperLink there
[[ " ${sans[*]} " == *" localhost "* ]] || sans=(localhost "${sans[@]}")
[[ " ${sans[*]} " == *" 127.0.0.1 "* ]] || sans=(127.0.0.1 "${sans[@]}")

die() { echo "make-pki.sh: $*" >&2; exit 1; }
[[ $devices =~ ^[0-9]+$ ]] || die "-n wants a number of devices, got '$devices'"
[[ $prefix =~ ^[A-Za-z0-9_-]+$ ]] || die "-p wants letters, digits, '-' or '_', got '$prefix'"
for tool in openssl ssh-keygen python3; do
    command -v "$tool" >/dev/null || die "$tool is missing: install openssl, openssh-client and python3"
done

# subjectAltName entries: an IPv4/IPv6 literal is an IP entry, anything else a DNS name.
alt_names=()
for san in "${sans[@]}"; do
    if [[ $san =~ ^[0-9.]+$ || $san == *:* ]]; then
        python3 -c 'import ipaddress, sys; ipaddress.ip_address(sys.argv[1])' "$san" 2>/dev/null \
            || die "'$san' is not a valid IP address"
        alt_names+=("IP:$san")
    elif [[ $san =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
        alt_names+=("DNS:$san")
    else
        die "'$san' is neither an IP address nor a DNS name"
    fi
done
alt_line=$(IFS=,; echo "${alt_names[*]}")

umask 077  # private keys readable by their owner only
mkdir -p "$out/devices"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# openssl's chatter only when it fails
quiet() { "$@" 2>"$tmp/err" || { cat "$tmp/err" >&2; die "$1 failed (see above)"; }; }

if [[ -e $out/ca.crt || -e $out/ca.key ]]; then
    [[ -e $out/ca.crt && -e $out/ca.key ]] || die "$out holds only half a CA (ca.crt or ca.key); restore the other half or move both away"
    echo "CA: keeping $out/ca.crt"
else
    # basicConstraints and keyUsage critical, key identifiers present: Python 3.13's TLS (Raspberry Pi
    # OS trixie) verifies with X509_STRICT and rejects a CA without them.
    quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 -days 3650 \
        -subj "/CN=FedMef federation CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -keyout "$tmp/ca.key" -out "$tmp/ca.crt"
    mv "$tmp/ca.key" "$out/ca.key"
    chmod 644 "$tmp/ca.crt"
    mv "$tmp/ca.crt" "$out/ca.crt"
    echo "CA: made $out/ca.crt"
fi

# issue NAME SANS: a P-384 TLS server certificate OUT/NAME.pem with key OUT/NAME.key, signed by the CA
issue() {
    quiet openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
        -subj "/CN=$1" -keyout "$tmp/$1.key" -out "$tmp/$1.csr"
    cat >"$tmp/$1.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $2
EOF
    quiet openssl x509 -req -in "$tmp/$1.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 825 -sha384 -extfile "$tmp/$1.ext" \
        -out "$tmp/$1.pem"
    mv "$tmp/$1.key" "$out/$1.key"
    chmod 644 "$tmp/$1.pem"
    mv "$tmp/$1.pem" "$out/$1.pem"
}

if [[ -e $out/server.pem ]]; then
    have=$(openssl x509 -in "$out/server.pem" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ')
    for name in "${alt_names[@]}"; do
        # openssl prints "IP Address:" where the request said "IP:", and IPv6 written out in upper case
        shown=${name/#IP:/IPAddress:}
        if [[ $name == IP:*:* ]]; then
            shown=IPAddress:$(python3 -c 'import ipaddress, sys
print(":".join(f"{int(g, 16):X}" for g in ipaddress.IPv6Address(sys.argv[1]).exploded.split(":")))' "${name#IP:}")
        fi
        [[ ",$have," == *",$shown,"* ]] \
            || die "$out/server.pem does not cover $name (it has: $have); delete $out/server.pem and $out/server.key to reissue it"
    done
    echo "server certificate: keeping $out/server.pem ($have)"
else
    issue server "$alt_line"
    echo "server certificate: made $out/server.pem for $alt_line"
fi

# A SuperNode's own Runtime API, which its ClientApp SuperExec reaches on 127.0.0.1 (compose runs the
# two in one network namespace): TLS with a certificate that names loopback only, so a device never
# holds the server's key.
if [[ ! -e $out/local.pem ]]; then
    issue local "IP:127.0.0.1,DNS:localhost"
    echo "loopback certificate: made $out/local.pem"
fi
# The SuperExec shared secret (--superexec-auth-secret-file): only a SuperExec holding it may use a
# Runtime API, so a process that reaches one cannot pose as the ServerApp's or a ClientApp's executor.
if [[ ! -e $out/superexec.secret ]]; then
    openssl rand -hex 32 | tr -d '\n' >"$out/superexec.secret"
    echo "SuperExec secret: made $out/superexec.secret"
fi

made=0
for i in $(seq 1 "$devices"); do
    key="$out/devices/$prefix-$i"
    [[ -e $key ]] && continue
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$prefix-$i" -f "$key"
    chmod 644 "$key.pub"  # public: copied around and registered
    made=$((made + 1))
done
echo "device keys: $made made, $(find "$out/devices" -name '*.pub' | wc -l) in $out/devices"

# The app-signing key: Ed25519, the only kind flwr's SuperNodes verify app signatures with.
if [[ ! -e $out/app-signing/operator ]]; then
    mkdir -p "$out/app-signing"
    ssh-keygen -q -t ed25519 -N "" -C "fedmef-app-signing" -f "$out/app-signing/operator"
    chmod 644 "$out/app-signing/operator.pub"
    echo "app-signing key: made $out/app-signing/operator"
fi
# trusted-entities.yaml maps a key id to the public key; the id is fpk_ and 16 hex digits of SHA-256
# over the key blob, the rule deploy/app_registry.py uses when it signs.
pub=$(cat "$out/app-signing/operator.pub")
id=$(awk '{print $2}' <<<"$pub" | base64 -d | sha256sum | cut -c1-16)
printf "fpk_%s: '%s'\n" "$id" "$pub" >"$out/trusted-entities.yaml"
chmod 644 "$out/trusted-entities.yaml"
echo "trusted entities: $out/trusted-entities.yaml (fpk_$id)"
