#!/usr/bin/env bash
# Prepare a Debian host for l3net (12 "bookworm", 13 "trixie" or unstable; idempotent; as root):
#   1. install the Debian packages that are missing (`--packages`: this step alone),
#   2. create .venv with l3net and its test tools,
#   3. start a local etcd and a dockerd when none is running,
#   4. build the busybox test image when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

LOGDIR=/var/log/l3net
ETCD_DATA=/var/lib/l3net/etcd
PACKAGES=(docker.io etcd-server etcd-client bird2 iptables ipset busybox-static iproute2 iperf3
          iputils-ping python3 python3-venv procps debootstrap conntrack docker-compose)

say() { echo "setup: $*"; }
die() { echo "setup: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (the plugin manages interfaces, routes and iptables)"

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
export DEBIAN_FRONTEND=noninteractive
updated=""
install() {
    say "installing $*"
    [ -n "$updated" ] || apt-get update -qq
    updated=1
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
[ ${#missing[@]} -eq 0 ] || install "${missing[@]}"
# The docker command: part of docker.io up to Debian 12; from Debian 13 on, its own package
# docker-cli, which docker.io only recommends (and recommends are not installed here).
if [ ! -x /usr/bin/docker ]; then
    install docker-cli
fi
[ "${1:-}" != --packages ] || exit 0

scripts/quiet-system-bird.sh

if [ ! -x .venv/bin/l3net-plugin ] || [ setup.cfg -nt .venv/.installed ]; then
    say "installing l3net into .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch .venv/.installed
fi

mkdir -p "$LOGDIR"
if ! etcdctl --endpoints=http://127.0.0.1:2379 --command-timeout=2s endpoint health >/dev/null 2>&1; then
    say "starting etcd on 127.0.0.1:2379 (data $ETCD_DATA, log $LOGDIR/etcd.log)"
    mkdir -p "$ETCD_DATA"
    setsid nohup etcd --name l3net-local --data-dir "$ETCD_DATA" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 \
        --auto-compaction-mode periodic --auto-compaction-retention 1h \
        >>"$LOGDIR/etcd.log" 2>&1 < /dev/null &
    for _ in $(seq 60); do
        etcdctl --endpoints=http://127.0.0.1:2379 --command-timeout=1s endpoint health >/dev/null 2>&1 && break
        sleep 0.5
    done
    etcdctl --endpoints=http://127.0.0.1:2379 endpoint health >/dev/null 2>&1 || die "etcd did not start; see $LOGDIR/etcd.log"
fi

if ! timeout 20 docker info >/dev/null 2>&1; then
    say "starting dockerd (log $LOGDIR/dockerd.log)"
    setsid nohup dockerd >>"$LOGDIR/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 120); do
        timeout 5 docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    timeout 20 docker info >/dev/null 2>&1 || die "dockerd did not start; see $LOGDIR/dockerd.log"
fi

if ! docker image inspect l3net-test/busybox:latest >/dev/null 2>&1; then
    scripts/test-image.sh
fi
say "ready"
