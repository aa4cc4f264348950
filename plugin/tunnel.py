"""The VXLAN device and its routes (netlink via pyroute2): side effects only, the decisions are
encap.py's.

One device per node, ``l3vxlan`` (VNI 4096, UDP 4789, source: the node's address, no
learning), present only while a pool needs it. What the calculation wants is written with
"replace" (idempotent) and what it no longer wants removed: the tunnel routes (their own route
protocol number, so nothing else's is touched), the neighbour entries and the forwarding
entries on the device. No multicast, no flooding.
"""

import errno
import logging
import socket
import time

from pyroute2.netlink.exceptions import NetlinkError

from core.errors import L3netError

from . import datapath
from .encap import DEVICE, OVERHEAD, PORT, VNI, vtep_mac

log = logging.getLogger("l3net.tunnel")

ROUTE_PROTO = 76        # the tunnel routes (the veths' /32 routes are datapath.ROUTE_PROTO)
METRIC = 16             # before BIRD's (32): a pool that is tunnelled to a node goes through the tunnel
ONLINK = 4              # RTNH_F_ONLINK
NTF_SELF = 2
NUD_PERMANENT = 0x80
IFF_UP = 1


class Tunnel:
    def __init__(self):
        self.applied = None         # the TunnelState in force (None: unknown)
        self._routes_checked = float("-inf")

    def apply(self, state):
        """Make the device, its routes and entries what ``state`` says. Returns a short
        description of what changed, or None."""
        if state == self.applied and self.device_ok(state):
            return None
        ipr = datapath._ipr()
        if not state:
            gone = self._remove(ipr)
            self.applied = state
            return "tunnel removed" if gone else None
        idx = self._device(ipr, state.local)
        wanted_neigh = dict(state.peers)
        for ip, mac in sorted(wanted_neigh.items()):
            ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=idx, state=NUD_PERMANENT)
            ipr.neigh("replace", family=socket.AF_BRIDGE, ifindex=idx, lladdr=mac, dst=ip,
                      state=NUD_PERMANENT, flags=NTF_SELF)
        for prefix, via in sorted(state.routes.items()):
            ipr.route("replace", dst=prefix, gateway=via, oif=idx, flags=ONLINK, proto=ROUTE_PROTO,
                      priority=METRIC)
        removed = 0
        for route in ipr.get_routes(family=socket.AF_INET, proto=ROUTE_PROTO):
            prefix = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
            if route.get_attr("RTA_OIF") != idx or state.routes.get(prefix) != route.get_attr("RTA_GATEWAY"):
                _quietly(ipr.route, "del", dst=prefix, oif=route.get_attr("RTA_OIF"), proto=ROUTE_PROTO,
                         priority=route.get_attr("RTA_PRIORITY"))
                removed += 1
        for family in (socket.AF_INET, socket.AF_BRIDGE):
            for entry in ipr.get_neighbours(family=family, ifindex=idx):
                dst, mac = entry.get_attr("NDA_DST"), entry.get_attr("NDA_LLADDR")
                if dst and wanted_neigh.get(dst) != mac and (family == socket.AF_INET or mac != "00:00:00:00:00:00"):
                    kw = {"family": family, "flags": NTF_SELF} if family == socket.AF_BRIDGE else {}
                    _quietly(ipr.neigh, "del", dst=dst, lladdr=mac, ifindex=idx, **kw)
        self.applied = state
        return f"tunnel: {len(state.routes)} routes to {len(state.peers)} nodes (-{removed})"

    @staticmethod
    def device_ok(state):
        """Whether the device is there exactly when ``state`` needs it."""
        return (datapath._index(DEVICE) is not None) == bool(state)

    ROUTES_EVERY = 30.0     # seconds between checks of the tunnel's routes and entries

    def drift(self, now=None):
        """What differs from the state last applied (a reason), or None: the device there
        exactly when needed (an ioctl, at every check), and, while it is, every ROUTES_EVERY
        seconds as many tunnel routes and neighbour entries on it as were written (a route
        dump: its cost grows with the host's routes, so not every 2 s)."""
        state = self.applied
        if state is None:
            return None
        if not self.device_ok(state):
            return f"{DEVICE} is {'gone' if state else 'there unwanted'}"
        now = time.monotonic() if now is None else now
        if not state or now - self._routes_checked < self.ROUTES_EVERY:
            return None
        self._routes_checked = now
        ipr, idx = datapath._ipr(), datapath._index(DEVICE)
        routes = sum(1 for r in ipr.get_routes(family=socket.AF_INET, oif=idx, proto=ROUTE_PROTO)
                     if r.get_attr("RTA_OIF") == idx)
        if routes != len(state.routes):
            return f"{DEVICE} has {routes} tunnel routes, not {len(state.routes)}"
        link = ipr.get_links(idx)[0]
        if not link["flags"] & IFF_UP:
            return f"{DEVICE} is down"
        neigh = {n.get_attr("NDA_DST") for n in ipr.get_neighbours(family=socket.AF_INET, ifindex=idx)
                 if n["state"] == NUD_PERMANENT}
        if not set(state.peers) <= neigh:
            return f"{DEVICE} lacks neighbour entries"
        fdb = {n.get_attr("NDA_DST") for n in ipr.get_neighbours(family=socket.AF_BRIDGE, ifindex=idx)}
        if not set(state.peers) <= fdb:
            return f"{DEVICE} lacks forwarding entries"
        return None

    def _device(self, ipr, local):
        """The device's index, created (or re-created, when its settings are not ours)."""
        idx = datapath._index(DEVICE)
        if idx is not None and not _ours(ipr, idx, local):
            log.warning("%s has other settings than l3net's: re-creating it", DEVICE)
            ipr.link("del", index=idx)
            idx = None
        if idx is None:
            mtu = (datapath.uplink_mtu() or 1500) - OVERHEAD
            try:
                ipr.link("add", ifname=DEVICE, kind="vxlan", vxlan_id=VNI, vxlan_local=local,
                         vxlan_port=PORT, vxlan_learning=0, address=vtep_mac(local), mtu=mtu)
            except NetlinkError as e:
                if e.code == errno.EEXIST and datapath._index(DEVICE) is None:
                    raise L3netError(f"could not create {DEVICE}: another VXLAN device of this host uses "
                                     f"VNI {VNI} on UDP port {PORT} (Calico's vxlan.calico, Docker's overlay?)"
                                     ) from None
                if e.code != errno.EEXIST:
                    raise L3netError(f"could not create {DEVICE}: {e}") from None
            idx = datapath._index(DEVICE)
            if idx is None:
                raise L3netError(f"{DEVICE} vanished as it was created")
            datapath.ipv6_off(DEVICE)
            log.info("created %s (VNI %d, UDP %d, local %s, MTU %d)", DEVICE, VNI, PORT, local, mtu)
        ipr.link("set", index=idx, state="up")      # (also one someone set down: its routes went)
        return idx

    @staticmethod
    def _remove(ipr):
        idx = datapath._index(DEVICE)
        if idx is None:
            return False
        ipr.link("del", index=idx)          # its routes and entries go with it
        log.info("removed %s: no pool needs it", DEVICE)
        return True


def _ours(ipr, idx, local):
    try:
        link = ipr.get_links(idx)[0]
        info = link.get_attr("IFLA_LINKINFO")
        data = info.get_attr("IFLA_INFO_DATA") if info else None
        return bool(data) and info.get_attr("IFLA_INFO_KIND") == "vxlan" and \
            data.get_attr("IFLA_VXLAN_ID") == VNI and data.get_attr("IFLA_VXLAN_LOCAL") == local and \
            data.get_attr("IFLA_VXLAN_PORT") == PORT and link.get_attr("IFLA_ADDRESS") == vtep_mac(local)
    except (NetlinkError, IndexError):
        return False


def _quietly(call, *args, **kw):
    try:
        call(*args, **kw)
    except NetlinkError as e:
        if e.code not in (errno.ESRCH, errno.ENOENT, errno.EINVAL):
            raise
