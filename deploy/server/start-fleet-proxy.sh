#!/usr/bin/env bash
# Start the Fleet API proxy (nginx): the only listener on the device network. It forwards the Fleet
# API's calls to the SuperLink on 127.0.0.1 and refuses the Control and Runtime APIs (see
# fleet-proxy.conf.in for why).
#
# Settings (environment; flower-fleet-proxy.service sets them, /etc/default/flower-superlink overrides):
#   FEDMEF_PKI             folder with ca.crt, server.pem, server.key from make-pki.sh   (default: ./pki)
#   FEDMEF_PROXY_STATE_DIR nginx' pid, scratch space and access log                     (default: ./state/fleet-proxy)
#   FEDMEF_FLEET_HOST      address the devices connect to                                (default: 0.0.0.0)
#   FEDMEF_FLEET_PORT      port the devices connect to (HTTPS, the SuperNodes' --superlink) (default: 9092)
#   FEDMEF_PORT            the SuperLink's own port (start-superlink.sh)                 (default: 8000)
#   FEDMEF_SUPERLINK_HOST  where the SuperLink listens; its certificate must name it     (default: 127.0.0.1)
#   FEDMEF_PROXY_MAX_BODY  largest request body, nginx syntax                            (default: 512m)
# Needs nginx (Debian: apt-get install nginx-light); the server certificate must cover 127.0.0.1
# (make-pki.sh's default names do) as well as the address the devices use.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
pki=${FEDMEF_PKI:-./pki}
state=${FEDMEF_PROXY_STATE_DIR:-./state/fleet-proxy}
host=${FEDMEF_FLEET_HOST:-0.0.0.0}
port=${FEDMEF_FLEET_PORT:-9092}
upstream_port=${FEDMEF_PORT:-8000}
upstream_host=${FEDMEF_SUPERLINK_HOST:-127.0.0.1}
max_body=${FEDMEF_PROXY_MAX_BODY:-512m}

die() { echo "start-fleet-proxy.sh: $*" >&2; exit 1; }
nginx=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $nginx ]] || die "nginx is not installed: apt-get install nginx-light (or nginx)"
for file in ca.crt server.pem server.key; do
    [[ -r $pki/$file ]] || die "$pki/$file is missing or unreadable: make it with deploy/server/make-pki.sh or set FEDMEF_PKI"
done
[[ $port =~ ^[0-9]+$ && $upstream_port =~ ^[0-9]+$ ]] || die "FEDMEF_FLEET_PORT and FEDMEF_PORT must be port numbers"
[[ $port != "$upstream_port" || $upstream_host != 127.0.0.1 ]] || die "FEDMEF_FLEET_PORT and FEDMEF_PORT must differ: the proxy listens on one, the SuperLink on the other"
[[ $max_body =~ ^[0-9]+[kKmMgG]?$ ]] || die "FEDMEF_PROXY_MAX_BODY must look like 512m, got '$max_body'"
[[ $host =~ ^[A-Za-z0-9.:-]+$ ]] || die "FEDMEF_FLEET_HOST must be an address, got '$host'"
[[ $upstream_host =~ ^[A-Za-z0-9.-]+$ ]] || die "FEDMEF_SUPERLINK_HOST must be a host name or IPv4 address, got '$upstream_host'"
mkdir -p "$state" || die "cannot create $state: set FEDMEF_PROXY_STATE_DIR to a writable place"
state=$(cd "$state" && pwd)
pki=$(cd "$pki" && pwd)

# the name nginx checks the SuperLink's certificate for: nginx matches DNS names only, never IP
# addresses, so loopback is checked as "localhost" (make-pki.sh always puts it in the certificate)
upstream_name=$upstream_host
[[ $upstream_host == 127.0.0.1 ]] && upstream_name=localhost
listen="$host:$port"
[[ $host == *:* ]] && listen="[$host]:$port"
conf="$state/fleet-proxy.conf"
sed -e "s|@STATE@|$state|g" -e "s|@PKI@|$pki|g" -e "s|@LISTEN@|$listen|g" \
    -e "s|@UPSTREAM@|$upstream_host:$upstream_port|g" -e "s|@UPSTREAM_NAME@|$upstream_name|g" \
    -e "s|@MAX_BODY@|$max_body|g" -e "s|@ACCESS_LOG@|$state/access.log|g" \
    "$here/fleet-proxy.conf.in" >"$conf"
# a broken configuration is reported here, with nginx' own words, not as a silent exit
"$nginx" -t -q -e stderr -p "$state" -c "$conf" || die "nginx rejected $conf (see above)"
# exec, in the foreground: systemd and tests see nginx itself
exec "$nginx" -e stderr -p "$state" -c "$conf" -g "daemon off;"
