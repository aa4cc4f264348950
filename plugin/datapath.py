"""The data path: veth pairs, host routes and per-interface sysctls (netlink via pyroute2).

Side effects only; no decisions. The shape, for a container with address 10.20.0.5:

    container netns                    host (root netns)
    eth0 10.20.0.5/32  <-- veth -->  l3<endpoint id[:11]>   proxy_arp=1, proxy_delay=0
    169.254.1.1 dev eth0 scope link   10.20.0.5 dev l3... scope link      (the /32 route)
    default via 169.254.1.1

The container has no on-link neighbours: it ARPs for 169.254.1.1, the host side answers with
its own MAC (proxy ARP: the host has a route to that address elsewhere), so every packet goes
to the host, which routes it. No bridge, no encapsulation. (169.254.1.1 is the gateway of a
host's first network; each further network has its own, 169.254.1.2 and so on, so that a
container on several networks has one on-link gateway route per interface: see driver.py.)

l3net is IPv4-only, and the host side of a veth is an ordinary interface: left alone, it would
get an IPv6 link-local address and accept router advertisements, so one crafted RA from a
container (Docker's default NET_RAW is enough) would give the host a default route through the
container. So IPv6 is switched off on the host side *before the link comes up* (no address is
ever configured, no RA ever processed); firewall.py drops IPv6 to and from the veths as well.
"""

import errno
import logging
import os
import socket
import threading

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from core.errors import L3netError, run_tool
from core.names import HOST_PREFIX, host_ifname, temp_ifname  # noqa: F401 (datapath.host_ifname)

log = logging.getLogger("l3net.datapath")

ROUTE_PROTO = 4         # "static": the /32 routes we install


class LinkExists(L3netError):
    """The endpoint's veth is already there (a re-sent call, or a leftover)."""




def host_port_free(proto, host_ip, port):
    """Whether a host process holds ``port`` (a TCP listener, a bound UDP socket): the DNAT
    of a published port would steal its traffic. SO_REUSEADDR so that connections in
    TIME_WAIT do not count."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host_ip or "0.0.0.0", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            if e.errno == errno.EADDRNOTAVAIL:
                raise L3netError(f"{host_ip} is not an address of this host") from None
            raise
    return True


def forget_flows(address):
    """Delete the connection-tracking entries of a container's address (it sent them, they
    were sent to it, or to a port published for it): the address goes to the next container,
    and an old flow, a UDP one above all, must not reach it as "established"."""
    for match in ("--orig-src", "--reply-src"):     # sent by it; sent to it, DNATed or not
        try:
            res = run_tool(["conntrack", "-D", match, address], "install conntrack", timeout=10)
        except L3netError as e:
            log.warning("old connections of %s not forgotten: %s", address, e)
            return
        if res.returncode not in (0, 1):       # 1: no entry matched
            log.warning("conntrack -D %s %s: %s", match, address, res.stderr.strip())


# Where the host's /proc/sys is: a managed plugin sees a read-only /proc/sys and gets the
# host's /proc mounted at /host/proc instead (plugin.json sets L3NET_PROC_SYS).
PROC_SYS = os.environ.get("L3NET_PROC_SYS", "/proc/sys")


def _sysctl(path, value):
    try:
        with open(f"{PROC_SYS}/{path}", "w") as f:
            f.write(str(value))
    except OSError as e:
        raise L3netError(f"cannot set {path.replace('/', '.')}={value}: {e.strerror} "
                         "(l3net needs a writable /proc/sys)") from None


_local = threading.local()


def _ipr():
    """One netlink socket per thread, kept open: opening one costs about a millisecond."""
    ipr = getattr(_local, "ipr", None)
    if ipr is None:
        ipr = _local.ipr = IPRoute()
    return ipr


def _index(ifname):
    """Interface index in this process's network namespace, or None. (An ioctl: about 100
    times cheaper than asking netlink, which decodes the whole link message.)"""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def link_exists(ifname):
    return _index(ifname) is not None


def link_mac(ifname):
    try:
        return _ipr().link("get", ifname=ifname)[0].get_attr("IFLA_ADDRESS")
    except NetlinkError:
        return None


def random_mac():
    """A locally administered unicast MAC (what the kernel would pick, chosen by us so the
    container side's address is known without asking netlink again)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def create_veth(host_if, temp_if, mac, mtu=None):
    """Create the pair, both sides down, container side with ``mac``, both with ``mtu`` (the
    kernel's default when None). Returns the host index."""
    extra = {"mtu": mtu} if mtu else {}
    try:
        _ipr().link("add", ifname=host_if, kind="veth", **extra,
                    peer={"ifname": temp_if, "address": mac, **extra})
    except NetlinkError as e:
        if e.code == errno.EEXIST:
            raise LinkExists(f"interface {host_if} or {temp_if} already exists") from None
        raise L3netError(f"failed to create veth {host_if}: {e}") from None
    idx = _index(host_if)
    if idx is None:
        raise L3netError(f"failed to create veth {host_if}: it vanished")
    return idx


def ipv6_off(ifname):
    """No IPv6 on ``ifname``: no RA taken, then no IPv6 at all (which also drops any address
    and route it had). Nothing to do on a kernel without IPv6."""
    if not os.path.isdir(f"{PROC_SYS}/net/ipv6/conf/{ifname}"):
        return
    _sysctl(f"net/ipv6/conf/{ifname}/accept_ra", 0)
    _sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", 1)


def setup_host_veth(host_if, idx, address, owner=None, mac=None):
    """Make the host side the container's router and route the /32 to it. The link is down
    until its settings are in place: it never has an IPv6 address, not even for a moment.
    ``owner`` goes into the link's alias: which node made it (the sweeper removes only veths
    of its own node that no endpoint record explains). ``mac``: the container side's MAC,
    written as a permanent neighbour entry (as Calico does): the host never ARPs for the
    container. Without it, a packet that arrives between CreateEndpoint and the moment dockerd
    gives the container its address (a client retrying a recycled address, a new container
    probed at once) leaves an INCOMPLETE entry, and the container stays unreachable until the
    kernel's next ARP try, a second later."""
    ipv6_off(host_if)
    # proxy_arp: answer the container's ARP for 169.254.1.1 with our MAC.
    # proxy_delay=0: answer at once (the default delays proxy replies by up to 0.8 s).
    _sysctl(f"net/ipv4/conf/{host_if}/proxy_arp", 1)
    _sysctl(f"net/ipv4/neigh/{host_if}/proxy_delay", 0)
    _sysctl(f"net/ipv4/conf/{host_if}/forwarding", 1)
    if owner:
        _ipr().link("set", index=idx, state="up", ifalias=owner)
    else:
        _ipr().link("set", index=idx, state="up")
    if mac:
        _ipr().neigh("replace", dst=str(address), lladdr=mac, ifindex=idx, state=NUD_PERMANENT)
    _ipr().route("replace", dst=f"{address}/32", oif=idx, scope=253, proto=ROUTE_PROTO)


NUD_PERMANENT = 0x80


def our_veths():
    """Names of the host sides of l3net veths on this host."""
    return [name for _, name in socket.if_nameindex() if name.startswith(HOST_PREFIX)]


def veth_facts():
    """({host-side name: alias} of the l3net veths, [(address, name)] of the /32 routes via
    them): what the sweeper compares with the endpoint records."""
    ipr = _ipr()
    links = {}
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME") or ""
        if name.startswith(HOST_PREFIX):
            links[link["index"]] = (name, link.get_attr("IFLA_IFALIAS") or "")
    routes = []
    for route in ipr.get_routes(family=socket.AF_INET, table=254):
        oif = route.get_attr("RTA_OIF")
        if route["dst_len"] == 32 and oif in links:
            routes.append((route.get_attr("RTA_DST"), links[oif][0]))
    return dict(links.values()), routes


def delete_route(address, ifname):
    """Delete the /32 route to ``address`` via ``ifname``; gone already is fine."""
    idx = _index(ifname)
    if idx is None:
        return
    for scope in (253, 0):          # link scope (ours, and "ip route add ... dev"), or universe
        try:
            _ipr().route("del", dst=f"{address}/32", oif=idx, scope=scope)
            return
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise L3netError(f"failed to delete the route to {address} via {ifname}: {e}") from None


def ipv6_off_everywhere():
    """IPv6 off on every l3net veth already there (made by an l3net before this rule, or
    whose setting someone changed). Returns how many were fixed."""
    fixed = 0
    for name in our_veths():
        try:
            with open(f"{PROC_SYS}/net/ipv6/conf/{name}/disable_ipv6") as f:
                if f.read().strip() == "1":
                    continue
            ipv6_off(name)
            fixed += 1
        except (OSError, L3netError) as e:
            log.warning("could not switch IPv6 off on %s: %s", name, e)
    return fixed


def uplinks(own_ip, others):
    """The interfaces towards the other nodes: the one holding ``own_ip`` (the address peers
    reach this node at) and those the routes to ``others`` (their addresses) leave by."""
    ipr, names = _ipr(), set()
    indexes = {a["index"] for a in ipr.get_addr(family=socket.AF_INET) if a.get_attr("IFA_ADDRESS") == own_ip}
    for ip in others:
        try:
            indexes |= {r.get_attr("RTA_OIF") for r in ipr.route("get", dst=ip)}
        except NetlinkError:
            continue            # no route to it (yet): the next look finds it
    for index in indexes - {None}:
        try:
            names.add(socket.if_indextoname(index))
        except OSError:
            pass
    return sorted(n for n in names if n != "lo")


def uplink_mtu():
    """The MTU of the interface this host's default route leaves by (None without one): what
    a container network's MTU must not exceed."""
    ipr = _ipr()
    for route in ipr.get_default_routes(family=socket.AF_INET, table=254):
        oif = route.get_attr("RTA_OIF")
        if oif:
            links = ipr.get_links(oif)
            if links:
                return links[0].get_attr("IFLA_MTU")
    return None


def host_facts():
    """What this node publishes for the others to protect (agent.Registry): its IPv4
    addresses (loopback aside) and the networks they are on."""
    from netaddr import IPNetwork
    addresses, networks = set(), set()
    for a in _ipr().get_addr(family=socket.AF_INET):
        ip, plen = a.get_attr("IFA_ADDRESS") or a.get_attr("IFA_LOCAL"), a["prefixlen"]
        if not ip or ip.startswith("127."):
            continue
        addresses.add(ip)
        if plen < 32:
            networks.add(str(IPNetwork(f"{ip}/{plen}").cidr))
    return {"addresses": sorted(addresses), "networks": sorted(networks)}


def enable_forwarding():
    """IPv4 forwarding on (dockerd usually did it already: then nothing is written)."""
    with open(f"{PROC_SYS}/net/ipv4/ip_forward") as f:
        if f.read().strip() == "1":
            return
    _sysctl("net/ipv4/ip_forward", 1)


def delete_veth(host_if):
    """Delete the pair (and with it the /32 route). Idempotent: the device may already be gone
    (a container whose netns died takes its veth with it, and dockerd may re-send the call)."""
    try:
        _ipr().link("del", ifname=host_if)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return False
        raise L3netError(f"failed to delete {host_if}: {e}") from None
    return True


class Reaper:
    """Deletes veths in a background thread. The kernel needs ~25 ms to delete a veth (it
    waits for an RCU grace period); dockerd only logs DeleteEndpoint's result, so there is no
    reason to make ``docker rm`` wait for it. ``then`` runs after each deletion (the driver
    removes the endpoint record there, so a crash before it leaves a record to finish from) in
    a second thread, retried with back-off until it succeeds: an etcd that does not answer
    delays the records, never the deletion of the next veth."""

    def __init__(self):
        from .retry import Retrier
        self.veths = Retrier("l3net-reaper", cap=10.0)
        self.finisher = Retrier("l3net-finisher", cap=10.0)

    def submit(self, host_if, then=None):
        def delete():
            delete_veth(host_if)
            if then is not None:
                self.finisher.submit(then, f"finishing the deletion of {host_if}")
        self.veths.submit(delete, f"deleting {host_if}")

    def wait(self):
        """Block until everything submitted so far has been tried once (tests, shutdown)."""
        self.veths.wait()
        self.finisher.wait()


class Datapath:
    """The data path as an object, so tests of the HTTP layer can substitute a fake."""

    host_ifname = staticmethod(host_ifname)
    temp_ifname = staticmethod(temp_ifname)
    host_port_free = staticmethod(host_port_free)
    link_exists = staticmethod(link_exists)
    forget_flows = staticmethod(forget_flows)

    def create(self, endpoint_id, address, mac=None, mtu=None):
        """Create the veth for an endpoint and route ``address`` to it. Rolls back on failure.
        Returns the container side's MAC."""
        host_if, temp_if = host_ifname(endpoint_id), temp_ifname(endpoint_id)
        mac = mac or random_mac()
        idx = create_veth(host_if, temp_if, mac, mtu)
        try:
            setup_host_veth(host_if, idx, address, self.owner, mac)
        except Exception:
            delete_veth(host_if)
            raise
        return mac

    def __init__(self, owner=None):
        """``owner``: this node's mark on its veths (see setup_host_veth)."""
        self.reaper = Reaper()
        self.owner = owner

    veth_facts = staticmethod(veth_facts)
    uplink_mtu = staticmethod(uplink_mtu)
    delete_route = staticmethod(delete_route)
    delete_veth = staticmethod(delete_veth)

    def delete(self, endpoint_id):
        return delete_veth(host_ifname(endpoint_id))

    def delete_later(self, endpoint_id, then=None):
        self.reaper.submit(host_ifname(endpoint_id), then)

    def prepare_host(self):
        """Host-wide settings routed containers need: IPv4 forwarding, and IPv6 off on every
        veth of ours (those of an older l3net too). (What may pass is the policy's business:
        see firewall.py.)"""
        enable_forwarding()
        fixed = ipv6_off_everywhere()
        if fixed:
            log.info("switched IPv6 off on %d existing l3net veths", fixed)
