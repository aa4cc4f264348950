"""End to end on one host: real dockerd, real etcd, the docker CLI, the kernel.

The plugin runs under the test name ``l3nettest`` (see conftest.Plugin); everything the tests
create carries the label ``l3net-test`` and is removed at the end of the session.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import BIN, ROOT, TEST_IMAGE, Plugin, docker, post, wait_for

D = Plugin.name


def veths():
    return sorted(n for n in os.listdir("/sys/class/net") if n.startswith("l3h"))


def unique(name):
    return f"l3t-{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def network(plugin):
    """A factory for l3nettest networks, removed after the test."""
    made = []

    def make(subnet=None, *extra, name=None):
        name = name or unique("net")
        args = ["network", "create", "-d", D, "--ipam-driver", D, "--label", "l3net-test"]
        if subnet:
            args += ["--subnet", subnet]
        docker(*args, *extra, name)
        made.append(name)
        return name
    yield make
    for name in made:
        ids = docker("ps", "-aq", "--filter", f"network={name}", check=False).stdout.split()
        if ids:
            docker("rm", "-f", *ids, check=False)
        docker("network", "rm", name, check=False)


def run(net, *args, name=None, cmd=("sleep", "600")):
    name = name or unique("c")
    docker("run", "-d", "--label", "l3net-test", "--name", name, "--net", net, *args,
           TEST_IMAGE, *cmd)
    return name


def ip_of(container, net):
    out = docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container).stdout
    return json.loads(out)[net]["IPAddress"]


def sh(container, script, check=True):
    return docker("exec", container, "sh", "-c", script, check=check)


def pings(container, address, within=10):
    """True once ``container`` gets a ping reply from ``address`` (retried for ``within`` s:
    one lost first packet must not fail a test)."""
    deadline = time.monotonic() + within
    while True:
        if sh(container, f"ping -c1 -W1 {address}", check=False).returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False


def l3netctl(plugin, *args):
    res = subprocess.run([os.path.join(BIN, "l3netctl"), "--etcd-endpoints", plugin.etcd_url,
                          "--etcd-prefix", plugin.prefix, *args],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout


def allocations(plugin):
    """Every address the IPAM holds, from etcd (via the CLI, so the CLI is tested too)."""
    return json.loads(l3netctl(plugin, "ipam", "show", "--json"))


# --------------------------------------------------------------------------------------------
def test_network_create_and_inspect(network):
    net = network("10.60.0.0/16")
    info = json.loads(docker("network", "inspect", net).stdout)[0]
    assert info["Driver"] == D and info["IPAM"]["Driver"] == D
    assert info["IPAM"]["Config"][0]["Subnet"] == "10.60.0.0/16"


def test_other_ipam_driver_rejected(plugin):
    res = docker("network", "create", "-d", D, "--subnet", "10.61.0.0/16", unique("bad"), check=False)
    assert res.returncode != 0 and f"--ipam-driver {D}" in res.stderr


def test_two_containers_ping_and_talk_tcp(network):
    net = network("10.62.0.0/16")
    a, b = run(net), run(net)
    ip_b = ip_of(b, net)
    assert pings(a, ip_b) and pings(b, ip_of(a, net))
    sh(b, "nc -l -p 8080 -e echo l3net-hello >/dev/null 2>&1 &")
    out = wait_for(lambda: "l3net-hello" in sh(a, f"nc -w 2 {ip_b} 8080 </dev/null", check=False).stdout,
                   20, "TCP reply from the other container")
    assert out


def test_routes_in_container_and_host_no_bridge(network):
    net = network("10.63.0.0/16")
    c = run(net)
    ip = ip_of(c, net)
    routes = sh(c, "ip -4 route").stdout
    assert "default via 169.254.1.1 dev eth0" in routes
    assert "169.254.1.1 dev eth0" in routes
    assert f"inet {ip}/32" in sh(c, "ip -4 addr show eth0").stdout
    host_route = subprocess.run(["ip", "-4", "route", "show", f"{ip}/32"], capture_output=True,
                                text=True).stdout
    dev = host_route.split("dev ")[1].split()[0]
    assert dev.startswith("l3h") and "scope link" in host_route
    assert os.path.exists(f"/sys/class/net/{dev}")
    assert not os.path.exists(f"/sys/class/net/{dev}/master"), "host side must not be in a bridge"
    with open(f"/proc/sys/net/ipv4/conf/{dev}/proxy_arp") as f:
        assert f.read().strip() == "1"
    with open(f"/proc/sys/net/ipv4/neigh/{dev}/proxy_delay") as f:
        assert f.read().strip() == "0"


def test_fixed_ip_and_duplicate(network):
    net = network("10.64.0.0/16")
    c = run(net, "--ip", "10.64.9.9")
    assert ip_of(c, net) == "10.64.9.9"
    res = docker("run", "--rm", "--label", "l3net-test", "--net", net, "--ip", "10.64.9.9",
                 TEST_IMAGE, "true", check=False)
    assert res.returncode != 0 and "address 10.64.9.9 is already in use" in res.stderr
    other = run(net)
    assert pings(other, "10.64.9.9")


def test_ip_range_gateway_and_aux_addresses(network, plugin):
    net = network("10.73.0.0/24", "--ip-range", "10.73.0.128/28", "--gateway", "10.73.0.129",
                  "--aux-address", "router=10.73.0.130")
    held = {a["address"]: a["handle"] for a in allocations_of(plugin, net)}
    assert held["10.73.0.129"] == held["10.73.0.130"] == "reserved:10.73.0.0/24"
    names = [run(net) for _ in range(3)]
    ips = [ip_of(n, net) for n in names]
    for ip in ips:
        last = int(ip.split(".")[-1])
        assert 128 <= last <= 143 and ip not in ("10.73.0.129", "10.73.0.130"), ips
    assert pings(names[0], ips[1])


def test_connect_and_disconnect_running_container(network, plugin):
    net = network("10.65.0.0/16")
    peer = run(net)
    c = run("bridge")
    docker("network", "connect", net, c)
    ip = ip_of(c, net)
    assert f"inet {ip}/32" in sh(c, "ip -4 addr").stdout
    # its default route stays on the bridge; the network's pool goes through l3net (with the
    # container's l3net address, so isolation lets it through)
    assert re.search(r"10\.65\.0\.0/16 via 169\.254\.1\.1 dev eth1", sh(c, "ip -4 route").stdout)
    assert pings(c, ip_of(peer, net))
    veth = veth_of(plugin, c, net)
    assert veth in veths()
    docker("network", "disconnect", net, c)
    assert ip not in sh(c, "ip -4 addr").stdout
    wait_for(lambda: veth not in veths(), 10, "host veth removed after disconnect")
    assert ip not in [a["address"] for a in allocations_of(plugin, net)]


def allocations_of(plugin, net):
    return [a for a in allocations(plugin) if a["pool"] == subnet_of(net)]


def footprint(plugin, net):
    """(veths, addresses of ``net``): what a test on ``net`` can change."""
    return set(veths()), allocations_of(plugin, net)


def unchanged_since(plugin, net, before):
    """No veth added since ``before`` (a footprint) and ``net``'s addresses the same. (Only
    what this test can change counts: another test's containers may still be going.)"""
    links, held = footprint(plugin, net)
    return not links - before[0] and held == before[1]


def subnet_of(net):
    return json.loads(docker("network", "inspect", net).stdout)[0]["IPAM"]["Config"][0]["Subnet"]


def test_stop_and_start(network, plugin):
    net = network("10.66.0.0/16")
    peer = run(net)
    c = run(net)
    docker("stop", "-t", "0", c)
    wait_for(lambda: len(allocations_of(plugin, net)) == 1, 10, "the stopped container's address released")
    docker("start", c)
    assert pings(c, ip_of(peer, net))
    wait_for(lambda: len(allocations_of(plugin, net)) == 2, 10, "an address for the restarted container")


def test_network_without_subnet(network):
    net = network()
    subnet = subnet_of(net)
    assert subnet.startswith("10.250.") and subnet.endswith("/24")
    a, b = run(net), run(net)
    assert pings(a, ip_of(b, net))
    net2 = network()
    assert subnet_of(net2) != subnet


def test_twenty_parallel_containers(network):
    net = network("10.67.0.0/16")
    names = [unique("par") for _ in range(20)]
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda n: run(net, name=n), names))
    ips = [ip_of(n, net) for n in names]
    assert len(set(ips)) == 20 and all(ip.startswith("10.67.") for ip in ips)
    for i, n in enumerate(names):   # every container reaches its neighbour
        assert pings(n, ips[(i + 1) % 20]), f"{n} cannot reach {ips[(i + 1) % 20]}"


def test_small_network_survives_30_cycles(network, plugin):
    net = network("10.68.0.0/28")
    before = veths()
    for i in range(30):
        res = docker("run", "--rm", "--label", "l3net-test", "--net", net, TEST_IMAGE, "true",
                     check=False)
        assert res.returncode == 0, f"cycle {i}: {res.stderr}"
    # Deletions of earlier tests may still be finishing in the background: no veth may be
    # left that was not there before the cycles.
    wait_for(lambda: set(veths()) <= set(before), 10, "host veths back to where they were")
    wait_for(lambda: allocations_of(plugin, net) == [], 10, "every address of the network released")


def test_network_rm_busy_then_ok(network, plugin):
    net = network("10.69.0.0/24")
    c = run(net)
    res = docker("network", "rm", net, check=False)
    assert res.returncode != 0 and "active endpoints" in res.stderr
    docker("rm", "-f", c)
    docker("network", "rm", net)
    assert "10.69.0.0/24" not in l3netctl(plugin, "pool", "list", "--json")


def test_malformed_requests_on_the_socket(plugin, network):
    net = network("10.70.0.0/24")
    c = run(net)
    before = footprint(plugin, net)
    cases = [
        ("NetworkDriver.CreateEndpoint", b"{garbage"),
        ("NetworkDriver.CreateEndpoint", json.dumps({"NetworkID": "a" * 63, "EndpointID": "b" * 64}).encode()),
        ("NetworkDriver.CreateEndpoint", json.dumps({"NetworkID": "../../etc", "EndpointID": "x;y"}).encode()),
        ("NetworkDriver.Join", json.dumps({"NetworkID": 1, "EndpointID": None}).encode()),
        ("IpamDriver.RequestPool", json.dumps({"Pool": "10.70.0.0/99"}).encode()),
        ("IpamDriver.RequestPool", json.dumps({"Pool": "a;reboot"}).encode()),
        ("IpamDriver.RequestAddress", json.dumps({"PoolID": "10.70.0.0/24", "Address": "1.2.3"}).encode()),
        ("IpamDriver.ReleasePool", b"[]"),
        ("NetworkDriver.DeleteEndpoint", b"\x00\x01\x02"),
    ]
    for method, raw in cases:
        status, body = post(plugin.socket, method, raw)
        assert status == 500 and isinstance(body, dict) and body.get("Err"), (method, body)
    # a truncated request and a bare connection that sends nothing
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(plugin.socket)
        s.sendall(b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    assert unchanged_since(plugin, net, before)
    assert plugin.call("Plugin.Activate")[0] == 200
    assert pings(c, ip_of(c, net))


def test_late_or_resent_ipam_calls_never_take_a_live_containers_address(plugin, network):
    """dockerd re-sends a call after a connection error, and a slow one arrives late: a
    ReleaseAddress for a container already gone must not free the address its successor now
    holds, and a CreateEndpoint for an address nobody requested (or another endpoint holds)
    is refused and leaves nothing behind."""
    net = network("10.74.0.0/24")
    first = run(net, "--ip", "10.74.0.9")
    docker("rm", "-f", first)
    wait_for(lambda: all(a["address"] != "10.74.0.9" for a in allocations(plugin)), 10, "its address released")
    second = run(net, "--ip", "10.74.0.9")
    held = [a for a in allocations(plugin) if a["address"] == "10.74.0.9"]
    status, _ = post(plugin.socket, "IpamDriver.ReleaseAddress",
                     json.dumps({"PoolID": "10.74.0.0/24", "Address": "10.74.0.9/32"}).encode())
    assert status == 200, "dockerd only logs a release's result: it succeeds, and changes nothing"
    assert [a for a in allocations(plugin) if a["address"] == "10.74.0.9"] == held
    other = run(net)
    assert ip_of(other, net) != "10.74.0.9" and pings(other, "10.74.0.9")
    before = footprint(plugin, net)
    network_id = json.loads(docker("network", "inspect", net).stdout)[0]["Id"]
    for address in ("10.74.0.77/32", "10.74.0.9/32"):      # free; held by the second container
        status, body = post(plugin.socket, "NetworkDriver.CreateEndpoint", json.dumps(
            {"NetworkID": network_id, "EndpointID": uuid.uuid4().hex * 2,
             "Interface": {"Address": address}, "Options": {}}).encode())
        assert status == 500 and ("not allocated" in body["Err"] or "held by" in body["Err"]), body
    assert unchanged_since(plugin, net, before)
    assert pings(other, ip_of(second, net))


def veth_of(plugin, container, net):
    """The host side of ``container``'s veth on ``net`` (from its endpoint record)."""
    address = ip_of(container, net)
    (record,) = [e for e in json.loads(l3netctl(plugin, "endpoint", "list", "--json"))
                 if e.get("address") == address]
    return record["interface"]


def pool_record(plugin, cidr):
    from core.keys import Keys
    from plugin.store import EtcdStore
    value, _ = EtcdStore(plugin.etcd_url, timeout=5).get(Keys(plugin.prefix).pool(cidr))
    return json.loads(value) if value else None


def test_resent_release_pool_and_network_reservations_count_per_network(plugin, network):
    """Two networks on one subnet, both with the same --gateway and --aux-address: removing
    one, then re-sending its ReleasePool and ReleaseAddress calls on the socket (dockerd does
    after a timeout), frees nothing the other still uses: its containers start, the gateway and
    aux address stay reserved (a --ip on them is refused), the pool stays."""
    opts = ("--gateway", "10.79.0.1", "--aux-address", "nas=10.79.0.250")
    first = network("10.79.0.0/24", *opts)
    claims = set(pool_record(plugin, "10.79.0.0/24")["claims"])
    second = network("10.79.0.0/24", *opts)
    (mine,) = set(pool_record(plugin, "10.79.0.0/24")["claims"]) - claims
    (theirs,) = claims
    docker("network", "rm", first)
    for _ in range(2):
        for method, body in (("IpamDriver.ReleaseAddress", {"Address": "10.79.0.1/24"}),
                             ("IpamDriver.ReleaseAddress", {"Address": "10.79.0.250/24"}),
                             ("IpamDriver.ReleasePool", {})):
            status, answer = plugin.call(method, dict(body, PoolID=f"10.79.0.0/24#{theirs}"))
            assert status == 200, answer
    record = pool_record(plugin, "10.79.0.0/24")
    assert set(record["claims"]) == {mine} and sum(record["refs"].values()) == 1
    held = {a["address"]: a["handle"] for a in allocations(plugin)}
    assert held["10.79.0.1"] == held["10.79.0.250"] == "reserved:10.79.0.0/24"
    c = run(second)
    assert ip_of(c, second) not in ("10.79.0.1", "10.79.0.250")
    for taken in ("10.79.0.1", "10.79.0.250"):
        res = docker("run", "--rm", "--label", "l3net-test", "--net", second, "--ip", taken,
                     TEST_IMAGE, "true", check=False)
        assert res.returncode != 0 and "in use" in res.stderr, res.stderr
    held_after = {a["address"]: a["handle"] for a in allocations(plugin)}
    assert held_after["10.79.0.1"] == held_after["10.79.0.250"] == "reserved:10.79.0.0/24"
    docker("rm", "-f", c)
    docker("network", "rm", second)
    wait_for(lambda: pool_record(plugin, "10.79.0.0/24") is None, 10, "the pool forgotten")
    assert not [a for a in allocations(plugin) if a["address"].startswith("10.79.")]


def test_plugin_kill9_and_restart_with_running_containers(plugin, network):
    net = network("10.71.0.0/24")
    a, b = run(net), run(net)
    ip_b = ip_of(b, net)
    plugin.kill9()
    assert pings(a, ip_b), "the data path does not depend on the plugin process"
    plugin.start()
    c = run(net)
    assert pings(c, ip_b)
    gone = {veth_of(plugin, a, net), veth_of(plugin, b, net)}
    assert gone <= set(veths())
    docker("stop", "-t", "0", a, b)
    wait_for(lambda: not gone & set(veths()), 10, "the stopped containers' veths gone")
    docker("rm", "-f", a, b, c)
    wait_for(lambda: allocations_of(plugin, net) == [], 10, "every address of the network released")


def test_etcd_paused_fails_fast_then_recovers(plugin, etcd, network):
    net = network("10.72.0.0/24")
    before = (set(veths()), set(docker("ps", "-aq").stdout.split()))
    etcd.pause()
    try:
        start = time.monotonic()
        res = docker("run", "--rm", "--label", "l3net-test", "--net", net, TEST_IMAGE, "true",
                     check=False, timeout=60)
        elapsed = time.monotonic() - start
        assert res.returncode != 0
        assert "etcd" in res.stderr and "did not answer" in res.stderr, res.stderr
        assert elapsed < 30, f"docker run took {elapsed:.1f}s to fail"
        assert not set(veths()) - before[0]
    finally:
        etcd.resume()
    assert not set(docker("ps", "-aq").stdout.split()) - before[1], "the failed docker run left a container"
    res = wait_for(lambda: docker("run", "--rm", "--label", "l3net-test", "--net", net, TEST_IMAGE,
                                  "true", check=False).returncode == 0, 30, "docker run after SIGCONT")
    assert res
    wait_for(lambda: allocations_of(plugin, net) == [], 10, "every address of the network released")


def test_containers_removed_while_etcd_hangs_leave_nothing_behind(plugin, etcd, network):
    """Three containers removed while etcd hangs for 45 s: DeleteEndpoint is journalled and
    done, ReleaseAddress fails (dockerd only logs it). Once etcd is back, the deletions are
    finished (retried with back-off until done) and the sweeper releases the addresses whose
    release was lost: nothing stays allocated, and ipam check finds nothing."""
    net = network("10.75.0.0/24")
    keep = run(net)
    names = [run(net) for _ in range(3)]
    gone = {veth_of(plugin, n, net) for n in names}
    removed = {ip_of(n, net) for n in names}
    etcd.pause()
    paused = time.monotonic()
    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda n: docker("rm", "-f", n, check=False, timeout=120), names))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        wait_for(lambda: not gone & set(veths()), 10, "the veths gone, etcd or not")
        time.sleep(max(0.0, 45 - (time.monotonic() - paused)))      # the hang, not a wait for something
    finally:
        etcd.resume()
    # the releases dockerd sent during the hang are retried at least every 10 s
    wait_for(lambda: {a["address"] for a in allocations_of(plugin, net)} == {ip_of(keep, net)}, 30,
             "the removed containers' addresses released")
    wait_for(lambda: not [e for e in json.loads(l3netctl(plugin, "endpoint", "list", "--json"))
                          if e["address"] in removed], 30, "their endpoint records gone")
    assert l3netctl(plugin, "ipam", "check", "--min-age", "0", "--hostname", "e2e-host").strip() == \
        "no problems found"
    assert pings(run(net), ip_of(keep, net))


def test_sweeper_removes_what_nothing_explains(plugin, network):
    """A veth of this node no endpoint record explains, a /32 route via a container's veth to an
    address that is not its own, and an endpoint whose veth is gone (its container died while
    nobody told the plugin) are removed after the grace period, the address released; a veth
    without this node's mark (not ours to judge) stays."""
    net = network("10.76.0.0/24")
    keep, victim = run(net), run(net)
    keep_veth, victim_veth = veth_of(plugin, keep, net), veth_of(plugin, victim, net)
    victim_ip = ip_of(victim, net)
    owner = f"l3net {plugin.prefix} e2e-host"
    subprocess.run(["ip", "link", "add", "l3h5eeb00000a", "type", "veth", "peer", "name", "l3t5eeb00000a"], check=True)
    subprocess.run(["ip", "link", "set", "l3h5eeb00000a", "alias", owner], check=True)
    subprocess.run(["ip", "link", "add", "l3h5eeb00000b", "type", "veth", "peer", "name", "l3t5eeb00000b"], check=True)
    try:
        subprocess.run(["ip", "route", "add", "10.76.0.200/32", "dev", keep_veth, "proto", "static"], check=True)
        subprocess.run(["ip", "link", "del", victim_veth], check=True)
        wait_for(lambda: "l3h5eeb00000a" not in veths(), 60, "the stray veth swept")
        wait_for(lambda: "10.76.0.200" not in subprocess.run(["ip", "route", "show", "dev", keep_veth],
                                                               capture_output=True, text=True).stdout,
                 30, "the stray route swept")
        wait_for(lambda: victim_ip not in {a["address"] for a in allocations_of(plugin, net)}, 60,
                 "the gone container's address released")
        assert "l3h5eeb00000b" in veths() and keep_veth in veths()
        assert ip_of(keep, net) in {a["address"] for a in allocations_of(plugin, net)}
        assert pings(run(net), ip_of(keep, net))
    finally:
        subprocess.run(["ip", "link", "del", "l3h5eeb00000b"], check=False)
        subprocess.run(["ip", "link", "del", "l3h5eeb00000a"], check=False, capture_output=True)


def test_policy_names_networks_by_docker_name(network, plugin):
    net = network("10.74.0.0/24")
    rule_id = l3netctl(plugin, "policy", "allow", "--from", net, "--to", net, "--proto", "tcp",
                       "--port", "80").strip().splitlines()[-1]
    rules = json.loads(l3netctl(plugin, "policy", "list", "--json"))
    assert [(r["id"], r["from"], r["to"]) for r in rules] == [(rule_id, "10.74.0.0/24", "10.74.0.0/24")]
    l3netctl(plugin, "policy", "remove", rule_id)


def test_spec_file_install(plugin):
    """The host-service alternative to a socket in /run/docker/plugins: the socket anywhere,
    and /etc/docker/plugins/NAME.spec pointing at it (README: host service). Same etcd prefix
    and node name as the session's plugin: two agents on one host must agree on the rules."""
    name = f"l3spec{uuid.uuid4().hex[:6]}"
    sockdir = f"/run/{name}"
    os.makedirs(sockdir, exist_ok=True)
    spec = f"/etc/docker/plugins/{name}.spec"
    os.makedirs("/etc/docker/plugins", exist_ok=True)
    with open(spec, "w") as f:
        f.write(f"unix://{sockdir}/{name}.sock\n")
    p = Plugin(plugin.etcd_url, plugin.prefix, name=name, socket=f"{sockdir}/{name}.sock")
    net = f"{name}-net"
    try:
        docker("network", "create", "-d", name, "--ipam-driver", name, "--subnet", "10.77.0.0/24",
               "--label", "l3net-test", net)
        a = docker("run", "-d", "--label", "l3net-test", "--net", net, TEST_IMAGE, "sleep", "600").stdout.strip()
        b = docker("run", "-d", "--label", "l3net-test", "--net", net, TEST_IMAGE, "sleep", "600").stdout.strip()
        assert pings(a, ip_of(b, net))
    finally:
        for c in docker("ps", "-aq", "--filter", f"network={net}").stdout.split():
            docker("rm", "-f", c, check=False)
        docker("network", "rm", net, check=False)
        p.stop()
        os.unlink(spec)
        shutil.rmtree(sockdir, ignore_errors=True)


def test_ipam_check_finds_and_fixes_a_leaked_address(network, plugin):
    """An address requested from the plugin that no endpoint ever took (a docker run that died
    half way) is a leak; the network's --aux-address and running containers are not."""
    net = network("10.78.0.0/24", "--aux-address", "nas=10.78.0.250")
    c = run(net)
    status, answer = plugin.call("IpamDriver.RequestAddress", {"PoolID": "10.78.0.0/24", "Address": "",
                                                               "Options": {}})
    assert status == 200, answer
    leaked = answer["Address"].split("/")[0]
    found = json.loads(l3netctl(plugin, "ipam", "check", "--min-age", "0", "--json"))
    assert [(f["kind"], f["address"]) for f in found] == [("leaked address", leaked)], found
    fixed = json.loads(l3netctl(plugin, "ipam", "check", "--min-age", "0", "--fix", "--json"))
    assert fixed[0]["fixed"] is True
    assert l3netctl(plugin, "ipam", "check", "--min-age", "0").strip() == "no problems found"
    held = {a["address"] for a in allocations_of(plugin, net)}
    assert leaked not in held and "10.78.0.250" in held and ip_of(c, net) in held


def test_prometheus_metrics(network, plugin):
    """--metrics-port: call counts and latencies, pool usage, endpoints, agent sync age."""
    import urllib.request
    net = network("10.79.0.0/24")
    run(net)

    def scrape():
        url = f"http://127.0.0.1:{plugin.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()

    def value(text, pattern):
        m = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else None

    def synced():
        text = scrape()
        return text if value(text, r'l3net_pool_addresses\{pool="10\.79\.0\.0/24",state="allocated"\}') else None

    text = wait_for(synced, 10, "pool figures after an agent sync")
    assert value(text, r'l3net_api_calls_total\{code="200",method="NetworkDriver\.CreateEndpoint"\}') >= 1
    assert value(text, r'l3net_api_call_seconds_count\{method="IpamDriver\.RequestAddress"\}') >= 1
    assert value(text, r'l3net_pool_addresses\{pool="10\.79\.0\.0/24",state="capacity"\}') == 254
    assert value(text, r"l3net_endpoints") >= 1
    assert 0 <= value(text, r"l3net_agent_sync_age_seconds") < 5
    # a bogus path is counted as "unknown", not as a new series
    post(plugin.socket, "Nonsense.Method")
    assert 'method="Nonsense.Method"' not in scrape()


def test_l3netctl_status(network, plugin):
    """Healthy with a running plugin; unhealthy (exit 1) when the state dir has no agent."""
    run(network("10.80.0.0/24"))
    wait_for(lambda: json.loads(l3netctl(plugin, "status", "--state-dir", plugin.state, "--json"))
             ["agent"].get("endpoints", 0) >= 1, 10, "the agent's status with the endpoint")
    out = json.loads(l3netctl(plugin, "status", "--state-dir", plugin.state, "--json"))
    assert out["healthy"] is True and out["agent"]["sync_age"] < 10 and out["etcd"]["pools"] >= 1
    text = l3netctl(plugin, "status", "--state-dir", plugin.state)
    assert "healthy" in text.splitlines()[-1] and "10.80.0.0/24" in text
    res = subprocess.run([os.path.join(BIN, "l3netctl"), "--etcd-endpoints", plugin.etcd_url, "status",
                          "--state-dir", "/nonexistent"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "UNHEALTHY" in res.stdout and "no agent status" in res.stdout


def test_endpoint_list_names_containers_and_ipam_blocks(network, plugin):
    net = network("10.81.9.0/24")
    c = run(net)
    rows = json.loads(l3netctl(plugin, "endpoint", "list", "--hostname", "e2e-host", "--json"))
    mine = [r for r in rows if r["address"] == ip_of(c, net)]
    assert len(mine) == 1 and mine[0]["container"] == c and mine[0]["network"] == net, rows
    blocks = json.loads(l3netctl(plugin, "ipam", "show", "--pool", "10.81.9.0/24", "--blocks", "--json"))
    assert [(b["allocated"], b["owner"]) for b in blocks] == [(1, "e2e-host")], blocks
    assert blocks[0]["free"] == 62        # a /26 at the pool's start: its network address is not usable


def test_json_logs_carry_the_call_and_its_ids(network, plugin):
    """--log-format json (the session plugin runs with it): every line on the plugin's output,
    gunicorn's own included, is one JSON object; a container's calls carry the Docker network
    and endpoint IDs."""
    net = network("10.81.10.0/24")
    c = run(net)
    network_id = docker("network", "inspect", "-f", "{{.Id}}", net).stdout.strip()
    endpoint_id = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", c).stdout)[net]["EndpointID"]
    with open(plugin.logpath) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    assert any(r["logger"].startswith("gunicorn") for r in records), "gunicorn's start not logged"
    calls = [r for r in records if r.get("method") == "NetworkDriver.CreateEndpoint"
             and r.get("endpoint") == endpoint_id[:12]]
    assert len(calls) == 1 and calls[0]["network"] == network_id[:12] and calls[0]["status"] == 200, calls
    assert all({"time", "level", "logger", "msg"} <= set(r) for r in records)


def unit_file(path):
    """A systemd unit as {section: {key: [values]}} (keys may repeat)."""
    out, section = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = out.setdefault(line.strip("[]"), {})
            else:
                key, value = line.split("=", 1)
                section.setdefault(key, []).append(value)
    return out


def test_make_install_and_its_systemd_unit(plugin, tmp_path):
    """`make install` into a scratch root, then what systemd does with the unit it installs,
    step by step (no systemd runs here): the settings file, ExecStart, ExecStartPost
    returning once the socket answers, SIGTERM for the stop. Same etcd prefix and node name
    as the session's plugin, so the two agents agree on the host's rules."""
    root = tmp_path
    env = {**os.environ, "PREFIX": f"{root}/opt", "BINDIR": f"{root}/bin", "UNITDIR": f"{root}/units",
           "DEFAULTS": f"{root}/default/l3net"}
    res = subprocess.run(["make", "install"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    unit_path = f"{root}/units/l3net-plugin.service"
    unit = unit_file(unit_path)
    assert "docker.service" in unit["Unit"]["Before"][0].split()
    assert unit["Service"]["Restart"] == ["on-failure"]
    assert "docker.service" in unit["Install"]["WantedBy"] and "RequiredBy" not in unit["Install"]
    assert unit["Service"]["ExecStart"] == [f"{root}/bin/l3net-plugin"]
    assert os.stat(env["DEFAULTS"]).st_mode & 0o077 == 0, "the settings file may hold a password"
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", unit_path], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    sock = f"{root}/run/l3unit.sock"
    with open(env["DEFAULTS"], "a") as f:
        f.write(f"L3NET_ETCD_ENDPOINTS={plugin.etcd_url}\nL3NET_ETCD_PREFIX={plugin.prefix}\n"
                f"L3NET_HOSTNAME=e2e-host\nL3NET_NO_BGP=1\nL3NET_SOCKET={sock}\n"
                f"L3NET_STATE_DIR={root}/state\n")
    settings = dict(line.split("=", 1) for line in open(env["DEFAULTS"]).read().splitlines()
                    if line and not line.startswith("#"))
    service_env = {"PATH": os.environ["PATH"], **settings}
    log = open(f"{root}/plugin.log", "w")
    main = subprocess.Popen(unit["Service"]["ExecStart"][0].split(), env=service_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        post_cmd = unit["Service"]["ExecStartPost"][0]
        assert post_cmd.startswith("/bin/sh -c '") and post_cmd.endswith("'")
        post_start = subprocess.run(["/bin/sh", "-c", post_cmd[len("/bin/sh -c '"):-1]], env=service_env,
                                    timeout=60)
        assert post_start.returncode == 0, open(f"{root}/plugin.log").read()
        assert os.stat(sock).st_mode & 0o777 == 0o660
        wait_for(lambda: post(sock, "Plugin.Activate", timeout=2)[0] == 200, 10, "the unit's plugin to answer")
        os.kill(main.pid, signal.SIGTERM)             # KillMode=mixed: SIGTERM to the main process
        stop_within = float(unit["Service"]["TimeoutStopSec"][0])
        assert main.wait(stop_within) == 0, open(f"{root}/plugin.log").read()
    finally:
        if main.poll() is None:
            os.killpg(main.pid, signal.SIGKILL)
            main.wait(10)
        log.close()
