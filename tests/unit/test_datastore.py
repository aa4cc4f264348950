"""The agent's watch-fed copy of etcd (plugin/datastore.py): loaded once, then kept by events;
loaded again only when the watch is lost; in memory and on a real etcd."""

import json
import threading

import pytest

from plugin.datastore import Cache
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
