"""The sweeper's decisions (plugin/sweep.py plan) and its grace period, without a kernel."""

from plugin.datapath import host_ifname
from plugin.sweep import PENDING_AGE, Sweeper, plan

OWNER = "l3net /l3net h1"
A, B, C = "a" * 64, "b" * 64, "c" * 64


def record(endpoint_id, address, network="n" * 64):
    return {"id": endpoint_id, "address": address, "host_ifname": host_ifname(endpoint_id),
            "network": network}


def test_everything_explained_means_nothing_to_do():
    endpoints = {A: record(A, "10.20.0.2")}
    allocations = [("10.20.0.0/24", "10.20.0.2", {"handle": f"endpoint:{A}", "host": "h1"}),
                   ("10.20.0.0/24", "10.20.0.3", {"handle": f"endpoint:{B}", "host": "h2"}),
                   ("10.20.0.0/24", "10.20.0.1", {"handle": "reserved:10.20.0.0/24", "host": "h1"}),
                   ("10.20.0.0/24", "10.20.0.4", {"handle": "pending:h1", "host": "h1", "time": 1000.0})]
    veths = {host_ifname(A): OWNER, host_ifname(C): OWNER, "l3hforeign": "", "l3hother": "l3net /x h2"}
    routes = [("10.20.0.2", host_ifname(A)), ("10.20.0.9", host_ifname(C))]
    assert plan("h1", OWNER, endpoints, allocations, veths, routes, {C}, set(), 1010.0) == {}


def test_leftovers_are_named():
    endpoints = {A: record(A, "10.20.0.2"), B: record(B, "10.20.0.3")}      # B's veth is gone
    allocations = [("10.20.0.0/24", "10.20.0.2", {"handle": f"endpoint:{A}", "host": "h1"}),
                   ("10.20.0.0/24", "10.20.0.5", {"handle": f"endpoint:{C}", "host": "h1"}),
                   ("10.20.0.0/24", "10.20.0.6", {"handle": "pending:h1", "host": "h1", "time": 0.0}),
                   ("10.20.0.0/24", "10.20.0.7", {"handle": "pending:h1", "host": "h1", "time": 0.0}),
                   ("10.20.0.0/24", "10.20.0.8", {"handle": f"endpoint:{C}", "host": "h2"})]
    veths = {host_ifname(A): OWNER, host_ifname(C): OWNER, "l3hforeign": ""}
    routes = [("10.20.0.2", host_ifname(A)), ("10.20.0.99", host_ifname(A))]
    got = plan("h1", OWNER, endpoints, allocations, veths, routes, set(), {"10.20.0.7"}, PENDING_AGE)
    assert sorted(got.values()) == sorted([
        ("stray veth", host_ifname(C)),
        ("stray route", "10.20.0.99", host_ifname(A)),
        ("gone container", "n" * 64, B),
        ("leaked address", "10.20.0.0/24", "10.20.0.5", f"endpoint:{C}"),
        ("leaked address", "10.20.0.0/24", "10.20.0.6", "pending:h1")])


class FakeDriver:
    host = "h1"

    def __init__(self):
        self.deleted = []

        class Datapath:
            owner = OWNER
        self.datapath = Datapath()
        self.datapath.delete_veth = self.deleted.append


def test_grace_period_and_a_leftover_that_comes_back_explained():
    driver = FakeDriver()
    sweeper = Sweeper(driver, ipam=None, every=1, grace=10)
    facts = [{}, [], {host_ifname(C): OWNER}, [], set(), set()]
    sweeper.facts = lambda: facts
    assert sweeper.sweep(now=100) == [] and sweeper.sweep(now=105) == []
    facts[0] = {C: record(C, "10.20.0.9")}               # its CreateEndpoint finished
    assert sweeper.sweep(now=111) == [] and sweeper.seen == {}
    facts[0] = {}
    assert sweeper.sweep(now=112) == [] and sweeper.sweep(now=121) == []
    assert sweeper.sweep(now=122) == [("stray veth", host_ifname(C))]
    assert driver.deleted == [host_ifname(C)]


def test_etcd_away_means_no_sweep():
    driver = FakeDriver()
    sweeper = Sweeper(driver, ipam=None, every=1, grace=0)

    def away():
        raise OSError("etcd did not answer")
    sweeper.facts = away
    try:
        sweeper.sweep(now=1)
    except OSError:
        pass
    assert driver.deleted == [] and sweeper.seen == {}



def test_the_sweep_reads_the_agents_copy_not_etcd():
    """An idle node's sweep costs etcd nothing: its endpoint and network records and the
    allocations come from the agent's watch-fed copy."""
    import json

    from core.keys import Keys
    from ipam.allocator import Ipam
    from plugin.cache import Cache
    from plugin.store import MemoryStore

    reads = []

    class Counting(MemoryStore):
        def get_prefix(self, prefix):
            reads.append(prefix)
            return super().get_prefix(prefix)

        def read(self, prefixes):
            reads.append("load")
            return super().read(prefixes)
    driver = FakeDriver()
    driver.store, driver.keys = Counting(), Keys("/t")
    driver.journal = type("Journal", (), {"pending": staticmethod(lambda: [])})()
    driver.datapath.veth_facts = lambda: ({host_ifname(A): OWNER}, [])
    ipam = Ipam(driver.store, driver.keys, "h1")
    pool_id, _, _ = ipam.request_pool("10.20.0.0/24")
    ip = ipam.request_address(pool_id).split("/")[0]
    driver.store.put(driver.keys.endpoint("h1", A), json.dumps(record(A, ip)))
    driver.store.put(driver.keys.network("h1", "n" * 64), json.dumps({"id": "n" * 64, "aux": ["10.20.0.9"]}))
    cache = Cache(driver.store, driver.keys.agent_view("h1"))
    cache.view()
    reads.clear()
    endpoints, allocations, veths, _, _, aux = Sweeper(driver, ipam, view=cache.view).facts()
    assert list(endpoints) == [A] and aux == {"10.20.0.9"} and [a[1] for a in allocations] == [ip]
    assert reads == [], "nothing read from etcd"
