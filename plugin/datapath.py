"""The data path: veth pairs, host routes and per-interface sysctls (netlink via pyroute2).

Side effects only; no decisions. The shape, for a container with address 10.20.0.5:

    container netns                    host (root netns)
    eth0 10.20.0.5/32  <-- veth -->  l3<endpoint id[:11]>   proxy_arp=1, proxy_delay=0
    169.254.1.1 dev eth0 scope link   10.20.0.5 dev l3... scope link      (the /32 route)
    default via 169.254.1.1

The container has no on-link neighbours: it ARPs for 169.254.1.1, the host side answers with
its own MAC (proxy ARP: the host has a route to that address elsewhere), so every packet goes
to the host, which routes it. No bridge, no encapsulation.
"""

import errno
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import L3netError

log = logging.getLogger("l3net.datapath")

HOST_PREFIX = "l3"      # l3 + 11 hex chars: host side, named from the endpoint ID
TEMP_PREFIX = "l3t"     # l3t + 11 hex chars: container side until dockerd moves it ("t" is not hex)
ROUTE_PROTO = 4         # "static": the /32 routes we install


def host_ifname(endpoint_id):
    return HOST_PREFIX + endpoint_id[:11]


def temp_ifname(endpoint_id):
    return TEMP_PREFIX + endpoint_id[:11]


def _sysctl(path, value):
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(str(value))


def _index(ipr, ifname):
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def link_exists(ifname):
    with IPRoute() as ipr:
        return _index(ipr, ifname) is not None


def link_mac(ifname):
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return None
        return ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")


def create_veth(host_if, temp_if):
    """Create the pair; return the MAC of the container side."""
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": temp_if})
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise L3netError(f"failed to create veth {host_if}: {e}") from None
        idx = _index(ipr, temp_if)
        if idx is None:
            raise L3netError(f"failed to create veth {host_if}: peer {temp_if} missing")
        return ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")


def setup_host_veth(host_if, address):
    """Bring the host side up as the container's router and route the /32 to it."""
    with IPRoute() as ipr:
        idx = _index(ipr, host_if)
        if idx is None:
            raise L3netError(f"host interface {host_if} disappeared")
        ipr.link("set", index=idx, state="up")
        # proxy_arp: answer the container's ARP for 169.254.1.1 with our MAC.
        # proxy_delay=0: answer at once (the default delays proxy replies by up to 0.8 s).
        _sysctl(f"net/ipv4/conf/{host_if}/proxy_arp", 1)
        _sysctl(f"net/ipv4/neigh/{host_if}/proxy_delay", 0)
        _sysctl(f"net/ipv4/conf/{host_if}/forwarding", 1)
        ipr.route("replace", dst=f"{address}/32", oif=idx, scope=253, proto=ROUTE_PROTO)


def enable_forwarding():
    _sysctl("net/ipv4/ip_forward", 1)


def delete_veth(host_if):
    """Delete the pair (and with it the /32 route). Idempotent: the device may already be gone
    (a container whose netns died takes its veth with it, and dockerd may re-send the call)."""
    with IPRoute() as ipr:
        idx = _index(ipr, host_if)
        if idx is None:
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise L3netError(f"failed to delete {host_if}: {e}") from None
        return True


def list_host_veths():
    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return [n for n in names if n and n.startswith(HOST_PREFIX) and not n.startswith(TEMP_PREFIX)]


class Datapath:
    """The data path as an object, so tests of the HTTP layer can substitute a fake."""

    host_ifname = staticmethod(host_ifname)
    temp_ifname = staticmethod(temp_ifname)
    link_exists = staticmethod(link_exists)

    def create(self, endpoint_id, address):
        """Create the veth for an endpoint and route ``address`` to it. Rolls back on failure.
        Returns the container side's MAC."""
        host_if, temp_if = host_ifname(endpoint_id), temp_ifname(endpoint_id)
        mac = create_veth(host_if, temp_if)
        try:
            setup_host_veth(host_if, address)
        except Exception:
            delete_veth(host_if)
            raise
        return mac

    def delete(self, endpoint_id):
        return delete_veth(host_ifname(endpoint_id))

    def prepare_host(self):
        """Host-wide settings routed containers need: IPv4 forwarding and a FORWARD accept."""
        from .firewall import ensure_forward

        enable_forwarding()
        ensure_forward()
