"""The agent's watch-fed copy of etcd (plugin/cache.py): loaded once, then kept by events;
loaded again only when the watch is lost; in memory and on a real etcd."""

import json
import threading

import pytest

from plugin.cache import Cache
from plugin.store import MemoryStore
from tests.conftest import wait_for


@pytest.fixture(params=["memory", "etcd"])
def store(request, prefix):
    if request.param == "memory":
        return MemoryStore()
    return request.getfixturevalue("etcd_store")


def test_loaded_once_then_followed_by_events(store, prefix):
    store.put(f"{prefix}/ipam/pools/a", "1")
    store.put(f"{prefix}/hosts/h1/endpoints/x", "not kept")
    woken = threading.Event()
    cache = Cache(store, [f"{prefix}/ipam/", f"{prefix}/nodes/"], on_change=woken.set)
    view = cache.view()
    assert [k for k, _, _ in view.get_prefix(prefix)] == [f"{prefix}/ipam/pools/a"]
    assert cache.reloads == 1 and cache.following
    generation = cache.generation
    store.put(f"{prefix}/hosts/h1/endpoints/y", "ignored")      # outside the kept prefixes
    store.put(f"{prefix}/nodes/n1", json.dumps({"name": "n1"}))
    store.delete(f"{prefix}/ipam/pools/a")
    # one transaction, several keys (a block and its affinity): one revision, every change kept
    store.txn({}, put={f"{prefix}/ipam/blocks/b1": "x", f"{prefix}/ipam/affinity/h1/b1": "y"})
    wait_for(lambda: cache.view().get(f"{prefix}/ipam/pools/a")[0] is None and
             cache.view().get(f"{prefix}/nodes/n1")[0] is not None and
             cache.view().get(f"{prefix}/ipam/blocks/b1")[0] == "x" and
             cache.view().get(f"{prefix}/ipam/affinity/h1/b1")[0] == "y", 10, "the events applied")
    assert woken.is_set() and cache.generation > generation
    assert cache.reloads == 1 and cache.events == 4           # no read since the load
    assert cache.view() is cache.view()                        # one copy per generation
    cache.stop()


def test_a_lost_watch_means_a_full_load_next_time(prefix):
    store = MemoryStore()
    cache = Cache(store, [f"{prefix}/ipam/"])
    cache.view()
    cache._on(cache._epoch, RuntimeError("the etcd watch ended"))
    assert not cache.following
    store.put(f"{prefix}/ipam/pools/b", "2")                   # missed by the dead watch
    assert cache.view().get(f"{prefix}/ipam/pools/b")[0] == "2"
    assert cache.reloads == 2


def test_etcd_away_at_load_raises_and_keeps_nothing(prefix):
    class Away(MemoryStore):
        def read(self, prefixes):
            raise OSError("etcd did not answer")
    cache = Cache(Away(), [f"{prefix}/ipam/"])
    with pytest.raises(OSError):
        cache.view()
    assert not cache.following


def test_a_container_start_elsewhere_is_two_small_events(store, prefix):
    """What another host's docker run costs an agent: its RequestAddress and CreateEndpoint
    change one member record each (not the block, not the endpoint record): two events of a
    few hundred bytes, whatever the number of addresses in the block."""
    from netaddr import IPNetwork

    from core.keys import Keys
    from ipam.allocator import Ipam
    keys = Keys(prefix)
    other = Ipam(store, keys, "h2")
    pool_id, _, _ = other.request_pool("10.20.0.0/16")
    for _ in range(50):                                     # a block well filled already
        other.request_address(pool_id)
    cache = Cache(store, keys.agent_view("h1"))
    cache.view()
    events, generation = cache.events, cache.generation
    ip = other.request_address(pool_id).split("/")[0]      # RequestAddress on h2
    other.set_handle(IPNetwork("10.20.0.0/16"), ip, "endpoint:" + "e" * 64,
                     also_put={keys.endpoint("h2", "e" * 64): json.dumps({"id": "e" * 64, "address": ip})})
    wait_for(lambda: cache.events - events == 2, 10, "the two member events")
    view = cache.view()
    assert cache.reloads == 1 and cache.generation > generation
    member = view.get(keys.member("10.20.0.0/16", ip))[0]
    assert '"handle": "endpoint:' in member and len(member) < 200
    assert not view.get_prefix(keys.all_blocks()) and not view.get_prefix(keys.all_hosts())
    cache.stop()


def test_overlay_replaces_only_the_fresh_prefixes():
    from plugin.cache import View
    view = View({"/p/a/1": ("old", 3), "/p/a/2": ("gone", 4), "/p/b/1": ("kept", 5)}, {"/p/a/": 4, "/p/b/": 5})
    fresh = view.overlay(["/p/a/"], {"/p/a/1": ("new", 9)})
    assert fresh.get_prefix("/p/") == [("/p/a/1", "new", 9), ("/p/b/1", "kept", 5)]
    assert fresh.revision == {"/p/a/": 9, "/p/b/": 5} and fresh.memo is view.memo
    assert view.get("/p/a/1") == ("old", 3)            # the cache's own view is left alone


def test_a_lost_watch_in_a_large_cluster_reloads_after_a_spread(prefix):
    """Every agent loses its watch when etcd restarts: in a large cluster each waits a random
    part of the spread before loading again, serving its last copy meanwhile."""
    store = MemoryStore()
    store.put(f"{prefix}/ipam/pools/a", "1")
    cache = Cache(store, [f"{prefix}/ipam/"], spread=lambda items: 3600.0)
    cache.view()
    cache._on(cache._epoch, RuntimeError("the etcd watch ended"))
    store.put(f"{prefix}/ipam/pools/b", "2")
    view = cache.view()                                     # not reloaded yet: the last copy
    assert view.get(f"{prefix}/ipam/pools/a")[0] == "1" and cache.reloads == 1 and not cache.following
    cache._reload_at = 0.0                                  # its turn comes
    assert cache.view().get(f"{prefix}/ipam/pools/b")[0] == "2" and cache.reloads == 2 and cache.following



def test_one_sync_reads_the_members_of_a_view_once(prefix):
    """BGP, policy and the node's figures all need every allocation and every node: derived
    once per view, not once per calculation."""
    from core.keys import Keys
    from ipam.allocator import Ipam
    from plugin.agent import Registry
    from plugin.cache import View
    from plugin.calc import desired_bgp, desired_policy, node_stats

    store, keys = MemoryStore(), Keys(prefix)
    Registry(store, keys, "h1", "198.18.0.11").heartbeat(64512)
    ipam = Ipam(store, keys, "h1")
    pool_id, _, _ = ipam.request_pool("10.20.0.0/24")
    ipam.request_address(pool_id)
    cache = Cache(store, keys.agent_view("h1"))
    view = cache.view()
    reads = []
    original = View.get_prefix

    def counting(self, p):
        reads.append(p)
        return original(self, p)
    View.get_prefix = counting
    try:
        desired_bgp(view, keys, "h1", "198.18.0.11")
        desired_policy(view, keys, "h1")
        assert node_stats(view, keys, "h1")["pools"]["10.20.0.0/24"][0] == 1
    finally:
        View.get_prefix = original
    assert reads.count(keys.all_members()) == 1 and reads.count(keys.nodes()) == 1, reads
