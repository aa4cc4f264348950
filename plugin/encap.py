"""Encapsulation between hosts, the calculation (pure): which prefixes of encapsulated pools
this node reaches through its VXLAN device, and through which node.

A pool's ``encap`` mode (ipam.pools.ENCAP_MODES) is cluster-wide, like NAT: ``never`` (pure
routing, BGP carries the routes), ``cross-subnet`` (a VXLAN tunnel towards nodes outside this
node's own subnet, pure routing within it), ``always``. Tunnel routes need no BGP: the blocks
each node holds (its affinities) and the addresses it borrowed from other nodes' blocks are in
etcd, so every node computes them; a node in another subnet may have no BGP session at all.

No multicast, no flooding, no learning: every other node's VTEP is its address, and its MAC
is derived from it (``vtep_mac``; the registry record shows it); the tunnel routes go
``via <node address> dev l3vxlan onlink``, with a permanent neighbour entry (that address ->
its VTEP MAC) and a forwarding entry (that MAC -> that address on the underlay).
"""

from dataclasses import dataclass, field

from netaddr import AddrFormatError, IPAddress, IPNetwork

from core import records as R
from ipam.pools import encap_of

DEVICE = "l3vxlan"
VNI = 4096
PORT = 4789                 # IANA's VXLAN port
OVERHEAD = 50               # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14


def vtep_mac(node_ip):
    """A node's VTEP MAC, from its address: locally administered, unicast, unique per address."""
    return "0e:4c:" + ":".join(f"{int(o):02x}" for o in str(node_ip).split("."))


@dataclass
class TunnelState:
    local: str = ""                                 # this node's address (the tunnel's source)
    routes: dict = field(default_factory=dict)      # prefix -> the node address it goes to
    peers: dict = field(default_factory=dict)       # node address -> its VTEP MAC

    def __bool__(self):
        return bool(self.routes)


def own_subnet(node, ip):
    """The subnet of this node's own address, from its published networks (None: unknown)."""
    for cidr in node.get("networks") or []:
        try:
            if IPAddress(ip) in IPNetwork(cidr):
                return str(IPNetwork(cidr).cidr)
        except (AddrFormatError, ValueError, TypeError):
            continue
    return None


def tunnelled(mode, subnet, node_ip):
    """Whether traffic of a pool in ``mode`` goes to ``node_ip`` through the tunnel."""
    if mode == "always":
        return True
    if mode == "cross-subnet":
        return subnet is None or IPAddress(node_ip) not in IPNetwork(subnet)
    return False


def desired_tunnels(pools, nodes, name, ip, blocks, members):
    """The tunnel state of node ``name`` (address ``ip``):
    ``pools`` pool records in force; ``nodes`` registered node records (name, ip, networks);
    ``blocks`` {host: [block CIDR]} (affinities); ``members`` [(pool, address, record)]."""
    me = next((n for n in nodes if n["name"] == name), {"networks": []})
    subnet = own_subnet(me, ip)
    modes = {p["cidr"]: encap_of(p) for p in pools}
    modes = {cidr: mode for cidr, mode in modes.items() if mode != "never"}
    state = TunnelState(local=ip)
    if not modes:
        return state
    address = {n["name"]: n["ip"] for n in nodes if n["name"] != name and n["ip"] != ip}
    subnets = {n["ip"]: own_subnet(n, n["ip"]) for n in nodes}

    def through(mode, node_ip):
        # both ends decide alike: a tunnel when either side sees the other outside its subnet
        # (or does not know its subnet), or replies would come back another way than requests
        return tunnelled(mode, subnet, node_ip) or tunnelled(mode, subnets.get(node_ip), ip)
    nets = {cidr: IPNetwork(cidr) for cidr in modes}
    owned = {host: [IPNetwork(b) for b in bs] for host, bs in blocks.items()}
    ranges = {host: R.block_ranges(bs) for host, bs in blocks.items()}
    for host, host_blocks in owned.items():
        if host not in address:
            continue
        for block in host_blocks:
            pool = next((c for c, net in nets.items() if block in net), None)
            if pool and through(modes[pool], address[host]):
                state.routes[str(block)] = address[host]
    for pool, addr, record in members:
        host = record.get("host")
        # (an address in its host's own block: the block's route covers it)
        if pool not in modes or host not in address or not R.borrowed(addr, record, ranges):
            continue
        if through(modes[pool], address[host]):
            state.routes[f"{addr}/32"] = address[host]
    # The MAC is derived, never taken from the record (which only shows it): every device is
    # created with the derived one, and a record naming another node's MAC must not divert
    # that node's traffic.
    state.peers = {node_ip: vtep_mac(node_ip) for node_ip in set(state.routes.values())}
    return state
