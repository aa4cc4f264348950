"""Encapsulated pools: the option, the tunnel routes a node computes, the MTU they imply, the
VXLAN filter and diagnose across subnets (pure; the device itself: test_tunnel below, root)."""

import json
import os

import pytest

from core.errors import L3netError
from core.keys import Keys
from ipam.allocator import Ipam
from ipam.pools import encap_of, parse_pool_options
from plugin.calc import desired_policy, desired_tunnel
from plugin.diagnose import diagnose
from plugin.encap import desired_tunnels, vtep_mac
from plugin.policy import render_iptables
from plugin.store import MemoryStore

NODES = [{"name": "h1", "ip": "198.18.0.11", "networks": ["198.18.0.0/24"]},
         {"name": "h2", "ip": "198.18.0.12", "networks": ["198.18.0.0/24"]},
         {"name": "h3", "ip": "198.18.9.13", "networks": ["198.18.9.0/24"]}]
BLOCKS = {"h1": ["10.120.0.0/26", "10.130.0.0/26"], "h2": ["10.120.0.64/26"], "h3": ["10.120.0.128/26", "10.130.0.64/26"]}


def pool(cidr, encap=None):
    return {"cidr": cidr, **({"encap": encap} if encap else {})}


def member(pool_cidr, address, host, handle="endpoint:x"):
    return pool_cidr, address, {"host": host, "handle": handle}


@pytest.mark.parametrize("mode, routes", [
    ("never", {}),
    ("cross-subnet", {"10.120.0.128/26": "198.18.9.13", "10.120.0.7/32": "198.18.9.13"}),
    ("always", {"10.120.0.64/26": "198.18.0.12", "10.120.0.128/26": "198.18.9.13",
                "10.120.0.7/32": "198.18.9.13"}),
])
def test_tunnel_routes_by_mode(mode, routes):
    """From h1: other nodes' blocks of the pool (never its own), and an address h3 borrowed from
    h1's own block as a /32; same-subnet h2 only with "always"; pool 10.130 never tunnelled."""
    members = [member("10.120.0.0/24", "10.120.0.7", "h3"),          # borrowed by h3 from h1's block
               member("10.120.0.0/24", "10.120.0.70", "h2"),         # in its own block
               member("10.120.0.0/24", "10.120.0.8", "h3", "reserved:x"),
               member("10.130.0.0/24", "10.130.0.9", "h3")]
    state = desired_tunnels([pool("10.120.0.0/24", mode), pool("10.130.0.0/24")], NODES, "h1", "198.18.0.11",
                            BLOCKS, members)
    assert state.routes == routes
    assert state.peers == {ip: vtep_mac(ip) for ip in set(routes.values())}
    assert bool(state) == bool(routes) and state.local == "198.18.0.11"


def test_vtep_macs_are_local_unicast_and_distinct():
    macs = {vtep_mac(f"198.18.{a}.{b}") for a in range(4) for b in range(256)}
    assert len(macs) == 1024 and all(int(m[:2], 16) & 0b11 == 0b10 for m in macs)


def test_the_encap_option_is_the_pools():
    assert parse_pool_options({"encap": "cross-subnet"})["encap"] == "cross-subnet"
    with pytest.raises(L3netError, match="invalid encap 'sometimes': expected never, cross-subnet, always"):
        parse_pool_options({"encap": "sometimes"})
    store, keys = MemoryStore(), Keys("/t")
    h1, h2 = Ipam(store, keys, "h1"), Ipam(store, keys, "h2")
    h1.request_pool("10.120.0.0/24", options={"encap": "cross-subnet"})
    h2.request_pool("10.120.0.0/24")                                   # no option: the pool's
    h2.request_pool("10.120.0.0/24", options={"encap": "cross-subnet"})
    with pytest.raises(L3netError, match="already exists with encap=cross-subnet"):
        h2.request_pool("10.120.0.0/24", options={"encap": "never"})
    assert encap_of(json.loads(store.get(keys.pool("10.120.0.0/24"))[0])) == "cross-subnet"
    assert h1.add_pool("10.121.0.0/24", encap="always")["encap"] == "always"
    assert encap_of({"encap": "bogus"}) == "never" and encap_of({}) == "never"


def test_from_etcd_records_and_the_vxlan_filter():
    store, keys = MemoryStore(), Keys("/t")
    for name, ip, net in (("h1", "198.18.0.11", "198.18.0.0/24"), ("h3", "198.18.9.13", "198.18.9.0/24")):
        store.put(keys.node(name), json.dumps({"name": name, "ip": ip, "addresses": [ip], "networks": [net]}))
    h1, h3 = Ipam(store, keys, "h1"), Ipam(store, keys, "h3")
    p1, _, _ = h1.request_pool("10.120.0.0/24", options={"encap": "cross-subnet"})
    p3, _, _ = h3.request_pool("10.120.0.0/24")
    h1.request_address(p1)
    b = h3.request_address(p3).split("/")[0]
    state = desired_tunnel(store, keys, "h1", "198.18.0.11")
    assert list(state.routes.values()) == ["198.18.9.13"] and b.startswith("10.120.0.")
    assert all(not r.startswith("10.120.0.0/") for r in state.routes), "never h1's own block"
    rules = render_iptables(desired_policy(store, keys, "h1"))
    assert "-p udp --dport 4789 -m set ! --match-set l3n-hosts src" in rules
    assert "-A L3NET-FORWARD -p udp --dport 4789 -m set --match-set l3n-hosts dst" in rules
    assert "--dport 4789" not in render_iptables(desired_policy(MemoryStore(), keys, "h1"))


def test_diagnose_across_subnets():
    pools = {"10.120.0.0/24": pool("10.120.0.0/24", "cross-subnet"), "10.140.0.0/24": pool("10.140.0.0/24")}
    alloc = {"10.120.0.1": {"handle": "endpoint:a", "host": "h1"}, "10.120.0.130": {"handle": "endpoint:b", "host": "h3"},
             "10.140.0.1": {"handle": "endpoint:c", "host": "h1"}, "10.140.0.130": {"handle": "endpoint:d", "host": "h3"}}
    from tests.unit.test_diagnose import facts_from
    facts = facts_from(pools, alloc, {n["name"]: n["ip"] for n in NODES},
                       route_to_dst="10.140.0.130 via 198.18.0.1 dev eth0",
                       subnets={n["name"]: n["networks"][0] for n in NODES})
    verdict, steps = diagnose("10.140.0.1", "10.140.0.130", facts)
    text = " | ".join(s.what for s in steps)
    assert verdict == "NOT REACHABLE" and "different subnets and pool 10.140.0.0/24 is not encapsulated" in text
    facts.route_to_dst = "10.120.0.130 via 198.18.9.13 dev l3vxlan onlink"
    verdict, steps = diagnose("10.120.0.1", "10.120.0.130", facts)
    assert verdict == "REACHABLE" and "goes through the VXLAN tunnel" in " | ".join(s.what for s in steps)


root = pytest.mark.root


@root
def test_the_tunnel_device_routes_and_entries_in_a_namespace():
    """plugin.tunnel in a throwaway network namespace: created, changed, removed."""
    import subprocess
    import sys
    script = r'''
import subprocess
subprocess.run("ip link add u0 type veth peer name u1 && ip addr add 198.18.0.11/24 dev u0 && "
               "ip link set u0 up && ip link set u1 up && ip route add default via 198.18.0.1", shell=True, check=True)
from plugin.encap import TunnelState
from plugin.tunnel import Tunnel
def show(what):
    return subprocess.run(what, shell=True, capture_output=True, text=True).stdout
t = Tunnel()
state = TunnelState(local="198.18.0.11", routes={"10.120.0.128/26": "198.18.9.13", "10.120.0.7/32": "198.18.9.13"},
                    peers={"198.18.9.13": "0e:4c:c6:12:09:0d"})
print(t.apply(state)); assert t.apply(state) is None
link = show("ip -d link show l3vxlan")
assert "vxlan id 4096 local 198.18.0.11" in link and "dstport 4789" in link and "nolearning" in link, link
assert "mtu 1450" in link, link
routes = show("ip route show proto 76")
assert "10.120.0.128/26 via 198.18.9.13 dev l3vxlan metric 16 onlink" in routes, routes
assert "198.18.9.13 lladdr 0e:4c:c6:12:09:0d PERMANENT" in show("ip neigh show dev l3vxlan")
assert "0e:4c:c6:12:09:0d dst 198.18.9.13 self permanent" in show("bridge fdb show dev l3vxlan")
assert t.drift() is None
subprocess.run("ip route del 10.120.0.7/32", shell=True, check=True)
assert t.drift() is None, "routes checked every 30 s only"
assert "1 tunnel routes, not 2" in t.drift(now=10 ** 9), t.drift(now=10 ** 9)
t.applied = None; t.apply(state); assert t.drift(now=2 * 10 ** 9) is None
subprocess.run("ip link del l3vxlan", shell=True, check=True)
assert t.drift() == "l3vxlan is gone"
t.applied = None; t.apply(state); assert t.drift() is None
moved = TunnelState(local="198.18.0.11", routes={"10.120.0.128/26": "198.18.9.14"}, peers={"198.18.9.14": "0e:4c:c6:12:09:0e"})
t.apply(moved)
routes, neigh = show("ip route show proto 76"), show("ip neigh show dev l3vxlan") + show("bridge fdb show dev l3vxlan")
assert routes.strip() == "10.120.0.128/26 via 198.18.9.14 dev l3vxlan metric 16 onlink", routes
assert "198.18.9.13" not in neigh and "198.18.9.14" in neigh, neigh
t.apply(TunnelState(local="198.18.0.11"))
assert "l3vxlan" not in show("ip link")
print("ok")
'''
    res = subprocess.run(["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def test_a_node_publishes_its_vtep_mac_and_the_others_derive_it():
    """The record shows the MAC; the others derive it from the address: a record naming
    another node's MAC diverts nothing."""
    from plugin.agent import Registry
    store, keys = MemoryStore(), Keys("/t")
    Registry(store, keys, "h3", "198.18.9.13").heartbeat(64512)
    record = json.loads(store.get(keys.node("h3"))[0])
    assert record["vtep_mac"] == vtep_mac("198.18.9.13") == "0e:4c:c6:12:09:0d"
    nodes = [NODES[0], {**NODES[2], "vtep_mac": vtep_mac("198.18.0.12")}]
    state = desired_tunnels([pool("10.120.0.0/24", "always")], nodes, "h1", "198.18.0.11", BLOCKS, [])
    assert state.peers == {"198.18.9.13": vtep_mac("198.18.9.13")}


def test_both_ends_choose_the_tunnel_alike():
    """h2 sees h4 in its own /16; h4 sees h2 outside its /24: both tunnel (else replies would
    come back another way than requests); a node with no known subnet is tunnelled to."""
    nodes = [{"name": "h2", "ip": "10.0.0.5", "networks": ["10.0.0.0/16"]},
             {"name": "h4", "ip": "10.0.1.5", "networks": ["10.0.1.0/24"]},
             {"name": "h5", "ip": "10.0.0.9", "networks": []}]
    blocks = {"h2": ["10.120.0.0/26"], "h4": ["10.120.0.64/26"], "h5": ["10.120.0.128/26"]}
    pools = [pool("10.120.0.0/24", "cross-subnet")]
    from_h2 = desired_tunnels(pools, nodes, "h2", "10.0.0.5", blocks, [])
    from_h4 = desired_tunnels(pools, nodes, "h4", "10.0.1.5", blocks, [])
    assert from_h2.routes == {"10.120.0.64/26": "10.0.1.5", "10.120.0.128/26": "10.0.0.9"}
    assert from_h4.routes["10.120.0.0/26"] == "10.0.0.5"
