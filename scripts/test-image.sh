#!/bin/sh
# Build the test image l3net-test/busybox from the host's busybox-static (no registry needed).
set -eu
IMAGE=${1:-l3net-test/busybox:latest}
BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || { echo "busybox not found: apt-get install busybox-static" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/bin" "$dir/etc" "$dir/tmp"
cp "$BUSYBOX" "$dir/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$dir/bin/$applet"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$dir/etc/passwd"
tar -C "$dir" -c . | docker import -c 'ENV PATH=/bin' - "$IMAGE" >/dev/null
echo "built $IMAGE"
