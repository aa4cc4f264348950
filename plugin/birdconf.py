"""BIRD 2 configuration for a node, rendered from desired state (pure; golden-tested).

What a node announces, and why:
  * one route per block it owns (a local ``blackhole`` for the aggregate: addresses of the
    block with no container are dropped here instead of looping, and the covering route exists
    for the other hosts);
  * a /32 for every local container whose address lies outside its blocks (a borrowed address,
    or an ``--ip`` that moved here). Those are learned from the kernel: the driver's
    ``proto static`` /32 routes, restricted to the pools;
  * nothing else: import and export are both restricted to the pools, so a misconfigured peer
    cannot hijack host routes and we leak nothing but container addresses.

What a node takes in, per session: from another node of the mesh only what etcd says that
node has (the blocks it owns, and /32s of addresses allocated to its endpoints outside those
blocks), so a rogue speaker posing as a node cannot take another node's container, a default
route or a host route; from an explicit peer (a router, a route reflector) pool prefixes. Every
session has a receive limit (a flood is cut off, the session stays). TTL security (GTSM) for
the directly connected mesh is a cluster setting (``l3netctl bgp config --ttl-security``: both
ends must have it, so switch it on once every node runs a version that knows it). Sessions
may be signed (TCP MD5): the mesh's password and explicit peers' come from each node's own
``--bgp-password-file`` / L3NET_BGP_PASSWORD, never from etcd.

Learned routes go to the kernel as ``proto bird`` with the owning host as next hop.
"""

import re
from dataclasses import dataclass, field

from .encap import DEVICE

DEFAULT_AS = 64512
HOLD_TIME = 9           # seconds; a dead peer's routes go after this (a killed BIRD: at once)


@dataclass(frozen=True)
class Peer:
    name: str
    ip: str
    asn: int
    multihop: bool = False
    allowed: tuple = None       # exact prefixes this peer may announce (a mesh node); None: any pool prefix
    # Route reflection (calc.node_peers): ((next hop, (prefixes...)), ...) this peer, a
    # reflector, may pass on from other nodes; whether we reflect to it (we are a reflector);
    # whether it is our client.
    via: tuple = ()
    reflect: bool = False
    rr_client: bool = False


@dataclass
class BgpState:
    node: str
    router_id: str
    asn: int = DEFAULT_AS
    pools: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    peers: list = field(default_factory=list)
    hold_time: int = HOLD_TIME
    ttl_security: bool = False
    passwords: dict = field(default_factory=dict, repr=False)   # "default" (mesh) / peer ip -> secret


GR_TIME = 30        # s peers keep a restarting node's routes (the registry lease is 30 s too)
GR_WAIT = 10        # s a restarted BIRD waits for its sessions before writing the kernel
RECEIVE_LIMIT = 100000  # routes one session may send us; beyond, new ones are dropped (action block)


def protocol_name(peer):
    """BIRD protocol names are identifiers: derive one from the peer, unique per address."""
    return "l3_" + re.sub(r"[^A-Za-z0-9]", "_", peer.ip)


def peer_of_protocol(name):
    """The peer address behind a protocol name of ours (``l3_10_0_0_1`` -> ``10.0.0.1``), or None."""
    m = re.fullmatch(r"l3_(\d+)_(\d+)_(\d+)_(\d+)", name)
    return ".".join(m.groups()) if m else None


def parse_protocols(text):
    """``birdc show protocols`` -> one dict per BGP session: name, peer, state, since, info.

    Rows are ``Name Proto Table State Since Info`` separated by blanks; Info (``Established``,
    ``Connect``, ``Active  Socket: Connection refused``...) may hold blanks of its own."""
    sessions = []
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) >= 5 and fields[1] == "BGP":
            info = fields[5].strip() if len(fields) > 5 else ""
            sessions.append({"name": fields[0], "peer": peer_of_protocol(fields[0]), "state": fields[3],
                             "since": fields[4], "info": info,
                             "established": re.match(r"Established\b", info) is not None})
    return sessions


def prefix_set(prefixes):
    """A BIRD prefix set matching the prefixes and everything inside them (``10.0.0.0/8+``).
    Callers handle the empty case: BIRD has no empty set literal."""
    return "[ " + ", ".join(f"{p}+" for p in sorted(prefixes)) + " ]"


REFLECT_FILTER = [
    "# A route reflector's export: what it has, and what it learned from the other nodes.",
    "filter l3net_reflect {",
    "  if !l3net_pool() then reject;",
    "  if source = RTS_BGP then accept;",
    "  if proto = \"l3net_blocks\" then accept;",
    "  if proto = \"l3net_kernel\" && net.len = 32 && !l3net_own_block() then accept;",
    "  reject;",
    "}",
    "",
]


def _reflection_channel(peer):
    """The channel of a session in route reflection: in, what etcd says the peer has, plus
    (from a reflector) what every other node has, with that node as next hop; out, on a
    reflector, the learned routes too, their next hop kept (a reflector never puts itself in
    the data path: Calico found ``next hop self`` on reflected routes does exactly that)."""
    lines = ["  ipv4 {", "    import filter {", "      if !l3net_pool() then reject;"]
    if peer.allowed:
        lines.append(f"      if net ~ {prefix_set(set(peer.allowed))} then accept;   # {peer.name}'s own")
    for hop, prefixes in peer.via:
        lines.append(f"      if bgp_next_hop = {hop} && net ~ {prefix_set(set(prefixes))} then accept;")
    lines += ["      reject;", "    };"]
    if peer.reflect:
        lines += ["    export filter l3net_reflect;", "    next hop self ebgp;"]
    return lines + ["  };"]


def render(state):
    s = state
    pools_def = prefix_set(s.pools) if s.pools else None
    blocks_def = prefix_set(s.blocks) if s.blocks else None
    lines = [
        f"# BIRD configuration of l3net node {s.node}. Rendered by l3net-plugin; any edit is",
        "# overwritten on the next change.",
        f"router id {s.router_id};",
        "# BGP graceful restart: when this BIRD restarts (the plugin's upgrade or crash; a managed",
        "# plugin's BIRD dies with it), peers keep its routes and the kernel keeps its own, until",
        "# the new one has converged (-R) or the restart time runs out. A host that vanishes",
        "# (hold timer) still loses its routes at once. After a restart, the kernel is written",
        "# once every session has converged, or after this many seconds.",
        f"graceful restart wait {GR_WAIT};",
        "log stderr { warning, error, fatal };",
        "",
        "function l3net_pool() {",
        f"  return {'net ~ ' + pools_def if pools_def else 'false'};",
        "}",
        "",
        "function l3net_own_block() {",
        f"  return {'net ~ ' + blocks_def if blocks_def else 'false'};",
        "}",
        "",
        "protocol device {",
        "  scan time 10;",
        "}",
        "",
        "# Connected networks, only so that next hops of multi-hop peers (route reflectors,",
        "# routers) resolve; the export filters below never let them out.",
        "protocol direct l3net_direct {",
        "  ipv4 { import filter { if l3net_pool() then reject; accept; }; };",
        "}",
        "",
        "# The aggregates of the blocks this node owns.",
        "protocol static l3net_blocks {",
        "  ipv4;",
    ]
    lines += [f"  route {b} blackhole;" for b in sorted(s.blocks)]
    lines += [
        "}",
        "",
        "# Learns the driver's container /32 routes; installs what BGP brings (proto bird).",
        "protocol kernel l3net_kernel {",
        "  learn;",
        "  scan time 10;",
        "  graceful restart on;",
        "  ipv4 {",
        "    # (not the tunnel's routes: those lead to other nodes' containers)",
        f"    import filter {{ if ifname = \"{DEVICE}\" then reject; if l3net_pool() && net.len = 32 then accept; reject; }};",
        "    export filter {",
        "      if proto = \"l3net_blocks\" then accept;",
        "      if source = RTS_BGP && l3net_pool() then accept;",
        "      reject;",
        "    };",
        "  };",
        "}",
        "",
        "filter l3net_export {",
        "  if !l3net_pool() then reject;",
        "  if proto = \"l3net_blocks\" then accept;",
        "  if proto = \"l3net_kernel\" && net.len = 32 && !l3net_own_block() then accept;",
        "  reject;",
        "}",
        "",
        *(REFLECT_FILTER if any(p.reflect for p in s.peers) else []),
        "template bgp l3net_peer {",
        f"  local as {s.asn};",
        f"  hold time {s.hold_time};",
        f"  keepalive time {max(1, s.hold_time // 3)};",
        "  connect delay time 1;",
        "  connect retry time 5;",
        "  # After an error (a hold timer that expired in a network blip) try again after 1 s,",
        "  # not BIRD's default 60: the session is back soon after the network is.",
        "  error wait time 1, 30;",
        "  graceful restart on;",
        f"  graceful restart time {GR_TIME};",
        "  ipv4 {",
        "    import filter { if l3net_pool() then accept; reject; };",
        "    export filter l3net_export;",
        "    next hop self;",
        f"    receive limit {RECEIVE_LIMIT} action block;",
        "    # Rejected routes are kept (marked filtered): when etcd tells more about a peer (its",
        "    # new block) the new filter takes them at once, whatever came first.",
        "    import keep filtered on;",
        "  };",
        "}",
        "",
    ]
    for peer in sorted(s.peers, key=lambda p: (p.ip, p.name)):
        lines += [
            f"# {peer.name}",
            f"protocol bgp {protocol_name(peer)} from l3net_peer {{",
            f"  neighbor {peer.ip} as {peer.asn};",
            f"  source address {s.router_id};",
            "  multihop;" if peer.multihop else "  direct;",
        ]
        if s.ttl_security and not peer.multihop:
            lines.append("  ttl security on;")
        secret = s.passwords.get(peer.ip) or (s.passwords.get("default") if peer.allowed is not None else None)
        if secret:
            lines.append(f'  password "{secret}";')     # config.SECRET: no quote, no backslash
        if peer.rr_client:
            lines.append("  rr client;")
        if peer.via or peer.reflect:
            lines += _reflection_channel(peer)
        elif peer.allowed is not None:
            allowed = sorted(set(peer.allowed))
            lines += ["  # what etcd says this node has: its blocks, its endpoints' /32s outside them",
                      "  ipv4 { import filter { if l3net_pool() && net ~ "
                      f"[ {', '.join(p + '+' for p in allowed)} ] then accept; reject; }}; }};" if allowed else
                      "  ipv4 { import none; };"]
        lines += ["}", ""]
    return "\n".join(lines)
