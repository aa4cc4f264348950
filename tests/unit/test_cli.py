"""l3netctl against a real etcd: BGP settings, peers, nodes, pools; errors are one line."""

import json

import pytest
from click.testing import CliRunner

from plugin.cli import cli


@pytest.fixture
def ctl(etcd, prefix):
    runner = CliRunner()

    def run(*args, ok=True):
        result = runner.invoke(cli, ["--etcd-endpoints", etcd.url, "--etcd-prefix", prefix, *args])
        if ok:
            assert result.exit_code == 0, result.output
        return result
    return run


def test_bgp_settings_and_peers_round_trip(ctl):
    assert json.loads(ctl("bgp", "config", "--json").output) == [{"as": 64512, "mesh": True, "hold_time": 9}]
    ctl("bgp", "config", "--as", "64600", "--no-mesh")
    assert json.loads(ctl("bgp", "config", "--json").output)[0]["mesh"] is False
    ctl("bgp", "peer", "add", "198.18.0.1", "--as", "65000", "--name", "rr1")
    ctl("bgp", "peer", "add", "198.18.0.2", "--as", "65001", "--node", "h1")
    peers = json.loads(ctl("bgp", "peer", "list", "--json").output)
    assert {(p["ip"], p["scope"]) for p in peers} == {("198.18.0.1", "global"), ("198.18.0.2", "node h1")}
    ctl("bgp", "peer", "remove", "198.18.0.2", "--node", "h1")
    ctl("bgp", "peer", "remove", "198.18.0.1")
    assert json.loads(ctl("bgp", "peer", "list", "--json").output) == []


def test_bgp_node_as_and_route_reflector(ctl):
    row = json.loads(ctl("bgp", "node", "h1", "--json").output)[0]
    assert row == {"node": "h1", "as": 64512, "as_from": "cluster", "route_reflector": False, "peers": 0}
    out = ctl("bgp", "node", "h1", "--route-reflector").output
    assert "the mesh is on" in out
    ctl("bgp", "node", "h1", "--as", "64601")                   # the flag stays
    row = json.loads(ctl("bgp", "node", "h1", "--json").output)[0]
    assert row["route_reflector"] is True and (row["as"], row["as_from"]) == (64601, "node")
    ctl("bgp", "node", "h1", "--cluster-as", "--no-route-reflector")
    row = json.loads(ctl("bgp", "node", "h1", "--json").output)[0]
    assert row["route_reflector"] is False and row["as_from"] == "cluster"
    assert ctl("bgp", "node", "h1", "--as", "1", "--cluster-as", ok=False).exit_code != 0


@pytest.mark.parametrize("args", [
    ("bgp", "peer", "add", "300.1.1.1", "--as", "1"),
    ("bgp", "peer", "add", "1.1.1.1", "--as", "0"),
    ("bgp", "peer", "add", "1.1.1.1", "--as", "1", "--node", "../etc"),
    ("bgp", "config", "--hold-time", "1"),
    ("bgp", "peer", "add", "198.18.0.9", "--as", "1", "--name", "rr1\nprotocol bgp x {"),
    ("bgp", "peer", "add", "127.0.0.1", "--as", "1"),
])
def test_bad_input_is_refused_and_changes_nothing(ctl, args):
    before = ctl("bgp", "peer", "list", "--json").output
    result = ctl(*args, ok=False)
    assert result.exit_code != 0 and "Error" in result.output
    assert ctl("bgp", "peer", "list", "--json").output == before


def test_unreachable_etcd_is_one_clear_line():
    result = CliRunner().invoke(cli, ["--etcd-endpoints", "http://127.0.0.1:1", "--etcd-timeout", "1",
                                      "pool", "list"])
    assert result.exit_code != 0
    assert "unreachable" in str(result.exception) or "did not answer" in str(result.exception)


def test_node_remove_refuses_a_live_node_then_releases_everything(ctl, etcd, prefix):
    from core.keys import Keys
    from ipam.allocator import Ipam
    from plugin.agent import Registry
    from plugin.store import EtcdStore

    store, keys = EtcdStore(etcd.url), Keys(prefix)
    Registry(store, keys, "gone", "198.18.0.99").heartbeat(64512)
    ipam = Ipam(store, keys, "gone")
    pid, _, _ = ipam.request_pool("10.33.0.0/24")
    ipam.request_address(pid)
    store.put(keys.endpoint("gone", "e" * 64), "{}")
    listed = {n["name"]: n for n in json.loads(ctl("node", "list", "--json").output)}
    assert (listed["gone"]["state"], listed["gone"]["blocks"], listed["gone"]["endpoints"]) == ("up", 1, 1)
    assert listed["gone"]["vtep_mac"] == "0e:4c:c6:12:00:63"          # its VXLAN MAC, from its address
    store.delete(keys.node("gone"))                      # its lease expired: the node died
    listed = {n["name"]: n for n in json.loads(ctl("node", "list", "--json").output)}
    assert listed["gone"]["state"].startswith("gone") and listed["gone"]["blocks"] == 1
    Registry(store, keys, "gone", "198.18.0.99").heartbeat(64512)
    result = ctl("node", "remove", "gone", ok=False)
    assert result.exit_code != 0 and "still registered" in str(result.exception)
    assert "1 addresses released, 1 blocks freed" in ctl("node", "remove", "gone", "--force").output
    assert store.get_prefix(keys.host("gone")) == [] and store.get(keys.node("gone"))[0] is None
    assert json.loads(ctl("ipam", "show", "--json").output) == []
    store.close()


def test_policy_and_host_rules_round_trip(ctl, etcd, prefix):
    from core.keys import Keys
    from plugin.store import EtcdStore
    store, keys = EtcdStore(etcd.url), Keys(prefix)
    for cidr in ("10.20.0.0/16", "10.30.0.0/16"):
        store.put(keys.pool(cidr), "{}")
    out = ctl("policy", "allow", "--from", "10.20.0.0/16", "--to", "10.30.0.0/16",
              "--proto", "tcp", "--port", "5432").output
    rule_id = out.strip().splitlines()[-1]
    (rule,) = json.loads(ctl("policy", "list", "--json").output)
    assert rule["id"] == rule_id and rule["ports"] == "5432" and rule["to"] == "10.30.0.0/16"
    host_id = ctl("host", "allow", "--proto", "udp", "--port", "53-54").output.strip().splitlines()[-1]
    assert json.loads(ctl("host", "list", "--json").output)[0]["ports"] == "53-54"
    ctl("policy", "remove", rule_id)
    ctl("host", "remove", host_id)
    assert json.loads(ctl("policy", "list", "--json").output) == []
    assert json.loads(ctl("host", "list", "--json").output) == []
    store.close()


@pytest.mark.parametrize("args", [
    ("policy", "allow", "--from", "10.20.0.0/16", "--to", "10.99.0.0/16"),          # not a pool
    ("policy", "allow", "--from", "10.20.0.0/16", "--to", "10.20.0.0/16", "--proto", "icmp", "--port", "1"),
    ("policy", "allow", "--from", "10.20.0.0/16", "--to", "10.20.0.0/16", "--proto", "tcp", "--port", "9-1"),
    ("policy", "allow", "--from", "web;rm", "--to", "10.20.0.0/16"),
    ("host", "allow", "--proto", "tcp", "--port", "70000"),
    ("policy", "remove", "../x"),
])
def test_bad_policy_input_changes_nothing(ctl, etcd, prefix, args):
    from core.keys import Keys
    from plugin.store import EtcdStore
    store = EtcdStore(etcd.url)
    store.put(Keys(prefix).pool("10.20.0.0/16"), "{}")
    before = store.get_prefix(prefix + "/")
    result = ctl(*args, ok=False)
    assert result.exit_code != 0
    assert store.get_prefix(prefix + "/") == before
    store.close()


def err(result):
    return str(result.exception) + result.output


def test_pool_add_list_remove_and_nat_flag(ctl, etcd, prefix):
    """An operator's pool: NAT off sticks (a network asking otherwise is refused), it outlives
    its networks, and it is removed only when unused."""
    from core.keys import Keys
    from ipam.allocator import Ipam
    from plugin.store import EtcdStore

    assert "nat-outgoing false" in ctl("pool", "add", "10.77.0.0/24", "--no-nat-outgoing", "--block-size", "28").output
    pools = json.loads(ctl("pool", "list", "--json").output)
    assert [(p["cidr"], p["nat_outgoing"], p["block_size"]) for p in pools] == [("10.77.0.0/24", False, 28)]
    assert "already exists" in err(ctl("pool", "add", "10.77.0.0/24", ok=False))
    assert "overlaps" in err(ctl("pool", "add", "10.77.0.0/16", ok=False))
    store = EtcdStore(etcd.url)
    ipam = Ipam(store, Keys(prefix), "h1")
    with pytest.raises(Exception, match="nat-outgoing=false"):
        ipam.request_pool("10.77.0.0/24", options={"nat-outgoing": "true"})
    pool_id, _, _ = ipam.request_pool("10.77.0.0/24")
    assert "used by networks on h1" in err(ctl("pool", "remove", "10.77.0.0/24", ok=False))
    ipam.release_pool(pool_id)
    assert json.loads(ctl("pool", "list", "--json").output)[0]["cidr"] == "10.77.0.0/24"   # pinned
    ctl("pool", "remove", "10.77.0.0/24")
    assert json.loads(ctl("pool", "list", "--json").output) == []
    assert "no pool" in err(ctl("pool", "remove", "10.77.0.0/24", ok=False))
    store.close()


def test_etcd_flags_are_taken_anywhere():
    from plugin.cli import hoist_etcd_flags
    assert hoist_etcd_flags(["policy", "list", "--etcd-prefix", "/x", "--json", "--etcd-endpoints=http://e:1"]) == \
        ["--etcd-prefix", "/x", "--etcd-endpoints=http://e:1", "policy", "list", "--json"]
    assert hoist_etcd_flags(["host", "allow", "--port", "22"]) == ["host", "allow", "--port", "22"]


def test_l3netctl_takes_etcd_flags_after_the_command(etcd, prefix):
    import os
    import subprocess
    import sys
    ctl = os.path.join(os.path.dirname(sys.executable), "l3netctl")
    res = subprocess.run([ctl, "policy", "list", "--json", "--etcd-endpoints", etcd.url, "--etcd-prefix", prefix],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and json.loads(res.stdout) == [], res.stderr
    res = subprocess.run([ctl, "policy", "remove", "nosuchid", "--etcd-endpoints", etcd.url],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and res.stderr.strip() == "l3netctl: no rule 'nosuchid'"


def test_protected_ranges_and_destinations_round_trip(ctl, etcd, prefix):
    from core.keys import Keys
    from plugin.store import EtcdStore
    store, keys = EtcdStore(etcd.url), Keys(prefix)
    store.put(keys.pool("10.20.0.0/16"), json.dumps({"cidr": "10.20.0.0/16", "refs": {}}))
    store.put(keys.node("h1"), json.dumps({"name": "h1", "ip": "198.18.0.11", "etcd": ["198.18.0.1"]}))
    ctl("host", "protect", "10.1.0.0/16")
    rule = ctl("host", "allow", "--to", "169.254.169.254", "--proto", "tcp", "--port", "80").output.split()[-1]
    rows = json.loads(ctl("host", "list", "--json").output)
    assert {(r["kind"], r["id"]) for r in rows} == {("allow", rule), ("protect", "10.1.0.0/16")}
    assert [r["to"] for r in rows if r["kind"] == "allow"] == ["169.254.169.254/32"]
    text = ctl("host", "list", "--all").output
    for expected in ("169.254.0.0/16", "198.18.0.11/32", "198.18.0.1/32", "etcd endpoint", "10.1.0.0/16"):
        assert expected in text, text
    ctl("host", "unprotect", "10.1.0.0/16")
    ctl("host", "remove", rule)
    assert json.loads(ctl("host", "list", "--json").output) == []
    result = ctl("host", "unprotect", "10.1.0.0/16", ok=False)
    assert result.exit_code != 0 and "not a protected range" in str(result.exception)
    store.close()


def test_pool_ranges_round_trip(ctl, etcd, prefix):
    from core.keys import Keys
    from plugin.store import EtcdStore
    store, keys = EtcdStore(etcd.url), Keys(prefix)
    store.put(keys.pool("10.20.0.0/16"), json.dumps({"cidr": "10.20.0.0/16", "block_prefix": 26, "refs": {},
                                                     "nat_outgoing": True, "auto": False}))
    result = ctl("pool", "ranges", "set", "10.64.0.0/10", ok=False)
    assert result.exit_code != 0 and "10.20.0.0/16 lies outside" in str(result.exception)
    assert json.loads(ctl("pool", "ranges", "show", "--json").output) == []
    ctl("pool", "ranges", "set", "10.0.0.0/9", "10.128.0.0/9")
    assert json.loads(ctl("pool", "ranges", "show", "--json").output) == ["10.0.0.0/9", "10.128.0.0/9"]
    result = ctl("pool", "add", "172.20.0.0/16", ok=False)
    assert result.exit_code != 0 and "outside the ranges allowed" in str(result.exception)
    ctl("pool", "ranges", "clear")
    assert "any" in ctl("pool", "ranges").output
    store.close()


@pytest.mark.parametrize("args", [
    ("host", "protect", "10.20.0.0/8"),                      # host bits
    ("host", "protect", "10.0.0.0/8"),                       # covers a pool
    ("host", "protect", "not-a-cidr"),
    ("host", "protect", "0.0.0.0/0"),
    ("host", "allow", "--to", "169.254.169.254/16", "--proto", "tcp", "--port", "80"),
    ("host", "allow", "--to", "1.2.3.4/32", "--node", "h1", "--proto", "tcp", "--port", "80"),
    ("host", "allow", "--to", "0.0.0.0/0", "--proto", "tcp", "--port", "80"),
    ("host", "allow", "--to", "10.20.1.0/24", "--proto", "tcp", "--port", "80"),   # inside a pool
    ("pool", "add", "127.0.0.0/8"),
    ("pool", "add", "169.254.0.0/16"),
    ("pool", "ranges", "set", "10.0.0.1/8"),
])
def test_bad_protection_input_changes_nothing(ctl, etcd, prefix, args):
    from core.keys import Keys
    from plugin.store import EtcdStore
    store = EtcdStore(etcd.url)
    store.put(Keys(prefix).pool("10.20.0.0/16"), json.dumps({"cidr": "10.20.0.0/16", "refs": {}}))
    before = store.get_prefix(prefix + "/")
    result = ctl(*args, ok=False)
    assert result.exit_code != 0
    assert store.get_prefix(prefix + "/") == before
    store.close()


def test_tags_on_networks_and_policies_naming_them(ctl):
    ctl("pool", "add", "10.50.0.0/24")
    ctl("pool", "add", "10.51.0.0/24")
    assert "10.50.0.0/24: tags needs-db,web" in ctl("tag", "add", "10.50.0.0/24", "web", "needs-db").output
    rule = ctl("policy", "allow", "--from", "tag:needs-db", "--to", "10.51.0.0/24", "--proto", "tcp",
               "--port", "5432").output.split()[-1]
    ctl("policy", "allow", "--from", "10.51.0.0/24", "--to", "tag:nobody-yet")
    assert [(r["from"], r["to"]) for r in json.loads(ctl("policy", "list", "--json").output)
            if r["id"] == rule] == [("tag:needs-db", "10.51.0.0/24")]
    rows = {r["tag"]: r for r in json.loads(ctl("tag", "list", "--json").output)}
    assert rows["needs-db"]["networks"] == ["10.50.0.0/24"] and rows["needs-db"]["policies"] == [rule]
    assert rows["web"]["policies"] == [] and rows["nobody-yet"]["networks"] == []
    pools = {p["cidr"]: p for p in json.loads(ctl("pool", "list", "--json").output)}
    assert pools["10.50.0.0/24"]["tags"] == ["needs-db", "web"] and pools["10.51.0.0/24"]["tags"] == []
    assert "(none yet)" in ctl("tag", "list").output
    assert "10.50.0.0/24: tags web" in ctl("tag", "remove", "10.50.0.0/24", "needs-db").output
    # bad input: refused, nothing changed
    before = (ctl("tag", "list", "--json").output, ctl("policy", "list", "--json").output)
    for args in (("tag", "add", "10.50.0.0/24", "Needs-DB"), ("tag", "add", "10.50.0.0/24", "a b"),
                 ("tag", "add", "10.99.0.0/24", "x"), ("policy", "allow", "--from", "tag:BAD", "--to", "10.51.0.0/24"),
                 ("policy", "allow", "--from", "tag:", "--to", "10.51.0.0/24")):
        result = ctl(*args, ok=False)
        said = result.output + str(result.exception)
        assert result.exit_code != 0 and ("invalid tag" in said or "not an l3net pool" in said), said
    assert (ctl("tag", "list", "--json").output, ctl("policy", "list", "--json").output) == before
