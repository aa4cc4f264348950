"""``l3netctl diagnose SRC DST``: can SRC reach DST, and if not, why (pure: it reasons over
records read from etcd and a few facts about this host, and returns the steps it took).

SRC is an l3net container address; DST is another container address, a cluster node's address,
or anything outside. The checks, in the order a packet meets them:
  1. both ends known: SRC allocated in a pool (and on which host), DST classified;
  2. the route: DST's host registered (its BGP announces its blocks), and, when this host is
     SRC's, the kernel's route to DST (``ip route get``), with the BGP sessions;
  3. the policy: same network, a policy from SRC's network (or a tag it carries) to DST's
     (protocol, port; or one naming a tag the networks lack, which would), a host
     rule for a cluster node (any of its addresses), a host rule with ``--to`` for a protected
     destination (link-local and cloud metadata, etcd, BGP peers, the operator's ranges),
     outgoing NAT for the outside. A pool the agents refuse (it lies over infrastructure) is
     said so first.
"""

from dataclasses import dataclass, field

from netaddr import IPAddress, IPNetwork

from core.validate import TAG_SIDE

from .policy import PolicyState


@dataclass
class Facts:
    state: PolicyState               # what the agents enforce: calc.desired_policy, as they compute it
    allocations: dict                # address -> {"handle", "host"}: the member records, as the agents read them
    here: str = None                 # this host's node name
    route_to_dst: str = None         # `ip route get DST` on this host, if asked
    bgp: dict = field(default_factory=dict)    # this node's BGP session states, if any
    addresses: dict = field(default_factory=dict)   # node name -> every address it published (naming)
    refused: dict = field(default_factory=dict)     # pool cidr -> why the agents do not enforce it
    subnets: dict = field(default_factory=dict)     # node name -> the subnet of its address (encap)
    encap: dict = field(default_factory=dict)       # pool cidr -> its encapsulation mode


def gather(store, keys, here, route_to_dst=None, bgp=None):
    """The facts for a diagnosis, from etcd (``store``), computed by the same functions the
    agents use to decide what to enforce: what diagnose says is what the kernel does."""
    import json

    from core.infra import canonical_cidr, pool_conflict
    from ipam.pools import encap_of

    from . import calc
    from .encap import own_subnet
    state = calc.desired_policy(store, keys, here)
    registered = calc.nodes(store, keys)
    refused = {}                     # the pools in etcd the agents leave out, and why
    for _, value, _ in store.get_prefix(keys.pools()):
        try:
            cidr = json.loads(value).get("cidr")
        except (ValueError, AttributeError):
            continue
        if isinstance(cidr, str) and canonical_cidr(cidr) and cidr not in state.pools:
            refused[cidr] = pool_conflict(cidr, calc.RESERVED_NETS)
    return Facts(state=state,
                 allocations={ip: a for _, ip, a in calc.allocations(store, keys)},
                 here=here, route_to_dst=route_to_dst, bgp=bgp or {},
                 addresses={**{"(a node away, not removed)": calc.known_node_addresses(store, keys)},
                            **{n["name"]: n["addresses"] for n in registered}},
                 refused=refused,
                 subnets={n["name"]: own_subnet(n, n["ip"]) for n in registered},
                 encap={p["cidr"]: encap_of(p) for p in calc.pools_in_force(store, keys)})


@dataclass
class Step:
    ok: bool
    what: str


def pool_of(address, pools):
    ip = IPAddress(address)
    return next((c for c in sorted(pools) if ip in IPNetwork(c)), None)


def describe(rule):
    return f"{rule.get('proto') or 'all'}{'/' + str(rule['ports']) if rule.get('ports') else ''}"


def diagnose(src, dst, facts, proto=None, port=None):
    """(verdict, [Step]) for SRC -> DST (proto/port: the traffic asked about; None: any)."""
    steps = []
    state = facts.state
    every_pool = sorted(set(state.pools) | set(facts.refused))
    src_pool, dst_pool = pool_of(src, every_pool), pool_of(dst, every_pool)
    for pool in (src_pool, dst_pool):
        if pool in facts.refused:
            steps.append(Step(False, f"network {pool} is refused: {facts.refused[pool]}; no node puts it "
                                     "in force (nothing reaches its members)"))
            return "NOT REACHABLE", steps
    held = facts.allocations.get(src)
    if src_pool is None or held is None:
        steps.append(Step(False, f"{src} is not an allocated l3net address: nothing to diagnose"))
        return "UNKNOWN", steps
    src_host = held["host"]
    steps.append(Step(True, f"{src}: network {src_pool}, on host {src_host} ({held['handle']})"))
    node_of_dst = next((n for n, ip in state.nodes.items() if ip == dst), None) or \
        next((n for n, ips in facts.addresses.items() if dst in ips), None) or \
        ("(a node's address)" if dst in state.host_addresses else None)
    opened_to = [r for r in state.host_rules if _covers(r.get("to"), dst)]
    what = f"{proto or 'any protocol'}{'/' + str(port) if port else ''}"

    if dst_pool is not None:
        dheld = facts.allocations.get(dst)
        if dheld is None:
            steps.append(Step(False, f"{dst} is in network {dst_pool} but nobody holds it: no such container"))
            return "NOT REACHABLE", steps
        dst_host = dheld["host"]
        if dst not in state.members.get(dst_pool, []):
            steps.append(Step(False, f"{dst} is reserved in network {dst_pool} ({dheld['handle']}: a --gateway "
                                     "or --aux-address), not a container"))
            return "NOT REACHABLE", steps
        steps.append(Step(True, f"{dst}: network {dst_pool}, on host {dst_host} ({dheld['handle']})"))
        # the route
        if dst_host != src_host:
            if dst_host not in state.nodes:
                steps.append(Step(False, f"no route: host {dst_host} is not registered (its plugin is "
                                         "down or gone), so nobody announces its containers"))
                return "NOT REACHABLE", steps
            steps.append(Step(True, f"host {dst_host} is registered at {state.nodes[dst_host]}"))
            crossing = _crossing(facts, src_host, dst_host, dst_pool)
            if crossing:
                ok, why = crossing
                steps.append(Step(ok, why))
                if not ok and not (facts.here == src_host and facts.route_to_dst and
                                   f"via {state.nodes[dst_host]} " in facts.route_to_dst + " "):
                    return "NOT REACHABLE", steps
            if facts.here == src_host and facts.route_to_dst is not None:
                via = state.nodes[dst_host]
                if f"via {via} " in facts.route_to_dst + " ":
                    steps.append(Step(True, f"route on {src_host}: {facts.route_to_dst.strip()}"))
                else:
                    down = facts.bgp.get("down", 0)
                    steps.append(Step(False, f"route on {src_host} does not go via {via}: "
                                             f"{facts.route_to_dst.strip() or 'none'}"
                                             + (f" ({down} BGP sessions down: l3netctl bgp status)" if down else
                                                " (BGP: l3netctl bgp status)")))
                    return "NOT REACHABLE", steps
            elif facts.here != src_host:
                steps.append(Step(True, f"(routes not checked: run diagnose on {src_host} for that)"))
        # the policy
        if dst_pool == src_pool:
            steps.append(Step(True, "same network: allowed"))
            return "REACHABLE", steps
        opening = [r for r in state.rules if _names(r.get("from"), src_pool, state)
                   and _names(r.get("to"), dst_pool, state)]
        allowed = [r for r in opening if _rule_allows(r, proto, port)]
        if allowed:
            steps.append(Step(True, f"policy {allowed[0]['id']} allows {_side(allowed[0]['from'], src_pool)} -> "
                                    f"{_side(allowed[0]['to'], dst_pool)} {describe(allowed[0])}"))
            return "REACHABLE", steps
        if opening:
            steps.append(Step(False, f"policies from {src_pool} to {dst_pool} open only "
                                     f"{', '.join(describe(r) + _via_tags(r) for r in opening)}, not {what}"))
            return "NOT REACHABLE", steps
        naming_tags = [r for r in state.rules if _tag_of(r.get("from")) or _tag_of(r.get("to"))]
        would = [r for r in naming_tags if _names(r.get("from"), src_pool, state, any_tag=True)
                 and _names(r.get("to"), dst_pool, state, any_tag=True) and _rule_allows(r, proto, port)]
        hint = ""
        if would:
            r = would[0]
            missing = [f"{pool} lacks tag {_tag_of(side)}" for side, pool in ((r["from"], src_pool), (r["to"], dst_pool))
                       if _tag_of(side) and _tag_of(side) not in _tags(state, pool)]
            hint = (f"; policy {r['id']} ({r['from']} -> {r['to']} {describe(r)}) would allow it, but "
                    f"{' and '.join(missing)} (l3netctl tag add ...)")
        steps.append(Step(False, f"policy denies: different networks, and no policy from {src_pool} to "
                                 f"{dst_pool}{hint or f' (l3netctl policy allow --from {src_pool} --to {dst_pool} ...)'}"))
        return "NOT REACHABLE", steps

    if node_of_dst is not None:
        steps.append(Step(True, f"{dst}: cluster host {node_of_dst}"))
        rules = [r for r in state.host_rules if not r.get("to") and r.get("node") in (None, node_of_dst)]
        allowed = [r for r in rules if _rule_allows(r, proto, port)]
        if allowed:
            steps.append(Step(True, f"host rule {allowed[0]['id']} opens {describe(allowed[0])} on "
                                    f"{allowed[0].get('node') or 'every node'}"))
            return "REACHABLE", steps
        opened = ", ".join(describe(r) for r in rules) or "nothing"
        steps.append(Step(False, f"host rule denies: containers may not reach cluster hosts; open on "
                                 f"{node_of_dst}: {opened} (l3netctl host allow --proto P --port N)"))
        return "NOT REACHABLE", steps

    guarded = next((c for c in state.protected if IPAddress(dst) in IPNetwork(c)), None)
    if guarded is not None:
        what_it_is = ("link-local: the cloud's instance metadata service (credentials) lives at "
                      "169.254.169.254" if IPAddress(dst) in IPNetwork("169.254.0.0/16") else
                      "the cluster's infrastructure (etcd, a BGP peer, or a range the operator protects)")
        steps.append(Step(True, f"{dst}: protected ({guarded}; {what_it_is})"))
        allowed = [r for r in opened_to if _rule_allows(r, proto, port)]
        if allowed:
            steps.append(Step(True, f"host rule {allowed[0]['id']} opens {describe(allowed[0])} to "
                                    f"{allowed[0]['to']}"))
            return "REACHABLE", steps
        opened = ", ".join(f"{describe(r)} ({r['id']})" for r in opened_to) or "nothing"
        steps.append(Step(False, f"protected destination: containers may not reach {guarded}; open to "
                                 f"{dst}: {opened} (l3netctl host allow --to {dst}/32 --proto P --port N)"))
        return "NOT REACHABLE", steps
    steps.append(Step(True, f"{dst}: outside the cluster (no pool, not a node)"))
    if src_pool in state.internal:
        steps.append(Step(False, f"network {src_pool} is internal (docker network create --internal): "
                                 "nothing of it leaves the cluster's pools"))
        return "NOT REACHABLE", steps
    if src_pool in state.nat_pools:
        steps.append(Step(True, f"outgoing NAT on for {src_pool}: the outside sees {src_host}'s address"))
        return "REACHABLE", steps
    steps.append(Step(False, f"outgoing NAT off for {src_pool}: the outside sees {src} and must have a "
                             "route back to the pool"))
    return "REACHABLE IF ROUTED BACK", steps


def _crossing(facts, src_host, dst_host, pool):
    """(ok, what) when the two hosts are in different subnets (None otherwise): a pool
    encapsulated towards the other subnet goes through the VXLAN tunnel; one that is not needs
    routes across the router between them, which BGP between the nodes does not give."""
    a, b = facts.subnets.get(src_host), facts.subnets.get(dst_host)
    if not a or not b or a == b:
        return None
    mode = facts.encap.get(pool, "never")
    if mode != "never":
        return True, f"hosts {src_host} ({a}) and {dst_host} ({b}) are in different subnets: pool {pool} " \
                     f"(encap={mode}) goes through the VXLAN tunnel"
    return False, f"hosts {src_host} ({a}) and {dst_host} ({b}) are in different subnets and pool {pool} is " \
                  "not encapsulated (encap=never): its routes must cross the router between them, which " \
                  "needs a router that learns the pools by BGP (l3netctl bgp peer add); or use a pool with " \
                  "--ipam-opt encap=cross-subnet"


def _tag_of(side):
    return side[len(TAG_SIDE):] if isinstance(side, str) and side.startswith(TAG_SIDE) else None


def _tags(state, pool):
    """The tags ``pool`` carries, as the agents put its set into the tags' sets."""
    return [tag for tag, pools in state.tags.items() if pool in pools]


def _names(side, pool, state, any_tag=False):
    """Whether a rule side (a network, or ``tag:X``) takes in ``pool``; ``any_tag``: would,
    were the pool tagged."""
    tag = _tag_of(side)
    if tag is None:
        return side == pool
    return any_tag or tag in _tags(state, pool)


def _side(side, pool):
    tag = _tag_of(side)
    return pool if tag is None else f"{pool} (tag {tag})"


def _via_tags(rule):
    tags = [t for t in (_tag_of(rule.get("from")), _tag_of(rule.get("to"))) if t]
    return f" (policy {rule['id']}, tag {', '.join(tags)})" if tags else ""


def _covers(cidr, address):
    """Whether a rule's ``--to`` CIDR holds ``address`` (a malformed one holds nothing: the
    agents skip it too)."""
    from core.infra import canonical_cidr
    return bool(canonical_cidr(cidr)) and IPAddress(address) in IPNetwork(cidr)


def _rule_allows(rule, proto, port):
    """Is all of the asked traffic (proto, port; None = any) inside what ``rule`` opens?"""
    if not rule.get("proto"):
        return True                               # the rule opens everything
    if proto != rule["proto"]:
        return False
    if not rule.get("ports"):
        return True
    if port is None:
        return False
    low, _, high = str(rule["ports"]).partition("-")
    return int(low) <= int(port) <= int(high or low)
