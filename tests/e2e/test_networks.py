"""What Docker users do with networks, on one host with the real docker CLI: a container on
several l3net networks (connected and disconnected in any order, running or stopped), fixed
addresses and aliases on connect, prune, and many networks at once. Compose: test_compose.py.

Reachability is probed from inside the containers' network namespaces (netprobe.py): the
server answers with the address it saw, so the source address a container picks per network
is checked at the receiver.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import docker, wait_for
from tests.e2e.test_docker import allocations, ip_of, network, pings, run, sh, unique, veths  # noqa: F401

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netprobe.py")
PORT = 5432


def pid_of(container):
    return int(docker("inspect", "-f", "{{.State.Pid}}", container).stdout)


def probe(container, ip, proto="tcp", port=PORT):
    """What the server at ``ip`` answered ("ok <source address it saw>"), or None."""
    res = subprocess.run(["nsenter", "-t", str(pid_of(container)), "-n", sys.executable, PROBE, "probe",
                          json.dumps([[ip, proto, port]])], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)[0]


@pytest.fixture
def servers():
    """serve(container): a TCP server on PORT inside the container's namespace."""
    procs = []

    def serve(container):
        proc = subprocess.Popen(["nsenter", "-t", str(pid_of(container)), "-n", sys.executable, PROBE,
                                 "serve", str(PORT), ""], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
    yield serve
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def subnet(net):
    return json.loads(docker("network", "inspect", net).stdout)[0]["IPAM"]["Config"][0]["Subnet"]


def interfaces(container):
    """{address: interface} inside the container."""
    out = sh(container, "ip -4 -o addr").stdout
    return {m.group(2): m.group(1) for m in re.finditer(r"^\d+: (\S+)\s+inet ([\d.]+)/", out, re.M)}


def routes(container):
    return sh(container, "ip -4 route").stdout


def assert_attached(c, nets, peers):
    """``c`` is on exactly ``nets`` (of the networks in ``peers``, {net: a container there
    serving PORT}): it reaches each one's peer from its own address there, through its
    interface there; it reaches no other network's peer; it keeps a default route."""
    ifaces, table = interfaces(c), routes(c)
    for net, peer in peers.items():
        if net in nets:
            ip = ip_of(c, net)
            assert ip in ifaces, (net, ifaces)
            m = re.search(rf"^{re.escape(subnet(net))} via (169\.254\.\d+\.\d+) dev (\S+)", table, re.M)
            assert m and m.group(2) == ifaces[ip], table
            assert re.search(rf"^{re.escape(m.group(1))} dev {ifaces[ip]} ", table, re.M), table
            answer = wait_for(lambda: probe(c, ip_of(peer, net)), 5, f"{c} -> its peer on {net}")
            assert answer == f"ok {ip}", answer
        else:
            assert subnet(net) not in table, table
            assert probe(c, ip_of(peer, net)) is None, f"{c} reaches {net}, which it left"
    assert re.search(r"^default via 169\.254\.\d+\.\d+ dev ", table, re.M), table


@pytest.fixture
def two_nets(network, servers):
    """Networks a and b, each with a serving peer."""
    a, b = network("10.91.1.0/24"), network("10.91.2.0/24")
    peers = {a: run(a), b: run(b)}
    for p in peers.values():
        servers(p)
    return a, b, peers


# --------------------------------------------------------------------------------------------
def test_a_running_container_joins_and_leaves_two_networks_in_any_order(two_nets):
    a, b, peers = two_nets
    c = run(a)
    assert_attached(c, {a}, peers)
    docker("network", "connect", b, c)          # was: "169.254.1.1/32 ... file exists"
    assert_attached(c, {a, b}, peers)
    docker("network", "disconnect", a, c)       # the default route's network goes first
    assert_attached(c, {b}, peers)
    docker("network", "connect", a, c)
    assert_attached(c, {a, b}, peers)
    docker("network", "disconnect", b, c)
    assert_attached(c, {a}, peers)
    # the peers of a and b stay apart while c is on both (c is no bridge between them)
    docker("network", "connect", b, c)
    assert probe(peers[a], ip_of(peers[b], b)) is None and probe(peers[b], ip_of(peers[a], a)) is None


def test_a_stopped_container_connected_and_disconnected(two_nets, plugin):
    a, b, peers = two_nets
    before = set(veths())
    c = unique("c")
    docker("create", "--label", "l3net-test", "--name", c, "--net", a, "l3net-test/busybox:latest", "sleep", "600")
    docker("network", "connect", b, c)
    docker("start", c)
    assert_attached(c, {a, b}, peers)
    docker("stop", "-t", "0", c)
    docker("network", "disconnect", a, c)
    docker("start", c)
    assert_attached(c, {b}, peers)
    docker("rm", "-f", c)
    wait_for(lambda: not set(veths()) - before, 10, "the container's veths removed")
    held = {x["address"] for x in allocations(plugin)}
    assert held >= {ip_of(p, n) for n, p in peers.items()}
    assert len([x for x in allocations(plugin) if x["pool"] in (subnet(a), subnet(b))]) == 2, \
        "only the peers' addresses are left"


def test_a_container_on_two_networks_is_no_way_between_them(two_nets):
    """Attacks from both sides of a container on networks a and b, with NET_ADMIN: it forwards
    packets (ip_forward on in its namespace); a's peer routes b's pool through it; it sends
    to b's peer out of its interface on a with its address on b. b's server sees none of it."""
    a, b, peers = two_nets
    pa, pb = peers[a], peers[b]
    attacker = run(a, "--cap-add", "NET_ADMIN")
    pivot = run(a, "--cap-add", "NET_ADMIN", "--sysctl", "net.ipv4.ip_forward=1")
    docker("network", "connect", b, pivot)
    assert sh(pivot, "cat /proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    target = ip_of(pb, b)
    # the pivot itself may: it is on b
    assert wait_for(lambda: probe(pivot, target), 10, "the pivot -> b's peer") == f"ok {ip_of(pivot, b)}"
    # a's member routes b's member through the pivot's address on a
    sh(attacker, f"ip route add {ip_of(pivot, a)}/32 dev eth0 && ip route add {target}/32 via {ip_of(pivot, a)}")
    assert probe(attacker, target) is None
    assert probe(pa, target) is None
    # the pivot sends from its address on b out of its interface on a: on b's side that would
    # look like b talking to b; anti-spoofing drops it on the way in
    ifaces = interfaces(pivot)
    dev_a = ifaces[ip_of(pivot, a)]
    gw_a = re.search(rf"^{re.escape(subnet(a))} via (\S+) dev {dev_a}", routes(pivot), re.M).group(1)
    sh(pivot, f"ip route replace {target}/32 via {gw_a} dev {dev_a} src {ip_of(pivot, b)}")
    assert probe(pivot, target) is None
    sh(pivot, f"ip route del {target}/32")
    assert wait_for(lambda: probe(pivot, target), 10, "the way back working again") == f"ok {ip_of(pivot, b)}"


def test_connect_with_a_fixed_address_and_an_alias(two_nets):
    a, b, peers = two_nets
    c = run(a)
    fixed = "10.91.2.200"
    docker("network", "connect", "--ip", fixed, "--alias", "the-db", b, c)
    assert ip_of(c, b) == fixed and fixed in interfaces(c)
    aliases = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", c).stdout)[b]["Aliases"]
    assert "the-db" in aliases
    out = wait_for(lambda: sh(peers[b], "ping -c1 -W1 the-db", check=False).stdout, 10, "the alias resolved")
    assert f"({fixed})" in out
    # the fixed address is taken while c holds it; free again once c leaves
    res = docker("run", "-d", "--label", "l3net-test", "--net", b, "--ip", fixed, "l3net-test/busybox:latest",
                 "sleep", "600", check=False)
    assert res.returncode != 0
    docker("network", "disconnect", b, c)
    docker("network", "connect", "--ip", fixed, b, run(a))


def keys_under(plugin):
    """The IPAM's keys and this host's records under the test plugin's etcd prefix (read with
    etcdctl: etcd itself): what networks and containers leave behind if anything."""
    res = subprocess.run(["etcdctl", "--endpoints", plugin.etcd_url, "get", "--prefix", "--keys-only",
                          plugin.prefix + "/"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "ETCDCTL_API": "3"})
    assert res.returncode == 0, res.stderr
    return {k for k in res.stdout.split() if k.startswith((plugin.prefix + "/ipam/", plugin.prefix + "/hosts/"))}


def snapshot(plugin):
    """What is there now: (etcd keys, veths), to compare with ``nothing_left`` afterwards."""
    return keys_under(plugin), set(veths())


def nothing_left(plugin, before, timeout, what):
    """Wait until no etcd key and no veth is there that was not there ``before``; on timeout
    say which. (Only what is new counts: a previous test's containers may still be finishing
    their release while this one runs, so what was there may go.)"""
    left = {}

    def clean():
        keys, links = snapshot(plugin)
        left.update(keys=sorted(keys - before[0]), veths=sorted(links - before[1]))
        return not left["keys"] and not left["veths"]
    try:
        wait_for(clean, timeout, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; left behind: {left}") from None


def kernel_routes(*subnets):
    out = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if any(line.startswith(s.rsplit(".", 1)[0] + ".") for s in subnets)]


def test_network_prune_and_system_prune_leave_nothing(plugin):
    label = f"l3net-prune-{uuid.uuid4().hex[:6]}"
    subnets = ["10.91.5.0/24", "10.91.6.0/24"]
    before = snapshot(plugin)
    nets = [unique("prune") for _ in subnets]
    for net, s in zip(nets, subnets):
        docker("network", "create", "-d", plugin.name, "--ipam-driver", plugin.name, "--label", label,
               "--subnet", s, net)
    # network prune: networks no container uses
    docker("network", "prune", "-f", "--filter", f"label={label}")
    assert docker("network", "ls", "-q", "--filter", f"label={label}").stdout.split() == []
    nothing_left(plugin, before, 10, "nothing left by network prune")
    # system prune: a stopped container on two networks, then the networks
    for net, s in zip(nets, subnets):
        docker("network", "create", "-d", plugin.name, "--ipam-driver", plugin.name, "--label", label,
               "--subnet", s, net)
    c = unique("c")
    docker("run", "-d", "--label", label, "--name", c, "--net", nets[0], "l3net-test/busybox:latest", "sleep", "600")
    docker("network", "connect", nets[1], c)
    docker("stop", "-t", "0", c)
    docker("system", "prune", "-f", "--filter", f"label={label}")
    assert docker("ps", "-aq", "--filter", f"label={label}").stdout.split() == []
    assert docker("network", "ls", "-q", "--filter", f"label={label}").stdout.split() == []
    nothing_left(plugin, before, 10, "nothing left by system prune")
    assert kernel_routes(*subnets) == []


def test_ten_networks_fifty_containers_on_two_each_in_parallel(network, plugin):
    """Created and removed in parallel: nothing leaks (address, veth, route, record) and no
    call to the plugin takes a second."""
    with open(plugin.logpath) as f:
        f.seek(0, 2)
        log_start = f.tell()
    before = snapshot(plugin)
    subnets = [f"10.92.{i}.0/24" for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        nets = list(pool.map(network, subnets))

    def start(i):
        first, second = nets[i % 10], nets[(i % 10 + 1 + i // 10) % 10]
        c = run(first)
        docker("network", "connect", second, c)
        return c, first, second
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(start, range(50)))
    addresses = set()
    for c, first, second in made:
        got = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", c).stdout)
        assert set(got) == {first, second}
        addresses |= {got[first]["IPAddress"], got[second]["IPAddress"]}
    assert len(addresses) == 100, "every attachment has its own address"
    assert len(set(veths()) - before[1]) == 100
    # containers 0 and 10 share their first network
    assert made[0][1] == made[10][1] and pings(made[0][0], ip_of(made[10][0], made[0][1]))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda m: docker("rm", "-f", m[0]), made))
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda n: docker("network", "rm", n), nets))
    nothing_left(plugin, before, 60, "no address, endpoint, network or veth left")
    assert kernel_routes(*subnets) == []
    with open(plugin.logpath) as f:
        f.seek(log_start)
        calls = [json.loads(line) for line in f if line.startswith("{")]
    calls = [r for r in calls if "ms" in r and r.get("method")]
    assert len(calls) > 500
    slowest = max(calls, key=lambda r: r["ms"])
    print(f"{len(calls)} calls, slowest {slowest['method']} {slowest['ms']:.0f} ms")
    assert slowest["ms"] < 1000, slowest


def test_docker_run_with_two_networks(two_nets, plugin):
    """`docker run --network a --network b`: Docker 25 and later attach both; older dockerd
    refuses it itself, and then nothing is left behind either."""
    a, b, peers = two_nets
    before = snapshot(plugin)
    major = int(docker("version", "-f", "{{.Server.Version}}").stdout.split(".")[0])
    name = unique("c")
    res = docker("run", "-d", "--label", "l3net-test", "--name", name, "--network", a, "--network", b,
                 "l3net-test/busybox:latest", "sleep", "600", check=False)
    if major >= 25:
        assert res.returncode == 0, res.stderr
        assert_attached(name, {a, b}, peers)
        docker("rm", "-f", name)
    else:
        assert res.returncode != 0, "this dockerd takes one --network at run"
        docker("rm", "-f", name, check=False)
    nothing_left(plugin, before, 10, "nothing left")
