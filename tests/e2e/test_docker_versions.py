"""What Docker 25-28 changed for a network plugin, each handled on purpose (one host, the real
docker CLI and dockerd of whatever version runs here; `make test-docker DOCKER=26|28` runs them
on Debian 13's and Debian unstable's Docker):

- 28 sends options a plugin never saw (com.docker.network.enable_ipv4): tolerated; --ipv4=false
  refused clearly; the interface-name driver option refused clearly (dockerd does not give a
  plugin's interface the name); per-interface sysctls applied (by dockerd); GwAllocCheck
  answered so no pool address is spent on a gateway (older versions: the pool's answer does it);
- 25: several --network at `docker run` (test_networks.py); 28: gw-priority chooses which
  network gives the default route, between two l3net networks and with Docker's bridge;
- 26.0.2: IPv6 off on an interface given only IPv4;
- 28: a filter FORWARD policy of DROP (dockerd sets it when it turns forwarding on): l3net
  accepts its own forwarded traffic.
A feature a version does not have is skipped there, saying which version has it.
"""

import json
import re
import subprocess

import pytest

from plugin.firewall import count_rules, pick_backend
from tests.conftest import TEST_IMAGE, docker, wait_for
from tests.e2e.test_docker import D, allocations, network, pings, run, sh, unique  # noqa: F401
from tests.e2e.test_networks import interfaces, nothing_left, probe, routes, servers, snapshot, two_nets  # noqa: F401


def version():
    out = docker("version", "-f", "{{.Server.Version}}").stdout.strip()
    return tuple(int(n) for n in re.findall(r"\d+", out)[:3])


def needs(*least):
    if version() < least:
        pytest.skip(f"Docker {'.'.join(map(str, least))} or later has this (here: "
                    f"{'.'.join(map(str, version()))})")


def calls(plugin, method):
    """The plugin's JSON log records of ``method`` calls, in order."""
    out = []
    with open(plugin.logpath) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("method") == method:
                out.append(record)
    return out


def run_on(*networks, name=None, check=True):
    """docker run with one --network per entry (a name or a name=...,key=value spec)."""
    name = name or unique("c")
    args = ["run", "-d", "--label", "l3net-test", "--name", name]
    for n in networks:
        args += ["--network", n]
    res = docker(*args, TEST_IMAGE, "sleep", "600", check=check)
    return name, res


def default_dev(container):
    m = re.search(r"^default via (\S+) dev (\S+)", routes(container), re.M)
    assert m, routes(container)
    return m.group(1), m.group(2)


def dev_of(container, net):
    """The container's interface on network ``net``."""
    ip = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container).stdout)[net]["IPAddress"]
    return interfaces(container)[ip]


# --------------------------------------------------------------------------------------------
def test_network_create_spends_no_pool_address_on_a_gateway(network, plugin):
    """Docker 28 asks GwAllocCheck first (l3net: skip both families); before 28 the pool's
    answer carries the gateway. Either way the pool's addresses are all the containers'."""
    before = len(calls(plugin, "NetworkDriver.GwAllocCheck"))
    net = network("10.94.0.0/24")
    held = [a for a in allocations(plugin) if a["address"].startswith("10.94.0.")]
    assert held == [], held
    gateway = json.loads(docker("network", "inspect", net).stdout)[0]["IPAM"]["Config"][0].get("Gateway", "")
    assert not gateway.startswith("10.94.0."), gateway
    asked = len(calls(plugin, "NetworkDriver.GwAllocCheck")) - before
    assert asked == (1 if version() >= (28,) else 0), asked
    c = run(net)
    assert sh(c, "ip -4 -o addr show eth0").stdout.count("10.94.0.1/") == 1   # the first address


def test_options_of_a_newer_docker_are_tolerated_and_ipv4_false_refused(network, plugin):
    """28 sends com.docker.network.enable_ipv4 (and an older client's -o carries it in the
    generic options): the network is created. --ipv4=false is refused with l3net's reason and
    leaves nothing behind."""
    net = network("10.94.1.0/24", "-o", "com.docker.network.enable_ipv4=true")
    c = run(net)
    assert pings(run(net), sh(c, "ip -4 -o addr show eth0").stdout.split()[3].split("/")[0])
    res = docker("network", "create", "-d", D, "--ipam-driver", D, "-o", "l3net.tag=x", unique("n"),
                 check=False)
    assert res.returncode != 0 and "l3net.tag" in res.stderr, res.stderr
    needs(28)
    before = snapshot(plugin)
    name = unique("v6only")
    res = docker("network", "create", "-d", D, "--ipam-driver", D, "--ipv4=false", "--ipv6",
                 "--label", "l3net-test", name, check=False)
    assert res.returncode != 0, res.stdout
    assert "IPv6" in res.stderr or "IPv4" in res.stderr, res.stderr
    assert docker("network", "inspect", name, check=False).returncode != 0
    nothing_left(plugin, before, 10, "nothing left of the refused network")


def test_interface_name_option_refused_clearly(network, plugin):
    net = network("10.94.2.0/24")
    needs(28)
    run(net)            # (the host's block of the pool is claimed by the first container)
    before = snapshot(plugin)
    name, res = run_on(f"name={net},driver-opt=com.docker.network.endpoint.ifname=web0", check=False)
    assert res.returncode != 0, "started with an interface name l3net cannot give"
    assert "com.docker.network.endpoint.ifname" in res.stderr, res.stderr
    docker("rm", "-f", name, check=False)
    nothing_left(plugin, before, 15, "nothing left of the refused container")


def test_per_interface_sysctls_are_applied(network):
    """27.0.1+: driver-opt com.docker.network.endpoint.sysctls, applied by dockerd inside the
    container once l3net's interface is there (IFNAME stands for its name)."""
    net = network("10.94.3.0/24")
    needs(27, 0, 1)
    name, _ = run_on(f"name={net},driver-opt=com.docker.network.endpoint.sysctls="
                     "net.ipv4.conf.IFNAME.log_martians=1")
    assert sh(name, "cat /proc/sys/net/ipv4/conf/eth0/log_martians").stdout.strip() == "1"
    peer = run(net)
    assert pings(peer, sh(name, "ip -4 -o addr show eth0").stdout.split()[3].split("/")[0])


def test_an_ipv4_only_interface_has_no_ipv6(network):
    """26.0.2+ turns IPv6 off on an interface given only IPv4: no link-local address a
    container could speak from, no IPv6 gateway from l3net."""
    net = network("10.94.4.0/24")
    c = run(net)
    if version() >= (26, 0, 2):
        assert sh(c, "cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6").stdout.strip() == "1"
        assert "inet6" not in sh(c, "ip -6 addr show eth0").stdout
    assert sh(c, "ip -6 route show default", check=False).stdout.strip() == ""
    assert json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", c).stdout)[net]["IPv6Gateway"] == ""


def test_gw_priority_between_two_l3net_networks(two_nets, plugin):
    """28: the network with the higher gw-priority gives the default route, whichever is named
    first; the other network still answers through its own interface."""
    a, b, peers = two_nets
    needs(28)
    for first, second in ((a, b), (b, a)):
        c, _ = run_on(f"name={first}", f"name={second},gw-priority=10")
        gateway, dev = default_dev(c)
        assert dev == dev_of(c, second), routes(c)
        for net, peer in peers.items():
            ip = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", peer).stdout)[net]["IPAddress"]
            answer = wait_for(lambda: probe(c, ip), 10, f"{c} -> {net}")
            mine = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", c).stdout)[net]["IPAddress"]
            assert answer == f"ok {mine}", answer
        docker("rm", "-f", c)


def bridge_and(net, bridge_priority=0, net_priority=0):
    """A running container on Docker's bridge and on ``net`` (docker run takes no user-defined
    network beside the bridge: created on the bridge, then connected, then started)."""
    name = unique("c")
    docker("create", "--label", "l3net-test", "--name", name, "--network", f"name=bridge,gw-priority={bridge_priority}",
           TEST_IMAGE, "sleep", "600")
    docker("network", "connect", "--gw-priority", str(net_priority), net, name)
    docker("start", name)
    return name


def test_gw_priority_with_dockers_bridge(network):
    """28: with Docker's bridge beside an l3net network, gw-priority picks either; the l3net
    network's pool stays reachable through its interface when the bridge has the default."""
    net = network("10.94.7.0/24")
    needs(28)
    peer = run(net)
    peer_ip = sh(peer, "ip -4 -o addr show eth0").stdout.split()[3].split("/")[0]
    c = bridge_and(net, net_priority=10)
    assert default_dev(c)[1] == dev_of(c, net), routes(c)
    assert default_dev(c)[0].startswith("169.254.1."), routes(c)
    assert pings(c, peer_ip)
    c2 = bridge_and(net, bridge_priority=10)
    assert default_dev(c2)[1] == dev_of(c2, "bridge"), routes(c2)
    assert not default_dev(c2)[0].startswith("169.254."), routes(c2)
    assert pings(c2, peer_ip)


def dockers_backend():
    counts = {}
    for backend in ("nft", "legacy"):
        res = subprocess.run([f"iptables-{backend}-save", "-t", "filter"], capture_output=True, text=True)
        counts[backend] = count_rules(res.stdout) if res.returncode == 0 else 0
    return pick_backend(counts) or "nft"


def test_forward_policy_drop_does_not_stop_l3net(network):
    """dockerd sets the filter FORWARD policy to DROP when it turns forwarding on (28 made it
    the rule for more hosts): l3net accepts its own forwarded traffic, so containers on one
    host still talk (their packets are forwarded by the host) and isolation still holds."""
    tool = f"iptables-{dockers_backend()}"
    policy = re.search(r"^:FORWARD (\w+)", subprocess.run([f"{tool}-save", "-t", "filter"], capture_output=True,
                                                          text=True).stdout, re.M).group(1)
    subprocess.run([tool, "-w", "5", "-P", "FORWARD", "DROP"], check=True)
    try:
        net, other = network("10.94.8.0/24"), network("10.94.9.0/24")
        a, b, stranger = run(net), run(net), run(other)
        b_ip = sh(b, "ip -4 -o addr show eth0").stdout.split()[3].split("/")[0]
        assert pings(a, b_ip)
        sh(b, "nc -l -p 8080 -e echo l3net-hello >/dev/null 2>&1 &")
        assert wait_for(lambda: "l3net-hello" in sh(a, f"nc -w 2 {b_ip} 8080", check=False).stdout, 10,
                        "TCP between two containers of one network")
        assert not pings(stranger, b_ip, within=2), "another network reached b"
    finally:
        subprocess.run([tool, "-w", "5", "-P", "FORWARD", policy], check=True)


def test_a_container_only_on_an_internal_network_keeps_its_default_route(network):
    """Docker 25 gives a container only on internal bridge networks no default route. An l3net
    --internal network keeps one on purpose: its pool is not NATed outside and no port is
    published, but a policy may open another network's service to it, and that network is
    reached through the default route (the host filters every packet)."""
    net = network("10.94.10.0/24", "--internal")
    c = run(net)
    gateway, dev = default_dev(c)
    assert gateway.startswith("169.254.1.") and dev == "eth0", routes(c)
