"""Isolation and policy rendered as iptables-restore and ipset-restore input (pure; golden-tested).

The model (issue 4): a *network* is a pool; its members are the container addresses allocated
in it on every host, kept in one ipset per network, so the number of rules depends on networks
and policies, never on containers.

  * members of a network reach each other; a policy opens ``--from`` network to ``--to``
    network for a protocol and port range; everything else towards a container is dropped,
    except replies to connections the container opened (conntrack);
  * containers may open connections to the outside world; pools with ``nat_outgoing`` are
    masqueraded towards destinations outside every pool;
  * containers may not reach any cluster host (``l3n-hosts``) except host services opened by a
    host rule; this covers their own host (INPUT) and the others (FORWARD);
  * a container only sends with its own address: strict reverse-path check on the host side of
    its veth (one rule, whatever the number of containers).

This module is not wired into the agent yet: it is the pure half, with its tests.
"""

import hashlib
from dataclasses import dataclass, field

from .datapath import HOST_PREFIX

FORWARD = "L3NET-FORWARD"
TO_CONTAINER = "L3NET-TO-CONTAINER"
FROM_CONTAINER = "L3NET-FROM-CONTAINER"
INPUT = "L3NET-INPUT"
POSTROUTING = "L3NET-POSTROUTING"
PREROUTING = "L3NET-PREROUTING"
HOSTS_SET = "l3n-hosts"
POOLS_SET = "l3n-pools"
NAT_SET = "l3n-nat-pools"
IFACES = f"{HOST_PREFIX}+"


@dataclass
class PolicyState:
    pools: list = field(default_factory=list)          # every pool CIDR
    nat_pools: list = field(default_factory=list)      # pools with outgoing NAT
    members: dict = field(default_factory=dict)        # pool CIDR -> [container address]
    rules: list = field(default_factory=list)          # {"id","from","to","proto","ports"}
    host_rules: list = field(default_factory=list)     # {"id","proto","ports"} for this node
    host_ips: list = field(default_factory=list)       # every cluster host's address


def set_name(cidr):
    """ipset names are at most 31 characters: a stable digest of the pool CIDR."""
    return "l3n-" + hashlib.sha1(str(cidr).encode()).hexdigest()[:12]


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


def render_ipsets(state):
    """``ipset restore`` input: every set rebuilt in a temporary twin, then swapped in (a set
    in use is never empty half way)."""
    sets = [(HOSTS_SET, "hash:ip", state.host_ips),
            (POOLS_SET, "hash:net", state.pools),
            (NAT_SET, "hash:net", state.nat_pools)]
    sets += [(set_name(p), "hash:ip", state.members.get(p, [])) for p in sorted(state.pools)]
    lines = []
    for name, kind, entries in sets:
        tmp = name + "-t"
        lines += [f"create {name} {kind} family inet -exist",
                  f"create {tmp} {kind} family inet -exist",
                  f"flush {tmp}"]
        lines += [f"add {tmp} {e}" for e in sorted(set(entries))]
        lines += [f"swap {tmp} {name}", f"destroy {tmp}"]
    return "\n".join(lines) + "\n"


def render_iptables(state):
    """``iptables-restore --noflush`` input for the filter, nat and raw tables: our chains are
    declared (so flushed and refilled in the same commit); Docker's are not touched."""
    f = ["*filter", f":{FORWARD} - [0:0]", f":{TO_CONTAINER} - [0:0]",
         f":{FROM_CONTAINER} - [0:0]", f":{INPUT} - [0:0]"]
    f += [f"-A {FORWARD} -o {IFACES} -j {TO_CONTAINER}",
          f"-A {FORWARD} -i {IFACES} -j {FROM_CONTAINER}"]
    # towards a container
    f += [f"-A {TO_CONTAINER} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
          f"-A {TO_CONTAINER} -m conntrack --ctstate INVALID -j DROP"]
    for pool in sorted(state.pools):
        s = set_name(pool)
        f.append(f"-A {TO_CONTAINER} -m set --match-set {s} src -m set --match-set {s} dst"
                 f"{_comment('same network ' + pool)} -j ACCEPT")
    for rule in sorted(state.rules, key=lambda r: r["id"]):
        f.append(f"-A {TO_CONTAINER}{_ports(rule)} -m set --match-set {set_name(rule['from'])} src"
                 f" -m set --match-set {set_name(rule['to'])} dst{_comment('policy ' + rule['id'])}"
                 " -j ACCEPT")
    f.append(f"-A {TO_CONTAINER}{_comment('default: isolated')} -j DROP")
    # from a container: not to cluster hosts (but host services opened), anything else goes
    f.append(f"-A {FROM_CONTAINER} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    for rule in sorted(state.host_rules, key=lambda r: r["id"]):
        f.append(f"-A {FROM_CONTAINER}{_ports(rule)} -m set --match-set {HOSTS_SET} dst"
                 f"{_comment('host rule ' + rule['id'])} -j ACCEPT")
    f.append(f"-A {FROM_CONTAINER} -m set --match-set {HOSTS_SET} dst{_comment('no hosts')} -j DROP")
    f.append(f"-A {FROM_CONTAINER} -j ACCEPT")
    # to this host itself
    f.append(f"-A {INPUT} -i {IFACES} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    for rule in sorted(state.host_rules, key=lambda r: r["id"]):
        f.append(f"-A {INPUT} -i {IFACES}{_ports(rule)}{_comment('host rule ' + rule['id'])} -j ACCEPT")
    f.append(f"-A {INPUT} -i {IFACES}{_comment('no host access')} -j DROP")
    f.append("COMMIT")
    n = ["*nat", f":{POSTROUTING} - [0:0]",
         f"-A {POSTROUTING} -m set --match-set {NAT_SET} src -m set ! --match-set {POOLS_SET} dst"
         f"{_comment('outgoing NAT')} -j MASQUERADE", "COMMIT"]
    r = ["*raw", f":{PREROUTING} - [0:0]",
         f"-A {PREROUTING} -i {IFACES} -m rpfilter --invert{_comment('anti-spoofing')} -j DROP",
         "COMMIT"]
    return "\n".join(f + n + r) + "\n"
