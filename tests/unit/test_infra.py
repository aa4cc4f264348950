"""The infrastructure model (plugin/infra.py) and what uses it: pools refused by the IPAM, the
agent's desired policy (protected ranges, every node address, pools not enforced), host rules
with --to, diagnose's new denials. Pure or in-memory: no root, no etcd."""

import json

import pytest
from netaddr import IPNetwork

from core import infra
from core.errors import L3netError
from core.keys import Keys
from ipam.allocator import Ipam
from plugin.agent import Registry
from plugin.calc import desired_bgp, desired_policy, read_infrastructure
from plugin.diagnose import diagnose
from plugin.store import MemoryStore

KEYS = Keys("/t")
NODE = {"name": "h2", "ip": "198.18.0.12", "as": 64512,
        "addresses": ["198.18.0.12", "10.1.0.12", "not-an-ip", "10.1.0.012"],
        "networks": ["198.18.0.0/24", "10.1.0.0/16", "10.1.0.5/16", "x"], "etcd": ["198.18.0.1", 7]}


def test_node_facts_keep_only_well_formed_entries():
    facts = infra.node_facts(NODE)
    assert facts == {"name": "h2", "ip": "198.18.0.12", "addresses": ["10.1.0.12", "198.18.0.12"],
                     "networks": ["10.1.0.0/16", "198.18.0.0/24"], "etcd": ["198.18.0.1"]}
    assert infra.node_facts({"name": "h3", "ip": "198.18.0.13"})["addresses"] == ["198.18.0.13"]
    for bad in ({"ip": "198.18.0.1"}, {"name": "x", "ip": "1.2.3"}, [], "x", {"name": 1, "ip": "1.2.3.4"}):
        assert infra.node_facts(bad) is None


@pytest.mark.parametrize("cidr,why", [
    ("127.0.0.0/8", "loopback"), ("0.0.0.0/8", "this network"), ("169.254.0.0/24", "link-local"),
    ("239.0.0.0/8", "multicast"), ("240.0.0.0/8", "multicast and reserved"),
    ("198.18.0.0/16", "node h2's address 198.18.0.12"), ("10.1.200.0/24", "node h2's network 10.1.0.0/16"),
    ("198.18.0.0/31", "the etcd endpoint 198.18.0.1"), ("192.0.2.0/24", "the BGP peer 192.0.2.9"),
    ("172.30.0.0/24", "the protected range 172.30.0.0/16")])
def test_pools_over_infrastructure_conflict(cidr, why):
    reserved = infra.infrastructure([infra.node_facts(NODE)], ["192.0.2.9"], ["172.30.0.0/16"])
    assert why in infra.pool_conflict(cidr, reserved)


def test_allowed_ranges_and_free_subnets():
    reserved = infra.infrastructure([], [], [])
    assert infra.pool_conflict("10.20.0.0/24", reserved) is None
    assert "outside the ranges allowed for pools (10.64.0.0/10" in \
        infra.pool_conflict("10.20.0.0/24", reserved, ["10.64.0.0/10"])
    assert infra.pool_conflict("10.64.1.0/24", reserved, ["10.64.0.0/10"]) is None


def test_protected_ranges():
    got = infra.protected([infra.node_facts(NODE)], ["192.0.2.9", "bad"], ["172.30.0.0/16", "10.0.0.1/8"])
    assert got == ["100.100.100.200/32", "168.63.129.16/32", "169.254.0.0/16", "172.30.0.0/16", "192.0.2.9/32",
                   "198.18.0.1/32"]


def test_ipam_refuses_pools_over_infrastructure_and_writes_nothing():
    store = MemoryStore()
    store.put(KEYS.node("h2"), json.dumps(NODE))
    ipam = Ipam(store, KEYS, "h1", infrastructure=lambda: read_infrastructure(store, KEYS))
    before = store.get_prefix("/t/ipam/")
    for cidr in ("127.0.0.0/8", "198.18.0.0/16", "10.1.0.0/24"):
        with pytest.raises(L3netError, match="overlaps"):
            ipam.request_pool(cidr)
        with pytest.raises(L3netError, match="overlaps"):
            ipam.add_pool(cidr)
    assert store.get_prefix("/t/ipam/") == before
    # an existing pool stays joinable when a host address later falls into it
    Ipam(store, KEYS, "h3").request_pool("10.30.0.0/16")
    store.put(KEYS.node("h4"), json.dumps({"name": "h4", "ip": "198.18.0.14", "addresses": ["10.30.5.1"]}))
    assert ipam.request_pool("10.30.0.0/16")[1] == "10.30.0.0/16"
    store.put(KEYS.pool_ranges(), json.dumps({"ranges": ["10.64.0.0/10"]}))
    with pytest.raises(L3netError, match="10.64.0.0/10"):
        ipam.request_pool("10.20.0.0/24")
    assert ipam.request_pool("10.65.0.0/24")[1] == "10.65.0.0/24"


def test_auto_pool_steps_over_infrastructure():
    store = MemoryStore()
    store.put(KEYS.node("h2"), json.dumps({**NODE, "networks": ["10.250.0.0/23"]}))
    ipam = Ipam(store, KEYS, "h1", infrastructure=lambda: read_infrastructure(store, KEYS))
    assert ipam.request_pool()[1] == "10.250.2.0/24"
    # without any infrastructure reader, the reserved ranges are still refused
    with pytest.raises(L3netError, match="link-local"):
        Ipam(MemoryStore(), KEYS, "h1").request_pool("169.254.0.0/16")


def policy_store():
    store = MemoryStore()
    store.put(KEYS.node("h1"), json.dumps({"name": "h1", "ip": "198.18.0.11", "etcd": ["198.18.0.1"]}))
    store.put(KEYS.node("h2"), json.dumps(NODE))
    store.put(KEYS.bgp_peer("192.0.2.9"), json.dumps({"ip": "192.0.2.9", "as": 65000}))
    store.put(KEYS.protected_range("172.30.0.0/16"), json.dumps({"cidr": "172.30.0.0/16"}))
    # the second and third written behind l3netctl's back: over link-local, over a node's address
    for cidr in ("10.20.0.0/24", "169.254.0.0/16", "198.18.0.0/16"):
        store.put(KEYS.pool(cidr), json.dumps({"cidr": cidr, "block_prefix": 26, "refs": {}}))
    return store


def test_desired_policy_protects_infrastructure_and_skips_pools_over_it():
    store = policy_store()
    for rule in ({"id": "m1", "proto": "tcp", "ports": "80", "to": "169.254.169.254/32"},
                 {"id": "bad1", "proto": "tcp", "ports": "80", "to": "169.254.169.254/16"},
                 {"id": "bad2", "proto": "tcp", "ports": "80", "to": "10.0.0.0/8", "node": "h1"},
                 {"id": "bad3", "proto": "tcp", "ports": "80", "to": "1.2.3.4/32 -j ACCEPT"}):
        store.put(KEYS.host_rule(rule["id"]), json.dumps(rule))
    state = desired_policy(store, KEYS, "h1")
    # a reserved range is never enforced; an existing pool is not switched off because a host
    # address turned up in it (a Docker bridge created on some host would otherwise do that)
    assert state.pools == ["10.20.0.0/24", "198.18.0.0/16"]
    assert state.host_addresses == ["10.1.0.12", "198.18.0.11", "198.18.0.12"]
    assert state.protected == ["100.100.100.200/32", "168.63.129.16/32", "169.254.0.0/16", "172.30.0.0/16",
                               "192.0.2.9/32", "198.18.0.1/32"]
    assert [r["id"] for r in state.host_rules] == ["m1"]
    bgp, _ = desired_bgp(store, KEYS, "h1", "198.18.0.11")
    assert "169.254.0.0/16" not in bgp.pools, "a reserved range must not reach BIRD's filters"


def test_node_addresses_stay_protected_while_the_node_is_away():
    """A node's lease expires (its plugin stopped, or cut off from etcd): every node keeps
    protecting its addresses until `l3netctl node remove`."""
    store = MemoryStore()
    Registry(store, KEYS, "h2", "198.18.0.12", facts=lambda: {"addresses": ["198.18.0.12", "10.1.0.12"]}
             ).heartbeat(64512)
    assert desired_policy(store, KEYS, "h1").host_addresses == ["10.1.0.12", "198.18.0.12"]
    store.delete(KEYS.node("h2"))                    # the lease expired
    state = desired_policy(store, KEYS, "h1")
    assert state.host_addresses == ["10.1.0.12", "198.18.0.12"] and "h2" not in state.nodes


def test_a_bad_bgp_record_stops_neither_the_heartbeat_nor_the_others():
    from plugin.agent import Agent
    store = MemoryStore()
    store.put(KEYS.bgp_peer("192.0.2.1"), "{not json")
    store.put(KEYS.bgp_peer("192.0.2.2"), json.dumps({"ip": "192.0.2.2", "as": 65000, "name": "rr\nprotocol x"}))
    store.put(KEYS.bgp_peer("192.0.2.3"), json.dumps({"ip": "192.0.2.3", "as": "65000; }"}))
    store.put(KEYS.bgp_peer("192.0.2.4"), json.dumps({"ip": "192.0.2.4", "as": 65001, "name": "tor-1"}))
    store.put(KEYS.bgp_config(), json.dumps({"as": -1, "hold_time": "9\n", "mesh": True}))
    store.put(KEYS.bgp_node("h1"), "[]")
    store.put(KEYS.node("h3"), json.dumps({"name": "h3\nprotocol", "ip": "198.18.0.13"}))
    store.put(KEYS.node("h4"), json.dumps({"name": "h4", "ip": "198.18.0.14", "as": "x"}))
    state, asn = desired_bgp(store, KEYS, "h1", "198.18.0.11")
    assert asn == 64512 and state.hold_time == 9
    assert sorted((p.name, p.ip, p.asn) for p in state.peers) == [("h4", "198.18.0.14", 64512),
                                                                   ("tor-1", "192.0.2.4", 65001)]
    agent = Agent(store, KEYS, "h1", "198.18.0.11")
    agent.sync()
    assert store.get(KEYS.node("h1"))[0] is not None, "the heartbeat happened"


def test_registry_publishes_the_hosts_facts():
    store = MemoryStore()
    Registry(store, KEYS, "h1", "198.18.0.11",
             facts=lambda: {"addresses": ["198.18.0.11", "172.17.0.1"], "networks": ["172.17.0.0/16"],
                            "etcd": ["198.18.0.1"], "junk": 1}).heartbeat(64512)
    record = json.loads(store.get(KEYS.node("h1"))[0])
    assert record["addresses"] == ["198.18.0.11", "172.17.0.1"] and record["etcd"] == ["198.18.0.1"]
    assert "junk" not in record

    def broken():
        raise OSError("netlink")
    Registry(store, KEYS, "h3", "198.18.0.13", facts=broken).heartbeat(64512)
    assert json.loads(store.get(KEYS.node("h3"))[0])["ip"] == "198.18.0.13", "a failing probe keeps the node in"


def facts(**kw):
    from tests.unit.test_diagnose import facts_from
    base = dict(pools={"10.20.0.0/24": {"cidr": "10.20.0.0/24", "nat_outgoing": True}},
                allocations={"10.20.0.1": {"handle": "endpoint:a", "host": "h1"}},
                nodes={"h1": "198.18.0.11", "h2": "198.18.0.12"}, rules=[], host_rules=[], here="h1",
                addresses={"h2": ["198.18.0.12", "10.1.0.12"]},
                protected=["198.18.0.1/32"])          # (link-local is protected anyway)
    return facts_from(**{**base, **kw})


def test_diagnose_explains_protected_destinations_and_refused_pools():
    v, steps = diagnose("10.20.0.1", "169.254.169.254", facts(), "tcp", 80)
    text = " | ".join(s.what for s in steps)
    assert v == "NOT REACHABLE" and "metadata" in text and "host allow --to 169.254.169.254/32" in text
    rule = {"id": "m1", "proto": "tcp", "ports": "80", "to": "169.254.169.254/32"}
    v, steps = diagnose("10.20.0.1", "169.254.169.254", facts(host_rules=[rule]), "tcp", 80)
    assert v == "REACHABLE" and "host rule m1" in steps[-1].what
    assert diagnose("10.20.0.1", "169.254.169.254", facts(host_rules=[rule]), "udp", 53)[0] == "NOT REACHABLE"
    v, steps = diagnose("10.20.0.1", "198.18.0.1", facts())
    assert v == "NOT REACHABLE" and "infrastructure" in steps[-2].what
    v, steps = diagnose("10.20.0.1", "10.1.0.12", facts(), "tcp", 22)       # a second address of h2
    assert v == "NOT REACHABLE" and "cluster host h2" in steps[-2].what
    # a pool over loopback written into etcd behind l3netctl's back: the agents refuse it
    f = facts(pools={"127.1.0.0/24": {"cidr": "127.1.0.0/24"}},
              allocations={"127.1.0.1": {"handle": "endpoint:a", "host": "h1"}})
    v, steps = diagnose("127.1.0.1", "8.8.8.8", f)
    assert v == "NOT REACHABLE" and "is refused" in steps[-1].what and "loopback" in steps[-1].what


def test_reserved_ranges_cover_what_the_issue_names():
    names = [IPNetwork(c) for c, _ in infra.RESERVED]
    for address in ("0.1.2.3", "127.0.0.1", "169.254.169.254", "224.0.0.5", "255.255.255.255"):
        assert any(IPNetwork(address) in n for n in names), address
