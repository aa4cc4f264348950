"""Route reflectors of our own: four hosts on one machine (tests/testbed.py), two of them
marked route reflector, the full mesh turned off.

Checked at the receivers: an ordinary host has BGP sessions with the two reflectors only, yet
it routes straight to the host that has the container (the reflector is never the next hop);
with one reflector killed (plugin and BIRD, as in a crash) no route is lost, and an address
announced after the loss still arrives through the other reflector. A reflector taken over by
an attacker (its BIRD made to announce another host's container, and an address nobody holds,
as its own) pulls no traffic: the clients receive the routes and filter them out.
"""

import json
import os
import re
import subprocess
import time
import uuid

import pytest

from tests.conftest import BIN, bed_up, wait_for
from tests.testbed import Testbed, pings, still_pings

NET = "198.18.18"
SUBNET = "10.41.0.0/16"


@pytest.fixture(scope="module")
def bed(docker_ready):
    bed = bed_up(Testbed(4, prefix=f"/l3rr-{uuid.uuid4().hex[:6]}", tag="l3rr", net=NET, etcd_port=23940))
    try:
        for host in bed.hosts:
            host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet", SUBNET, "web")
        yield bed
    finally:
        bed.cleanup()


def ctl(bed, *args):
    res = subprocess.run([f"{BIN}/l3netctl", "--etcd-endpoints", bed.etcd_url, "--etcd-prefix", bed.prefix,
                          *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout


def sessions(host):
    """{peer address: established?} as this host's BIRD reports them."""
    out = host.sh(f"{BIN}/l3netctl", "--etcd-endpoints", host.bed.etcd_url, "--etcd-prefix", host.bed.prefix,
                  "bgp", "status", "--json", check=False).stdout
    try:
        return {s["peer"]: s["established"] for s in json.loads(out)}
    except ValueError:
        return {}


def run(host, *args):
    name = f"c-{uuid.uuid4().hex[:8]}"
    host.docker("run", "-d", "--name", name, "--net", "web", *args, "l3net-test/busybox", "sleep", "600")
    out = host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout
    return name, json.loads(out)["web"]["IPAddress"]


def route_via(host, address):
    """The next hop of the host's route to ``address``, or None."""
    m = re.search(r" via (\S+) ", host.sh("ip", "route", "get", address, check=False).stdout)
    return m.group(1) if m else None


def test_two_reflectors_replace_the_mesh_and_losing_one_loses_no_route(bed):
    r1, r2, h3, h4 = bed.hosts
    c3, ip3 = run(h3)
    c4, ip4 = run(h4)
    wait_for(lambda: pings(h3, c3, ip4), 30, "host 4's container from host 3 (full mesh)")
    out = ctl(bed, "bgp", "node", r1.name, "--route-reflector")
    assert "yes" in out and "the mesh is on" in out, out
    ctl(bed, "bgp", "node", r2.name, "--route-reflector")
    assert json.loads(ctl(bed, "bgp", "node", r2.name, "--json"))[0]["route_reflector"] is True
    roles = {n["name"]: n["role"] for n in json.loads(ctl(bed, "node", "list", "--json"))}
    assert roles == {r1.name: "route reflector", r2.name: "route reflector", h3.name: "node", h4.name: "node"}
    ctl(bed, "bgp", "config", "--no-mesh")

    # Ordinary hosts peer with the reflectors only; reflectors with everyone.
    for host in (h3, h4):
        wait_for(lambda: sessions(host) == {r1.ip: True, r2.ip: True}, 40,
                 f"{host.name}'s sessions: the two reflectors, established")
    for host in (r1, r2):
        others = {h.ip: True for h in bed.hosts if h is not host}
        wait_for(lambda: sessions(host) == others, 40, f"{host.name}'s sessions: every other host")
    # Reflected, and still straight to the host that has the container.
    wait_for(lambda: pings(h3, c3, ip4) and pings(h4, c4, ip3), 30, "hosts 3 and 4 through reflection")
    assert route_via(h3, ip4) == h4.ip and route_via(h4, ip3) == h3.ip
    moved = "10.41.250.7"                       # outside any block: its own /32, reflected
    c4b, _ = run(h4, "--ip", moved)
    wait_for(lambda: pings(h3, c3, moved), 30, "a /32 announced by host 4, on host 3")
    assert route_via(h3, moved) == h4.ip

    # One reflector dies (plugin and BIRD killed): nothing is lost, and what host 4 announces
    # afterwards arrives on host 3 through the other one.
    r1.kill_plugin()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert route_via(h3, ip4) == h4.ip and route_via(h3, moved) == h4.ip, "a route lost with reflector 1"
    late = "10.41.250.8"
    run(h4, "--ip", late)
    wait_for(lambda: pings(h3, c3, late), 30, "an address announced after reflector 1 died, on host 3")
    assert route_via(h3, late) == h4.ip
    # past the graceful-restart time of the dead reflector's routes, still everything
    wait_for(lambda: not sessions(h3).get(r1.ip), 20, "host 3's session with the dead reflector down")
    r1.start_plugin()
    wait_for(lambda: sessions(h3) == {r1.ip: True, r2.ip: True}, 40, "reflector 1 back on host 3")
    assert still_pings(h3, c3, ip4) and still_pings(h3, c3, moved) and still_pings(h3, c3, late)
    for name in (c3,):
        h3.docker("rm", "-f", name, check=False)
    for name in (c4, c4b):
        h4.docker("rm", "-f", name, check=False)


def reflection(bed):
    """Both reflectors marked, the mesh off, host 3 peering with them (idempotent: this test
    may run alone)."""
    r1, r2, h3, _ = bed.hosts
    ctl(bed, "bgp", "node", r1.name, "--route-reflector")
    ctl(bed, "bgp", "node", r2.name, "--route-reflector")
    ctl(bed, "bgp", "config", "--no-mesh")
    wait_for(lambda: sessions(h3) == {r1.ip: True, r2.ip: True}, 40, "host 3 peering with the two reflectors")


def test_a_rogue_reflector_cannot_pull_traffic_to_itself(bed):
    r1, r2, h3, h4 = bed.hosts
    reflection(bed)
    c3, ip3 = run(h3)
    c4, ip4 = run(h4)
    wait_for(lambda: pings(h3, c3, ip4), 30, "host 4's container from host 3 through reflection")
    unheld = "10.41.251.9"                  # in the pool, held by nobody
    # The attacker, root on reflector 2, makes its BIRD originate both as its own: exported to
    # its clients with itself as next hop (what a reflector's own routes carry).
    conf = os.path.join(r2.dir, "state", "bird.conf")
    with open(conf) as f:
        text = f.read()
    head = "protocol static l3net_blocks {\n  ipv4;\n"
    assert head in text
    with open(conf, "w") as f:
        f.write(text.replace(head, f"{head}  route {ip4}/32 blackhole;\n  route {unheld}/32 blackhole;\n"))
    birdc = ("birdc", "-s", "/run/l3net/bird.ctl")
    assert "Reconfigur" in r2.sh(*birdc, "configure").stdout
    # Sent: reflector 2 exports both to host 3 (proof the attack reached the wire) ...
    proto = "l3_" + h3.ip.replace(".", "_")
    wait_for(lambda: all(f"{p}/32" in r2.sh(*birdc, "show", "route", "export", proto, check=False).stdout
                         for p in (ip4, unheld)), 30, "reflector 2 announcing the hijack to host 3")
    # ... received and filtered out there: no route through reflector 2, traffic still straight
    # to host 4, and no route at all to the address nobody holds.
    rogue = "l3_" + r2.ip.replace(".", "_")
    wait_for(lambda: all(f"{p}/32" in h3.sh(*birdc, "show", "route", "filtered", "protocol", rogue,
                                            check=False).stdout for p in (ip4, unheld)), 30,
             "host 3 receiving the hijack and filtering it out")
    assert route_via(h3, ip4) == h4.ip, h3.sh("ip", "route", "get", ip4).stdout
    assert unheld not in h3.sh("ip", "route", "show", "proto", "bird").stdout
    assert still_pings(h3, c3, ip4)
    h3.docker("rm", "-f", c3, check=False)
    h4.docker("rm", "-f", c4, check=False)
