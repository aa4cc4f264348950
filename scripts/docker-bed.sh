#!/usr/bin/env bash
# `make test-docker DOCKER=26`: run l3net's tests against another Docker version, the way a user
# gets it: Debian's own packages of the suite that ships it, in a nested Docker host.
#
#   scripts/docker-bed.sh VERSION [pytest arguments...]
#
# VERSION is a Docker major version or a Debian suite: 20 (bookworm, Debian 12, Docker 20.10),
# 26 (trixie, Debian 13, Docker 26.1), 28 (sid, Debian unstable, Docker 28.5).
#
#   1. An image l3net-bed/SUITE:HASH: a debootstrapped rootfs of that suite (`docker import`),
#      with the packages `scripts/setup.sh --packages` installs there (docker.io, etcd, BIRD,
#      iptables on that suite's default backend, Compose...). Built once and kept; HASH follows
#      setup.sh and IMAGE_RECIPE below, so a change to either builds a new one.
#   2. A container of it, as a whole host: every capability the machine allows, its own
#      /var/lib/docker volume, /sys and /proc/sys writable, its own cgroup2 mount; this checkout
#      copied in (the working tree, not a commit), so uncommitted changes are tested too.
#   3. Inside: `scripts/setup.sh` (the same as `make setup` on that Debian: the .venv, a local
#      etcd, the suite's dockerd, the test image), then pytest with the arguments given
#      (default: the Docker-facing end-to-end tests, L3NET_BED_TESTS) and L3NET_REQUIRE_E2E=1.
#
#   scripts/docker-bed.sh VERSION --quickstart
#
# instead takes the suite's bare debootstrap (l3net-bed/SUITE-fresh:HASH, a fresh machine:
# nothing of l3net's installed) and does what the README's quick start says: `make run`, then
# the commands of its "Then, in another shell" block, each of which must succeed.
#
# The container is removed at the end, also on failure or Ctrl-C. pytest's JUnit report is
# copied to build/docker-bed/SUITE.xml. Needs a running dockerd here (make setup starts one)
# and debootstrap. L3NET_DEBIAN_MIRROR overrides the mirror; L3NET_BED_REBUILD=1 builds the
# image again.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
say() { echo "docker-bed: $*"; }
die() { echo "docker-bed: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: $0 20|26|28|bookworm|trixie|sid [pytest arguments...]"
case "$1" in
    20|bookworm) SUITE=bookworm ;;
    26|trixie)   SUITE=trixie ;;
    28|sid)      SUITE=sid ;;
    *) die "unknown Docker version or suite '$1': use 20 (Debian 12), 26 (Debian 13) or 28 (Debian unstable)" ;;
esac
shift
# The Docker-facing end-to-end tests: what dockerd, the docker CLI, Compose and the managed
# plugin see of l3net (the multi-host routing, policy and attack suites run their own dockerds
# too: `make test-docker DOCKER=26 TESTS=tests` runs everything).
DEFAULT_TESTS="tests/e2e/test_docker.py tests/e2e/test_networks.py tests/e2e/test_compose.py tests/e2e/test_docker_versions.py tests/e2e/test_managed_plugin.py"
if [ $# -eq 0 ]; then
    # shellcheck disable=SC2086
    set -- ${L3NET_BED_TESTS:-$DEFAULT_TESTS}
fi

[ "$(id -u)" = 0 ] || die "run as root"
command -v docker >/dev/null || die "docker not found (make setup)"
timeout 20 docker info >/dev/null 2>&1 || die "dockerd is not running here (make setup starts one)"
MIRROR=${L3NET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGE_RECIPE=1     # raise when build_image changes what goes into the image
HASH=$( (cat scripts/setup.sh; echo "$IMAGE_RECIPE") | sha256sum | cut -c1-12)
IMAGE=l3net-bed/$SUITE:$HASH
FRESH=l3net-bed/$SUITE-fresh:$HASH
NAME=l3net-bed-$SUITE-$$
OUT=$ROOT/build/docker-bed
CACHE=/var/cache/l3net-bed      # pip's cache, shared by the beds' .venv installs
mkdir -p "$OUT" "$CACHE/pip"

# The flags that make a container a Docker host on this machine (--privileged is refused: the
# machine withholds CAP_SYS_RESOURCE); --init: a PID 1 that reaps orphans, as a host's init does
# (a killed containerd's shims and containers are reparented to it).
HOST_FLAGS=(--init --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined
            --security-opt apparmor=unconfined --device-cgroup-rule 'a *:* rwm'
            --cgroupns private --tmpfs /run:rw,exec)
CERTS=/etc/ssl/certs/ca-certificates.crt
[ -f "$CERTS" ] && HOST_FLAGS+=(-v "$CERTS:$CERTS:ro")

build_image() {
    command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
    local root
    root=$(mktemp -d /var/tmp/l3net-bed-rootfs.XXXXXX)
    trap 'rm -rf "$root" "$root.log"' RETURN
    say "debootstrap $SUITE from $MIRROR (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,make,ca-certificates,iproute2,procps \
        "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; die "debootstrap $SUITE failed"; }
    # Debian unstable's Release file on a mirror may be past its Valid-Until date; inside this
    # test bed only (a real machine gets a fresh one), apt is told not to mind.
    [ "$SUITE" = sid ] && echo 'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/99l3net-bed"
    echo "deb $MIRROR $SUITE main" >"$root/etc/apt/sources.list"
    rm -rf "$root/var/cache/apt/archives/"*.deb
    tar -C "$root" -c . | docker import -c 'CMD ["sleep", "infinity"]' - "$FRESH" >/dev/null
    say "installing $SUITE's packages (scripts/setup.sh --packages)"
    local cid
    cid=$(docker create "${HOST_FLAGS[@]}" -v "$ROOT/scripts:/setup:ro" "$FRESH" /setup/setup.sh --packages)
    if ! docker start -a "$cid" >"$root.log" 2>&1; then
        docker rm -f "$cid" >/dev/null
        tail -20 "$root.log" >&2; die "installing the packages in the $SUITE image failed"
    fi
    docker commit -c 'CMD ["sleep", "infinity"]' "$cid" "$IMAGE" >/dev/null
    docker rm "$cid" >/dev/null
}

if [ "${L3NET_BED_REBUILD:-}" = 1 ] || ! docker image inspect "$IMAGE" "$FRESH" >/dev/null 2>&1; then
    build_image
    # older images of this suite are of no further use
    for repo in "l3net-bed/$SUITE" "l3net-bed/$SUITE-fresh"; do
        for old in $(docker images --format '{{.Repository}}:{{.Tag}}' "$repo"); do
            [ "$old" = "$IMAGE" ] || [ "$old" = "$FRESH" ] || docker rmi "$old" >/dev/null 2>&1 || true
        done
    done
fi
QUICKSTART=""
if [ "${1:-}" = --quickstart ]; then
    QUICKSTART=1
    IMAGE=$FRESH
fi

cleanup() { docker rm -f -v "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM
docker run -d --name "$NAME" --hostname "bed-$SUITE" "${HOST_FLAGS[@]}" \
    -v /var/lib/docker -v "$CACHE/pip:/root/.cache/pip" \
    -v "$ROOT:/src:ro" "$IMAGE" sleep infinity >/dev/null
# The checkout, less what belongs to this machine's own runs. IPTABLES=legacy|nft switches the
# bed's iptables (and so dockerd's and l3net's) to that backend first.
docker exec -e IPTABLES="${IPTABLES:-}" "$NAME" sh -ec '
    mount -o remount,rw /sys; mount -o remount,rw /proc/sys
    mount -t cgroup2 none /sys/fs/cgroup
    if [ -n "$IPTABLES" ]; then
        for t in iptables ip6tables; do update-alternatives --quiet --set $t /usr/sbin/$t-$IPTABLES; done
    fi
    mkdir /l3net
    tar -C /src --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./.git \
        --exclude=./.pytest_cache --exclude=./.hypothesis --exclude="*.egg-info" -c . | tar -C /l3net -x'
if [ -n "$QUICKSTART" ]; then
    # The README's commands after "Then, in another shell:", up to the end of that block.
    awk '/^Then, in another shell:/ {on=1; next} on && /^```sh/ {inblock=1; next}
         inblock && /^```/ {exit} inblock' README.md >"$OUT/quickstart.sh"
    [ -s "$OUT/quickstart.sh" ] || die "no quick start commands found in README.md"
    docker cp "$OUT/quickstart.sh" "$NAME:/quickstart.sh"
    say "Debian $SUITE, nothing installed: make run, then the README's quick start"
    rc=0
    docker exec -w /l3net "$NAME" sh -ec '
        setsid make run >/var/log/make-run.log 2>&1 </dev/null &
        deadline=$(( $(date +%s) + 900 ))
        until [ -S /run/docker/plugins/l3net.sock ] && docker info >/dev/null 2>&1; do
            if [ "$(date +%s)" -gt $deadline ] || ! kill -0 $! 2>/dev/null; then
                tail -30 /var/log/make-run.log; echo "make run did not serve the plugin" >&2; exit 1
            fi
            sleep 1
        done
        tail -3 /var/log/make-run.log
        version=$(dpkg-query -W -f "\${Version}" docker.io)
        echo "docker.io $version, $(iptables --version)"
        sh -ex /quickstart.sh' || rc=$?
    if [ $rc = 0 ]; then say "Debian $SUITE: make run and the quick start: passed"
    else say "Debian $SUITE: make run and the quick start: FAILED ($rc)"; fi
    exit $rc
fi
version=$(docker exec "$NAME" sh -c 'dpkg-query -W -f "\${Version}" docker.io')
backend=$(docker exec "$NAME" sh -c 'iptables --version')
say "Debian $SUITE, docker.io $version, $backend: scripts/setup.sh, then pytest $*"
rc=0
docker exec -e CI="${CI:-}" -e L3NET_REQUIRE_E2E=1 -w /l3net "$NAME" sh -ec '
    scripts/setup.sh
    exec .venv/bin/pytest -q -p no:cacheprovider --junitxml=/tmp/junit.xml "$@"' pytest "$@" || rc=$?
docker cp "$NAME:/tmp/junit.xml" "$OUT/$SUITE.xml" >/dev/null 2>&1 || true
if [ $rc = 0 ]; then say "Debian $SUITE (docker.io $version, $backend): passed"
else say "Debian $SUITE (docker.io $version, $backend): FAILED ($rc)"; fi
exit $rc
