"""BGP: rendered BIRD config against golden files and `bird -p`; desired state from etcd data."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.keys import Keys
from plugin.agent import Registry
from plugin.birdconf import BgpState, Peer, render
from plugin.calc import desired_bgp
from plugin.store import MemoryStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
MESH = BgpState(node="h1", router_id="198.18.0.11", pools=["10.20.0.0/16", "10.250.0.0/24"],
                blocks=["10.20.0.0/26", "10.20.0.64/26"],
                peers=[Peer("h2", "198.18.0.12", 64512, allowed=("10.20.0.128/26", "10.20.1.7/32")),
                       Peer("h3", "198.18.0.13", 64512, allowed=()),
                       Peer("tor1", "198.18.0.1", 65000, multihop=True)])
EMPTY = BgpState(node="lonely", router_id="192.0.2.7")
has_bird = pytest.mark.bird


@pytest.mark.parametrize("state,name", [(MESH, "bird-mesh.conf"), (EMPTY, "bird-empty.conf")])
def test_render_matches_golden(state, name):
    with open(os.path.join(GOLDEN, name)) as f:
        assert render(state) == f.read()


def bird_accepts(text, tmp_path):
    path = tmp_path / "bird.conf"
    path.write_text(text)
    res = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True, timeout=30)
    return res.returncode == 0, res.stderr + res.stdout


@has_bird
@pytest.mark.parametrize("state", [MESH, EMPTY])
def test_bird_accepts_rendered_config(state, tmp_path):
    ok, err = bird_accepts(render(state), tmp_path)
    assert ok, err


cidrs = st.tuples(st.integers(1, 223), st.integers(0, 255), st.integers(16, 30)).map(
    lambda t: f"{t[0]}.{t[1]}.0.0/{t[2]}")
ips = st.tuples(st.integers(1, 223), st.integers(0, 255), st.integers(1, 254)).map(
    lambda t: f"{t[0]}.{t[1]}.0.{t[2]}")


@has_bird
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(pools=st.lists(cidrs, max_size=4, unique=True), blocks=st.lists(cidrs, max_size=4, unique=True),
       peers=st.lists(st.tuples(ips, st.integers(1, 4294967295), st.booleans()), max_size=4,
                      unique_by=lambda p: p[0]),
       name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True))
def test_bird_accepts_any_state(tmp_path_factory, pools, blocks, peers, name):
    state = BgpState(node=name, router_id="192.0.2.1", pools=pools, blocks=blocks,
                     peers=[Peer(f"n{i}", ip, asn, mh) for i, (ip, asn, mh) in enumerate(peers)])
    ok, err = bird_accepts(render(state), tmp_path_factory.mktemp("bird"))
    assert ok, err


def test_desired_state_full_mesh_from_registry():
    store, keys = MemoryStore(), Keys("/t")
    for name, ip in [("h1", "198.18.0.11"), ("h2", "198.18.0.12"), ("h3", "198.18.0.13")]:
        Registry(store, keys, name, ip).heartbeat(64512)
    store.put(keys.pool("10.20.0.0/16"), '{"cidr": "10.20.0.0/16"}')
    store.put(keys.affinity("h1", "10.20.0.0/26"), "10.20.0.0/16")
    store.put(keys.affinity("h2", "10.20.0.64/26"), "10.20.0.0/16")
    state, asn = desired_bgp(store, keys, "h1", "198.18.0.11")
    assert asn == 64512 and state.router_id == "198.18.0.11"
    assert sorted(p.ip for p in state.peers) == ["198.18.0.12", "198.18.0.13"]
    assert state.pools == ["10.20.0.0/16"] and state.blocks == ["10.20.0.0/26"]


def test_desired_state_options_mesh_off_global_and_node_peers():
    store, keys = MemoryStore(), Keys("/t")
    Registry(store, keys, "h1", "198.18.0.11").heartbeat(64512)
    Registry(store, keys, "h2", "198.18.0.12").heartbeat(64512)
    store.put(keys.bgp_config(), json.dumps({"as": 64600, "mesh": False}))
    store.put(keys.bgp_peer("198.18.0.1"), json.dumps({"ip": "198.18.0.1", "as": 65000, "name": "rr1"}))
    store.put(keys.bgp_node("h1"), json.dumps({"as": 64601, "peers": [{"ip": "198.18.0.2", "as": 65001}]}))
    state, asn = desired_bgp(store, keys, "h1", "198.18.0.11")
    assert asn == 64601
    assert {(p.ip, p.asn, p.multihop) for p in state.peers} == {("198.18.0.1", 65000, True),
                                                                ("198.18.0.2", 65001, True)}


def _rr_cluster(reflectors=("r1", "r2"), mesh=False):
    """Four nodes with a block each; ``reflectors`` marked; the mesh off."""
    store, keys = MemoryStore(), Keys("/t")
    hosts = [("r1", "198.18.0.11"), ("r2", "198.18.0.12"), ("h3", "198.18.0.13"), ("h4", "198.18.0.14")]
    store.put(keys.pool("10.20.0.0/16"), '{"cidr": "10.20.0.0/16"}')
    for i, (name, ip) in enumerate(hosts):
        Registry(store, keys, name, ip).heartbeat(64512)
        store.put(keys.affinity(name, f"10.20.{i}.0/26"), "10.20.0.0/16")
    store.put(keys.bgp_config(), json.dumps({"mesh": mesh}))
    for name in reflectors:
        store.put(keys.bgp_node(name), json.dumps({"route_reflector": True}))
    return store, keys, dict(hosts)


def test_route_reflection_topology():
    """Mesh off, two reflectors: a node peers with the reflectors only and takes from each
    what every other node has (next hop: that node); a reflector peers with everyone, its
    AS's nodes as clients, and reflects."""
    store, keys, ips = _rr_cluster()
    h3, _ = desired_bgp(store, keys, "h3", ips["h3"])
    assert sorted(p.name for p in h3.peers) == ["r1", "r2"]
    r1_seen_by_h3 = next(p for p in h3.peers if p.name == "r1")
    assert r1_seen_by_h3.allowed == ("10.20.0.0/26",) and not r1_seen_by_h3.reflect
    assert r1_seen_by_h3.via == (("198.18.0.12", ("10.20.1.0/26",)), ("198.18.0.14", ("10.20.3.0/26",)))
    r1, _ = desired_bgp(store, keys, "r1", ips["r1"])
    by = {p.name: p for p in r1.peers}
    assert sorted(by) == ["h3", "h4", "r2"] and all(p.reflect for p in r1.peers)
    assert by["h3"].rr_client and by["h4"].rr_client and not by["r2"].rr_client
    assert by["r2"].via == (("198.18.0.13", ("10.20.2.0/26",)), ("198.18.0.14", ("10.20.3.0/26",)))
    assert by["h3"].via == ()


def test_route_reflection_needs_the_mesh_off_and_a_live_reflector():
    store, keys, ips = _rr_cluster(mesh=True)           # flag set, mesh on: the full mesh
    state, _ = desired_bgp(store, keys, "h3", ips["h3"])
    assert sorted(p.name for p in state.peers) == ["h4", "r1", "r2"] and not any(p.via for p in state.peers)
    store, keys, ips = _rr_cluster(reflectors=("gone",))     # no live reflector, mesh off: no sessions
    assert desired_bgp(store, keys, "h3", ips["h3"])[0].peers == []
    store.put(keys.bgp_node("h4"), json.dumps({"route_reflector": "yes"}))   # not a boolean: ignored
    assert desired_bgp(store, keys, "h3", ips["h3"])[0].peers == []


def test_reflector_with_a_node_of_another_as_does_not_make_it_a_client():
    store, keys, ips = _rr_cluster()
    store.put(keys.bgp_node("h4"), json.dumps({"as": 65001}))
    Registry(store, keys, "h4", ips["h4"]).heartbeat(65001)
    r1, _ = desired_bgp(store, keys, "r1", ips["r1"])
    h4 = next(p for p in r1.peers if p.name == "h4")
    assert h4.asn == 65001 and not h4.rr_client and h4.reflect


@has_bird
def test_bird_accepts_reflector_and_client_configs(tmp_path):
    store, keys, ips = _rr_cluster()
    for name in ("r1", "h3"):
        state, _ = desired_bgp(store, keys, name, ips[name])
        text = render(state)
        ok, err = bird_accepts(text, tmp_path)
        assert ok, err
        assert ("rr client;" in text) == (name == "r1")
        assert ("export filter l3net_reflect;" in text) == (name == "r1")
    assert "if bgp_next_hop = 198.18.0.14 && net ~ [ 10.20.3.0/26+ ] then accept;" in text


def test_expired_lease_removes_node():
    store, keys = MemoryStore(), Keys("/t")
    reg = Registry(store, keys, "h2", "198.18.0.12")
    reg.heartbeat(64512)
    reg._lease.expire()
    state, _ = desired_bgp(store, keys, "h1", "198.18.0.11")
    assert state.peers == []
    reg.heartbeat(64512, force=True)            # back: a new lease, the record again
    state, _ = desired_bgp(store, keys, "h1", "198.18.0.11")
    assert [p.ip for p in state.peers] == ["198.18.0.12"]


def test_node_record_vanishes_when_its_lease_is_not_renewed(etcd_store, prefix):
    """On a real etcd: a node that stops heart-beating drops out of everyone's peer list."""
    from tests.conftest import wait_for
    keys = Keys(prefix)
    Registry(etcd_store, keys, "h2", "198.18.0.12", ttl=2).heartbeat(64512)
    state, _ = desired_bgp(etcd_store, keys, "h1", "198.18.0.11")
    assert [p.ip for p in state.peers] == ["198.18.0.12"]
    wait_for(lambda: desired_bgp(etcd_store, keys, "h1", "198.18.0.11")[0].peers == [], 10,
             "the expired node to leave the peer list")


def test_bgp_states_for_metrics():
    from plugin.metrics import bgp_states
    out = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     02:06:22.458
l3net_kernel Kernel     master4    up     02:06:22.458
l3_198_18_1_12 BGP        ---        up     02:06:23.758  Established
l3_198_18_1_13 BGP        ---        start  02:06:23.370  Active        Socket: Connection refused
"""
    assert bgp_states(out) == {"established": 1, "down": 1}


def test_parse_protocols_keeps_only_bgp_sessions_with_their_peer():
    from plugin.birdconf import parse_protocols
    out = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     02:06:22.458
l3_198_18_1_12 BGP        ---        up     02:06:23.758  Established
l3_198_18_1_13 BGP        ---        start  02:06:23.370  Active        Socket: Connection refused
other      BGP        ---        down   02:06:23.370
"""
    sessions = parse_protocols(out)
    assert [(s["peer"], s["state"], s["established"]) for s in sessions] == [
        ("198.18.1.12", "up", True), ("198.18.1.13", "start", False), (None, "down", False)]
    assert sessions[1]["info"] == "Active        Socket: Connection refused"
    assert sessions[2]["info"] == ""


def test_another_bird_in_this_network_namespace_is_found(tmp_path):
    """The distribution's BIRD beside ours would delete our routes: the plugin names it."""
    import os
    import subprocess
    import sys

    from plugin.bird import other_birds
    link = tmp_path / "bird"
    os.symlink(sys.executable, link)            # a process whose argv[0] is ".../bird"
    same = subprocess.Popen([str(link), "-c", "import time; time.sleep(30)"])
    try:
        from tests.conftest import wait_for
        wait_for(lambda: same.pid in other_birds("/run/l3net/bird.ctl"), 5, "the other BIRD found")
        assert same.pid not in other_birds("import time; time.sleep(30)")   # ours: names our socket
    finally:
        same.kill()
        same.wait()


SCRIPT = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from plugin.bird import Bird
run, a, b = sys.argv[2:5]
conf = "router id 192.0.2.1;\\nprotocol device {}\\n"
first = Bird(a, run_dir=run)
first.apply(conf)
old = first.pid()
later = Bird(a, run_dir=run)                 # a new plugin process, same state: adopts
later.apply(conf)
assert later.pid() == old, (later.pid(), old)
moved = Bird(b, run_dir=run)                 # the state directory moved: the old BIRD goes
moved.apply(conf)
new = moved.pid()
assert new and new != old, (new, old)
assert not os.path.exists(f"/proc/{old}") or open(f"/proc/{old}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
assert moved.stop() and not Bird(b, run_dir=run).stop()
print("ok")
"""


@pytest.mark.root
@pytest.mark.bird
def test_bird_is_adopted_or_replaced_when_its_config_moved(tmp_path):
    """A BIRD left by a previous plugin is adopted when it runs our config file, stopped and
    replaced when it runs another one (the state directory moved). In a network namespace of
    its own: the host's routes are not touched."""
    dirs = [tmp_path / d for d in ("run", "a", "b")]
    for d in dirs:
        d.mkdir()
    res = subprocess.run(["unshare", "-n", sys.executable, "-c", SCRIPT, ROOT, *map(str, dirs)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_mesh_peers_may_announce_only_what_etcd_says_they_have():
    """h2 owns one block and holds one borrowed address in h1's block: that is all h1 takes
    from h2; h3 has nothing, so nothing; an explicit router keeps the pool filter."""
    from ipam.allocator import Ipam
    store, keys = MemoryStore(), Keys("/t")
    h1, h2 = Ipam(store, keys, "h1", block_prefix=28), Ipam(store, keys, "h2", block_prefix=28)
    pool, _, _ = h1.request_pool("10.20.0.0/24")
    h1.request_address(pool)                                   # h1 claims 10.20.0.0/28
    h2.request_address(pool)                                   # h2 claims 10.20.0.16/28
    h2.request_address(pool, "10.20.0.9")                      # a --ip in h1's block, on h2
    for name, ip in (("h1", "198.18.0.11"), ("h2", "198.18.0.12"), ("h3", "198.18.0.13")):
        Registry(store, keys, name, ip).heartbeat(64512)
    store.put(keys.bgp_peer("198.18.0.1"), json.dumps({"ip": "198.18.0.1", "as": 65000, "name": "tor"}))
    state, _ = desired_bgp(store, keys, "h1", "198.18.0.11")
    allowed = {p.name: p.allowed for p in state.peers}
    assert sorted(allowed["h2"]) == ["10.20.0.16/28", "10.20.0.9/32"]
    assert allowed["h3"] == () and allowed["tor"] is None


@has_bird
def test_ttl_security_and_per_peer_filters_are_valid_bird(tmp_path):
    import dataclasses
    state = dataclasses.replace(MESH, ttl_security=True)
    text = render(state)
    assert text.count("ttl security on;") == 2, "the two direct mesh peers, not the multihop router"
    ok, err = bird_accepts(text, tmp_path)
    assert ok, err


def test_bgp_password_file(tmp_path):
    from core.errors import L3netError
    from plugin.config import read_bgp_passwords
    path = tmp_path / "bgp-passwords"
    path.write_text("# the mesh, then a router\nmesh-S3cret!\n198.18.0.1 r0uter-key\n")
    assert read_bgp_passwords(str(path)) == {"default": "mesh-S3cret!", "198.18.0.1": "r0uter-key"}
    assert read_bgp_passwords(None, "from-env")["default"] == "from-env"
    for bad in ('quo"te\n', "a b c\n", "300.1.1.1 key\n", "x" * 81 + "\n", "back\\slash\n"):
        path.write_text(bad)
        with pytest.raises(L3netError) as e:
            read_bgp_passwords(str(path))
        assert bad.strip() not in str(e.value), "a secret never ends up in a message"


@has_bird
def test_passwords_sign_the_mesh_and_the_peers_that_have_one(tmp_path):
    import dataclasses
    state = dataclasses.replace(MESH, passwords={"default": "mesh-S3cret!", "198.18.0.1": "r0uter-key"})
    text = render(state)
    assert text.count('password "mesh-S3cret!";') == 2 and text.count('password "r0uter-key";') == 1
    assert "S3cret" not in repr(state), "not in a repr either (logs, tracebacks)"
    ok, err = bird_accepts(text, tmp_path)
    assert ok, err
