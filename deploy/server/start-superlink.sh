#!/usr/bin/env bash
# Start the federation's SuperLink: TLS, SuperNode authentication, state kept in a database file.
#
# Settings (environment; flower-superlink.service sets them, /etc/default/flower-superlink overrides):
#   FEDMEF_PKI        folder with ca.crt, server.pem, server.key from make-pki.sh   (default: ./pki)
#   FEDMEF_STATE_DIR  where the SuperLink's database and Flower's files live        (default: ./state)
#   FEDMEF_HOST       address to listen on                                           (default: 127.0.0.1)
#   FEDMEF_PORT       the one port of Fleet, Control and Runtime APIs (HTTPS)        (default: 8000)
#   FEDMEF_EXPOSE_CONTROL_API  1: allow a FEDMEF_HOST other than loopback             (default: 0)
#   FEDMEF_REGISTRY_PORT  the app registry on 127.0.0.1 (python -m deploy.app_registry serve),
#                     where `flwr run @fedmef/fedmef==X.Y.Z` finds signed releases     (default: 9093)
# That one port carries the Control API, which has no account authentication in flwr 1.41/1.42:
# anyone who reaches it can register keys, start and stop runs. So the SuperLink stays on loopback;
# the devices reach the Fleet API through start-fleet-proxy.sh, and the operator runs `flwr` on this
# server or through an SSH tunnel (deploy/README.md).
#   FEDMEF_NODE_AUTH  1: only SuperNodes whose key is registered may join; 0: any    (default: 1)
# The flwr 1.42 venv with this project installed (make .venv/.installed) must be first on PATH:
# the SuperLink starts flower-superexec by name, and that runs the ServerApp.
set -euo pipefail

pki=${FEDMEF_PKI:-./pki}
state=${FEDMEF_STATE_DIR:-./state}
host=${FEDMEF_HOST:-127.0.0.1}
expose=${FEDMEF_EXPOSE_CONTROL_API:-0}
port=${FEDMEF_PORT:-8000}
node_auth=${FEDMEF_NODE_AUTH:-1}

die() { echo "start-superlink.sh: $*" >&2; exit 1; }
for tool in flower-superlink flower-superexec; do
    command -v "$tool" >/dev/null || die "$tool is not on PATH: put the project's venv (flwr 1.42.0) first on PATH"
done
for file in ca.crt server.pem server.key; do
    [[ -r $pki/$file ]] || die "$pki/$file is missing or unreadable: make it with deploy/server/make-pki.sh or set FEDMEF_PKI"
done
[[ $port =~ ^[0-9]+$ ]] || die "FEDMEF_PORT must be a port number, got '$port'"
case $host in
    127.*|::1|localhost) ;;
    *) [[ $expose == 1 ]] || die "FEDMEF_HOST=$host would put the Control API on the network, where anyone holding ca.crt can start runs and register devices: keep 127.0.0.1 and let the devices in through start-fleet-proxy.sh (set FEDMEF_EXPOSE_CONTROL_API=1 only on an isolated test network)" ;;
esac
mkdir -p "$state" || die "cannot create the state folder $state: set FEDMEF_STATE_DIR to a writable place"

# Offline Flower: no telemetry or update check, and no run-time `uv sync` of the app's dependencies
# (it would fetch a CUDA torch); the venv already holds them.
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=${FLWR_HOME:-$state/flwr-home}
# Flower looks up `@publisher/app==x.y.z` at this hub: the federation's own registry, never the internet
registry_port=${FEDMEF_REGISTRY_PORT:-9093}
[[ $registry_port =~ ^[0-9]+$ ]] || die "FEDMEF_REGISTRY_PORT must be a port number, got '$registry_port'"
export FLWR_SUPERGRID_API_URL=http://127.0.0.1:$registry_port

args=(--ssl-ca-certfile "$pki/ca.crt" --ssl-certfile "$pki/server.pem" --ssl-keyfile "$pki/server.key"
      # a file, so registered SuperNodes and runs survive a restart; without it every SuperNode
      # gets 401 after a restart and has to be registered again
      --database "$state/superlink.db"
      --host "$host" --port "$port" --disable-runtime-dependency-installation)
case $node_auth in
    1) args+=(--enable-supernode-auth) ;;
    0) echo "start-superlink.sh: FEDMEF_NODE_AUTH=0: any SuperNode that trusts the CA may join" >&2 ;;
    *) die "FEDMEF_NODE_AUTH must be 1 or 0, got '$node_auth'" ;;
esac
# exec: systemd and tests see the SuperLink itself, not this shell
exec flower-superlink "${args[@]}"
