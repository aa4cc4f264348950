"""The agent: the long-running half of a node, beside the API.

It computes from a watch-fed copy of etcd (datastore.Cache: read once, then followed event by
event; read in full again only when the watch is lost). When that copy changes, and at least
every ``RESYNC`` seconds, it
  1. keeps this node's registry record alive (an etcd lease: a dead node's record vanishes;
     every ``interval`` seconds it checks whether a beat is due),
  2. computes the BGP desired state from etcd (nodes, BGP settings, pools, this node's blocks),
     renders it (bgp.render) and makes BIRD run with it (bird.Bird.apply: only on change;
     a BIRD that died is started again),
  3. computes the policy desired state (networks and their members on every host, policies,
     host rules, nodes) and puts it in force (firewall.Firewall.apply: only what changed),
  4. every ``drift_every`` seconds, checks that our chains, hooks and sets are still what it
     wrote, and writes them again if not.
Errors are logged and retried at the next tick; nothing here can block a Docker call.
"""

import json
import logging
import os
import re
import threading
import time

from netaddr import IPAddress, IPNetwork

from . import metrics
from .bgp import DEFAULT_AS, HOLD_TIME, BgpState, Peer, render
from .datastore import Cache, View
from .errors import L3netError
from .firewall import NoFirewall
from .infra import (MAX_LISTED, RESERVED, canonical_cidr, canonical_ip, infrastructure, node_facts,
                    pool_conflict, protected, unicast_ip)
from .keys import key_cidr
from .policy import PolicyState
from .store import StoreError

log = logging.getLogger("l3net.agent")

LEASE_TTL = 30
HEARTBEAT = 10
DEBOUNCE = 0.1      # seconds to let a burst of etcd changes settle before a sync
RESYNC = 30.0       # seconds between computations when nothing changed (a safety net)


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


class Registry:
    """This node's record under <prefix>/nodes/<name>, kept alive by a lease. Besides its
    address and AS it publishes what every node must protect from containers and keep pools
    off: all its IPv4 addresses, its connected networks and the etcd endpoints it uses
    (``facts``: a callable returning {"addresses", "networks", "etcd"}, asked at each beat,
    so a new address is protected within a heartbeat)."""

    def __init__(self, store, keys, name, ip, ttl=LEASE_TTL, facts=None):
        self.store, self.keys, self.name, self.ip, self.ttl = store, keys, name, ip, ttl
        self.facts = facts or (lambda: {})
        self._lease = None
        self._last = 0.0
        self._facts = {}            # the last facts gathered (kept when gathering fails)
        self._known = None          # the addresses last written to the node's lasting record
        self._record = None         # the record last written (without its time)

    def heartbeat(self, asn, force=False, present=True):
        """Refresh the lease (and the record, when it changed) if a beat is due. Returns
        whether etcd was asked (and answered). ``present``: whether the record is in etcd as
        far as the caller knows (deleted by someone: written again)."""
        now = time.time()
        if not force and self._lease is not None and now - self._last < HEARTBEAT:
            return False
        renewed = False
        if self._lease is None or not self.store.refresh(self._lease):
            conflict = self.identity_conflict()
            if conflict:
                raise L3netError(conflict)
            self._lease = self.store.lease(self.ttl)
            renewed = True
            log.info("registered node %s (%s) with a %ds lease", self.name, self.ip, self.ttl)
        try:
            self._facts = {**self._facts, **self.facts()}
        except Exception as e:  # noqa: BLE001 - the last facts gathered still hold
            warn("could not list this host's addresses (publishing the last known): %s", e)
        facts = self._facts
        record = {"name": self.name, "ip": self.ip, "as": asn,
                  **{k: facts[k] for k in ("addresses", "networks", "etcd") if k in facts}}
        if renewed or record != self._record or not present:
            # Written only when it changes (or with a new lease): liveness is the lease's, and
            # a record rewritten every beat would wake every other node's agent each time.
            self.store.put(self.keys.node(self.name), json.dumps(dict(record, since=round(now, 3)),
                                                                 sort_keys=True), lease=self._lease)
            self._record = record
        self._last = now
        known = sorted(set(facts.get("addresses", [])) | {self.ip})
        if known != self._known:
            # Without a lease: every node keeps protecting these addresses while this node is
            # away (its plugin stopped or cut off from etcd), until `l3netctl node remove`.
            self.store.put(self.keys.node_addresses(self.name), json.dumps({"name": self.name, "addresses": known}))
            self._known = known
        return True


    def identity_conflict(self):
        """Why this node may not register (a live node holds its name with another address:
        two hosts under one name would share blocks and announce each other's containers), or
        None."""
        value, _ = self.store.get(self.keys.node(self.name))
        try:
            record = json.loads(value) if value is not None else None
        except ValueError:
            return None
        other = record.get("ip") if isinstance(record, dict) else None
        if other is None or other == self.ip:
            return None
        return (f"node name {self.name!r} is held by a live node at {other}, not this host ({self.ip}): give "
                f"each host its own --hostname (L3NET_HOSTNAME). If that node was this host before its "
                f"address changed, its record expires within {self.ttl} s")


def nodes(store, keys):
    """Registered nodes, their fields checked (infra.node_facts): a record without a name and
    an IPv4 address is skipped, malformed list entries dropped (one bad record must not stop
    every node's sync, nor reach ipset input)."""
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
    node = {"as": valid_asn(node_record.get("as")), "peers": []}
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


def desired_bgp(store, keys, name, ip):
    """The BGP state this node should run with, from what etcd holds now (records checked:
    a bad one is skipped, the others still count)."""
    cluster, node = bgp_settings(store, keys, name)
    asn = node["as"] or cluster["as"]
    peers = []
    if cluster["mesh"]:
        owned = announced_by_node(store, keys)
        peers += [Peer(n["name"], n["ip"], valid_asn(n.get("as")) or cluster["as"],
                       allowed=tuple(owned.get(n["name"], ())))
                  for n in nodes(store, keys) if n["name"] != name and n["ip"] != ip]
    explicit = [p for p in _records(store, keys.bgp_peers()) if _valid_peer(p)] + node["peers"]
    peers += [Peer(p.get("name") or p["ip"], p["ip"], p["as"], multihop=True) for p in explicit if p["ip"] != ip]
    unique = {p.ip: p for p in peers}       # one session per address: explicit peers win
    pools = [p["cidr"] for p in pools_in_force(store, keys)]
    blocks = [key_cidr(k.rsplit("/", 1)[1]) for k, _, _ in store.get_prefix(keys.affinities(name))]
    return BgpState(node=name, router_id=ip, asn=asn, pools=pools, blocks=blocks,
                    peers=list(unique.values()), hold_time=cluster["hold_time"],
                    ttl_security=cluster["ttl_security"]), asn


def announced_by_node(store, keys):
    """{node: [prefix]}: what each node may announce in the mesh, as etcd says: the blocks it
    owns, and /32s of addresses allocated to its endpoints (or about to be: ``pending``)
    outside them (borrowed, or an --ip that moved there). A node announcing anything else is
    not believed."""
    blocks = {}
    for key, value, _ in store.get_prefix(keys.all_affinities()):
        cidr = key_cidr(key.rsplit("/", 1)[1])
        if canonical_cidr(cidr):
            blocks.setdefault(keys.host_of(key), []).append(cidr)
    nets = {host: [IPNetwork(c) for c in cidrs] for host, cidrs in blocks.items()}
    out = {host: list(cidrs) for host, cidrs in blocks.items()}
    for block in _records(store, keys.all_blocks()):
        allocations = block.get("allocations") if isinstance(block, dict) else None
        for ip, a in (allocations.items() if isinstance(allocations, dict) else ()):
            host = a.get("host") if isinstance(a, dict) else None
            if not (isinstance(host, str) and str(a.get("handle", "")).startswith(("endpoint:", "pending:"))
                    and unicast_ip(ip)):
                continue
            if not any(IPAddress(ip) in net for net in nets.get(host, ())):
                out.setdefault(host, []).append(f"{ip}/32")
    return out


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
    return rule.get("from") in pools and rule.get("to") in pools


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
    return holders.get(record["ip"]) == f"endpoint:{record.get('endpoint')}"


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
    holders = {}                    # address -> its holder ("endpoint:<id>", "gateway:...")
    for block in _records(store, keys.all_blocks()):
        if not isinstance(block, dict) or block.get("pool") not in members \
                or not isinstance(block.get("allocations"), dict):
            continue
        allocations = block["allocations"]
        pool_net = IPNetwork(block["pool"])
        for ip, a in allocations.items():
            handle = a.get("handle") if isinstance(a, dict) else None
            if unicast_ip(ip) is None or IPAddress(ip) not in pool_net or not isinstance(handle, str):
                warn("ignoring malformed allocation %.100r in a block of %s", ip, block["pool"])
                continue
            holders[ip] = handle
            if not handle.startswith(("gateway:", "reserved:")):
                members[block["pool"]].append(ip)
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
    return PolicyState(node=name, pools=sorted(members),
                       nat_pools=sorted(p["cidr"] for p in pools
                                        if p.get("nat_outgoing", True) and not p.get("internal")),
                       members={k: sorted(v) for k, v in members.items()}, rules=rules,
                       host_rules=host_rules, nodes={n["name"]: n["ip"] for n in registered},
                       host_addresses=sorted({a for n in registered for a in n["addresses"]}
                                             | set(known_node_addresses(store, keys))),
                       protected=protected(registered, peers, protected_by_operator(store, keys)),
                       internal=sorted(p["cidr"] for p in pools if p.get("internal")),
                       ports=sorted(ports, key=lambda p: (p["proto"], p["host_port"])))


def node_stats(view, keys, name):
    """Figures for metrics and l3netctl status: {"pools": {cidr: (allocated, capacity)},
    "endpoints": endpoints on this node}."""
    pools, endpoints = {}, 0
    for p in _records(view, keys.pools()):
        cidr = canonical_cidr(p.get("cidr")) if isinstance(p, dict) else None
        if cidr:
            pools[cidr] = [0, max(IPNetwork(cidr).size - 2, 1)]
    for block in _records(view, keys.all_blocks()):
        allocations = block.get("allocations") if isinstance(block, dict) else None
        if not isinstance(allocations, dict):
            continue
        if block.get("pool") in pools:
            pools[block["pool"]][0] += len(allocations)
        endpoints += sum(1 for a in allocations.values() if isinstance(a, dict) and a.get("host") == name
                         and str(a.get("handle", "")).startswith("endpoint:"))
    return {"pools": {k: tuple(v) for k, v in pools.items()}, "endpoints": endpoints}


class Agent:
    """Runs sync() when etcd changes (a watch on the whole prefix wakes it) and at least
    every ``interval`` seconds (so a broken watch costs latency, not correctness), and checks
    the kernel for drift every ``drift_every`` seconds."""

    def __init__(self, store, keys, name, ip, bird=None, firewall=None, interval=1.0, drift_every=2.0,
                 status_path=None, facts=None, uplinks=None, bgp_passwords=None):
        self.store, self.keys, self.name, self.ip = store, keys, name, ip
        self.bgp_passwords = bgp_passwords or {}
        self.uplinks_of = uplinks             # (own ip, [other nodes' ips]) -> [interface names]
        self._uplinks = (None, 0.0, [])       # (node ips asked about, when, answer)
        self.registry = Registry(store, keys, name, ip, facts=facts)
        self.bird = bird
        self.firewall = firewall or NoFirewall()
        self.interval, self.drift_every = interval, drift_every
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._policy_lock = threading.Lock()
        self._thread = None
        self._last_drift_check = 0.0
        self.last_sync = None
        self.last_error = None
        self.etcd_down_since = None     # when the agent last failed to read etcd (None: it reads)
        self._mesh_seen = {}            # mesh peer ip -> (Peer, when last in etcd): keep_departed
        self.stats = {}
        self.status_path = status_path   # where `l3netctl status` reads this agent's state
        self.cache = Cache(store, keys.agent_view(name), on_change=self._wake.set)
        self._computed = (None, 0.0)    # (cache generation, when) of the last full computation
        self._applied_revision = {}     # {prefix: revision} of the policy the driver put in force

    def sync(self):
        """BGP and policy are synced independently: a BIRD problem must not freeze the
        firewall, nor the reverse. The first error is raised after both were tried."""
        errors = []
        generation = self.firewall.generation()        # before the read: see Firewall.apply
        cache_generation, reloads = self.cache.generation, self.cache.reloads
        try:
            view = self.cache.view()
        except Exception:
            # etcd is away: nothing is recomputed, so rules, sets, routes and BIRD stay as
            # they were (fail closed, last good state) until it answers again
            if self.etcd_down_since is None:
                self.etcd_down_since = time.time()
            raise
        answered = self.cache.reloads != reloads       # etcd was read just now
        try:
            # First, and on its own: a node whose BGP state cannot be computed is still alive,
            # and its record (with the addresses every node protects) must not expire.
            answered |= self.registry.heartbeat(node_asn(view, self.keys, self.name),
                                                present=view.get(self.keys.node(self.name))[0] is not None)
        except StoreError as e:
            # the copy may still be followed (a hung etcd keeps the watch open): the beat
            # is what tells; it is tried again at every tick until it goes through
            if self.etcd_down_since is None:
                self.etcd_down_since = time.time()
            errors.append(e)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        if answered and self.etcd_down_since is not None:
            log.info("etcd answers again after %.0f s", time.time() - self.etcd_down_since)
            self.etcd_down_since = None
        computed, when = self._computed
        if computed == cache_generation and time.monotonic() - when < RESYNC and \
                (self.bird is None or self.bird.pid() is not None):
            # nothing changed since the last computation: nothing to compute
            if errors:
                metrics.SYNC_ERRORS.inc()
                raise errors[0]
            self.last_sync = time.time()
            return
        try:
            state, _ = desired_bgp(view, self.keys, self.name, self.ip)
            state.peers = self.keep_departed(state.peers)
            state.passwords = self.bgp_passwords
            if self.bird is not None:
                self.bird.apply(render(state))
        except Exception as e:  # noqa: BLE001 - reported below, after the policy sync
            errors.append(e)
        try:
            self.sync_policy(view, generation)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        self.stats = node_stats(view, self.keys, self.name)
        if errors:
            metrics.SYNC_ERRORS.inc()
            raise errors[0]
        self._computed = (cache_generation, time.monotonic())
        self.last_sync = time.time()

    def sync_policy(self, view=None, generation=None):
        """Compute the desired policy and put it in force. ``view``: the cache's (the loop),
        with the firewall's ``generation`` taken before it was taken. None: read etcd now (the
        driver, after a network is created or a port published: its rules must be in force
        before the call returns, whatever the watch has delivered yet)."""
        with self._policy_lock:
            if view is None:
                generation = self.firewall.generation()
                prefixes = self.keys.agent_view(self.name)
                items, _ = self.store.read(prefixes)
                # per prefix, the newest record in it: what the cache must have seen too
                view = View(items, {p: max((r for k, (_, r) in items.items() if k.startswith(p)), default=0)
                                    for p in prefixes})
            elif any(view.revision.get(p, 0) < r for p, r in self._applied_revision.items()):
                return      # older than what the driver put in force: the watch catches up
            desired = desired_policy(view, self.keys, self.name)
            desired.uplinks = self.uplinks(sorted(set(desired.nodes.values()) - {self.ip}))
            done = self.firewall.apply(desired, generation)
            for p, r in view.revision.items():
                self._applied_revision[p] = max(self._applied_revision.get(p, 0), r)
            if done:
                log.info("%s", done)
                metrics.POLICY_WRITES.labels("full" if "in full" in done else "update").inc()

    MESH_GRACE = 60.0

    def keep_departed(self, peers):
        """Mesh peers whose registry record vanished stay configured for MESH_GRACE seconds:
        when etcd comes back after an outage longer than a lease, every node's record has
        expired for the second it takes them to register again, and dropping their sessions
        then would withdraw every route in the cluster. A node really gone loses its routes
        by the BGP hold time anyway; only its (idle) session is kept a while longer."""
        now = time.monotonic()
        current = {p.ip: p for p in peers}
        for p in peers:
            if p.allowed is not None:
                self._mesh_seen[p.ip] = (p, now)
        for ip, (p, seen) in list(self._mesh_seen.items()):
            if ip in current:
                continue
            if now - seen < self.MESH_GRACE:
                current[ip] = p
            else:
                del self._mesh_seen[ip]
        return list(current.values())

    UPLINKS_EVERY = 30.0

    def uplinks(self, others):
        """The interfaces towards the other nodes (asked again when the nodes change, and every
        UPLINKS_EVERY seconds: routes change rarely). On failure, none: then pool sources
        from the uplinks are checked by their routes too, which is stricter, not looser."""
        if self.uplinks_of is None:
            return []
        asked, when, answer = self._uplinks
        if asked != others or time.monotonic() - when >= self.UPLINKS_EVERY:
            try:
                answer = self.uplinks_of(self.ip, others)
            except Exception as e:  # noqa: BLE001
                warn("could not tell the uplinks: %s", e)
                answer = []
            self._uplinks = (others, time.monotonic(), answer)
        return answer

    def check_drift(self):
        now = time.monotonic()
        if now - self._last_drift_check < self.drift_every:
            return
        self._last_drift_check = now
        reason = self.firewall.drift()
        if reason:
            log.warning("drift: %s; writing the policy again", reason)
            metrics.POLICY_WRITES.labels("drift").inc()
            self.sync_policy()

    def _loop(self):
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.sync()
                self.check_drift()
                if self.last_error:
                    log.info("agent back in sync")
                self.last_error = None
            except Exception as e:  # noqa: BLE001 - log, retry at the next tick
                if str(e) != str(self.last_error):
                    log.warning("agent sync failed: %s", e)
                self.last_error = e
            self.write_status()
            if self._wake.wait(self.interval):
                # One docker run is several writes within milliseconds (address, endpoint
                # record): one sync for the burst, not one each, off the CPU dockerd needs.
                self._stop.wait(DEBOUNCE)

    def write_status(self):
        """This node's view for `l3netctl status` (a small JSON file, replaced atomically)."""
        if not self.status_path:
            return
        applied = getattr(self.firewall, "applied", None)
        status = {"node": self.name, "ip": self.ip, "pid": os.getpid(), "written": time.time(),
                  "last_sync": self.last_sync, "last_error": str(self.last_error) if self.last_error else None,
                  "etcd_down_since": self.etcd_down_since,
                  "watch": self.cache.following, "datastore_reloads": self.cache.reloads,
                  "datastore_events": self.cache.events, **self.stats,
                  "policy": None if applied is None else {
                      "networks": len(applied.pools), "policies": len(applied.rules),
                      "host_rules": len(applied.host_rules),
                      "members": sum(len(m) for m in applied.members.values())}}
        try:
            tmp = self.status_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(status, f)
            os.replace(tmp, self.status_path)
        except OSError as e:
            log.debug("cannot write %s: %s", self.status_path, e)

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="l3net-agent", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.cache.stop()           # (a watch that is already dead is fine)
        # BIRD is left running: a plugin restart (an upgrade) costs no route, and the next
        # plugin adopts it (bird.py). A node down for good leaves the mesh when its registry
        # lease expires: the other nodes drop their sessions with it.
