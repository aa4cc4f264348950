"""Policy rendering: golden files, and random policy sets accepted by the real tools
(ipset restore + iptables-restore --test, inside a throwaway network namespace)."""

import os
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugin.policy import (
    PolicyState,
    render_ip6tables,
    render_ipsets,
    render_iptables,
    render_set_changes,
    set_name,
    tag_set_name,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
STATE = PolicyState(
    node="h1",
    pools=["10.20.0.0/16", "10.30.0.0/16", "10.40.0.0/24"],
    nat_pools=["10.20.0.0/16", "10.30.0.0/16"],
    members={"10.20.0.0/16": ["10.20.0.1", "10.20.0.65"], "10.30.0.0/16": ["10.30.0.7"]},
    rules=[{"id": "p1", "from": "10.20.0.0/16", "to": "10.30.0.0/16", "proto": "tcp", "ports": "5432"},
           {"id": "p2", "from": "10.40.0.0/24", "to": "10.30.0.0/16", "proto": "udp", "ports": "8000-8080"},
           {"id": "p3", "from": "10.40.0.0/24", "to": "10.20.0.0/16", "proto": "icmp", "ports": None},
           {"id": "p4", "from": "tag:needs-db", "to": "10.30.0.0/16", "proto": "tcp", "ports": "5432"},
           {"id": "p5", "from": "10.20.0.0/16", "to": "tag:nobody", "proto": None, "ports": None}],
    tags={"needs-db": ["10.20.0.0/16", "10.40.0.0/24"], "nobody": []},
    host_rules=[{"id": "h1", "proto": "tcp", "ports": "53", "node": None},
                {"id": "h2", "proto": "tcp", "ports": "8080-8081", "node": "h2"},
                {"id": "h3", "proto": "udp", "ports": "9", "node": "h1"},
                {"id": "h4", "proto": "udp", "ports": "7", "node": "gone"},
                {"id": "h5", "proto": "tcp", "ports": "80", "node": None, "to": "169.254.169.254/32"}],
    nodes={"h1": "198.18.0.11", "h2": "198.18.0.12"},
    host_addresses=["172.17.0.1", "198.18.0.11", "198.18.0.12", "198.18.1.12"],
    protected=["169.254.0.0/16", "198.18.0.1/32", "192.0.2.0/24"],
    uplinks=["eth0", "bond0.12", "l3hbadbadbad", "bad+"],
    internal=["10.40.0.0/24"],
    ports=[{"proto": "tcp", "host_ip": None, "host_port": 8080, "ip": "10.20.0.1", "port": 80},
           {"proto": "udp", "host_ip": "198.18.0.11", "host_port": 5353, "ip": "10.30.0.7", "port": 53}])
tools = pytest.mark.root


@pytest.mark.parametrize("render,name", [(render_iptables, "policy.rules"), (render_ipsets, "policy.ipsets"),
                                         (lambda _: render_ip6tables(), "policy6.rules")])
def test_rendering_matches_golden(render, name):
    with open(os.path.join(GOLDEN, name)) as f:
        assert render(STATE) == f.read()


def test_rule_count_does_not_grow_with_containers():
    many = PolicyState(**{**STATE.__dict__,
                          "members": {"10.20.0.0/16": [f"10.20.{i // 250}.{i % 250 + 1}" for i in range(500)]}})
    assert render_iptables(many) == render_iptables(STATE)
    # members, hosts' addresses, protected ranges, pools, nat pools, tagged networks
    assert render_ipsets(many).count("add l3n-") == 500 + 4 + 3 + 3 + 2 + 2


def test_rule_count_does_not_grow_with_tagged_networks():
    pools = [f"10.{i}.0.0/24" for i in range(50, 90)]
    many = PolicyState(**{**STATE.__dict__, "pools": STATE.pools + pools,
                          "tags": {**STATE.tags, "needs-db": STATE.tags["needs-db"] + pools}})
    rules = [line for line in render_iptables(many).splitlines() if "policy p4" in line]
    assert len(rules) == 1 and f"--match-set {tag_set_name('needs-db')} src" in rules[0]


def accepted_by_kernel_tools(state):
    """Load the sets and test the rules in a network namespace of their own (ipsets and
    iptables are per namespace: the host's are never touched)."""
    with tempfile.TemporaryDirectory() as tmp:
        sets, rules = os.path.join(tmp, "sets"), os.path.join(tmp, "rules")
        with open(sets, "w") as f:
            f.write(render_ipsets(state))
        with open(rules, "w") as f:
            f.write(render_iptables(state))
        res = subprocess.run(["unshare", "-n", "sh", "-c",
                              'ipset restore < "$1" && iptables-restore --test --noflush < "$2"',
                              "sh", sets, rules], capture_output=True, text=True, timeout=60)
    return res.returncode == 0, res.stderr


@tools
def test_golden_state_is_accepted_by_ipset_and_iptables():
    ok, err = accepted_by_kernel_tools(STATE)
    assert ok, err


cidr = st.tuples(st.integers(1, 223), st.integers(0, 255), st.sampled_from([16, 20, 24])).map(
    lambda t: f"{t[0]}.{t[1]}.0.0/{t[2]}")
ports = st.one_of(st.none(), st.integers(1, 65535).map(str),
                  st.tuples(st.integers(1, 1000), st.integers(1001, 65535)).map(lambda t: f"{t[0]}-{t[1]}"))


@tools
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(pools=st.lists(cidr, min_size=1, max_size=4, unique=True), data=st.data())
def test_random_policy_sets_are_accepted(pools, data):
    sides = pools + ["tag:a", "tag:b-2"]
    rules = [{"id": f"r{i}", "from": data.draw(st.sampled_from(sides)), "to": data.draw(st.sampled_from(sides)),
              "proto": data.draw(st.sampled_from(["tcp", "udp", "icmp", None])), "ports": data.draw(ports)}
             for i in range(data.draw(st.integers(0, 5)))]
    host_rules = [{"id": f"h{i}", "proto": data.draw(st.sampled_from(["tcp", "udp"])), "ports": data.draw(ports),
                   "node": data.draw(st.sampled_from([None, "n1", "n2"]))}
                  for i in range(data.draw(st.integers(0, 3)))]
    host_rules += [{"id": f"t{i}", "proto": "tcp", "ports": data.draw(ports), "node": None, "to": data.draw(cidr)}
                   for i in range(data.draw(st.integers(0, 2)))]
    state = PolicyState(pools=pools, nat_pools=pools[:1], rules=rules, host_rules=host_rules,
                        members={pools[0]: ["10.0.0.1"]}, nodes={"n1": "192.0.2.1"},
                        host_addresses=["192.0.2.1", "172.17.0.1"],
                        protected=["169.254.0.0/16"] + data.draw(st.lists(cidr, max_size=3, unique=True)),
                        internal=data.draw(st.lists(st.sampled_from(pools), unique=True)),
                        tags={"a": data.draw(st.lists(st.sampled_from(pools), unique=True)), "b-2": []})
    ok, err = accepted_by_kernel_tools(state)
    assert ok, err


def test_set_names_fit_ipset_limit():
    assert len(set_name("255.255.255.0/24")) <= 31
    assert len(tag_set_name("x" * 63) + "-t") <= 31


def test_tagging_a_network_is_one_set_entry():
    """Tagging adds the network's set to the tag's list:set, untagging deletes it: no rule
    changes, and a new tag's set is built whole."""
    from dataclasses import replace
    tagged = replace(STATE, tags={**STATE.tags, "needs-db": STATE.tags["needs-db"] + ["10.30.0.0/16"]})
    before, stale = render_set_changes(STATE, tagged)
    assert before == f"add {tag_set_name('needs-db')} {set_name('10.30.0.0/16')} -exist\n" and not stale
    assert render_iptables(tagged) == render_iptables(STATE)
    untagged = replace(STATE, tags={"nobody": []})
    before, stale = render_set_changes(STATE, untagged)
    assert stale == [tag_set_name("needs-db")]
    fresh = replace(STATE, tags={**STATE.tags, "new": ["10.30.0.0/16"]})
    before, _ = render_set_changes(STATE, fresh)
    assert f"create {tag_set_name('new')} list:set size 4096 -exist" in before


def test_desired_policy_from_etcd_data():
    """Members come from every host's allocations (not gateways); host rules of other nodes
    and pools without NAT are left out where they do not apply."""
    import json

    from core.keys import Keys
    from ipam.allocator import Ipam
    from plugin.agent import Registry
    from plugin.calc import desired_policy
    from plugin.store import MemoryStore

    store, keys = MemoryStore(), Keys("/t")
    h1, h2 = Ipam(store, keys, "h1"), Ipam(store, keys, "h2")
    web, _, _ = h1.request_pool("10.20.0.0/24")
    db, _, _ = h2.request_pool("10.30.0.0/24", options={"nat-outgoing": "false"})
    h1.request_address(web, "10.20.0.1", {"RequestAddressType": "com.docker.network.gateway"})
    a = h1.request_address(web).split("/")[0]
    b = h2.request_address(web).split("/")[0]
    c = h2.request_address(db).split("/")[0]
    Registry(store, keys, "h1", "198.18.0.11").heartbeat(64512)
    Registry(store, keys, "h2", "198.18.0.12").heartbeat(64512)
    store.put(keys.policy_rule("aaaaaaaa"), json.dumps({"id": "aaaaaaaa", "from": "10.20.0.0/24",
                                                        "to": "10.30.0.0/24", "proto": "tcp", "ports": "5432"}))
    store.put(keys.host_rule("bbbbbbbb"), json.dumps({"id": "bbbbbbbb", "proto": "tcp", "ports": "53", "node": None}))
    store.put(keys.host_rule("cccccccc"), json.dumps({"id": "cccccccc", "proto": "udp", "ports": "9", "node": "h2"}))
    state = desired_policy(store, keys, "h1")
    assert state.members == {"10.20.0.0/24": sorted([a, b]), "10.30.0.0/24": [c]}
    assert state.nat_pools == ["10.20.0.0/24"] and state.pools == ["10.20.0.0/24", "10.30.0.0/24"]
    assert sorted(r["id"] for r in state.host_rules) == ["bbbbbbbb", "cccccccc"]
    assert [r["id"] for r in state.rules] == ["aaaaaaaa"]
    assert state.nodes == {"h1": "198.18.0.11", "h2": "198.18.0.12"} and state.node == "h1"
    assert state.internal == []
    render_iptables(state)          # renders without error
    # a network created with --internal: its pool is internal, and never NATed
    h1.set_internal("10.20.0.0/24", True)
    state = desired_policy(store, keys, "h1")
    assert state.internal == ["10.20.0.0/24"] and state.nat_pools == []
    assert "internal 10.20.0.0/24" in render_iptables(state)


def test_set_changes_are_incremental():
    from plugin.policy import render_set_changes
    old = PolicyState(**{**STATE.__dict__, "members": {"10.20.0.0/16": ["10.20.0.1", "10.20.0.65"]}})
    new = PolicyState(**{**STATE.__dict__, "pools": ["10.20.0.0/16", "10.30.0.0/16", "10.50.0.0/24"],
                         "members": {"10.20.0.0/16": ["10.20.0.1", "10.20.0.9"], "10.50.0.0/24": ["10.50.0.3"]}})
    before, stale = render_set_changes(old, new)
    web, fresh = set_name("10.20.0.0/16"), set_name("10.50.0.0/24")
    assert f"del {web} 10.20.0.65 -exist" in before and f"add {web} 10.20.0.9 -exist" in before
    assert f"add {fresh}-t 10.50.0.3" in before and f"swap {fresh}-t {fresh}" in before
    assert "10.20.0.1" not in before                      # unchanged members are not touched
    assert stale == [set_name("10.40.0.0/24")]
    assert render_set_changes(new, new) == ("", [])


def test_hooks_only_for_what_is_missing():
    from plugin.policy import HOOKS, render_hooks
    assert render_hooks([]) == ""
    text = render_hooks([(HOOKS[0], 1), (HOOKS[2], 0)])
    assert text == ("*filter\n-D FORWARD -j L3NET-FORWARD\n-I FORWARD 1 -j L3NET-FORWARD\nCOMMIT\n"
                    "*nat\n-I POSTROUTING 1 -j L3NET-POSTROUTING\nCOMMIT\n")


def test_malformed_records_in_etcd_are_ignored():
    """Anyone with etcd access can write there; nothing malformed reaches iptables-restore."""
    import json

    from netaddr import IPNetwork

    from core.keys import Keys
    from ipam.allocator import Ipam
    from plugin.calc import desired_policy
    from plugin.store import MemoryStore

    store, keys = MemoryStore(), Keys("/t")
    Ipam(store, keys, "h1").request_pool("10.20.0.0/24")
    good = {"id": "aaaaaaaa", "from": "10.20.0.0/24", "to": "10.20.0.0/24", "proto": "tcp", "ports": "80"}
    bad = [dict(good, id='x" -j ACCEPT\n-A FORWARD'), dict(good, ports="80\nCOMMIT"), dict(good, proto="gre"),
           dict(good, **{"from": "10.99.0.0/24"}), dict(good, proto="icmp", ports="1"), "junk", [1]]
    store.put(keys.policy_rule("aaaaaaaa"), json.dumps(good))
    for i, rule in enumerate(bad):
        store.put(keys.policy_rule(f"bad{i}"), json.dumps(rule))
    store.put(keys.policy_rule("notjson"), "{")
    store.put(keys.host_rule("h"), json.dumps({"id": "h", "proto": "tcp", "ports": "22", "node": "a b"}))
    store.put(keys.host_rule("i"), json.dumps({"id": "i", "proto": "icmp", "ports": None, "node": None}))
    # pools, allocations and published ports: only canonical addresses and numbers, and a port
    # only while its endpoint holds the address
    ipam = Ipam(store, keys, "h1")
    pool_id, _, _ = ipam.request_pool("10.30.0.0/24")
    held = ipam.request_address(pool_id).split("/")[0]
    ipam.set_handle(IPNetwork("10.30.0.0/24"), held, "endpoint:" + "e" * 64)
    store.put(keys.pool("10.66.0.0/24"), json.dumps({"cidr": "10.66.0.0/24\nflush l3n-hosts", "refs": {}}))
    block_key = next(k for k, _, _ in store.get_prefix(keys.all_blocks()) if "10.30" in k)
    block = json.loads(store.get(block_key)[0])
    block["allocations"]["10.30.0.9\n-I INPUT 1 -j ACCEPT"] = {"handle": "endpoint:x", "host": "h1"}
    block["allocations"]["10.30.0.10"] = "junk"
    store.put(block_key, json.dumps(block))
    # the member records the agents compute from: malformed keys and values are skipped
    members = keys.members("10.30.0.0/24")
    store.put(members + "10.30.0.9\n-I INPUT 1 -j ACCEPT", json.dumps({"handle": "endpoint:x", "host": "h1"}))
    store.put(members + "10.30.0.10", "junk")
    store.put(members + "10.30.0.11", json.dumps({"handle": 7, "host": "h1"}))
    store.put(members + "10.99.0.12", json.dumps({"handle": "endpoint:y", "host": "h1"}))   # not in the pool
    store.put(keys.all_members() + "10.30.0.0-33/10.30.0.13", json.dumps({"handle": "endpoint:z", "host": "h1"}))
    claim = {"proto": "tcp", "host_ip": None, "host_port": 8080, "ip": held, "port": 80, "endpoint": "e" * 64}
    for i, port in enumerate([claim, dict(claim, port=True, host_port=81), dict(claim, ip=167772161, host_port=82),
                              dict(claim, host_ip="1.2.3.4 -j ACCEPT", host_port=83),
                              dict(claim, endpoint="f" * 64, host_port=84), dict(claim, ip="10.30.0.200", host_port=85),
                              "junk"]):
        store.put(keys.port("h1", "tcp", 8080 + i), json.dumps(port))
    state = desired_policy(store, keys, "h1")
    assert [r["id"] for r in state.rules] == ["aaaaaaaa"] and state.host_rules == []
    assert state.pools == ["10.20.0.0/24", "10.30.0.0/24"] and state.members["10.30.0.0/24"] == [held]
    assert [p["host_port"] for p in state.ports] == [8080]
    render_iptables(state)
    render_ipsets(state)
