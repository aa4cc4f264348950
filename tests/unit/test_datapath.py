"""The data path's own logic: names, MACs, the background reaper (real netlink, as root)."""

import threading

import pytest

from plugin import datapath as D
from tests.conftest import wait_for

root = pytest.mark.root


def test_interface_names_fit_and_cannot_collide():
    eid = "c0ffee" + "0" * 58
    host, temp = D.host_ifname(eid), D.temp_ifname(eid)
    assert len(host) <= 15 and len(temp) <= 15
    assert host == "l3hc0ffee00000" and temp == "l3tc0ffee00000"
    # "t" is not a hex digit: no endpoint's host side can be named like another's temp side
    assert not any(D.host_ifname(f"{c}" * 64).startswith("l3t") for c in "0123456789abcdef")


def test_random_mac_is_local_unicast():
    for _ in range(50):
        first = int(D.random_mac().split(":")[0], 16)
        assert first & 0x02 and not first & 0x01


@root
def test_create_and_delete_veth_in_this_namespace():
    dp = D.Datapath()
    eid = "e" * 64
    mac = dp.create(eid, "10.254.254.254")
    try:
        assert D.link_exists(D.host_ifname(eid)) and D.link_exists(D.temp_ifname(eid))
        assert D.link_mac(D.temp_ifname(eid)) == mac
        # the host never ARPs for its container: a packet before the container has its
        # address must not leave an INCOMPLETE entry (a second of silence after it is up)
        import subprocess
        neigh = subprocess.run(["ip", "neigh", "show", "dev", D.host_ifname(eid)], capture_output=True,
                               text=True, check=True).stdout
        assert f"10.254.254.254 lladdr {mac} PERMANENT" in neigh, neigh
    finally:
        dp.delete(eid)
    assert not D.link_exists(D.host_ifname(eid))
    assert dp.delete(eid) is False      # idempotent


@root
def test_veth_with_an_mtu_has_it_on_both_ends():
    dp = D.Datapath()
    eid = "d" * 64
    dp.create(eid, "10.254.254.253", mtu=1400)
    try:
        for name in (D.host_ifname(eid), D.temp_ifname(eid)):
            with open(f"/sys/class/net/{name}/mtu") as f:
                assert int(f.read()) == 1400, name
    finally:
        dp.delete(eid)
    uplink = D.uplink_mtu()
    assert uplink is None or 576 <= uplink <= 65536


@root
def test_reaper_retries_a_failing_follow_up():
    reaper = D.Reaper()
    calls = []
    done = threading.Event()

    def then():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("etcd down")
        done.set()
    reaper.submit("l3doesnotexist", then)
    wait_for(done.is_set, 10, "the retried follow-up")
    assert len(calls) == 2
