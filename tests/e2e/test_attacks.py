"""The security model attacked, on two test-bed hosts with real dockerd, etcd, BIRD, iptables,
ip6tables and ipsets. Every test plays the attacker (a container with Docker's default
capabilities, NET_RAW included; one with NET_ADMIN; a ``--net bridge`` container; a Docker
user creating networks) and checks at the receiver: a listener's counter that must not move,
a route or an address that must not appear.

The bed: networks web and db with a container on each host; an "outside" namespace on the
underlay standing for the rest of the data centre (a management server, and the cloud's
metadata service at 169.254.169.254, routed to it from the hosts as a cloud does); etcd on the
underlay's bridge, as the plugins use it.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import BIN, bed_up, wait_for
from tests.e2e.test_policy import Bed, add_outside, icmp_echoes_received, probe_from
from tests.testbed import TEST_IMAGE, Testbed, run

NET = "198.18.6"
SUBNETS = {"web": "10.91.0.0/24", "db": "10.92.0.0/24"}
OUTSIDE_NS, OUTSIDE = "l3atkx", f"{NET}.254"
METADATA, METADATA_PORT = "169.254.169.254", 8081
SECOND_NET = "198.18.7"               # a second address of host 2, on another network
LISTEN_PORT = 7777
RAW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rawframes.py")


@pytest.fixture(scope="module")
def bed(docker_ready):
    testbed = bed_up(Testbed(2, prefix=f"/l3atk-{uuid.uuid4().hex[:6]}", tag="l3atk", net=NET,
                             etcd_port=23830))
    b = Bed(testbed)
    try:
        add_outside(testbed, OUTSIDE_NS, OUTSIDE, [f"{METADATA}/32"])
        b.serve(["nsenter", f"--net=/run/netns/{OUTSIDE_NS}"], [8080, METADATA_PORT], [])
        for host in testbed.hosts:
            b.serve(["nsenter", "-t", str(host.anchor.pid), "-n"], [LISTEN_PORT], [])
            # the metadata service, routed as a cloud routes it: through the underlay
            host.sh("ip", "route", "add", f"{METADATA}/32", "via", OUTSIDE)
            for net, subnet in SUBNETS.items():
                host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net",
                            "--subnet", subnet, net)
        for net in SUBNETS:
            for i, host in enumerate(testbed.hosts, 1):
                b.start(host, net, f"{net}{i}")
        yield b
    finally:
        b.stop()
        testbed.cleanup()
        run("ip", "netns", "del", OUTSIDE_NS, check=False)


def tcp_counters(nsenter):
    """(segments received, connections accepted) of a network namespace: the receiver's own count."""
    snmp = subprocess.run([*nsenter, "cat", "/proc/net/snmp"], capture_output=True, text=True,
                          check=True).stdout
    names, values = [line.split() for line in snmp.splitlines() if line.startswith("Tcp:")][:2]
    return int(values[names.index("InSegs")]), int(values[names.index("PassiveOpens")])


def outside():
    return ["nsenter", f"--net=/run/netns/{OUTSIDE_NS}"]


def syn_counter(nsenter, port):
    """A receiver-side count of TCP connection attempts (SYNs) to ``port`` in a namespace: a
    counting rule (no target) in its raw PREROUTING, added once. Unlike the namespace's TCP
    segment counters, no late segment of an earlier, allowed connection moves it."""
    spec = ["-p", "tcp", "--syn", "--dport", str(port)]
    if run(*nsenter, "iptables", "-t", "raw", "-C", "PREROUTING", *spec, check=False).returncode != 0:
        run(*nsenter, "iptables", "-t", "raw", "-A", "PREROUTING", *spec)

    def count():
        out = run(*nsenter, "iptables", "-t", "raw", "-nvxL", "PREROUTING").stdout
        return sum(int(line.split()[0]) for line in out.splitlines()
                   if f"dpt:{port}" in line and "flags:" in line)
    return count


def netns_of(host):
    return ["nsenter", "-t", str(host.anchor.pid), "-n"]


def host_veth(c):
    endpoint = json.loads(c.host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                        c.name).stdout)[c.net]["EndpointID"]
    return "l3h" + endpoint[:11]


def link(host, ifname):
    """``ip -j -s link show`` of one interface of ``host`` (its MAC, its counters)."""
    return json.loads(host.sh("ip", "-j", "-s", "link", "show", "dev", ifname).stdout)[0]


def in_container(c, *args, timeout=30):
    res = subprocess.run(["nsenter", "-t", str(c.pid), "-n", sys.executable, RAW, *args],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr
    return res.stdout


def connects(nsenter, ip, port):
    """Whether a TCP connection to ip:port opens from ``nsenter``'s namespace (for servers that
    say nothing first, like etcd)."""
    res = subprocess.run([*nsenter, sys.executable, "-c",
                          "import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), "
                          "timeout=1).close(); print('yes')\nexcept OSError: print('no')", ip, str(port)],
                         capture_output=True, text=True, timeout=20)
    return res.stdout.strip() == "yes"


def ctl_on(bed, host, *args):
    return host.sh(os.path.join(BIN, "l3netctl"), "--etcd-endpoints", bed.testbed.etcd_url,
                   "--etcd-prefix", bed.testbed.prefix, *args, check=False)


# -- 1. IPv6 on the host side of a veth ---------------------------------------------------
def test_router_advertisement_and_ipv6_from_a_container_change_nothing_on_its_host(bed):
    """A container with Docker's default capabilities sends a router advertisement (its own
    prefix, itself as default router) and TCP SYNs to its host's link-local address: the host
    takes no route and no address, and answers nothing; ip6tables drops IPv6 both ways."""
    web1, h1 = bed.containers["web1"], bed.h1
    veth = host_veth(web1)
    assert h1.sh("ip", "-6", "addr", "show", "dev", veth).stdout.strip() == "", "an IPv6 address on the veth"
    assert h1.sh("cat", f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6").stdout.strip() == "1"
    mac = link(h1, veth)["address"]
    # where its link-local address would be (fe80:: + EUI-64 of its MAC), as an attacker guesses it
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 2
    ll = "fe80::%02x%02x:%02xff:fe%02x:%02x%02x" % tuple(octets)
    routes_before = h1.sh("ip", "-6", "route", "show", "table", "all").stdout
    rx_before = link(h1, veth)["stats64"]["rx"]["packets"]
    listener = subprocess.Popen([*netns_of(h1), sys.executable, "-c",
                                 "import socket,sys\ns=socket.socket(socket.AF_INET6)\n"
                                 "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                                 "s.bind(('::', 7780)); s.listen(8); print('ready', flush=True)\n"
                                 "c, a = s.accept(); print('accepted', a, flush=True)"],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        _, opens_before = tcp_counters(netns_of(h1))
        sniffer = subprocess.Popen(["nsenter", "-t", str(web1.pid), "-n", sys.executable, RAW, "sniff6",
                                    "eth0", "3"], stdout=subprocess.PIPE, text=True)
        assert sniffer.stdout.readline().strip() == "ready"
        in_container(web1, "ra", "eth0", "2001:db8:66::/64")
        for dst in (ll, "ff02::1"):
            in_container(web1, "syn6", "eth0", mac, dst, "7780")
        answers = int(sniffer.communicate(timeout=10)[0].split()[-1])
        rx_after = link(h1, veth)["stats64"]["rx"]["packets"]
        assert rx_after >= rx_before + 9, "the frames did not even reach the host side"
        assert answers == 0, f"the host answered {answers} IPv6 frames"
        routes = h1.sh("ip", "-6", "route", "show", "table", "all").stdout
        assert "2001:db8:66" not in routes and f"dev {veth}" not in routes, routes
        assert routes == routes_before, routes
        assert h1.sh("ip", "-6", "addr", "show", "dev", veth).stdout.strip() == ""
        assert "2001:db8:66" not in h1.sh("ip", "-6", "addr").stdout
        assert tcp_counters(netns_of(h1))[1] == opens_before
        assert listener.poll() is None, "the [::] listener accepted a connection"
    finally:
        listener.kill()
        listener.wait(5)
    saved6 = h1.sh("ip6tables-save").stdout
    assert "-A L3NET-PREROUTING -i l3h+" in saved6 and "-A PREROUTING -j L3NET-PREROUTING" in saved6
    assert "-A L3NET-FORWARD -o l3h+" in saved6


# -- 2. link-local and cloud metadata -----------------------------------------------------------
def test_metadata_service_closed_until_host_allow_to(bed):
    web1, h1 = bed.containers["web1"], bed.h1
    syns = syn_counter(outside(), METADATA_PORT)
    before = syns()
    assert wait_for(lambda: probe_from(netns_of(h1), [[METADATA, "tcp", METADATA_PORT]])[0], 10,
                    "the host reaching the metadata service") == f"ok {h1.ip}"
    assert syns() > before, "the counter counts"
    before = syns()
    assert web1.probe([[METADATA, "tcp", METADATA_PORT], [METADATA, "icmp", 0],
                       ["169.254.1.1", "tcp", LISTEN_PORT]]) == [None, None, None]
    assert syns() == before, "a container's packet reached the metadata service"
    res = ctl_on(bed, h1, "diagnose", "--hostname", h1.name, "web1", METADATA, "--proto", "tcp",
                 "--port", str(METADATA_PORT))
    assert res.returncode == 1 and "protected" in res.stdout and "metadata" in res.stdout, res.stdout
    rule = bed.allow("host", "allow", "--to", f"{METADATA}/32", "--proto", "tcp", "--port", str(METADATA_PORT))
    try:
        rows = json.loads(bed.ctl("host", "list", "--json").stdout)
        assert any(r.get("id") == rule and r.get("to") == f"{METADATA}/32" for r in rows), rows
        wait_for(lambda: web1.reaches(METADATA, "tcp", METADATA_PORT) == f"ok {h1.ip}", 15,
                 "the metadata service opened (NATed to the host's address)")
        assert web1.reaches(METADATA, "icmp") is None, "only what the rule names"
        res = ctl_on(bed, h1, "diagnose", "--hostname", h1.name, "web1", METADATA, "--proto", "tcp",
                     "--port", str(METADATA_PORT))
        assert res.returncode == 0 and f"host rule {rule}" in res.stdout, res.stdout
    finally:
        bed.ctl("host", "remove", rule)
    wait_for(lambda: web1.reaches(METADATA, "tcp", METADATA_PORT) is None, 15, "closed again")


# -- 3. the infrastructure: every node address, etcd, operator ranges ----------------------------
def test_etcd_other_node_addresses_and_protected_ranges_are_out_of_reach(bed):
    web1, h1, h2 = bed.containers["web1"], bed.h1, bed.h2
    etcd_host, etcd_port = bed.testbed.etcd_url.rsplit("//", 1)[1].split(":")
    # etcd, as the plugins use it: an ordinary container could rewrite every policy
    assert connects(netns_of(h1), etcd_host, etcd_port), "etcd answers its hosts"
    assert not connects(["nsenter", "-t", str(web1.pid), "-n"], etcd_host, etcd_port), "a container reached etcd"
    assert not connects(["nsenter", "-t", str(bed.containers["db2"].pid), "-n"], etcd_host, etcd_port)
    res = ctl_on(bed, h1, "diagnose", "--hostname", h1.name, "web1", etcd_host)
    assert res.returncode == 1 and "protected" in res.stdout, res.stdout
    # a second address of host 2, on another network: a node is every address it has
    h2.sh("ip", "addr", "add", f"{SECOND_NET}.12/24", "dev", "eth0")
    h1.sh("ip", "route", "add", f"{SECOND_NET}.12/32", "via", h2.ip)
    try:
        assert probe_from(netns_of(h1), [[f"{SECOND_NET}.12", "tcp", LISTEN_PORT]]) == [f"ok {h1.ip}"]
        wait_for(lambda: f"{SECOND_NET}.12/32" in bed.ctl("host", "list", "--all").stdout, 20,
                 "host 2's second address published (next heartbeat)")
        wait_for(lambda: f"{SECOND_NET}.12" in h1.sh("ipset", "list", "l3n-hosts").stdout, 15,
                 "host 1 protecting it")
        syns = syn_counter(netns_of(h2), LISTEN_PORT)
        before = syns()
        assert web1.reaches(f"{SECOND_NET}.12", "tcp", LISTEN_PORT) is None
        assert syns() == before, "a container's connection attempt reached host 2"
    finally:
        h1.sh("ip", "route", "del", f"{SECOND_NET}.12/32", check=False)
        h2.sh("ip", "addr", "del", f"{SECOND_NET}.12/24", "dev", "eth0", check=False)
    # the operator's own range: the management server
    assert web1.reaches(OUTSIDE, "tcp", 8080) == f"ok {h1.ip}"
    res = bed.ctl("host", "protect", f"{OUTSIDE}/32")
    try:
        assert f"{OUTSIDE}/32" in bed.ctl("host", "list").stdout
        wait_for(lambda: web1.reaches(OUTSIDE, "tcp", 8080) is None, 15, "the protected range closed")
        syns = syn_counter(outside(), 8080)
        before = syns()
        assert bed.containers["web2"].reaches(OUTSIDE, "tcp", 8080) is None
        assert syns() == before, "a container's packet reached the protected server"
        res = ctl_on(bed, h1, "diagnose", "--hostname", h1.name, "web1", OUTSIDE)
        assert res.returncode == 1 and f"{OUTSIDE}/32" in res.stdout, res.stdout
        # a range over a pool would cut containers off each other: refused, nothing written
        res = bed.ctl("host", "protect", "10.91.0.0/16", check=False)
        assert res.returncode != 0 and "overlaps pool" in res.stderr, res.stderr
    finally:
        bed.ctl("host", "unprotect", f"{OUTSIDE}/32")
    wait_for(lambda: web1.reaches(OUTSIDE, "tcp", 8080) == f"ok {h1.ip}", 15, "the outside open again")
    assert "10.91.0.0/16" not in bed.ctl("host", "list").stdout


# -- 4. pools over the infrastructure -------------------------------------------------------------
def test_pools_over_infrastructure_are_refused(bed):
    h1, h2 = bed.h1, bed.h2
    refused = {f"{NET}.0/24": "node", "198.18.0.0/16": "node", "127.0.0.0/8": "loopback",
               "169.254.0.0/16": "link-local", "239.1.0.0/16": "multicast", "0.0.0.0/8": "this network",
               "172.17.0.0/16": "node"}            # Docker's bridge on every host
    for subnet, why in refused.items():
        name = f"bad-{uuid.uuid4().hex[:6]}"
        res = h2.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet", subnet, name,
                        check=False)
        assert res.returncode != 0 and "overlaps" in res.stderr and why in res.stderr, (subnet, res.stderr)
        assert h2.docker("network", "inspect", name, check=False).returncode != 0
    pools = [p["cidr"] for p in json.loads(bed.ctl("pool", "list", "--json").stdout)]
    assert sorted(pools) == sorted(SUBNETS.values()), pools
    res = bed.ctl("pool", "add", f"{NET}.128/25", check=False)
    assert res.returncode != 0 and "overlaps node" in res.stderr, res.stderr
    # the operator's allowed ranges
    res = bed.ctl("pool", "ranges", "set", "10.128.0.0/9", check=False)
    assert res.returncode != 0 and "10.91.0.0/24" in res.stderr, "existing pools must fit"
    bed.ctl("pool", "ranges", "set", "10.88.0.0/13")
    try:
        assert json.loads(bed.ctl("pool", "ranges", "show", "--json").stdout) == ["10.88.0.0/13"]
        res = h1.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet",
                        "10.50.0.0/24", "outofrange", check=False)
        assert res.returncode != 0 and "10.88.0.0/13" in res.stderr, res.stderr
        h1.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet", "10.93.0.0/24",
                  "inrange")
        h1.docker("network", "rm", "inrange")
    finally:
        bed.ctl("pool", "ranges", "clear")
    # a pool written into etcd behind l3netctl's back, over link-local: no node enforces or routes it
    from core.keys import Keys
    from plugin.store import EtcdStore
    store, keys = EtcdStore(bed.testbed.etcd_url), Keys(bed.testbed.prefix)
    bad = "169.254.0.0/16"
    store.put(keys.pool(bad), json.dumps({"cidr": bad, "block_prefix": 26, "nat_outgoing": True, "auto": False,
                                          "refs": {}}))
    try:
        def plugin_log():
            with open(os.path.join(h1.dir, "plugin.log")) as f:
                return f.read()
        wait_for(lambda: f"not enforcing pool {bad}" in plugin_log(), 15, "host 1's agent refusing it")
        assert bad not in h1.sh("ipset", "list", "l3n-pools").stdout
        with open(os.path.join(h1.dir, "state", "bird.conf")) as f:
            assert bad not in f.read(), "BIRD would import routes for link-local"
        web1, web2 = bed.containers["web1"], bed.containers["web2"]
        assert web2.reaches(web1.ip) is not None, "the cluster still works"
    finally:
        store.delete(keys.pool(bad))
        store.close()


# -- 5. pool sources from other interfaces ------------------------------------------------------
def test_pool_source_from_docker_bridge_gets_nothing_through(bed):
    """A --net bridge container with NET_ADMIN on host 1 sends from web members' addresses (one
    on host 1, one on host 2) to web containers on both hosts: nothing arrives."""
    h1 = bed.h1
    web1, web2 = bed.containers["web1"], bed.containers["web2"]
    raw = h1.sh("iptables-save", "-t", "raw").stdout
    assert "-A L3NET-PREROUTING -i eth0 " in raw, "the uplink is known: other nodes' members pass at no cost"
    assert "-A L3NET-PREROUTING -i docker0 " not in raw
    name = f"bridged-{uuid.uuid4().hex[:6]}"
    h1.docker("run", "-d", "--name", name, "--net", "bridge", "--cap-add", "NET_ADMIN", TEST_IMAGE,
              "sleep", "3600")
    try:
        for victim, target in [(web1, web2), (web2, web1)]:
            assert victim.reaches(target.ip, "icmp") == "ok"       # the counter does count
            before = icmp_echoes_received(target)
            res = h1.docker("exec", name, "sh", "-c",
                            f"ip addr add {victim.ip}/32 dev eth0 && ping -c 3 -W 1 -I {victim.ip} "
                            f"{target.ip}; ip addr del {victim.ip}/32 dev eth0", check=False)
            assert "0 packets received" in res.stdout, res.stdout + res.stderr
            assert icmp_echoes_received(target) == before, f"fake {victim.ip} from docker0 reached {target}"
    finally:
        h1.docker("rm", "-f", name, check=False)


# -- losing a lease never opens a node (LAST: restarts host 2's plugin) --------------------------
def test_a_node_away_stays_protected(bed):
    """Host 2's plugin stops (an upgrade, a crash) and its registry lease expires: containers on
    host 1 still cannot reach host 2 (its addresses stay in every node's protected set until
    `l3netctl node remove`), and it comes back as before."""
    h1, h2, web1 = bed.h1, bed.h2, bed.containers["web1"]
    assert web1.reaches(h2.ip, "tcp", LISTEN_PORT) is None
    h2.stop_plugin()
    try:
        nodes = lambda: {n["name"] for n in json.loads(bed.ctl("node", "list", "--json").stdout)  # noqa: E731
                         if n["state"] == "up"}
        wait_for(lambda: h2.name not in nodes(), 60, "host 2's lease to expire")
        assert h2.ip in h1.sh("ipset", "list", "l3n-hosts").stdout, "host 2 no longer protected"
        syns = syn_counter(netns_of(h2), LISTEN_PORT)
        before = syns()
        assert web1.reaches(h2.ip, "tcp", LISTEN_PORT) is None
        assert syns() == before, "a container's connection attempt reached host 2"
    finally:
        h2.start_plugin()
    wait_for(lambda: h2.name in nodes(), 30, "host 2 registered again")
    assert web1.reaches(h2.ip, "tcp", LISTEN_PORT) is None
