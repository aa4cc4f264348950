"""The agent loop with an in-memory store: an etcd change wakes it at once (the watch), a BIRD
failure does not stop the policy, drift makes it write the policy again."""

import json
import threading
import time

from core.keys import Keys
from plugin.agent import Agent
from plugin.store import MemoryStore
from tests.conftest import wait_for


class FakeFirewall:
    def __init__(self):
        self.states = []
        self.drifted = None
        self.lock = threading.Lock()

    def generation(self):
        return 0

    def apply(self, desired, generation=None):
        with self.lock:
            self.states.append(desired)
        return "applied"

    def drift(self):
        reason, self.drifted = self.drifted, None
        return reason

    def add_member(self, pool, address):
        pass

    def last(self):
        with self.lock:
            return self.states[-1] if self.states else None


class BrokenBird:
    def apply(self, conf):
        raise RuntimeError("bird -p: syntax error")

    def stop(self):
        pass


def agent_with(store, bird=None, interval=30.0):
    fw = FakeFirewall()
    agent = Agent(store, Keys("/t"), "h1", "192.0.2.1", bird=bird, firewall=fw, interval=interval,
                  drift_every=0.0)
    agent.start()
    return agent, fw


def test_a_change_in_etcd_wakes_the_agent_at_once():
    store = MemoryStore()
    agent, fw = agent_with(store)       # polls only every 30 s: only the watch can be this fast
    try:
        wait_for(fw.last, 5, "the first sync")
        start = time.monotonic()
        store.put(Keys("/t").host_rule("aaaaaaaa"),
                  json.dumps({"id": "aaaaaaaa", "proto": "tcp", "ports": "22", "node": None}))
        wait_for(lambda: fw.last().host_rules, 2, "the host rule applied")
        assert time.monotonic() - start < 1.0
    finally:
        agent.stop()


def test_bird_failure_does_not_stop_the_policy():
    store = MemoryStore()
    agent, fw = agent_with(store, bird=BrokenBird(), interval=0.05)
    try:
        wait_for(lambda: len(fw.states) >= 2, 5, "policy synced although BIRD fails")
        assert "syntax error" in str(agent.last_error)
    finally:
        agent.stop()


def test_drift_triggers_a_new_sync():
    store = MemoryStore()
    agent, fw = agent_with(store, interval=0.05)
    try:
        wait_for(fw.last, 5, "the first sync")
        count = len(fw.states)
        fw.drifted = "iptables rules changed"
        wait_for(lambda: fw.drifted is None and len(fw.states) > count, 5, "a sync after the drift")
    finally:
        agent.stop()


def test_etcd_follow_delivers_changes_under_its_prefix_and_its_end(etcd, prefix):
    """On a real etcd: events come in order, so once the second put is seen, the first (outside
    the followed prefix) would have been seen before it."""
    from plugin.store import EtcdStore

    store = EtcdStore(etcd.url)
    _, revision = store.read([prefix + "/ipam/"])
    seen = []
    store.follow(prefix + "/ipam/", revision, seen.append)
    store.put(prefix + "/hosts/h1/endpoints/x", "{}")
    store.put(prefix + "/ipam/pools/y", "{}")
    wait_for(lambda: seen, 5, "the watch callback")
    time.sleep(0.2)     # a negative check: nothing else may arrive
    assert [[(k, v) for k, v, _ in changes] for changes in seen] == [[(prefix + "/ipam/pools/y", "{}")]]
    # when the stream ends, the callback hears it (and the agent's copy is read again)
    store.close()
    wait_for(lambda: len(seen) == 2, 5, "the end of the watch reported")
    assert isinstance(seen[1], Exception)