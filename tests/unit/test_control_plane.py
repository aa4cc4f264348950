"""The control plane's own integrity (issue 11, first items): one node name per host, one
plugin per state dir, and a node that loses etcd keeps what it had and says so."""

import json
import os
import subprocess
import sys

import pytest

from core.errors import L3netError
from core.keys import Keys
from plugin.agent import Agent, Registry
from plugin.store import MemoryStore, StoreError

KEYS = Keys("/t")


def test_a_live_node_name_with_another_address_is_refused():
    store = MemoryStore()
    Registry(store, KEYS, "h1", "198.18.0.11").heartbeat(64512)
    twin = Registry(store, KEYS, "h1", "198.18.0.12")
    conflict = twin.identity_conflict()
    assert "198.18.0.11" in conflict and "198.18.0.12" in conflict and "--hostname" in conflict
    with pytest.raises(L3netError, match="held by a live node at 198.18.0.11"):
        twin.heartbeat(64512)
    assert json.loads(store.get(KEYS.node("h1"))[0])["ip"] == "198.18.0.11", "the live node's record untouched"
    assert Registry(store, KEYS, "h1", "198.18.0.11").identity_conflict() is None, "a restart of the same host"
    store.delete(KEYS.node("h1"))                      # the other one's lease expired
    twin.heartbeat(64512)


def test_a_second_plugin_on_one_state_dir_is_refused(tmp_path):
    code = ("import sys, time; from plugin.server import lock_state_dir; lock_state_dir(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(30)")
    first = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        assert first.stdout.readline().strip() == "locked"
        from plugin.server import lock_state_dir
        with pytest.raises(L3netError, match=f"pid {first.pid}"):
            lock_state_dir(str(tmp_path))
    finally:
        first.kill()
        first.wait(5)


class DownStore(MemoryStore):
    """etcd that stops answering (every call), while the agent's watch stays open (a hung etcd
    keeps its TCP connections)."""

    def __init__(self):
        super().__init__()
        self.down = False

    def _check(self):
        if self.down:
            raise StoreError("etcd at http://127.0.0.1:2379 did not answer within 5s")

    def get(self, key):
        self._check()
        return super().get(key)

    def get_prefix(self, prefix):
        self._check()
        return super().get_prefix(prefix)

    def read(self, prefixes):
        self._check()
        return super().read(prefixes)

    def refresh(self, lease):
        self._check()
        return super().refresh(lease)

    def txn(self, expect, put=None, delete=None):
        self._check()
        return super().txn(expect, put, delete)


class CountingFirewall:
    applied = None

    def __init__(self):
        self.written = []

    def generation(self):
        return 0

    def apply(self, desired, generation=None):
        self.written.append(desired)

    def drift(self):
        return None


def test_losing_etcd_changes_nothing_and_is_reported(tmp_path):
    store, fw = DownStore(), CountingFirewall()
    store.put(KEYS.pool("10.20.0.0/24"), json.dumps({"cidr": "10.20.0.0/24", "refs": {}}))
    agent = Agent(store, KEYS, "h1", "198.18.0.11", firewall=fw, status_path=str(tmp_path / "status.json"))
    agent.sync()
    agent.sync()                                # (its own node record, written by the first)
    written = len(fw.written)
    agent.sync()
    assert len(fw.written) == written, "nothing changed: nothing computed"
    assert agent.etcd_down_since is None
    store.down = True
    agent.registry._last = 0                    # a beat is due: that is what finds etcd gone
    with pytest.raises(L3netError):
        agent.sync()
    assert len(fw.written) == written, "nothing recomputed or written while etcd is away"
    agent.write_status()
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["etcd_down_since"] is not None
    agent.cache.spread = lambda items: 0.0      # (a one-node cluster: no reason to wait)
    agent.cache._on(agent.cache._epoch, RuntimeError("the etcd watch ended"))   # and the watch breaks
    with pytest.raises(L3netError):
        agent.sync()                            # the copy cannot be loaded again: nothing done
    assert len(fw.written) == written and agent.etcd_down_since is not None
    store.down = False
    agent.sync()
    assert agent.etcd_down_since is None and len(fw.written) == written + 1   # loaded afresh


def test_mesh_peers_outlive_their_record_for_a_grace():
    from plugin.birdconf import Peer
    agent = Agent(MemoryStore(), KEYS, "h1", "198.18.0.11")
    h2 = Peer("h2", "198.18.0.12", 64512, allowed=("10.20.0.64/26",))
    tor = Peer("tor", "198.18.0.1", 65000, multihop=True)
    assert agent.keep_departed([h2, tor]) == [h2, tor]
    assert agent.keep_departed([]) == [h2], "h2's record expired a moment ago: kept; an explicit peer is not"
    assert agent.keep_departed([], {"198.18.0.12"}) == [], "h2 is registered: dropped by the topology, not gone"
    assert agent.keep_departed([h2]) == [h2]
    agent.MESH_GRACE = 0.0
    assert agent.keep_departed([]) == []


def test_a_heartbeat_refreshes_the_lease_and_rewrites_the_record_only_on_change():
    """A record rewritten every beat would wake every other node's agent every 10 s: it is
    written with a new lease, when it changes, or when it went missing; liveness is the lease."""
    store = MemoryStore()
    facts = {"addresses": ["198.18.0.11"]}
    reg = Registry(store, KEYS, "h1", "198.18.0.11", facts=lambda: dict(facts))
    assert reg.heartbeat(64512)
    _, first = store.get(KEYS.node("h1"))
    for _ in range(3):
        assert reg.heartbeat(64512, force=True)
    assert store.get(KEYS.node("h1"))[1] == first, "an unchanged record is not written again"
    facts["addresses"] = ["198.18.0.11", "10.1.2.3"]
    reg.heartbeat(64512, force=True)
    _, changed = store.get(KEYS.node("h1"))
    assert changed > first and "10.1.2.3" in store.get(KEYS.node("h1"))[0]
    store.delete(KEYS.node("h1"))                   # removed by someone, its lease still alive
    reg.heartbeat(64512, force=True, present=False)
    assert store.get(KEYS.node("h1"))[0] is not None
