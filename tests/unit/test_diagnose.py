"""diagnose's reasoning over records (pure): the records go into an in-memory store, and the
facts come from it the way `l3netctl diagnose` gets them (gather: the agents' calculation)."""

import json

from core.keys import Keys
from plugin.diagnose import diagnose, gather, pool_of
from plugin.store import MemoryStore


def facts_from(pools, allocations, nodes, rules=(), host_rules=(), protected=(), addresses=None,
               here="h1", **extra):
    """Facts from records written as l3netctl and the plugins write them; ``extra`` sets what
    only the node itself knows (route_to_dst, bgp, subnets)."""
    store, keys = MemoryStore(), Keys("/l3net")
    for cidr, record in pools.items():
        store.put(keys.pool(cidr), json.dumps(record))
    for ip, held in allocations.items():
        store.put(keys.member(pool_of(ip, list(pools)), ip), json.dumps({"time": 0, **held}))
    for name, ip in nodes.items():
        store.put(keys.node(name), json.dumps({"name": name, "ip": ip,
                                               "addresses": (addresses or {}).get(name, [ip])}))
    for rule in rules:
        store.put(keys.policy_rule(rule["id"]), json.dumps(rule))
    for rule in host_rules:
        store.put(keys.host_rule(rule["id"]), json.dumps(rule))
    for cidr in protected:
        store.put(keys.protected_range(cidr), json.dumps({"cidr": cidr}))
    facts = gather(store, keys, here)
    for name, value in extra.items():
        setattr(facts, name, value)
    return facts

POOLS = {"10.20.0.0/24": {"cidr": "10.20.0.0/24", "nat_outgoing": True},
         "10.30.0.0/24": {"cidr": "10.30.0.0/24", "nat_outgoing": False}}
ALLOC = {"10.20.0.1": {"handle": "endpoint:a", "host": "h1"},
         "10.20.0.65": {"handle": "endpoint:b", "host": "h2"},
         "10.30.0.1": {"handle": "endpoint:c", "host": "h2"}}
NODES = {"h1": "198.18.0.11", "h2": "198.18.0.12"}


def facts(**kw):
    base = dict(pools=POOLS, allocations=ALLOC, nodes=NODES, rules=[], host_rules=[], here="h1",
                route_to_dst="10.20.0.65 via 198.18.0.12 dev eth0 src 198.18.0.11")
    return facts_from(**{**base, **kw})


def verdict(src, dst, f, proto=None, port=None):
    v, steps = diagnose(src, dst, f, proto, port)
    return v, " | ".join(s.what for s in steps)


def test_same_network_across_hosts():
    assert verdict("10.20.0.1", "10.20.0.65", facts())[0] == "REACHABLE"


def test_no_route_when_the_other_host_is_gone_or_bgp_is_down():
    v, why = verdict("10.20.0.1", "10.20.0.65", facts(nodes={"h1": "198.18.0.11"}))
    assert v == "NOT REACHABLE" and "h2 is not registered" in why
    v, why = verdict("10.20.0.1", "10.20.0.65", facts(route_to_dst="10.20.0.65 dev eth0", bgp={"down": 1}))
    assert v == "NOT REACHABLE" and "1 BGP sessions down" in why


def test_policy_decides_between_networks():
    v, why = verdict("10.20.0.1", "10.30.0.1", facts(), "tcp", 5432)
    assert v == "NOT REACHABLE" and "no policy from 10.20.0.0/24 to 10.30.0.0/24" in why
    rule = {"id": "p1", "from": "10.20.0.0/24", "to": "10.30.0.0/24", "proto": "tcp", "ports": "5000-6000"}
    assert verdict("10.20.0.1", "10.30.0.1", facts(rules=[rule]), "tcp", 5432)[0] == "REACHABLE"
    v, why = verdict("10.20.0.1", "10.30.0.1", facts(rules=[rule]), "udp", 5432)
    assert v == "NOT REACHABLE" and "open only tcp/5000-6000" in why
    assert verdict("10.20.0.1", "10.30.0.1", facts(rules=[rule]))[0] == "NOT REACHABLE"   # any traffic


def test_hosts_and_outside():
    v, why = verdict("10.20.0.1", "198.18.0.12", facts(), "tcp", 22)
    assert v == "NOT REACHABLE" and "cluster host h2" in why
    ssh = {"id": "h1", "proto": "tcp", "ports": "22", "node": "h2"}
    assert verdict("10.20.0.1", "198.18.0.12", facts(host_rules=[ssh]), "tcp", 22)[0] == "REACHABLE"
    assert verdict("10.20.0.1", "198.18.0.11", facts(host_rules=[ssh]), "tcp", 22)[0] == "NOT REACHABLE"
    assert verdict("10.20.0.1", "8.8.8.8", facts())[0] == "REACHABLE"
    assert verdict("10.30.0.1", "8.8.8.8", facts())[0] == "REACHABLE IF ROUTED BACK"
    assert verdict("10.99.0.1", "8.8.8.8", facts())[0] == "UNKNOWN"


def test_internal_network_does_not_reach_the_outside():
    pools = {**POOLS, "10.20.0.0/24": {**POOLS["10.20.0.0/24"], "internal": True}}
    v, why = verdict("10.20.0.1", "8.8.8.8", facts(pools=pools))
    assert v == "NOT REACHABLE" and "internal" in why
    assert verdict("10.20.0.1", "10.20.0.65", facts(pools=pools))[0] == "REACHABLE"


def test_across_subnets_the_policy_message_names_the_traffic_asked_about():
    """The tunnel step between two subnets must not replace the description of the traffic
    asked about (it once printed 'open only tcp/80, not hosts h1 (...) ... VXLAN tunnel')."""
    pools = {**POOLS, "10.30.0.0/24": {**POOLS["10.30.0.0/24"], "encap": "cross-subnet"}}
    rule = {"id": "p1", "from": "10.20.0.0/24", "to": "10.30.0.0/24", "proto": "tcp", "ports": "80"}
    f = facts(pools=pools, rules=[rule], here="h9",
              subnets={"h1": "198.18.0.0/25", "h2": "198.18.0.128/25"})
    v, why = verdict("10.20.0.1", "10.30.0.1", f, "tcp", 5432)
    assert v == "NOT REACHABLE", why
    assert "goes through the VXLAN tunnel" in why
    assert "open only tcp/80, not tcp/5432" in why, why
