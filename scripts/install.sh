#!/bin/sh
# `make install`: l3net as a host service (the legacy-plugin way; `make plugin` is the
# managed-plugin way).
#
#   1. a virtualenv in $PREFIX (default /opt/l3net) with l3net and its dependencies;
#   2. l3net-plugin and l3netctl linked into $BINDIR (default /usr/local/bin);
#   3. the systemd unit (contrib/l3net-plugin.service, ExecStart pointing into $BINDIR) in
#      $UNITDIR (default /etc/systemd/system), and a commented settings file $DEFAULTS
#      (default /etc/default/l3net) unless one exists.
#
# It enables nothing: edit $DEFAULTS, then `systemctl daemon-reload && systemctl enable --now
# l3net-plugin`. Run it again to upgrade (the settings file is kept).
set -eu
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/opt/l3net}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
DEFAULTS=${DEFAULTS:-/etc/default/l3net}
say() { echo "install: $*"; }
die() { echo "install: $*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 not found (apt-get install python3 python3-venv)"
[ -x "$PREFIX/bin/pip" ] || python3 -m venv "$PREFIX" || die "cannot create a virtualenv in $PREFIX (apt-get install python3-venv)"
say "installing l3net into $PREFIX"
"$PREFIX/bin/pip" install --quiet --disable-pip-version-check --upgrade . || die "pip install failed"
mkdir -p "$BINDIR" "$UNITDIR" "$(dirname "$DEFAULTS")"
for tool in l3net-plugin l3netctl; do
    ln -sfn "$PREFIX/bin/$tool" "$BINDIR/$tool"
done
sed "s|/usr/local/bin/l3net-plugin|$BINDIR/l3net-plugin|; s|^EnvironmentFile=-/etc/default/l3net|EnvironmentFile=-$DEFAULTS|" \
    contrib/l3net-plugin.service >"$UNITDIR/l3net-plugin.service"
say "unit $UNITDIR/l3net-plugin.service (ExecStart $BINDIR/l3net-plugin)"
if [ ! -e "$DEFAULTS" ]; then
    cat >"$DEFAULTS" <<'DEFAULTS_EOF'
# l3net-plugin settings (README: Configuration). One VARIABLE=value per line.
#L3NET_ETCD_ENDPOINTS=http://127.0.0.1:2379
#L3NET_ETCD_PREFIX=/l3net
#L3NET_HOST_IP=
#L3NET_HOSTNAME=
#L3NET_LOG_LEVEL=info
#L3NET_LOG_FORMAT=text
#L3NET_METRICS_PORT=0
DEFAULTS_EOF
    chmod 0600 "$DEFAULTS"     # it may hold an etcd password
    say "settings $DEFAULTS (edit it)"
fi
if [ -d /run/systemd/system ] && [ "$UNITDIR" = /etc/systemd/system ]; then
    systemctl daemon-reload
    scripts/quiet-system-bird.sh
fi
for tool in bird birdc iptables-restore ipset conntrack; do
    command -v "$tool" >/dev/null || say "WARNING: $tool not found: apt-get install bird2 iptables ipset conntrack"
done
say "done: systemctl enable --now l3net-plugin"
