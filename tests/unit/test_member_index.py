"""The agent's incremental calculation (calc.MemberIndex): whatever sequence of member record
changes arrives, what it says to add and remove leaves exactly the sets a full computation
would give, it asks for BGP whenever a node's announced prefixes change, and for the policy in
full whenever a published port's holder changes. Then the agent and the cache around it: a
member record changed is one set entry, no full computation, no BIRD."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.keys import Keys
from plugin.agent import Agent
from plugin.cache import Cache, View
from plugin.calc import (
    MemberIndex,
    allocations,
    announced_by_node,
    desired_policy,
    node_stats,
)
from plugin.store import MemoryStore

KEYS = Keys("/t")
POOLS = {"10.20.0.0/24": {}, "10.30.0.0/24": {"internal": True}, "127.0.0.0/24": {}}   # the last: not in force
BLOCKS = {"h1": ["10.20.0.0/28", "10.30.0.0/28"], "h2": ["10.20.0.16/28"]}
PORT_IP = "10.20.0.5"           # a port of h1's names this address


def base_store():
    store = MemoryStore()
    for cidr, extra in POOLS.items():
        store.put(KEYS.pool(cidr), json.dumps({"cidr": cidr, **extra}))
    for host, blocks in BLOCKS.items():
        for block in blocks:
            store.put(KEYS.affinity(host, block), block)
    store.put(KEYS.port("h1", "tcp", 8080), json.dumps({"proto": "tcp", "host_port": 8080, "port": 80,
                                                         "ip": PORT_IP, "endpoint": "e1"}))
    return store


def snapshot(store):
    items, revision = store.read(["/t/"])
    return View(items)


ADDRESSES = [f"10.20.0.{i}" for i in (1, 2, 5, 17, 18, 40)] + ["10.30.0.3", "10.30.0.99", "127.0.0.9"]
RECORD = st.one_of(
    st.none(),
    st.builds(lambda host, handle: json.dumps({"host": host, "handle": handle, "time": 1}),
              st.sampled_from(["h1", "h2", "h3"]),
              st.sampled_from(["endpoint:e1", "endpoint:e2", "pending:x", "gateway:n1", "reserved:r"])),
    st.sampled_from(["not json", "{}", json.dumps({"host": 1, "handle": "endpoint:e"})]))


def pool_of(address):
    return next(c for c in POOLS if address.startswith(c.rsplit(".", 1)[0] + "."))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.sampled_from(ADDRESSES), RECORD, min_size=1, max_size=4),
                min_size=1, max_size=8))
def test_the_deltas_lead_where_a_full_computation_does(batches):
    store = base_store()
    index = MemberIndex(KEYS, "h1")
    view = snapshot(store)
    index.load(view)
    sets = {k: set(v) for k, v in desired_policy(view, KEYS, "h1").members.items()}
    announced = announced_by_node(view, KEYS)
    for batch in batches:
        changes = {}
        for address, value in batch.items():
            key = KEYS.member(pool_of(address), address)
            if value is None:
                store.delete(key)
            else:
                store.put(key, value)
            changes[key] = value
        delta = index.apply(changes)
        view = snapshot(store)
        full = desired_policy(view, KEYS, "h1")
        for pool, added in delta.add.items():
            sets[pool] |= added
        for pool, removed in delta.remove.items():
            sets[pool] -= removed
        if not delta.policy:
            assert sets == {k: set(v) for k, v in full.members.items()}
        sets = {k: set(v) for k, v in full.members.items()}
        now = announced_by_node(view, KEYS)
        if {h: sorted(p) for h, p in now.items()} != {h: sorted(p) for h, p in announced.items()}:
            assert delta.bgp, (announced, now)
        announced = now
        holder = {ip: a["handle"] for _, ip, a in allocations(view, KEYS)}.get(PORT_IP)
        assert delta.policy or all(pool_of(a) != pool_of(PORT_IP) or a != PORT_IP for a in batch) or \
            holder is None, "a port's holder changed without a full policy computation"
        assert index.stats() == node_stats(view, KEYS, "h1")


def test_a_new_member_elsewhere_is_one_entry_and_nothing_else():
    index = MemberIndex(KEYS, "h1")
    index.load(snapshot(base_store()))
    record = json.dumps({"host": "h2", "handle": "endpoint:e9", "time": 1})
    delta = index.apply({KEYS.member("10.20.0.0/24", "10.20.0.17"): record})
    assert (delta.add, delta.remove, delta.bgp, delta.policy) == ({"10.20.0.0/24": {"10.20.0.17"}}, {}, False, False)
    # outside h2's blocks: a /32 h2 may announce now, BGP must know
    delta = index.apply({KEYS.member("10.20.0.0/24", "10.20.0.40"): record})
    assert delta.bgp and delta.add == {"10.20.0.0/24": {"10.20.0.40"}}
    # the address a published port names: the policy in full (its holder decides the port)
    assert index.apply({KEYS.member("10.20.0.0/24", PORT_IP): record}).policy
    # a gateway reservation is no member; a pool not in force has no set
    gateway = json.dumps({"host": "h1", "handle": "gateway:n", "time": 1})
    assert not index.apply({KEYS.member("10.20.0.0/24", "10.20.0.1"): gateway})
    assert not index.apply({KEYS.member("127.0.0.0/24", "127.0.0.9"): record})
    delta = index.apply({KEYS.member("10.20.0.0/24", "10.20.0.17"): None})
    assert delta.remove == {"10.20.0.0/24": {"10.20.0.17"}} and not delta.add


def test_the_cache_says_what_changed_since_it_was_last_asked():
    store = MemoryStore()
    store.put("/t/ipam/pools/a", "1")
    cache = Cache(store, ["/t/ipam/"])
    assert cache.changes() is None                      # the load: everything is new
    assert cache.changes() == {}
    store.put("/t/ipam/members/a/1", "x")
    store.put("/t/ipam/members/a/2", "y")
    store.delete("/t/ipam/members/a/2")
    store.put("/t/other", "not followed")
    assert cache.changes() == {"/t/ipam/members/a/1": "x", "/t/ipam/members/a/2": None}
    assert cache.get("/t/ipam/members/a/1")[0] == "x" and cache.get("/t/nothing") == (None, 0)
    for i in range(5):
        store.put(f"/t/ipam/members/a/{i}", "z")
    assert cache.changes(most=4) is None                # too many: compute all
    cache._on(cache._epoch, RuntimeError("the etcd watch ended"))
    assert cache.changes() is None and cache.reloads == 2


class Recorder:
    """A firewall that records what it is asked (the kernel side is test_firewall's)."""
    def __init__(self):
        self.applied, self.calls = None, []

    def generation(self):
        return 0

    def apply(self, desired, generation=None):
        self.calls.append(("apply", desired.members))
        self.applied = desired
        return None

    def apply_members(self, add, remove, generation=None):
        self.calls.append(("members", add, remove))
        return "policy updated"

    def drift(self):
        return None


def test_the_agent_applies_a_member_change_as_one_entry(monkeypatch):
    import plugin.agent as A
    store = base_store()
    firewall = Recorder()
    agent = Agent(store, KEYS, "h1", "198.18.0.11", firewall=firewall)
    agent.sync()
    agent.sync()        # (computes again: its own registration changed the nodes meanwhile)
    assert [c[0] for c in firewall.calls] == ["apply", "apply"]
    del firewall.calls[:]
    bgp = []
    monkeypatch.setattr(A, "desired_bgp", lambda *a: bgp.append(a) or (_ for _ in ()).throw(AssertionError))
    record = json.dumps({"host": "h2", "handle": "endpoint:e9", "time": 1})
    store.put(KEYS.member("10.20.0.0/24", "10.20.0.17"), record)
    agent.sync()
    assert firewall.calls[-1] == ("members", {"10.20.0.0/24": {"10.20.0.17"}}, {}) and not bgp
    assert agent.stats["pools"]["10.20.0.0/24"][0] == 1
    agent.sync()                                         # nothing new: nothing done
    assert len(firewall.calls) == 1
    # this host's endpoint and network records (the sweeper's): nothing to compute
    store.put(KEYS.endpoint("h1", "e1"), json.dumps({"id": "e1"}))
    store.put(KEYS.network("h1", "n1"), json.dumps({"id": "n1"}))
    agent.sync()
    assert len(firewall.calls) == 1 and not bgp
    # anything but members (a policy rule): everything computed again
    monkeypatch.undo()
    store.put(KEYS.policy_rule("r1"), json.dumps({"id": "r1", "from": "10.20.0.0/24", "to": "10.30.0.0/24"}))
    agent.sync()
    assert firewall.calls[-1][0] == "apply" and "10.20.0.17" in firewall.calls[-1][1]["10.20.0.0/24"]
    agent.cache.stop()
