#!/bin/sh
# The distribution's bird.service (Debian starts it when bird2 is installed) runs a BIRD whose
# default configuration exports to the kernel: it takes l3net's routes (the same kernel route
# protocol, "proto bird") for its own stale ones and deletes them at every scan. l3net runs its
# own BIRD, so that one goes: disabled when its configuration is the package's unchanged
# default, a warning when someone changed it (then it is theirs: check its kernel protocol).
# Called by scripts/setup.sh and scripts/install.sh; does nothing without systemd.
set -u
[ -d /run/systemd/system ] || exit 0
systemctl is-enabled --quiet bird.service 2>/dev/null || systemctl is-active --quiet bird.service 2>/dev/null \
    || exit 0
conf=/etc/bird/bird.conf
want=$(dpkg-query -W -f='${Conffiles}\n' bird2 2>/dev/null | awk -v f="$conf" '$1 == f { print $2 }')
have=$(md5sum "$conf" 2>/dev/null | cut -d' ' -f1)
if [ -n "$want" ] && [ "$want" = "$have" ]; then
    if systemctl disable --now --quiet bird.service; then
        echo "l3net: disabled the distribution's bird.service (its default configuration would delete l3net's routes; l3net runs its own BIRD)"
    else
        echo "l3net: WARNING: could not disable bird.service: its kernel protocol deletes l3net's routes" >&2
    fi
else
    echo "l3net: WARNING: bird.service runs with a changed $conf: a kernel protocol in it deletes l3net's routes (proto bird); disable it or drop that protocol" >&2
fi
exit 0
