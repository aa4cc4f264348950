#!/bin/sh
# `make plugin`: build l3net as a Docker managed plugin and enable it on the local dockerd.
#
#   1. a Debian base image whose Python is the one that builds the wheels (some wheels, grpcio's,
#      are for one Python version): Python 3.11 -> bookworm (Debian 12), 3.13 -> trixie (Debian
#      13), 3.14 -> sid (unstable); debian:SUITE-slim if dockerd has it, else one made here with
#      debootstrap (with the packages the plugin needs) + docker import (no registry needed);
#      L3NET_PLUGIN_BASE=IMAGE chooses another;
#   2. wheels of l3net and its dependencies, built on this host (dist/wheels);
#   3. the plugin image (Dockerfile), its filesystem exported as the plugin's rootfs, with
#      plugin.json as its config.json;
#   4. docker plugin create NAME, docker plugin set (etcd, host name, ...), docker plugin enable.
#
# Settings come from the environment: L3NET_PLUGIN_NAME (default l3net:latest) and the plugin's
# own variables (L3NET_ETCD_ENDPOINTS, L3NET_ETCD_PREFIX, L3NET_HOST_IP, L3NET_HOSTNAME,
# L3NET_LOG_LEVEL, L3NET_NO_BGP), passed to `docker plugin set` when set.
#
# Upgrade: run it again. An existing plugin of that name is replaced, and keeps its settings
# (every settable variable, and the state mount's source) unless the environment gives new ones.
#
# L3NET_PLUGIN_NO_ENABLE=1 stops after create+set; L3NET_PLUGIN_ROOTFS_ONLY=1 stops once
# build/plugin (rootfs + config.json) is ready, for `docker plugin create` elsewhere.
# L3NET_PLUGIN_DIR=DIR skips steps 1-3 and installs the plugin directory DIR built earlier
# (build once, install on many hosts: DOCKER_HOST selects the dockerd).
set -eu
cd "$(dirname "$0")/.."
NAME=${L3NET_PLUGIN_NAME:-l3net:latest}
IMAGE=l3net/plugin-image:latest
BUILD=build/plugin
PY=${PYTHON:-}
say() { echo "plugin: $*"; }
die() { echo "plugin: $*" >&2; exit 1; }

command -v docker >/dev/null || die "docker not found"
docker info >/dev/null 2>&1 || die "dockerd is not running"

# A Python (wheels, and reading config.json): the checkout's .venv (make setup), else one made
# here; a production node needs no `make setup` (no local etcd, no test tools) for this.
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then
        PY=.venv/bin/python
    else
        command -v python3 >/dev/null || die "python3 not found (apt-get install python3 python3-venv)"
        [ -x build/wheel-venv/bin/python ] || python3 -m venv build/wheel-venv \
            || die "cannot create a virtualenv (apt-get install python3-venv)"
        PY=build/wheel-venv/bin/python
    fi
fi

# The Debian suite whose python3 is the wheels' Python.
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "$PY does not run"
case "$pyver" in
    3.11) SUITE=bookworm ;;
    3.13) SUITE=trixie ;;
    3.14) SUITE=sid ;;
    *) SUITE="" ;;
esac
if [ -n "${L3NET_PLUGIN_BASE:-}" ]; then
    BASE=$L3NET_PLUGIN_BASE
else
    [ -n "$SUITE" ] || die "no Debian release has Python $pyver as python3 (wheels are built by $PY): \
set PYTHON to a Python 3.11, 3.13 or 3.14, or L3NET_PLUGIN_BASE to an image with Python $pyver"
    BASE=debian:$SUITE-slim
fi
LOCAL_BASE=l3net/debian-base:$SUITE

build() {
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    [ -z "${L3NET_PLUGIN_BASE:-}" ] || die "no image $BASE on this dockerd"
    if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || die "no $BASE image and no debootstrap: apt-get install debootstrap"
        MIRROR=${L3NET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
        root=$(mktemp -d)
        trap 'rm -rf "$root"' EXIT
        say "no $BASE image: building $LOCAL_BASE with debootstrap from $MIRROR (a few minutes)"
        debootstrap --variant=minbase --include="$(sed -n 's/^ARG PACKAGES="\(.*\)"$/\1/p' Dockerfile | tr ' ' ,)" \
            "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
            || die "debootstrap failed; see $root.log"
        rm -rf "$root/var/cache/apt/archives/"*.deb "$root.log"
        tar -C "$root" -c . | docker import - "$LOCAL_BASE" >/dev/null
        rm -rf "$root"
        trap - EXIT
    fi
    BASE=$LOCAL_BASE
fi
say "base image $BASE"

say "building wheels (dist/wheels)"
rm -rf dist/wheels
mkdir -p build
"$PY" -m pip wheel --quiet --wheel-dir dist/wheels . >build/wheels.log 2>&1 \
    || { cat build/wheels.log >&2; die "building wheels failed"; }

say "building the plugin image $IMAGE"
docker build --quiet --build-arg "BASE=$BASE" -t "$IMAGE" . >build/image.log 2>&1 \
    || { cat build/image.log >&2; die "building the image failed"; }

say "exporting its filesystem to $BUILD/rootfs"
rm -rf "$BUILD"
mkdir -p "$BUILD/rootfs"
cid=$(docker create "$IMAGE")
docker export "$cid" | tar -x -C "$BUILD/rootfs"
docker rm "$cid" >/dev/null
cp plugin.json "$BUILD/config.json"
}

if [ -n "${L3NET_PLUGIN_DIR:-}" ]; then
    [ -f "$L3NET_PLUGIN_DIR/config.json" ] && [ -d "$L3NET_PLUGIN_DIR/rootfs" ] \
        || die "$L3NET_PLUGIN_DIR is not a plugin directory (config.json + rootfs/)"
    BUILD=$L3NET_PLUGIN_DIR
else
    build
fi
if [ "${L3NET_PLUGIN_ROOTFS_ONLY:-}" = 1 ]; then
    say "plugin directory ready: $BUILD"
    exit 0
fi

# The settings: those of the plugin being replaced, then those given in the environment.
settable=$("$PY" -c 'import json, sys
print(" ".join(e["name"] for e in json.load(open(sys.argv[1]))["env"] if "value" in e.get("settable", [])))' \
    "$BUILD/config.json") || die "cannot read $BUILD/config.json"
set --
old_hostname=""
if docker plugin inspect "$NAME" >/dev/null 2>&1; then
    old_env=$(docker plugin inspect -f '{{range .Settings.Env}}{{println .}}{{end}}' "$NAME")
    old_state=$(docker plugin inspect -f '{{range .Settings.Mounts}}{{if eq .Name "state"}}{{.Source}}{{end}}{{end}}' "$NAME")
    while IFS= read -r line; do
        var=${line%%=*}
        case " $settable " in *" $var "*) set -- "$@" "$line" ;; esac
        if [ "$var" = L3NET_HOSTNAME ]; then old_hostname=${line#*=}; fi
    done <<SETTINGS
$old_env
SETTINGS
    if [ -n "$old_state" ]; then set -- "$@" "state.source=$old_state"; fi
    say "replacing the existing plugin $NAME (keeping its settings)"
    docker plugin disable -f "$NAME" >/dev/null 2>&1 || true
    docker plugin rm -f "$NAME" >/dev/null
fi
for var in L3NET_ETCD_ENDPOINTS L3NET_ETCD_PREFIX L3NET_HOST_IP L3NET_HOSTNAME L3NET_LOG_LEVEL L3NET_NO_BGP; do
    eval "value=\${$var:-}"
    if [ -n "$value" ]; then set -- "$@" "$var=$value"; fi
done
[ -n "${L3NET_HOSTNAME:-}$old_hostname" ] || set -- "$@" "L3NET_HOSTNAME=$(hostname -s)"
if [ -z "${DOCKER_HOST:-}" ]; then
    mkdir -p /var/lib/l3net     # the state mount's default source (dockerd does not create it)
    scripts/quiet-system-bird.sh
fi
docker plugin create "$NAME" "$BUILD" >/dev/null
docker plugin set "$NAME" "$@"
if [ "${L3NET_PLUGIN_NO_ENABLE:-}" = 1 ]; then
    say "created $NAME (not enabled)"
    exit 0
fi
docker plugin enable --timeout 60 "$NAME" >/dev/null
say "enabled $NAME: docker network create -d $NAME --ipam-driver $NAME --subnet CIDR NAME"
