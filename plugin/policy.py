"""Isolation and policy rendered as iptables-restore and ipset-restore input (pure; golden-tested).

The model (issue 4): a *network* is a pool; its members are the container addresses allocated
in it on every host, kept in one ipset per network, so the number of rules depends on networks,
policies and nodes, never on containers.

  * members of a network reach each other; a policy opens ``--from`` network to ``--to``
    network for a protocol and port range (either side may be a *tag* instead: every network
    carrying it, through one ``list:set`` per tag holding those networks' sets, so the rule
    count depends on neither members nor tagged networks); everything else towards a container is dropped
    (other networks, other hosts, the outside), except replies to connections the container
    opened (conntrack). The container's own host is not filtered (it has root over the
    container anyway, and health checks and debugging from the host keep working);
  * containers may open connections to the outside world; pools with ``nat_outgoing`` are
    masqueraded towards destinations outside every pool and every cluster host. Networks
    created with ``--internal`` (their pools: ``internal``) may not: nothing of theirs leaves
    the pools, whatever the policies;
  * containers may not reach any cluster host except services opened by a host rule. Their own
    host is protected in INPUT (every address it has), the other nodes in FORWARD (the
    ``l3n-hosts`` set: every address every node published, or the node's address for a rule
    that names a node), and each node's INPUT also refuses remote pool addresses the same way
    (defence in depth);
  * nor the rest of the infrastructure (``l3n-protected``, see infra.py): link-local and the
    clouds' metadata services, the etcd endpoints, the BGP peers, the operator's protected
    ranges. Only a host rule with a destination (``--to CIDR``) opens part of it (never a node
    address, nor for an ``--internal`` network); such traffic is NATed like any outgoing
    traffic;
  * a container only sends with its own address: strict reverse-path check on the host side of
    its veth (one rule, whatever the number of containers); and a pool address is accepted as a
    source only where the routes say it lives (its container's veth, or the uplink towards the
    node announcing it): from Docker's bridge or any other interface it is dropped;
  * l3net is IPv4-only: the host side of its veths has IPv6 off (datapath.py) and ip6tables
    drops every IPv6 packet from or to them (``render_ip6tables``), so a container cannot send
    router advertisements to its host nor reach host services on ``[::]``;
  * a published port (``docker run -p``) is a DNAT rule on the container's host, for packets
    to the host's own addresses (not 127/8) coming in or made on the host. It is for clients
    outside l3net's networks (the outside world, the hosts): containers reach each other at
    their own addresses, by network and policy, also through a published port.

The side effects (running ipset / iptables-restore, drift checks) are in firewall.py.
"""

import hashlib
import re
from dataclasses import dataclass, field

from core.names import HOST_PREFIX
from core.validate import TAG_SIDE

from .encap import PORT as VXLAN_PORT

FORWARD = "L3NET-FORWARD"
TO_CONTAINER = "L3NET-TO-CONTAINER"
FROM_CONTAINER = "L3NET-FROM-CONTAINER"
INPUT = "L3NET-INPUT"
TO_HOST = "L3NET-TO-HOST"
POSTROUTING = "L3NET-POSTROUTING"
PREROUTING = "L3NET-PREROUTING"
DNAT = "L3NET-DNAT"
OUTPUT = "L3NET-OUTPUT"
HOSTS_SET = "l3n-hosts"
PROTECTED_SET = "l3n-protected"
POOLS_SET = "l3n-pools"
NAT_SET = "l3n-nat-pools"
SET_PREFIX = "l3n-"
UPLINK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")     # what iptables -i accepts (no + wildcard)
IFACES = f"{HOST_PREFIX}+"
TAG_SET_SIZE = 4096          # networks per tag (a list:set's limit; its default would be 8)
# (table, built-in chain, our chain): the jumps that hook our chains in, first in their chain.
HOOKS = [("filter", "FORWARD", FORWARD), ("filter", "INPUT", INPUT),
         ("nat", "POSTROUTING", POSTROUTING), ("nat", "PREROUTING", DNAT), ("nat", "OUTPUT", DNAT),
         ("raw", "PREROUTING", PREROUTING)]
# Our chains of each table (v4), for drift checks and removal.
CHAINS = {"filter": [FORWARD, TO_CONTAINER, FROM_CONTAINER, INPUT, TO_HOST],
          "nat": [POSTROUTING, DNAT], "raw": [PREROUTING]}
# IPv6: only drops. Packets from a veth (raw PREROUTING), to one (filter FORWARD for routed
# ones, raw OUTPUT for the host's own).
HOOKS6 = [("raw", "PREROUTING", PREROUTING), ("raw", "OUTPUT", OUTPUT), ("filter", "FORWARD", FORWARD)]
CHAINS6 = {"raw": [PREROUTING, OUTPUT], "filter": [FORWARD]}


@dataclass
class PolicyState:
    node: str = ""                                     # this node's name
    pools: list = field(default_factory=list)          # every pool CIDR
    nat_pools: list = field(default_factory=list)      # pools with outgoing NAT
    members: dict = field(default_factory=dict)        # pool CIDR -> [container address]
    rules: list = field(default_factory=list)          # {"id","from","to","proto","ports"}
    host_rules: list = field(default_factory=list)     # {"id","proto","ports","node"}
    nodes: dict = field(default_factory=dict)          # node name -> address (every node)
    host_addresses: list = field(default_factory=list)  # every address of every node
    protected: list = field(default_factory=list)      # CIDRs containers may not reach
    uplinks: list = field(default_factory=list)        # interfaces towards the other nodes
    internal: list = field(default_factory=list)       # pools of --internal networks
    ports: list = field(default_factory=list)          # {"proto","host_ip","host_port","ip","port"}
    tags: dict = field(default_factory=dict)           # tag -> [pool CIDR carrying it]
    encap: bool = False                                # a pool is encapsulated (VXLAN between nodes)


def set_name(cidr):
    """ipset names are at most 31 characters: a stable digest of the pool CIDR."""
    return SET_PREFIX + hashlib.sha1(str(cidr).encode()).hexdigest()[:12]


def tag_set_name(tag):
    """The ``list:set`` of the sets of the networks carrying ``tag``."""
    return SET_PREFIX + "tag-" + hashlib.sha1(tag.encode()).hexdigest()[:12]


def side_set(side):
    """The set a rule side matches: a network's members, or (``tag:X``) the tag's networks'."""
    return tag_set_name(side[len(TAG_SIDE):]) if side.startswith(TAG_SIDE) else set_name(side)


def sets(state):
    """Every ipset the state needs: {name: (type, sorted entries)}. The tag sets come last:
    they hold the network sets, which must exist first."""
    out = {HOSTS_SET: ("hash:ip", sorted(set(state.nodes.values()) | set(state.host_addresses))),
           PROTECTED_SET: ("hash:net", sorted(set(state.protected))),
           POOLS_SET: ("hash:net", sorted(set(state.pools))),
           NAT_SET: ("hash:net", sorted(set(state.nat_pools)))}
    for pool in state.pools:
        out[set_name(pool)] = ("hash:ip", sorted(set(state.members.get(pool, []))))
    for tag in sorted(state.tags):
        out[tag_set_name(tag)] = ("list:set", sorted({set_name(p) for p in state.tags[tag] if p in state.pools}))
    return out


def _ports(rule):
    """iptables match for a rule's protocol and ports ("5432" or "8000-8080")."""
    proto = rule.get("proto")
    if not proto:
        return ""
    out = f" -p {proto}"
    ports = rule.get("ports")
    if ports and proto in ("tcp", "udp"):
        out += f" --dport {str(ports).replace('-', ':')}"
    return out


def _comment(text):
    return f' -m comment --comment "{text}"'


def _rebuild(name, kind, entries):
    """A set rebuilt in a temporary twin, then swapped in: a set in use is never half full."""
    tmp = name + "-t"
    options = f"size {TAG_SET_SIZE}" if kind == "list:set" else "family inet"
    lines = [f"create {name} {kind} {options} -exist",
             f"create {tmp} {kind} {options} -exist",
             f"flush {tmp}"]
    lines += [f"add {tmp} {e}" for e in entries]
    return lines + [f"swap {tmp} {name}", f"destroy {tmp}"]


def render_ipsets(state):
    """``ipset restore`` input that makes every set exactly what the state says."""
    lines = []
    for name, (kind, entries) in sets(state).items():
        lines += _rebuild(name, kind, entries)
    return "\n".join(lines) + "\n"


def render_set_changes(old, new):
    """Incremental ``ipset restore`` input from state ``old`` to ``new``: new sets are built
    whole, existing ones get only their added and removed entries (a new container costs one
    line, whatever the size of its network). Returns (before, stale): ``before`` is applied
    before the iptables rules, ``stale`` lists the sets to destroy after them (a set
    referenced by a rule cannot be destroyed)."""
    old_sets, new_sets = sets(old), sets(new)
    lines = []
    for name, (kind, entries) in new_sets.items():
        if name not in old_sets or old_sets[name][0] != kind:
            lines += _rebuild(name, kind, entries)
            continue
        before, after = set(old_sets[name][1]), set(entries)
        lines += [f"del {name} {e} -exist" for e in sorted(before - after)]
        lines += [f"add {name} {e} -exist" for e in sorted(after - before)]
    stale = sorted(set(old_sets) - set(new_sets))
    return ("\n".join(lines) + "\n") if lines else "", stale


def render_iptables(state):
    """``iptables-restore --noflush`` input for the filter, nat and raw tables: our chains are
    declared (so flushed and refilled in the same commit); Docker's are not touched. The hooks
    into the built-in chains are added by firewall.py, only where missing."""
    f = ["*filter"] + [f":{c} - [0:0]" for c in (FORWARD, TO_CONTAINER, FROM_CONTAINER, INPUT, TO_HOST)]
    if state.encap:
        # VXLAN between nodes is sent by the nodes themselves, never forwarded: a packet to a
        # node's VXLAN port that this host routes (a container of Docker's bridge sending with
        # a node's address as its source, which the filter below would take) is forged
        f.append(f"-A {FORWARD} -p udp --dport {VXLAN_PORT} -m set --match-set {HOSTS_SET} dst"
                 f"{_comment('vxlan forwarded to a node')} -j DROP")
    f += [f"-A {FORWARD} -o {IFACES} -j {TO_CONTAINER}",
          f"-A {FORWARD} -i {IFACES} -j {FROM_CONTAINER}"]
    # towards a container
    f += [f"-A {TO_CONTAINER} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
          f"-A {TO_CONTAINER} -m conntrack --ctstate INVALID -j DROP",
          f"-A {TO_CONTAINER} -m conntrack --ctstate DNAT -m set ! --match-set {POOLS_SET} src"
          f"{_comment('published ports')} -j ACCEPT"]
    for pool in sorted(state.pools):
        s = set_name(pool)
        f.append(f"-A {TO_CONTAINER} -m set --match-set {s} src -m set --match-set {s} dst"
                 f"{_comment('same network ' + pool)} -j ACCEPT")
    for rule in sorted(state.rules, key=lambda r: r["id"]):
        f.append(f"-A {TO_CONTAINER}{_ports(rule)} -m set --match-set {side_set(rule['from'])} src"
                 f" -m set --match-set {side_set(rule['to'])} dst{_comment('policy ' + rule['id'])}"
                 " -j ACCEPT")
    f.append(f"-A {TO_CONTAINER}{_comment('default: isolated')} -j DROP")
    # from a container: not to cluster hosts (but host services opened), not to the protected
    # infrastructure (but destinations opened with --to, which never open a node: those are
    # host services), anything else goes
    f.append(f"-A {FROM_CONTAINER} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    host_rules = sorted(state.host_rules, key=lambda r: r["id"])
    for rule in host_rules:
        node = rule.get("node")
        if rule.get("to"):
            continue
        if node is None:
            dst = f" -m set --match-set {HOSTS_SET} dst"
        elif node in state.nodes:
            dst = f" -d {state.nodes[node]}/32"
        else:
            continue        # a node that is not registered (yet): nothing to open
        f.append(f"-A {FROM_CONTAINER}{_ports(rule)}{dst}{_comment('host rule ' + rule['id'])} -j ACCEPT")
    for pool in sorted(set(state.internal) & set(state.pools)):
        f.append(f"-A {FROM_CONTAINER} -m set --match-set {set_name(pool)} src -m set ! --match-set "
                 f"{POOLS_SET} dst{_comment('internal ' + pool)} -j DROP")
    for rule in host_rules:
        if rule.get("to"):
            f.append(f"-A {FROM_CONTAINER}{_ports(rule)} -d {rule['to']} -m set ! --match-set {HOSTS_SET} dst"
                     f"{_comment('host rule ' + rule['id'])} -j ACCEPT")
    f.append(f"-A {FROM_CONTAINER} -m set --match-set {PROTECTED_SET} dst{_comment('protected')} -j DROP")
    f.append(f"-A {FROM_CONTAINER} -m set --match-set {HOSTS_SET} dst{_comment('no hosts')} -j DROP")
    f.append(f"-A {FROM_CONTAINER} -j ACCEPT")
    # to this host itself: from a local container, or from a container on another host
    f += [f"-A {INPUT} -i {IFACES} -j {TO_HOST}",
          f"-A {INPUT} -m set --match-set {POOLS_SET} src -j {TO_HOST}",
          f"-A {TO_HOST} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    for rule in host_rules:
        if not rule.get("to") and rule.get("node") in (None, state.node):
            f.append(f"-A {TO_HOST}{_ports(rule)}{_comment('host rule ' + rule['id'])} -j ACCEPT")
    f.append(f"-A {TO_HOST}{_comment('no host access')} -j DROP")
    f.append("COMMIT")
    n = ["*nat", f":{POSTROUTING} - [0:0]", f":{DNAT} - [0:0]",
         f"-A {POSTROUTING} -m set --match-set {NAT_SET} src -m set ! --match-set {POOLS_SET} dst"
         f" -m set ! --match-set {HOSTS_SET} dst{_comment('outgoing NAT')} -j MASQUERADE"]
    for p in sorted(state.ports, key=lambda p: (p["proto"], p["host_port"])):
        to = f" -d {p['host_ip']}/32" if p.get("host_ip") else " ! -d 127.0.0.0/8"
        to += " -m addrtype --dst-type LOCAL"      # the host's own addresses only, never routed traffic
        n.append(f"-A {DNAT}{to} -p {p['proto']} -m {p['proto']} --dport {p['host_port']}"
                 f"{_comment('published ' + p['ip'])} -j DNAT --to-destination {p['ip']}:{p['port']}")
    n.append("COMMIT")
    r = ["*raw", f":{PREROUTING} - [0:0]",
         f"-A {PREROUTING} -i {IFACES} -m rpfilter --invert{_comment('anti-spoofing')} -j DROP"]
    if state.encap:
        # VXLAN only from the cluster's nodes: anyone else on the underlay could put packets
        # into a container network (the device takes any sender with the right VNI)
        r.append(f"-A {PREROUTING} -p udp --dport {VXLAN_PORT} -m set ! --match-set {HOSTS_SET} src"
                 f"{_comment('vxlan from a non-node')} -j DROP")
    # Pool sources from other nodes arrive on the uplinks: passed at the cost of one interface
    # match. From anywhere else (Docker's bridge, another interface) a pool source is dropped
    # unless the routes say it lives there.
    r += [f"-A {PREROUTING} -i {name}{_comment('uplink')} -j RETURN" for name in sorted(set(state.uplinks))
          if UPLINK_NAME.fullmatch(name) and not name.startswith(HOST_PREFIX)]
    r += [f"-A {PREROUTING} ! -i {IFACES} -m set --match-set {POOLS_SET} src -m rpfilter --invert"
          f"{_comment('pool source on a foreign interface')} -j DROP",
          "COMMIT"]
    return "\n".join(f + n + r) + "\n"


def render_ip6tables():
    """``ip6tables-restore --noflush`` input: l3net is IPv4-only, so no IPv6 packet passes
    to or from an l3net veth (the host side also has IPv6 off: this is the second lock)."""
    why = _comment("l3net is IPv4-only")
    return "\n".join([
        "*raw", f":{PREROUTING} - [0:0]", f":{OUTPUT} - [0:0]",
        f"-A {PREROUTING} -i {IFACES}{why} -j DROP",
        f"-A {OUTPUT} -o {IFACES}{why} -j DROP",
        "COMMIT",
        "*filter", f":{FORWARD} - [0:0]",
        f"-A {FORWARD} -o {IFACES}{why} -j DROP",
        f"-A {FORWARD} -i {IFACES}{why} -j DROP",
        "COMMIT"]) + "\n"


def render_hooks(fixes):
    """``iptables-restore --noflush`` input putting the given HOOKS first in their built-in
    chains: ``fixes`` is [(hook, copies present)]; the copies are deleted and one inserted at
    the top, in the same commit (--noflush would otherwise add a duplicate)."""
    lines = []
    for table in ("filter", "nat", "raw"):
        jumps = [(chain, ours, n) for (t, chain, ours), n in fixes if t == table]
        if jumps:
            lines.append(f"*{table}")
            for chain, ours, copies in jumps:
                lines += [f"-D {chain} -j {ours}"] * copies + [f"-I {chain} 1 -j {ours}"]
            lines.append("COMMIT")
    return ("\n".join(lines) + "\n") if lines else ""


def hook_line(chain, ours):
    """How iptables-save prints a hook."""
    return f"-A {chain} -j {ours}"
