"""IPAM logic: pools, blocks, allocation, release, and races (in memory and on a real etcd)."""

import re
import threading
import time

import pytest
from netaddr import IPAddress, IPNetwork

from core.errors import L3netError
from core.keys import Keys
from ipam.allocator import Ipam
from plugin.store import MemoryStore


@pytest.fixture(params=["memory", "etcd"])
def store(request):
    if request.param == "memory":
        return MemoryStore()
    return request.getfixturevalue("etcd_store")


def make(store, host="h1", prefix="/t", **kw):
    return Ipam(store, Keys(prefix), host, **kw)


def addresses(ipam, pool_id, n):
    return [ipam.request_address(pool_id) for _ in range(n)]


def test_explicit_pool_is_shared_each_request_its_own_claim(store, prefix):
    a, b = make(store, "h1", prefix), make(store, "h2", prefix)
    pid1, cidr, data = a.request_pool("10.20.0.0/16")
    pid2, _, _ = b.request_pool("10.20.0.0/16")
    assert pid1 != pid2 and cidr == "10.20.0.0/16"
    assert all(re.fullmatch(r"10\.20\.0\.0/16#[0-9a-f]{16}", p) for p in (pid1, pid2))
    assert data == {"com.docker.network.gateway": "169.254.1.1/32"}
    (pool,) = a.pools()
    assert pool["refs"] == {"h1": 1, "h2": 1} and pool["block_prefix"] == 26
    assert {c: e["host"] for c, e in pool["claims"].items()} == {pid1[-16:]: "h1", pid2[-16:]: "h2"}
    assert a.request_address(pid2).startswith("10.20.")     # any PoolID of the pool works on any host


def test_overlapping_pool_rejected_and_nothing_written(store, prefix):
    ipam = make(store, prefix=prefix)
    ipam.request_pool("10.20.0.0/16")
    with pytest.raises(L3netError, match="overlaps pool 10.20.0.0/16"):
        ipam.request_pool("10.20.5.0/24")
    assert [p["cidr"] for p in ipam.pools()] == ["10.20.0.0/16"]


@pytest.mark.parametrize("bad", ["10.20.0.1/16", "10.20.0.0", "300.1.1.0/24", "10.0.0.0/33",
                                 "10.0.0.0/31", "fe80::/64", "10.0.0.0/16; rm -rf /", "../x"])
def test_invalid_subnets_rejected(bad):
    ipam = make(MemoryStore())
    with pytest.raises(L3netError):
        ipam.request_pool(bad)
    assert ipam.pools() == []


def test_bad_options_rejected():
    ipam = make(MemoryStore())
    with pytest.raises(L3netError, match="unknown --ipam-opt"):
        ipam.request_pool("10.1.0.0/16", options={"color": "red"})
    with pytest.raises(L3netError, match="invalid block-size"):
        ipam.request_pool("10.1.0.0/16", options={"block-size": "x"})
    with pytest.raises(L3netError, match="between 22 and 32 .*etcd"):
        ipam.request_pool("10.1.0.0/16", options={"block-size": "21"})   # its record would be too big
    with pytest.raises(L3netError, match="IPv6"):
        ipam.request_pool("10.1.0.0/16", v6=True)
    assert ipam.pools() == []


def test_auto_pools_are_distinct_and_avoid_existing(store, prefix):
    ipam = make(store, prefix=prefix, default_range="10.250.0.0/22", default_prefix=24)
    ipam.request_pool("10.250.1.0/24")
    got = [ipam.request_pool()[1] for _ in range(3)]
    assert got == ["10.250.0.0/24", "10.250.2.0/24", "10.250.3.0/24"]
    with pytest.raises(L3netError, match="no free /24"):
        ipam.request_pool()


def test_addresses_come_from_own_block_then_new_block(store, prefix):
    ipam = make(store, prefix=prefix)
    pid, _, _ = ipam.request_pool("10.20.0.0/24")   # four /26 blocks
    got = addresses(ipam, pid, 64)
    assert got[0] == "10.20.0.1/32"                  # network address never handed out
    assert len(set(got)) == 64
    blocks = ipam.blocks("10.20.0.0/24")
    assert [b["cidr"] for b in blocks] == ["10.20.0.0/26", "10.20.0.64/26"]
    assert all(b["host"] == "h1" for b in blocks)


def test_borrowing_when_every_block_is_claimed(store, prefix):
    a, b = make(store, "h1", prefix), make(store, "h2", prefix)
    pid, _, _ = a.request_pool("10.20.0.0/25", options={"block-size": "26"})  # 2 blocks
    b.request_pool("10.20.0.0/25")
    a.request_address(pid)
    b.request_address(pid)
    assert {x["cidr"]: x["host"] for x in a.blocks()} == {"10.20.0.0/26": "h1", "10.20.0.64/26": "h2"}
    # h2 fills its block (62 left, the broadcast address excluded), then borrows from h1's.
    got = addresses(b, pid, 62)
    assert len(set(got)) == 62
    borrowed = b.request_address(pid)
    assert IPAddress(borrowed.split("/")[0]) in IPNetwork("10.20.0.0/26")
    assert a.holder(IPNetwork("10.20.0.0/25"), borrowed)["host"] == "h2"


def test_small_pool_exhausts_with_clear_error():
    ipam = make(MemoryStore())
    pid, _, _ = ipam.request_pool("10.30.0.0/28")
    got = addresses(ipam, pid, 14)
    assert "10.30.0.0/32" not in got and "10.30.0.15/32" not in got
    with pytest.raises(L3netError, match="no free address left in pool 10.30.0.0/28"):
        ipam.request_address(pid)


def test_specific_address_and_duplicate(store, prefix):
    ipam = make(store, prefix=prefix)
    pid, _, _ = ipam.request_pool("10.20.0.0/16")
    assert ipam.request_address(pid, "10.20.7.7") == "10.20.7.7/32"
    with pytest.raises(L3netError, match="address 10.20.7.7 is already in use"):
        ipam.request_address(pid, "10.20.7.7")
    with pytest.raises(L3netError, match="not in pool"):
        ipam.request_address(pid, "10.21.0.1")
    with pytest.raises(L3netError, match="network or broadcast"):
        ipam.request_address(pid, "10.20.255.255")


def test_gateway_reservation_is_idempotent():
    ipam = make(MemoryStore())
    pid, _, _ = ipam.request_pool("10.20.0.0/24")
    opts = {"RequestAddressType": "com.docker.network.gateway"}
    assert ipam.request_address(pid, "10.20.0.1", opts) == "10.20.0.1/32"
    assert ipam.request_address(pid, "10.20.0.1", opts) == "10.20.0.1/32"
    assert "10.20.0.1/32" not in addresses(ipam, pid, 10)


def test_ip_range_restricts_addresses(store, prefix):
    ipam = make(store, prefix=prefix)
    pid, cidr, _ = ipam.request_pool("10.20.0.0/16", "10.20.3.0/30")
    assert pid.startswith("10.20.0.0/16@10.20.3.0/30#") and cidr == "10.20.0.0/16"
    got = addresses(ipam, pid, 4)
    assert sorted(got) == [f"10.20.3.{i}/32" for i in range(4)]
    with pytest.raises(L3netError, match="ip-range 10.20.3.0/30"):
        ipam.request_address(pid)
    with pytest.raises(L3netError, match="not inside subnet"):
        ipam.request_pool("10.20.0.0/16", "10.99.0.0/24")


def test_release_is_idempotent_and_pool_goes_away(store, prefix):
    ipam = make(store, prefix=prefix)
    pid, _, _ = ipam.request_pool("10.20.0.0/16")
    addr = ipam.request_address(pid)
    ipam.release_address(pid, addr)
    ipam.release_address(pid, addr)
    ipam.release_address(pid, "169.254.1.1")     # the gateway we answered: not ours, no-op
    assert ipam.request_address(pid) == addr      # reused
    ipam.release_address(pid, addr)
    ipam.release_pool(pid)
    ipam.release_pool(pid)
    assert ipam.pools() == [] and ipam.blocks() == []
    assert store.get_prefix(prefix + "/") == []


def test_pool_stays_while_another_host_uses_it(store, prefix):
    a, b = make(store, "h1", prefix), make(store, "h2", prefix)
    pid, _, _ = a.request_pool("10.20.0.0/16")
    pid_b, _, _ = b.request_pool("10.20.0.0/16")
    b_addr = b.request_address(pid_b)
    a_addr = a.request_address(pid)
    a.release_address(pid, a_addr)
    a.release_pool(pid)
    (pool,) = a.pools()
    assert pool["refs"] == {"h2": 1}
    assert [x["host"] for x in a.blocks()] == ["h2"]       # h1's empty block freed
    assert not b.release_pool(pid)                         # h1's again (re-sent): nothing
    b.release_address(pid_b, b_addr)
    assert b.release_pool(pid_b)
    assert a.pools() == []


def test_block_size_option():
    ipam = make(MemoryStore())
    pid, _, _ = ipam.request_pool("10.20.0.0/16", options={"block-size": "28"})
    addresses(ipam, pid, 16)    # 15 fit the first /28 (its .0 is the pool's network address)
    assert [b["cidr"] for b in ipam.blocks()] == ["10.20.0.0/28", "10.20.0.16/28"]
    with pytest.raises(L3netError, match="block-size 28, not 24"):
        make(ipam.store, "h2").request_pool("10.20.0.0/16", options={"block-size": "24"})


def test_set_handle_records_the_endpoint():
    ipam = make(MemoryStore())
    pid, _, _ = ipam.request_pool("10.20.0.0/16")
    addr = ipam.request_address(pid)
    assert ipam.holder(IPNetwork("10.20.0.0/16"), addr)["handle"] == "pending:h1"
    assert ipam.set_handle(IPNetwork("10.20.0.0/16"), IPAddress("10.20.0.1"), "endpoint:e1")
    assert ipam.holder(IPNetwork("10.20.0.0/16"), addr)["handle"] == "endpoint:e1"


def run_threads(workers):
    errors = []

    def wrap(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=wrap, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_race_many_threads_one_block(store, prefix):
    """16 threads allocating at once from one host: every address distinct, none lost."""
    ipam = make(store, prefix=prefix)
    pid, _, _ = ipam.request_pool("10.40.0.0/24")
    results = []
    lock = threading.Lock()

    def worker():
        got = addresses(ipam, pid, 8)
        with lock:
            results.extend(got)
    run_threads([worker] * 16)
    assert len(results) == 128 and len(set(results)) == 128
    held = [ip for b in ipam.blocks() for ip in b["allocations"]]
    assert sorted(held) == sorted(r.split("/")[0] for r in results)


def test_race_two_hosts_claim_blocks(store, prefix):
    """Two hosts allocate concurrently: no address twice, every block has one owner."""
    hosts = [make(store, f"h{i}", prefix) for i in range(3)]
    pid, _, _ = hosts[0].request_pool("10.50.0.0/22", options={"block-size": "28"})
    results = {h.host: [] for h in hosts}

    def worker(h):
        return lambda: results[h.host].extend(addresses(h, pid, 20))
    run_threads([worker(h) for h in hosts for _ in range(2)])
    everything = [a for r in results.values() for a in r]
    assert len(everything) == 120 and len(set(everything)) == 120
    blocks = hosts[0].blocks()
    assert len({b["cidr"] for b in blocks}) == len(blocks)
    for b in blocks:    # every allocation in a block claimed by h was made by h (no borrowing needed)
        assert {a["host"] for a in b["allocations"].values()} <= {b["host"]}


def test_release_host_frees_a_dead_nodes_addresses_and_blocks(store, prefix):
    a, b = make(store, "h1", prefix), make(store, "h2", prefix)
    pid, _, _ = a.request_pool("10.20.0.0/25")            # two /26 blocks
    b.request_pool("10.20.0.0/25")
    a.request_address(pid)                                 # h1 owns 10.20.0.0/26
    mine = b.request_address(pid)                          # h2 owns 10.20.0.64/26
    addresses(b, pid, 62)                                  # h2's block full...
    borrowed = b.request_address(pid)                      # ...so it borrows from h1's
    assert a.release_host("h1") == (1, 1)
    blocks = {x["cidr"]: x for x in a.blocks()}
    assert blocks["10.20.0.0/26"]["host"] == "" and list(blocks["10.20.0.0/26"]["allocations"]) == [borrowed.split("/")[0]]
    assert blocks["10.20.0.64/26"]["host"] == "h2" and mine.split("/")[0] in blocks["10.20.0.64/26"]["allocations"]
    assert a.pools()[0]["refs"] == {"h2": 1}
    assert store.get_prefix(Keys(prefix).affinities("h1")) == []


def test_ipam_check_finds_and_fixes_leaks_and_orphans():
    """pending leaks (not aux addresses, not recent ones), endpoint leaks, orphaned records;
    --fix releases only what the same holder still has."""
    import json as _json
    import time as _time

    from core.keys import Keys
    from ipam import check
    from ipam.allocator import Ipam
    from plugin.store import MemoryStore

    store, keys = MemoryStore(), Keys("/t")
    ipam = Ipam(store, keys, "h1")
    from netaddr import IPNetwork
    pool_id, cidr, _ = ipam.request_pool("10.20.0.0/24")
    pool = IPNetwork(cidr)
    leaked = ipam.request_address(pool_id).split("/")[0]              # pending, never used
    aux = ipam.request_address(pool_id, "10.20.0.200").split("/")[0]   # an --aux-address
    gone = ipam.request_address(pool_id).split("/")[0]                # endpoint deleted, not released
    ipam.set_handle(pool, gone, "endpoint:" + "a" * 64)
    live = ipam.request_address(pool_id).split("/")[0]
    ipam.set_handle(pool, live, "endpoint:" + "b" * 64)
    store.put(keys.endpoint("h1", "b" * 64), _json.dumps({"id": "b" * 64, "address": live, "pool": cidr,
                                                               "created": _time.time()}))
    store.put(keys.endpoint("h1", "c" * 64), _json.dumps({"id": "c" * 64, "address": "10.20.0.99", "pool": cidr,
                                                               "created": _time.time()}))
    store.put(keys.network("h1", "n" * 64), _json.dumps({"id": "n" * 64, "pools": [cidr], "aux": [aux]}))
    assert check.find(store, keys, _time.time()) == []                # all younger than 5 minutes
    later = _time.time() + 1000
    found = {(f.kind, f.address) for f in check.find(store, keys, later)}
    assert found == {("leaked address", leaked), ("leaked address", gone), ("orphaned endpoint", "10.20.0.99")}
    ipam.set_handle(pool, leaked, "endpoint:" + "d" * 64)             # meanwhile given to someone
    findings = check.fix(store, ipam, [f for f in check.find(store, keys, later) if f.address != leaked] +
                         [check.Finding("leaked address", leaked, cidr, "h1", "pending:h1", "stale view")])
    assert {f.address: f.fixed for f in findings} == {gone: True, "10.20.0.99": True, leaked: False}
    assert ipam.holder(pool, leaked) is not None and ipam.holder(pool, gone) is None
    remaining = {(f.kind, f.address) for f in check.find(store, keys, later)}
    assert remaining == {("leaked address", leaked)}                  # its endpoint "d" has no record


def test_internal_is_the_pools_and_decided_by_its_only_network():
    """docker network create --internal marks the pool (cluster-wide); a second network on
    the pool, on any host, must match; an operator's pool decides for its networks."""
    store, keys = MemoryStore(), Keys("/t")
    h1, h2 = Ipam(store, keys, "h1"), Ipam(store, keys, "h2")
    h1.request_pool("10.20.0.0/24")
    h1.set_internal("10.20.0.0/24", True)
    assert h1.pools()[0]["internal"] is True
    h2.request_pool("10.20.0.0/24")
    before = store.get(keys.pool("10.20.0.0/24"))
    with pytest.raises(L3netError, match="is internal .* with --internal"):
        h2.set_internal("10.20.0.0/24", False)
    assert store.get(keys.pool("10.20.0.0/24")) == before, "a refused network changes nothing"
    h2.set_internal("10.20.0.0/24", True)
    h1.add_pool("10.30.0.0/24")
    h1.request_pool("10.30.0.0/24")
    with pytest.raises(L3netError, match="is not internal .* without --internal"):
        h1.set_internal("10.30.0.0/24", True)


GW = {"RequestAddressType": "com.docker.network.gateway"}


def test_resent_release_pool_keeps_the_other_network_of_the_host(store, prefix):
    """Two networks of one host on a pool: a re-sent ReleasePool of one of them takes nothing
    away from the other (no "pool does not exist" for its next container)."""
    ipam = make(store, "h1", prefix)
    first, _, _ = ipam.request_pool("10.20.0.0/24")
    second, _, _ = ipam.request_pool("10.20.0.0/24")
    assert ipam.release_pool(first)
    assert not ipam.release_pool(first)
    assert not ipam.release_pool(first)
    assert not ipam.release_pool("10.20.0.0/24")      # a claim-less PoolID has nothing to drop either
    (pool,) = ipam.pools()
    assert pool["refs"] == {"h1": 1} and list(pool["claims"]) == [second[-16:]]
    assert ipam.request_address(second).startswith("10.20.0.")


def test_gateway_shared_by_networks_on_two_hosts(store, prefix):
    h1, h2 = make(store, "h1", prefix), make(store, "h2", prefix)
    net1, _, _ = h1.request_pool("10.20.0.0/24")
    net2, _, _ = h2.request_pool("10.20.0.0/24")
    assert h1.request_address(net1, "10.20.0.1", GW) == "10.20.0.1/32"
    assert h2.request_address(net2, "10.20.0.1", GW) == "10.20.0.1/32"
    assert h2.request_address(net2, "10.20.0.1", GW) == "10.20.0.1/32"      # re-sent
    held = h1.holder(IPNetwork("10.20.0.0/24"), "10.20.0.1")
    assert held["handle"] == "reserved:10.20.0.0/24" and set(held["users"]) == {net1[-16:], net2[-16:]}
    for _ in range(2):                                                       # network rm on h1, re-sent
        h1.release_address(net1, "10.20.0.1/32")
        h1.release_pool(net1)
    assert h2.holder(IPNetwork("10.20.0.0/24"), "10.20.0.1")["users"] == {net2[-16:]: "h2"}
    assert "10.20.0.1/32" not in addresses(h2, net2, 5)
    h2.release_address(net2, "10.20.0.1/32")
    assert h2.holder(IPNetwork("10.20.0.0/24"), "10.20.0.1") is None


def test_aux_address_is_a_reservation_a_container_cannot_take(store, prefix):
    pool = IPNetwork("10.20.0.0/24")
    h1, h2 = make(store, "h1", prefix), make(store, "h2", prefix)
    net1, _, _ = h1.request_pool("10.20.0.0/24")
    h1.request_address(net1, "10.20.0.200")               # --aux-address: asked like a --ip
    h1.reserve_for_network(pool, "10.20.0.200/24")        # CreateNetwork says what it is
    h1.reserve_for_network(pool, "10.20.0.200/24")        # (re-sent)
    net2, _, _ = h2.request_pool("10.20.0.0/24")
    h2.request_address(net2, "10.20.0.200")               # the same network on another host
    h2.reserve_for_network(pool, "10.20.0.200/24")
    assert set(h1.holder(pool, "10.20.0.200")["users"]) == {net1[-16:], net2[-16:]}
    # docker run --ip 10.20.0.200 on h2's network: refused before anything is built
    with pytest.raises(L3netError, match="already in use"):
        h2.request_address(net2, "10.20.0.200")
    net3, _, _ = h1.request_pool("10.20.0.0/24")           # ... or on a third network without it
    h1.request_address(net3, "10.20.0.200")
    with pytest.raises(L3netError, match="reserved by a network"):
        h1.check_can_take(pool, "10.20.0.200", "endpoint:" + "e" * 64)
    with pytest.raises(L3netError, match="reserved by a network"):
        h1.set_handle(pool, "10.20.0.200", "endpoint:" + "e" * 64)
    h1.release_address(net3, "10.20.0.200/32")            # dockerd undoes the failed run
    assert set(h1.holder(pool, "10.20.0.200")["users"]) == {net1[-16:], net2[-16:]}
    h1.release_address(net1, "10.20.0.200/32")
    h2.release_address(net2, "10.20.0.200/32")
    assert h1.holder(pool, "10.20.0.200") is None


def test_ipam_check_finds_unused_claims_and_stale_reservations():
    import json as _json

    from ipam import check
    store, keys = MemoryStore(), Keys("/t")
    ipam = Ipam(store, keys, "h1")
    lost, _, _ = ipam.request_pool("10.20.0.0/24")         # a RequestPool re-sent after a timeout
    used, _, _ = ipam.request_pool("10.20.0.0/24")
    ipam.request_address(used, "10.20.0.1", GW)
    store.put(keys.network("h1", "n" * 64), _json.dumps({"id": "n" * 64, "pools": ["10.20.0.0/24"]}))
    gone, _, _ = ipam.request_pool("10.20.0.0/24")         # a network whose gateway release was lost
    ipam.request_address(gone, "10.20.0.2", GW)
    store.put(keys.network("h1", "m" * 64), _json.dumps({"id": "m" * 64, "pools": ["10.20.0.0/24"]}))
    now = time.time()
    assert check.find(store, keys, now) == []
    ipam.release_pool(gone)
    store.delete(keys.network("h1", "m" * 64))
    found = check.find(store, keys, now + 1000)
    assert {(f.kind, f.address, f.handle) for f in found} == {
        ("stale reservation", "10.20.0.2", f"claim:{gone[-16:]}"),
        ("unused pool claim", "", f"claim:{lost[-16:]}")}
    assert all(f.fixed for f in check.fix(store, ipam, found))
    assert check.find(store, keys, now + 1000) == []
    (pool,) = ipam.pools()
    assert list(pool["claims"]) == [used[-16:]] and pool["refs"] == {"h1": 1}
    assert ipam.holder(IPNetwork("10.20.0.0/24"), "10.20.0.2") is None
    assert ipam.holder(IPNetwork("10.20.0.0/24"), "10.20.0.1")["users"] == {used[-16:]: "h1"}


def test_ipam_check_finds_endpoints_of_this_host_whose_veth_is_gone():
    import json as _json

    from ipam import check
    store, keys = MemoryStore(), Keys("/t")
    ipam = Ipam(store, keys, "h1")
    pid, cidr, _ = ipam.request_pool("10.20.0.0/24")
    store.put(keys.network("h1", "n" * 64), _json.dumps({"id": "n" * 64, "pools": [cidr]}))
    ips = []
    for host, endpoint_id in (("h1", "a" * 64), ("h1", "b" * 64), ("h2", "c" * 64)):
        ip = ipam.request_address(pid).split("/")[0]
        ipam.set_handle(IPNetwork(cidr), ip, f"endpoint:{endpoint_id}")
        store.put(keys.endpoint(host, endpoint_id), _json.dumps(
            {"id": endpoint_id, "address": ip, "pool": cidr, "host_ifname": f"l3h{endpoint_id[:11]}",
             "created": 0}))
        ips.append(ip)
    alive = {"l3h" + "b" * 11}                        # a's veth is gone; c is another host's
    found = check.find(store, keys, time.time(), local=("h1", alive.__contains__))
    assert [(f.kind, f.address) for f in found] == [("gone container", ips[0])]
    assert check.fix(store, ipam, found)[0].fixed
    assert ipam.holder(IPNetwork(cidr), ips[0]) is None and store.get(keys.endpoint("h1", "a" * 64))[0] is None
    assert check.find(store, keys, time.time(), local=("h1", alive.__contains__)) == []


def test_a_release_retried_later_leaves_an_address_requested_after_it(store, prefix):
    """A ReleaseAddress that met a hung etcd is retried when etcd is back: if the address was
    meanwhile requested again (pending since after the call), it is someone else's and stays."""
    ipam = make(store, "h1", prefix)
    pid, _, _ = ipam.request_pool("10.20.0.0/24")
    addr = ipam.request_address(pid, "10.20.0.9")
    asked = time.time()
    assert ipam.release_address(pid, addr, asked_at=asked + 10)          # requested before the call
    addr = ipam.request_address(pid, "10.20.0.9")
    assert not ipam.release_address(pid, addr, asked_at=asked - 10)      # requested after it
    assert ipam.holder(IPNetwork("10.20.0.0/24"), "10.20.0.9")["handle"] == "pending:h1"


def members_match_blocks(store, keys):
    """The member records are exactly what the blocks imply (ipam/blocks.members)."""
    import json

    from ipam import blocks as B
    want = {}
    for _, value, _ in store.get_prefix(keys.all_blocks()):
        block = json.loads(value)
        want.update({keys.member(block["pool"], ip): m for ip, m in B.members(block["allocations"]).items()})
    got = {k: json.loads(v) for k, v, _ in store.get_prefix(keys.all_members())}
    return got == want, (got, want)


def test_member_records_follow_every_allocation_change(store, prefix):
    """One small record per address, written in the block's transaction: the agents follow
    these, not the blocks. Allocation, handle, borrowing, gateway reservations, release,
    a node released: the records stay exactly what the blocks say."""
    keys = Keys(prefix)
    a, b = make(store, "h1", prefix, block_prefix=30), make(store, "h2", prefix, block_prefix=30)
    pid, _, _ = a.request_pool("10.20.0.0/28")
    pid_b, _, _ = b.request_pool("10.20.0.0/28")
    got = addresses(a, pid, 3)
    a.set_handle(IPNetwork("10.20.0.0/28"), got[0].split("/")[0], "endpoint:" + "a" * 64)
    a.request_address(pid, "10.20.0.14", {"RequestAddressType": "com.docker.network.gateway"})
    addresses(b, pid_b, 8)                           # h2 takes the remaining blocks, then borrows
    ok, diff = members_match_blocks(store, keys)
    assert ok, diff
    member = store.get(keys.member("10.20.0.0/28", got[0].split("/")[0]))[0]
    assert '"handle": "endpoint:' in member and '"host": "h1"' in member and len(member) < 150
    a.release_address(pid, got[1])
    assert store.get(keys.member("10.20.0.0/28", got[1].split("/")[0]))[0] is None
    a.release_host("h2")
    ok, diff = members_match_blocks(store, keys)
    assert ok, diff


def test_sync_members_backfills_and_drops_strays():
    """A cluster written before member records existed gets them at the next plugin start; a
    record no block implies (written by hand) goes."""
    store, keys = MemoryStore(), Keys("/t")
    ipam = make(store)
    pid, _, _ = ipam.request_pool("10.20.0.0/24")
    addresses(ipam, pid, 3)
    for key, _, _ in store.get_prefix(keys.all_members()):
        store.delete(key)
    store.put(keys.member("10.20.0.0/24", "10.20.0.200"), '{"handle": "endpoint:x", "host": "h9"}')
    assert ipam.sync_members(dry_run=True) == 4 and not members_match_blocks(store, keys)[0]
    assert ipam.ensure_members() == 4                   # the first plugin start after the upgrade
    ok, diff = members_match_blocks(store, keys)
    assert ok, diff
    assert ipam.sync_members() == 0
    store.delete(keys.member("10.20.0.0/24", "10.20.0.1"))
    assert ipam.ensure_members() == 0, "done once per cluster: later starts read one key"
    assert ipam.sync_members() == 1                     # l3netctl ipam check --fix


def test_a_host_filling_its_blocks_does_not_read_them_again():
    """A block this host filled is passed over from its cache: a hundred containers cost no
    read of the full blocks (each up to 1,024 allocations) from etcd, and claiming a block
    lists the pool's blocks by key only."""
    reads = []

    class Counting(MemoryStore):
        def get(self, key):
            if "/ipam/blocks/" in key:
                reads.append(key)
            return super().get(key)

        def get_prefix(self, prefix):
            if "/ipam/blocks/" in prefix:
                reads.append(prefix)
            return super().get_prefix(prefix)

        def keys(self, prefix):                         # (keys only: not counted)
            return [k for k, _, _ in MemoryStore.get_prefix(self, prefix)]
    ipam = make(Counting(), block_prefix=28)
    pool_id, _, _ = ipam.request_pool("10.20.0.0/24")
    got = addresses(ipam, pool_id, 100)
    assert len(set(got)) == 100
    assert reads == [], reads
