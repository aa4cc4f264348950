"""Tags on networks: validation at the edge, the pool's tags (CreateNetwork, l3netctl), the
calculation (tag sets, rules naming a tag) and diagnose naming the tag."""

import json

import pytest

from core import validate as V
from core.errors import L3netError
from core.keys import Keys
from ipam.allocator import Ipam
from plugin.calc import desired_policy
from plugin.diagnose import diagnose
from plugin.policy import render_iptables, set_name, sets, tag_set_name
from plugin.store import MemoryStore


@pytest.mark.parametrize("good", ["needs-db", "a", "x" * 63, "db2", "0"])
def test_good_tags(good):
    assert V.tag(good) == good


@pytest.mark.parametrize("bad", ["", "Needs-DB", "-x", "x-", "a b", "a,b", "x" * 64, "tag:x", "a_b", "é",
                                 'x" -j ACCEPT', None, 7, ["x"]])
def test_bad_tags_are_refused_with_a_clear_error(bad):
    with pytest.raises(L3netError, match="invalid tag .*plain label"):
        V.tag(bad)


def test_tag_lists():
    assert V.tag_list("needs-db, frontend,needs-db") == ["frontend", "needs-db"]
    assert V.tag_list("") == [] and V.tag_list([]) == []
    with pytest.raises(L3netError):
        V.tag_list("a,,b")
    with pytest.raises(L3netError, match="at most 32"):
        V.tag_list([f"t{i}" for i in range(33)])


def test_the_pool_decides_its_tags():
    store, keys = MemoryStore(), Keys("/t")
    h1, h2 = Ipam(store, keys, "h1"), Ipam(store, keys, "h2")
    h1.request_pool("10.20.0.0/24")
    h1.set_tags("10.20.0.0/24", ["needs-db"])            # the pool's only network decides
    h2.request_pool("10.20.0.0/24")
    h2.set_tags("10.20.0.0/24", ["needs-db"])            # matches
    h2.set_tags("10.20.0.0/24", None)                    # no option: takes the pool's
    with pytest.raises(L3netError, match="carries tags needs-db.*-o l3net.tags=needs-db"):
        h2.set_tags("10.20.0.0/24", ["other"])
    assert h1.change_tags("10.20.0.0/24", add=["web"]) == ["needs-db", "web"]
    assert h1.change_tags("10.20.0.0/24", remove=["needs-db", "absent"]) == ["web"]
    with pytest.raises(L3netError, match="not known"):
        h1.change_tags("10.99.0.0/24", add=["x"])


def pool_with(store, keys, cidr, tags, host="h1"):
    ipam = Ipam(store, keys, host)
    pool_id, _, _ = ipam.request_pool(cidr)
    ipam.set_tags(cidr, tags)
    return ipam, pool_id


def test_desired_policy_with_tags():
    store, keys = MemoryStore(), Keys("/t")
    pool_with(store, keys, "10.20.0.0/24", ["needs-db"])
    pool_with(store, keys, "10.30.0.0/24", [])
    _, db = pool_with(store, keys, "10.40.0.0/24", ["db"])
    rules = {"aaaaaaaa": {"from": "tag:needs-db", "to": "10.40.0.0/24", "proto": "tcp", "ports": "5432"},
             "bbbbbbbb": {"from": "10.30.0.0/24", "to": "tag:later", "proto": None},
             "cccccccc": {"from": "tag:Bad!", "to": "10.40.0.0/24", "proto": None},
             "dddddddd": {"from": "tag:", "to": "10.40.0.0/24", "proto": None},
             "eeeeeeee": {"from": ["10.40.0.0/24"], "to": "10.40.0.0/24", "proto": None}}
    for rid, rule in rules.items():
        store.put(keys.policy_rule(rid), json.dumps({"id": rid, **rule}))
    state = desired_policy(store, keys, "h1")
    assert sorted(r["id"] for r in state.rules) == ["aaaaaaaa", "bbbbbbbb"], "bad tag sides ignored"
    assert state.tags == {"needs-db": ["10.20.0.0/24"], "db": ["10.40.0.0/24"], "later": []}
    assert sets(state)[tag_set_name("needs-db")] == ("list:set", [set_name("10.20.0.0/24")])
    assert sets(state)[tag_set_name("later")] == ("list:set", [])
    assert f"--match-set {tag_set_name('needs-db')} src" in render_iptables(state)


def test_bad_tags_in_a_pool_record_are_skipped_the_good_kept():
    store, keys = MemoryStore(), Keys("/t")
    pool_with(store, keys, "10.20.0.0/24", None)
    key = keys.pool("10.20.0.0/24")
    record = json.loads(store.get(key)[0])
    store.put(key, json.dumps(dict(record, tags=["ok", "BAD TAG", 7, 'x" -j ACCEPT'])))
    assert desired_policy(store, keys, "h1").tags == {"ok": ["10.20.0.0/24"]}
    store.put(key, json.dumps(dict(record, tags="ok")))
    assert desired_policy(store, keys, "h1").tags == {}


POOLS = {"10.20.0.0/24": {"cidr": "10.20.0.0/24", "tags": ["needs-db"]},
         "10.30.0.0/24": {"cidr": "10.30.0.0/24"},
         "10.40.0.0/24": {"cidr": "10.40.0.0/24"}}
ALLOC = {"10.20.0.1": {"handle": "endpoint:a", "host": "h1"}, "10.30.0.1": {"handle": "endpoint:b", "host": "h1"},
         "10.40.0.1": {"handle": "endpoint:c", "host": "h1"}}
RULE = {"id": "p1", "from": "tag:needs-db", "to": "10.40.0.0/24", "proto": "tcp", "ports": "5432"}


def why(src, dst, proto="tcp", port=5432):
    from tests.unit.test_diagnose import facts_from
    verdict, steps = diagnose(src, dst, facts_from(POOLS, ALLOC, {"h1": "198.18.0.11"}, rules=[RULE]), proto, port)
    return verdict, " | ".join(s.what for s in steps)


def test_diagnose_names_the_tag_that_lets_a_packet_through_or_would():
    verdict, text = why("10.20.0.1", "10.40.0.1")
    assert verdict == "REACHABLE" and "policy p1 allows 10.20.0.0/24 (tag needs-db)" in text
    verdict, text = why("10.30.0.1", "10.40.0.1")
    assert verdict == "NOT REACHABLE"
    assert "policy p1 (tag:needs-db -> 10.40.0.0/24 tcp/5432) would allow it, but 10.30.0.0/24 lacks tag " \
           "needs-db" in text
    verdict, text = why("10.20.0.1", "10.40.0.1", "icmp", None)
    assert verdict == "NOT REACHABLE" and "open only tcp/5432 (policy p1, tag needs-db)" in text
