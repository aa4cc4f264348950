"""Host-port claims (docker run -p): parallel calls, releases, a stale claim, with the etcd
semantics of the in-memory store."""

import threading

import pytest

from core.errors import L3netError
from core.keys import Keys
from plugin.ports import PortClaims
from plugin.store import MemoryStore


def binding(port):
    return {"proto": "tcp", "host_ip": None, "host_port": port, "port": 80}


def run_all(jobs):
    errors = []

    def run(job):
        try:
            job()
        except L3netError as e:
            errors.append(str(e))
    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def test_parallel_claims_and_releases_leave_nothing_behind():
    store, keys = MemoryStore(), Keys("/t")
    claims = PortClaims(store, keys, "h1")
    endpoints = [f"{i:064x}" for i in range(40)]
    assert run_all([lambda e=e, i=i: claims.claim(e, "n" * 64, f"10.0.0.{i + 1}", [binding(9000 + i)],
                                                  lambda _: True, lambda *_: True)
                    for i, e in enumerate(endpoints)]) == []
    assert len(store.get_prefix(keys.ports("h1"))) == 40
    assert run_all([lambda e=e: claims.release(e) for e in endpoints]) == []
    assert store.get_prefix(keys.ports("h1")) == []


def test_one_port_two_live_containers_one_wins():
    store, keys = MemoryStore(), Keys("/t")
    claims = PortClaims(store, keys, "h1")
    errors = run_all([lambda e=e: claims.claim(e, "n" * 64, "10.0.0.1", [binding(8080)], lambda _: True,
                                               lambda *_: True) for e in ("a" * 64, "b" * 64)])
    assert len(errors) == 1 and "already published" in errors[0]
    assert len(store.get_prefix(keys.ports("h1"))) == 1


def test_a_restarted_plugin_reads_claims_and_takes_over_a_dead_holders_port():
    store, keys = MemoryStore(), Keys("/t")
    PortClaims(store, keys, "h1").claim("a" * 64, "n" * 64, "10.0.0.1", [binding(8080)], lambda _: True,
                                        lambda *_: True)
    store.put(keys.port("h1", "udp", 53), "junk")          # ignored, not fatal
    fresh = PortClaims(store, keys, "h1")                   # a new process
    with pytest.raises(L3netError, match="already published"):
        fresh.claim("b" * 64, "n" * 64, "10.0.0.2", [binding(8080)], lambda _: True, lambda *_: True)
    fresh.claim("b" * 64, "n" * 64, "10.0.0.2", [binding(8080)], lambda holder: False, lambda *_: True)
    assert fresh.release("a" * 64) is False                 # its claim is b's now: untouched
    assert '"endpoint": "' + "b" * 64 in store.get(keys.port("h1", "tcp", 8080))[0]
    assert fresh.release("b" * 64) is True
    assert store.get(keys.port("h1", "tcp", 8080))[0] is None
