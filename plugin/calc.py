"""The calculation: pure functions from a view of etcd to the state a node should run.

Felix's split, in l3net: cache.py keeps the watch-fed copy of etcd (the *datastore*),
this module turns a view of it into desired state (the *calculation*: ``desired_bgp`` ->
birdconf.BgpState, ``desired_policy`` -> policy.PolicyState), bird.py and firewall.py put that
state in force (the *dataplane*). Nothing here writes anything or talks to the kernel; every
function takes anything with ``get``/``get_prefix`` (a cache.View, a store, a
MemoryStore in tests).

Every record is checked here, since anyone with etcd access can write one: a malformed
record is skipped with a warning (logged once per WARN_AGAIN seconds), the others still count,
and nothing unchecked reaches bird.conf or iptables-restore input.
"""

import json
import logging
import re
import time
from dataclasses import replace

from netaddr import IPAddress, IPNetwork

from core import records as R
from core import validate
from core.errors import L3netError
from core.infra import (
    MAX_LISTED,
    RESERVED,
    canonical_cidr,
    canonical_ip,
    infrastructure,
    node_facts,
    pool_conflict,
    protected,
    unicast_ip,
)
from core.keys import key_cidr
from ipam.pools import encap_of

from .birdconf import DEFAULT_AS, HOLD_TIME, BgpState, Peer
from .encap import TunnelState, desired_tunnels
from .policy import PolicyState

log = logging.getLogger("l3net.calc")

_warned = {}
WARN_AGAIN = 600.0      # seconds before the same warning about a bad record is logged again


def warn(message, *args):
    """Log a warning about a record the agent skips, once (again after WARN_AGAIN seconds):
    the sync runs every second, the log must not."""
    text = message % args
    now = time.monotonic()
    if now - _warned.get(text, -WARN_AGAIN) >= WARN_AGAIN:
        _warned[text] = now
        if len(_warned) > 1000:
            _warned.clear()
        log.warning("%s", text)


def _once_per_view(store, name, compute):
    """``compute()``, once per cache.View (frozen: every calculation of one sync, BGP,
    policy, figures and the sweeper, shares the result; callers only read it); with a plain
    store, every time."""
    derived = getattr(store, "derived", None)
    if derived is None:
        return compute()
    if name not in derived:
        derived[name] = compute()
    return derived[name]


def nodes(store, keys):
    """Registered nodes, their fields checked (infra.node_facts): a record without a name and
    an IPv4 address is skipped, malformed list entries dropped (one bad record must not stop
    every node's sync, nor reach ipset input)."""
    return _once_per_view(store, "nodes", lambda: _nodes(store, keys))


def _nodes(store, keys):
    out = []
    for record in _records(store, keys.nodes()):
        facts = node_facts(record)
        if facts is None:
            warn("ignoring node record %.120s: no valid name or IPv4 address",
                 json.dumps({k: record.get(k) for k in ("name", "ip")} if isinstance(record, dict) else record))
            continue
        out.append({**record, **facts})
    return out


def known_node_addresses(store, keys):
    """Every address any node ever registered and was not removed with ``l3netctl node
    remove``: the lasting half of host protection (a lease that expires must not open a node
    to containers)."""
    out = set()
    for r in _records(store, keys.all_node_addresses()):
        addresses = r.get("addresses") if isinstance(r, dict) else None
        if isinstance(addresses, list):
            out |= {a for a in addresses[:MAX_LISTED] if unicast_ip(a)}
    return sorted(out)


def bgp_peer_ips(store, keys):
    """Addresses of every explicit BGP peer, cluster-wide and per node (protected from containers)."""
    ips = [p.get("ip") for p in _records(store, keys.bgp_peers()) if isinstance(p, dict)]
    for n in _records(store, keys.bgp_nodes()):
        peers = n.get("peers") if isinstance(n, dict) else None
        ips += [p.get("ip") for p in peers if isinstance(p, dict)] if isinstance(peers, list) else []
    return sorted({ip for ip in ips if unicast_ip(ip)})


def protected_by_operator(store, keys):
    """The ranges ``l3netctl host protect`` added."""
    out = []
    for r in _records(store, keys.protected_ranges()):
        cidr = r.get("cidr") if isinstance(r, dict) else None
        if canonical_cidr(cidr):
            out.append(cidr)
        else:
            warn("ignoring malformed protected range %.200r", r)
    return out


def pool_ranges(store, keys):
    """The ranges pools must lie in (``l3netctl pool ranges set``); [] = anywhere."""
    ranges = _json_record(store, keys.pool_ranges()).get("ranges")
    return [c for c in ranges if canonical_cidr(c)] if isinstance(ranges, list) else []


def read_infrastructure(store, keys):
    """(what no pool may overlap, the allowed ranges), from etcd: Ipam's ``infrastructure``."""
    return (infrastructure(nodes(store, keys), bgp_peer_ips(store, keys), protected_by_operator(store, keys)),
            pool_ranges(store, keys))


def valid_asn(value):
    return value if type(value) is int and 1 <= value <= 4294967295 else None


def _json_record(store, key):
    """The JSON object at ``key``, or {} (absent, or not a JSON object: warned, skipped)."""
    value, _ = store.get(key)
    if value is None:
        return {}
    try:
        record = json.loads(value)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        warn("ignoring %s: not a JSON object", key)
        return {}
    return record


def bgp_settings(store, keys, name):
    """(cluster settings, this node's settings) with defaults filled in; a malformed field is
    skipped with a warning (the default holds) and never reaches bird.conf."""
    cluster = {"as": DEFAULT_AS, "mesh": True, "hold_time": HOLD_TIME, "ttl_security": False}
    record = _json_record(store, keys.bgp_config())
    checks = {"as": valid_asn, "mesh": lambda v: v if type(v) is bool else None,
              "ttl_security": lambda v: v if type(v) is bool else None,
              "hold_time": lambda v: v if type(v) is int and 3 <= v <= 65535 else None}
    for field, check in checks.items():
        if field in record:
            if check(record[field]) is None:
                warn("ignoring BGP setting %s=%.50r: out of range", field, record[field])
            else:
                cluster[field] = record[field]
    node_record = _json_record(store, keys.bgp_node(name))
    node = {"as": valid_asn(node_record.get("as")), "peers": [],
            "route_reflector": node_record.get("route_reflector") is True}
    peers = node_record.get("peers")
    node["peers"] = [p for p in (peers if isinstance(peers, list) else []) if _valid_peer(p)]
    return cluster, node


def _valid_peer(record):
    """An explicit peer: a unicast IPv4 address, an AS, an optional name that is a plain label
    (it becomes a comment in bird.conf: a newline would inject configuration)."""
    ok = isinstance(record, dict) and unicast_ip(record.get("ip")) and valid_asn(record.get("as")) and \
        (record.get("name") in (None, "") or (isinstance(record.get("name"), str)
                                              and NODE.fullmatch(record["name"]) is not None))
    if not ok:
        warn("ignoring BGP peer %.200s: bad address, AS or name", json.dumps(record)[:200])
    return bool(ok)


def node_asn(store, keys, name):
    cluster, node = bgp_settings(store, keys, name)
    return node["as"] or cluster["as"]


def route_reflectors(store, keys):
    """The names of the nodes marked route reflector (``l3netctl bgp node NAME
    --route-reflector``); a flag that is not a boolean is ignored with a warning."""
    out = set()
    for key, value, _ in store.get_prefix(keys.bgp_nodes()):
        try:
            record = json.loads(value)
        except ValueError:
            continue        # (bgp_settings warns about its own node's record)
        flag = record.get("route_reflector", False) if isinstance(record, dict) else False
        if type(flag) is not bool:
            warn("ignoring route_reflector=%.50r of %s: not true or false", flag, key)
        elif flag:
            out.add(keys.host_of(key))
    return out


def desired_bgp(store, keys, name, ip):
    """The BGP state this node should run with, from what etcd holds now (records checked:
    a bad one is skipped, the others still count)."""
    cluster, node = bgp_settings(store, keys, name)
    asn = node["as"] or cluster["as"]
    others = [n for n in nodes(store, keys) if n["name"] != name and n["ip"] != ip]
    reflectors = route_reflectors(store, keys) if not cluster["mesh"] else set()
    peers = []
    if cluster["mesh"] or reflectors & ({n["name"] for n in others} | {name}):
        peers += node_peers(name, asn, cluster["as"], others, announced_by_node(store, keys), reflectors)
    explicit = [p for p in _records(store, keys.bgp_peers()) if _valid_peer(p)] + node["peers"]
    peers += [Peer(p.get("name") or p["ip"], p["ip"], p["as"], multihop=True) for p in explicit if p["ip"] != ip]
    unique = {p.ip: p for p in peers}       # one session per address: explicit peers win
    pools = [p["cidr"] for p in pools_in_force(store, keys)]
    blocks = [R.cidr_of_key(k) for k, _, _ in store.get_prefix(keys.affinities(name))]
    return BgpState(node=name, router_id=ip, asn=asn, pools=pools, blocks=blocks,
                    peers=list(unique.values()), hold_time=cluster["hold_time"],
                    ttl_security=cluster["ttl_security"]), asn


def node_peers(name, asn, cluster_as, others, owned, reflectors):
    """The sessions with other nodes. ``reflectors`` empty: the full mesh (one session with
    every node). Otherwise route reflection: a reflector peers with every node (the nodes of
    its AS are its clients) and reflects what it learns; any other node peers with the
    reflectors only. Two reflectors give every node two paths to each route: losing one loses
    nothing.

    What each session may bring in is what etcd says the nodes have (``owned``: {node:
    [prefix]}): from a node, its own prefixes; through a reflector, every other node's, each
    with that node as next hop (a reflector passes the next hop on: traffic goes straight to
    the node that has the container, never through the reflector)."""
    def peer(n, **kw):
        return Peer(n["name"], n["ip"], valid_asn(n.get("as")) or cluster_as,
                    allowed=tuple(owned.get(n["name"], ())), **kw)
    if not reflectors:
        return [peer(n) for n in others]
    if name not in reflectors:
        return [peer(n, via=_via(owned, others, n["name"])) for n in others if n["name"] in reflectors]
    out = []
    for n in others:
        p = peer(n, reflect=True)
        if n["name"] in reflectors:
            p = replace(p, via=_via(owned, others, n["name"]))
        elif p.asn == asn:
            p = replace(p, rr_client=True)      # (a node of another AS gets our routes by eBGP anyway)
        out.append(p)
    return out


def _via(owned, others, reflector):
    """(node ip, its prefixes) of every node but this one and ``reflector``: what may come
    in through that reflector."""
    return tuple((n["ip"], tuple(owned[n["name"]])) for n in sorted(others, key=lambda n: n["ip"])
                 if n["name"] != reflector and owned.get(n["name"]))


def announced_by_node(store, keys):
    """{node: [prefix]}: what each node may announce in the mesh, as etcd says: the blocks it
    owns, and /32s of addresses allocated to its endpoints (or about to be: ``pending``)
    outside them (borrowed, or an --ip that moved there). A node announcing anything else is
    not believed."""
    blocks = {}
    for key, value, _ in store.get_prefix(keys.all_affinities()):
        cidr = R.cidr_of_key(key)
        if canonical_cidr(cidr):
            blocks.setdefault(keys.host_of(key), []).append(cidr)
    ranges = {host: R.block_ranges(cidrs) for host, cidrs in blocks.items()}
    out = {host: list(cidrs) for host, cidrs in blocks.items()}
    for _, ip, a in allocations(store, keys):
        if R.borrowed(ip, a, ranges):
            out.setdefault(a["host"], []).append(f"{ip}/32")
    return out


def desired_tunnel(store, keys, name, ip):
    """The VXLAN routes of this node (encap.desired_tunnels), from the view: the pools in force,
    the registered nodes, every node's blocks (affinities) and every allocation."""
    pools = pools_in_force(store, keys)
    if all(encap_of(p) == "never" for p in pools):
        return TunnelState(local=ip)            # the common case: nothing more to read
    blocks = {}
    for key, _, _ in store.get_prefix(keys.all_affinities()):
        cidr = canonical_cidr(R.cidr_of_key(key))
        if cidr:
            blocks.setdefault(keys.host_of(key), []).append(cidr)
    return desired_tunnels(pools, nodes(store, keys), name, ip, blocks, allocations(store, keys))


def allocations(store, keys):
    """[(pool, address, {"host", "handle", "time"})] of every allocation, from the member
    records (ipam/blocks.members: one per address, written with its block). A record with a
    malformed key, an address outside its pool, or no string host and handle is skipped.

    Parsed once per record revision when ``store`` is a cache.View (its ``memo``): a
    container start anywhere costs each agent the parsing of one record, not of the cluster."""
    return _once_per_view(store, "allocations", lambda: _allocations(store, keys))


def _allocations(store, keys):
    memo = getattr(store, "memo", None)
    memo = memo.setdefault("allocations", {}) if memo is not None else {}
    out, seen = [], {}
    root = keys.all_members()
    for key, value, rev in store.get_prefix(root):
        hit = memo.get(key)
        parsed = hit[2] if hit is not None and hit[0] == rev and hit[1] == value else _member(root, key, value)
        seen[key] = (rev, value, parsed)
        if parsed is not None:
            out.append(parsed)
    memo.clear()
    memo.update(seen)
    return out


def _member(root, key, value):
    pool_key, _, ip = key[len(root):].partition("/")
    pool = canonical_cidr(key_cidr(pool_key))
    try:
        record = json.loads(value)
    except ValueError:
        record = None
    if pool is None or unicast_ip(ip) is None or IPAddress(ip) not in IPNetwork(pool) or \
            not isinstance(record, dict) or not isinstance(record.get("handle"), str) or \
            not isinstance(record.get("host"), str):
        warn("ignoring malformed allocation record %s", key[:200])
        return None
    return pool, ip, record


RULE_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def valid_ports(value):
    """"N" or "N-M" with 1 <= N <= M <= 65535 (anything else would make iptables-restore
    refuse the whole rule set, on every node)."""
    m = PORTS.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        return False
    low, high = int(m.group(1)), int(m.group(2) or m.group(1))
    return 1 <= low <= high <= 65535


def _valid_rule(rule, pools, host_rule=False):
    """Records come from etcd, written by l3netctl, but anyone with etcd access can write
    there: only well-formed rules reach iptables-restore input (no injection by a comment)."""
    if not isinstance(rule, dict) or not RULE_ID.fullmatch(str(rule.get("id", ""))):
        return False
    proto, ports = rule.get("proto"), rule.get("ports")
    if proto not in ((("tcp", "udp")) if host_rule else (None, "tcp", "udp", "icmp")):
        return False
    if ports is not None and (proto not in ("tcp", "udp") or not valid_ports(ports)):
        return False
    if host_rule:
        node, to = rule.get("node"), rule.get("to")
        return ports is not None and (node is None or bool(NODE.fullmatch(str(node)))) and \
            (to is None or (node is None and canonical_cidr(to) is not None and not to.endswith("/0")))
    return _valid_side(rule.get("from"), pools) and _valid_side(rule.get("to"), pools)


def _valid_side(side, pools):
    """A policy side: a pool in force, or ``tag:X`` with a well-formed tag."""
    if not isinstance(side, str):
        return False
    if side in pools:
        return True
    try:
        return validate.tag_side(side) is not None
    except L3netError:
        return False


def pool_tags(pool):
    """A pool record's tags: the well-formed ones (a bad entry written behind l3netctl's back
    opens nothing, and the others stay)."""
    tags = pool.get("tags") or []
    if not isinstance(tags, list):
        warn("ignoring the tags of pool %s: not a list", pool.get("cidr"))
        return []
    good = [t for t in tags if isinstance(t, str) and validate.TAG.fullmatch(t)]
    if len(good) != len(tags):
        warn("ignoring malformed tags of pool %s: %.200r", pool.get("cidr"), sorted(set(map(str, tags)) - set(good)))
    return sorted(set(good))


def _port_number(value):
    return type(value) is int and 1 <= value <= 65535


def _valid_port(record, holders):
    """A published port of this host, written by the driver; rendered only while its endpoint
    still holds the address in the IPAM (a claim left behind must not send traffic to the
    address's next holder)."""
    if not isinstance(record, dict) or record.get("proto") not in ("tcp", "udp"):
        return False
    if not (_port_number(record.get("host_port")) and _port_number(record.get("port"))):
        return False
    if canonical_ip(record.get("ip")) is None:
        return False
    if record.get("host_ip") is not None and canonical_ip(record.get("host_ip")) is None:
        return False
    return holders.get(record["ip"]) == R.endpoint_handle(record.get("endpoint"))


def _records(store, prefix):
    out = []
    for key, value, _ in store.get_prefix(prefix):
        try:
            out.append(json.loads(value))
        except ValueError:
            warn("ignoring %s: not JSON", key)
    return out


RESERVED_NETS = [(IPNetwork(c), why) for c, why in RESERVED]


def pools_in_force(store, keys):
    """The pool records this node enforces and routes. A pool over a reserved range
    (loopback, link-local, multicast...: only a write into etcd behind l3netctl's back can make
    one) is left out: no such address is ever filtered or routed as a container's. Pools are
    not judged against the nodes' addresses here: those change (a Docker bridge created on some
    host), and an existing network must not go dark because of that; new pools are refused
    over them (Ipam.check_not_infrastructure)."""
    hard = RESERVED_NETS
    pools = []
    for p in _records(store, keys.pools()):
        if not isinstance(p, dict) or not canonical_cidr(p.get("cidr")):
            warn("ignoring malformed pool record %.200r", p)
        elif pool_conflict(p["cidr"], hard):
            warn("not enforcing pool %s: %s", p["cidr"], pool_conflict(p["cidr"], hard))
        else:
            pools.append(p)
    return pools


def desired_policy(store, keys, name):
    """The isolation state this node should enforce, from what etcd holds now. Members of a
    network: every address allocated in its pool on any host, except gateway reservations, in
    the pools in force (pools_in_force)."""
    registered = nodes(store, keys)
    peers = bgp_peer_ips(store, keys)
    pools = pools_in_force(store, keys)
    members = {p["cidr"]: [] for p in pools}
    holders = {}                    # address -> its holder ("endpoint:<id>", "reserved:...")
    for pool, ip, a in allocations(store, keys):
        if pool in members:
            holders[ip] = a["handle"]
            if not R.is_reservation(a["handle"]):
                members[pool].append(ip)
    rules, host_rules = [], []
    for rule in _records(store, keys.policy_rules()):
        if _valid_rule(rule, members):
            rules.append(rule)
        else:
            warn("ignoring malformed policy rule %.200r", rule)
    for rule in _records(store, keys.host_rules()):
        if _valid_rule(rule, members, host_rule=True):
            host_rules.append(rule)
        else:
            warn("ignoring malformed host rule %.200r", rule)
    ports = []
    for record in _records(store, keys.ports(name)):
        if _valid_port(record, holders):
            ports.append({k: record.get(k) for k in ("proto", "host_ip", "host_port", "ip", "port")})
        else:
            warn("ignoring published port %.200r: malformed, or its endpoint no longer holds "
                        "the address", record)
    tags = {}
    for p in pools:
        for tag in pool_tags(p):
            tags.setdefault(tag, []).append(p["cidr"])
    for rule in rules:                  # a tag no network carries (yet): an empty set
        for side in (rule["from"], rule["to"]):
            if side.startswith(validate.TAG_SIDE):
                tags.setdefault(side[len(validate.TAG_SIDE):], [])
    return PolicyState(node=name, pools=sorted(members), tags={t: sorted(v) for t, v in tags.items()},
                       nat_pools=sorted(p["cidr"] for p in pools
                                        if p.get("nat_outgoing", True) and not p.get("internal")),
                       members={k: sorted(v) for k, v in members.items()}, rules=rules,
                       host_rules=host_rules, nodes={n["name"]: n["ip"] for n in registered},
                       host_addresses=sorted({a for n in registered for a in n["addresses"]}
                                             | set(known_node_addresses(store, keys))),
                       protected=protected(registered, peers, protected_by_operator(store, keys)),
                       internal=sorted(p["cidr"] for p in pools if p.get("internal")),
                       encap=any(encap_of(p) != "never" for p in pools),
                       ports=sorted(ports, key=lambda p: (p["proto"], p["host_port"])))


def node_stats(view, keys, name):
    """Figures for metrics and l3netctl status: {"pools": {cidr: (allocated, capacity)},
    "endpoints": endpoints on this node}."""
    pools, endpoints = {}, 0
    for p in _records(view, keys.pools()):
        cidr = canonical_cidr(p.get("cidr")) if isinstance(p, dict) else None
        if cidr:
            pools[cidr] = [0, max(IPNetwork(cidr).size - 2, 1)]
    for pool, _, a in allocations(view, keys):
        if pool in pools:
            pools[pool][0] += 1
        endpoints += a["host"] == name and R.is_endpoint(a["handle"])
    return {"pools": {k: tuple(v) for k, v in pools.items()}, "endpoints": endpoints}


class MemberIndex:
    """The member records the agent last computed from, indexed so that a change to a few of
    them costs the work of those few, not of the cluster (Felix's calculation graph, in
    small): a container started anywhere is one record, and becomes one address to add to
    one network's set, nothing else.

    ``load(view)`` indexes a view in full (with each full computation); ``apply(changes)`` takes {member key: value, or None
    when deleted} and returns a MemberDelta. What a member change can touch, and how it is
    told here:
      - the sets: its address joins or leaves its network's set (``add``/``remove``);
      - BGP: an address outside its host's blocks (borrowed, or an --ip that moved) is a /32
        its host may announce (announced_by_node): ``bgp`` asks for BGP to be computed again;
      - published ports: a port of this node is in force only while its endpoint holds the
        address: an address some port names asks for the policy in full (``policy``).
    Everything else about members (which pools are in force, the rules) is decided by other
    records, whose changes make the agent compute in full."""

    def __init__(self, keys, name):
        self.keys, self.name = keys, name
        self.records = {}       # member key -> (pool, ip, record), malformed ones left out
        self.enforced = set()   # the pools in force (their members are set entries)
        self.port_ips = set()   # the addresses this node's port records name
        self.blocks = {}        # host -> [(first, last)] of the blocks it owns
        self.capacity = {}      # pool -> addresses it has (figures)
        self.allocated = {}     # pool -> addresses allocated in it (figures)
        self.endpoints = 0      # this node's endpoints (figures)

    def load(self, view):
        self.enforced = {p["cidr"] for p in pools_in_force(view, self.keys)}
        self.port_ips = set()
        for _, value, _ in view.get_prefix(self.keys.ports(self.name)):
            try:
                record = json.loads(value)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("ip"), str):
                self.port_ips.add(record["ip"])
        self.blocks = {}
        for key, _, _ in view.get_prefix(self.keys.all_affinities()):
            cidr = canonical_cidr(R.cidr_of_key(key))
            if cidr:
                net = IPNetwork(cidr)
                self.blocks.setdefault(self.keys.host_of(key), []).append((net.first, net.last))
        self.capacity = {cidr: max(IPNetwork(cidr).size - 2, 1) for cidr in
                         (canonical_cidr(p.get("cidr")) if isinstance(p, dict) else None
                          for p in _records(view, self.keys.pools())) if cidr}
        self.allocated, self.endpoints = {p: 0 for p in self.capacity}, 0
        root = self.keys.all_members()
        self.records = {}
        memo = getattr(view, "memo", {}).get("allocations", {})
        for key, value, rev in view.get_prefix(root):
            hit = memo.get(key)
            parsed = hit[2] if hit is not None and hit[0] == rev and hit[1] == value else _member(root, key, value)
            if parsed is not None:
                self.records[key] = parsed
                self._count(parsed, 1)

    def stats(self):
        """What node_stats computes from a view, from the index."""
        return {"pools": {p: (self.allocated[p], c) for p, c in self.capacity.items()},
                "endpoints": self.endpoints}

    def apply(self, changes):
        delta = MemberDelta()
        root = self.keys.all_members()
        for key, value in changes.items():
            old = self.records.pop(key, None)
            new = _member(root, key, value) if value is not None else None
            if new is not None:
                self.records[key] = new
            for parsed, sign in ((old, -1), (new, 1)):
                if parsed is None:
                    continue
                self._count(parsed, sign)
                pool, ip, record = parsed
                if ip in self.port_ips:
                    delta.policy = True
                if self._borrowed(parsed):
                    delta.bgp = True
            before, after = self._entry(old), self._entry(new)
            if before != after:
                if before:
                    delta.remove.setdefault(before[0], set()).add(before[1])
                if after:
                    delta.add.setdefault(after[0], set()).add(after[1])
        return delta     # (keys are canonical, one per pool and address: no entry is both)

    def _entry(self, parsed):
        """(pool, address) when ``parsed`` makes an entry of its network's set, else None."""
        if parsed is None:
            return None
        pool, ip, record = parsed
        if pool not in self.enforced or R.is_reservation(record["handle"]):
            return None
        return pool, ip

    def _borrowed(self, parsed):
        _, ip, record = parsed
        return R.borrowed(ip, record, self.blocks)

    def _count(self, parsed, sign):
        pool, _, record = parsed
        if pool in self.allocated:
            self.allocated[pool] += sign
        if record["host"] == self.name and R.is_endpoint(record["handle"]):
            self.endpoints += sign


class MemberDelta:
    """What changed member records change: set entries to ``add`` / ``remove`` ({pool: {ip}}),
    whether BGP must be computed again (``bgp``), whether the policy must be computed in full
    (``policy``: then the entries are not to be used)."""

    def __init__(self):
        self.add, self.remove = {}, {}
        self.bgp = self.policy = False

    def __bool__(self):
        return bool(self.bgp or self.policy or any(self.add.values()) or any(self.remove.values()))
