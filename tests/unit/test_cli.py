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


@pytest.mark.parametrize("args", [
    ("bgp", "peer", "add", "300.1.1.1", "--as", "1"),
    ("bgp", "peer", "add", "1.1.1.1", "--as", "0"),
    ("bgp", "peer", "add", "1.1.1.1", "--as", "1", "--node", "../etc"),
    ("bgp", "config", "--hold-time", "1"),
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
    from ipam.allocator import Ipam
    from plugin.agent import Registry
    from plugin.keys import Keys
    from plugin.store import EtcdStore

    store, keys = EtcdStore(etcd.url), Keys(prefix)
    Registry(store, keys, "gone", "198.18.0.99").heartbeat(64512)
    ipam = Ipam(store, keys, "gone")
    pid, _, _ = ipam.request_pool("10.33.0.0/24")
    ipam.request_address(pid)
    store.put(keys.endpoint("gone", "e" * 64), "{}")
    result = ctl("node", "remove", "gone", ok=False)
    assert result.exit_code != 0 and "still registered" in str(result.exception)
    assert "1 addresses released, 1 blocks freed" in ctl("node", "remove", "gone", "--force").output
    assert store.get_prefix(keys.host("gone")) == [] and store.get(keys.node("gone"))[0] is None
    assert json.loads(ctl("ipam", "show", "--json").output) == []
    store.close()
