"""Cross-subnet VXLAN on a bed of two L2 segments (tests/testbed.py, ``remote``): hosts 1 and 2
on 198.18.24.0/24, host 3 on 198.18.25.0/24, joined by a router namespace that forwards and
knows no pool route and speaks no BGP (the nodes' BGP sessions are direct: none crosses it).

Pools: xnet (encap=cross-subnet) and znet (cross-subnet, another application), ynet (never).
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import BIN, bed_up, wait_for
from tests.testbed import TEST_IMAGE, Testbed, run

NET, REMOTE = "198.18.24", "198.18.25"
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netprobe.py")
SUBNETS = {"xnet": ("10.150.0.0/24", "cross-subnet"), "znet": ("10.152.0.0/24", "cross-subnet"),
           "ynet": ("10.151.0.0/24", "never")}
ATTACKER_NS, ATTACKER = "l3vxatk", f"{NET}.200"


class Ctr:
    def __init__(self, host, name, net):
        info = json.loads(host.docker("inspect", name).stdout)[0]
        self.host, self.name, self.net = host, name, net
        self.ip, self.pid = info["NetworkSettings"]["Networks"][net]["IPAddress"], info["State"]["Pid"]

    def nsenter(self):
        return ["nsenter", "-t", str(self.pid), "-n"]

    def probe(self, ip, proto="tcp", port=5432):
        res = subprocess.run([*self.nsenter(), sys.executable, PROBE, "probe", json.dumps([[ip, proto, port]])],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)[0]

    def sh(self, script, check=False):
        return self.host.docker("exec", self.name, "sh", "-c", script, check=check)


@pytest.fixture(scope="module")
def bed(docker_ready):
    testbed = bed_up(Testbed(3, prefix=f"/l3vx-{uuid.uuid4().hex[:6]}", tag="l3vx", net=NET, etcd_port=24000,
                             remote={3}, remote_net=REMOTE))
    servers = []
    try:
        for host in testbed.hosts:
            for net, (subnet, mode) in SUBNETS.items():
                host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet", subnet,
                            "--ipam-opt", f"encap={mode}", net)
        c = {}
        for name, index, net, extra in (("x1", 1, "xnet", ()), ("x2", 2, "xnet", ()), ("x3", 3, "xnet", ()),
                                        ("y1", 1, "ynet", ()), ("y3", 3, "ynet", ()), ("z3", 3, "znet", ()),
                                        ("s3", 3, "xnet", ("--cap-add", "NET_ADMIN"))):
            host = testbed.hosts[index - 1]
            host.docker("run", "-d", "--name", name, "--net", net, *extra, TEST_IMAGE, "sleep", "3600")
            c[name] = Ctr(host, name, net)
            proc = subprocess.Popen([*c[name].nsenter(), sys.executable, PROBE, "serve", "5432", "5353"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                    text=True, start_new_session=True)
            servers.append(proc)
            assert proc.stdout.readline().strip() == "ready"
        testbed.c = c
        yield testbed
    finally:
        for proc in servers:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        testbed.cleanup()
        run("ip", "netns", "del", ATTACKER_NS, check=False)


def ctl(bed, *args):
    return subprocess.run([os.path.join(BIN, "l3netctl"), "--etcd-endpoints", bed.etcd_url, "--etcd-prefix",
                           bed.prefix, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DOCKER_HOST": bed.hosts[0].docker_host})


def tx_packets(host):
    """Packets sent through the host's VXLAN device (/proc/net/dev: the namespace's own; its
    /sys is the machine's)."""
    line = next(l for l in host.sh("cat", "/proc/net/dev").stdout.splitlines() if l.strip().startswith("l3vxlan:"))
    return int(line.split(":", 1)[1].split()[9])


def test_a_cross_subnet_pool_reaches_across_the_router(bed):
    x1, x2, x3 = (bed.c[n] for n in ("x1", "x2", "x3"))
    for a, b in ((x1, x3), (x3, x1), (x2, x3), (x1, x2)):
        assert wait_for(lambda: a.probe(b.ip), 20, f"{a.name} -> {b.name}") == f"ok {a.ip}", "no NAT on the way"
        assert a.sh(f"ping -c1 -W2 {b.ip}").returncode == 0, f"{a.name} pings {b.name}"
    # the router has no route to any pool: the packets crossed it encapsulated
    assert "10.150." not in run("ip", "-n", bed.router, "route").stdout


def test_same_segment_traffic_is_not_encapsulated(bed):
    h1, h2, h3 = bed.hosts
    x1, x2, x3 = (bed.c[n] for n in ("x1", "x2", "x3"))
    assert f"via {h2.ip} dev eth0" in h1.sh("ip", "route", "get", x2.ip).stdout
    assert "dev l3vxlan" in h1.sh("ip", "route", "get", x3.ip).stdout
    before = tx_packets(h1)
    assert x1.sh(f"ping -c5 -i 0.2 -W2 {x2.ip}").returncode == 0
    assert tx_packets(h1) == before, "same-segment traffic went into the tunnel"
    assert x1.sh(f"ping -c5 -i 0.2 -W2 {x3.ip}").returncode == 0
    assert tx_packets(h1) >= before + 5
    assert "l3vxlan" not in h2.sh("ip", "route", "get", x1.ip).stdout


def test_a_never_pool_does_not_cross_and_diagnose_says_why(bed):
    y1, y3 = bed.c["y1"], bed.c["y3"]
    assert y1.probe(y3.ip) is None and y3.probe(y1.ip) is None
    out = ctl(bed, "diagnose", y1.ip, y3.ip).stdout
    assert "NOT REACHABLE" in out and "not encapsulated (encap=never)" in out, out
    out = ctl(bed, "diagnose", bed.c["x1"].ip, bed.c["x3"].ip).stdout
    assert "goes through the VXLAN tunnel" in out, out
    pools = {p["cidr"]: p["encap"] for p in json.loads(ctl(bed, "pool", "list", "--json").stdout)}
    assert pools == {"10.150.0.0/24": "cross-subnet", "10.152.0.0/24": "cross-subnet", "10.151.0.0/24": "never"}
    # a later network asking for another mode is refused, like a NAT mismatch
    res = bed.hosts[0].docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet",
                              "10.150.0.0/24", "--ipam-opt", "encap=always", "x-other", check=False)
    assert res.returncode != 0 and "already exists with encap=cross-subnet" in res.stderr, res.stderr


def test_policy_and_anti_spoofing_hold_through_the_tunnel(bed):
    x1, x2, z3, s3 = (bed.c[n] for n in ("x1", "x2", "z3", "s3"))
    assert z3.probe(x1.ip) is None, "another application, across the tunnel: isolated"
    rule = ctl(bed, "policy", "allow", "--from", "znet", "--to", "xnet", "--proto", "tcp", "--port", "5432").stdout.split()[-1]
    try:
        assert wait_for(lambda: z3.probe(x1.ip), 10, "z3 -> x1 by policy") == f"ok {z3.ip}"
        assert z3.probe(x1.ip, "tcp", 80) is None and z3.probe(x1.ip, "icmp", 0) is None
    finally:
        ctl(bed, "policy", "remove", rule)
    wait_for(lambda: z3.probe(x1.ip) is None, 10, "z3 -> x1 closed again")
    # s3 (host 3, NET_ADMIN) sends from x2's address: dropped on its own host
    s3.sh(f"ip addr add {x2.ip}/32 dev eth0", check=True)
    spoof = (f"import socket; s = socket.socket(); s.settimeout(2); s.bind(('{x2.ip}', 0))\n"
             f"try:\n s.connect(('{x1.ip}', 5432)); print(s.recv(100).decode())\nexcept OSError as e:\n print('none', e)")
    out = subprocess.run([*s3.nsenter(), sys.executable, "-c", spoof], capture_output=True, text=True, timeout=30).stdout
    assert out.startswith("none"), out
    assert s3.probe(x1.ip) == f"ok {s3.ip}", "its own address still goes through"


def vxlan_packet(src_mac, dst_mac, src_ip, dst_ip, dport, payload):
    """A VXLAN payload (VNI 4096): Ethernet, IPv4, UDP carrying ``payload``."""
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    header = header[:10] + struct.pack("!H", ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF) + header[12:]
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00"
    return struct.pack("!II", 0x08000000, 4096 << 8) + eth + header + udp


def test_vxlan_from_a_non_node_is_dropped(bed):
    """The same crafted VXLAN packet (inner: x3 -> x1 UDP 5353) reaches x1 when host 3 sends it,
    and nothing when a machine of the underlay that is not a node does."""
    from plugin.encap import vtep_mac
    h1, _, h3 = bed.hosts
    x1, x3 = bed.c["x1"], bed.c["x3"]
    listen = subprocess.Popen([*x1.nsenter(), sys.executable, "-c",
                               "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                               "s.bind(('0.0.0.0',9999)); print('ready',flush=True)\n"
                               "while True:\n d,a=s.recvfrom(100); print(d.decode(),a[0],flush=True)"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert listen.stdout.readline().strip() == "ready"
        os.set_blocking(listen.stdout.fileno(), False)

        def send(nsenter, tag):
            packet = vxlan_packet(vtep_mac(h3.ip), vtep_mac(h1.ip), x3.ip, x1.ip, 9999, tag.encode())
            script = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
                      f"s.sendto(bytes.fromhex('{packet.hex()}'), ('{h1.ip}', 4789))")
            subprocess.run([*nsenter, sys.executable, "-c", script], check=True, timeout=30)
        seen = []

        def heard(tag):
            line = listen.stdout.readline()
            while line:
                seen.append(line.strip())
                line = listen.stdout.readline()
            return any(s.startswith(tag) for s in seen)
        send(["nsenter", "-t", str(h3.anchor.pid), "-n"], "from-node")
        wait_for(lambda: heard("from-node"), 15, "the crafted packet from host 3 (a node) delivered")
        run("ip", "netns", "del", ATTACKER_NS, check=False)
        run("ip", "netns", "add", ATTACKER_NS)
        run("ip", "link", "add", "vb-vxatk", "type", "veth", "peer", "name", "ve-vxatk")
        run("ip", "link", "set", "vb-vxatk", "master", bed.bridge, "up")
        run("ip", "link", "set", "ve-vxatk", "netns", ATTACKER_NS)
        run("ip", "-n", ATTACKER_NS, "addr", "add", f"{ATTACKER}/24", "dev", "ve-vxatk")
        run("ip", "-n", ATTACKER_NS, "link", "set", "ve-vxatk", "up")
        for i in range(5):
            send(["nsenter", f"--net=/run/netns/{ATTACKER_NS}"], f"from-attacker-{i}")
        # a --net bridge container on host 3: masqueraded, its packet would leave with host 3's
        # address, a node's; host 3 drops it on the way in (its source is no node's)
        h3.docker("run", "-d", "--name", "bridged", "--net", "bridge", TEST_IMAGE, "sleep", "600")
        pid = json.loads(h3.docker("inspect", "bridged").stdout)[0]["State"]["Pid"]
        for i in range(5):
            send(["nsenter", "-t", str(pid), "-n"], f"from-attacker-bridged-{i}")
        deadline = time.monotonic() + 2            # a delivered packet takes milliseconds
        while time.monotonic() < deadline:
            assert not heard("from-attacker"), seen
        rule = [line for line in h1.sh("iptables", "-t", "raw", "-L", "L3NET-PREROUTING", "-v", "-n", "-x").stdout
                .splitlines() if "vxlan from a non-node" in line][0]
        assert int(rule.split()[0]) >= 5, rule
        on_h3 = [line for line in h3.sh("iptables", "-t", "raw", "-L", "L3NET-PREROUTING", "-v", "-n", "-x").stdout
                 .splitlines() if "vxlan from a non-node" in line][0]
        assert int(on_h3.split()[0]) >= 5, f"the bridged container's packets dropped on host 3: {on_h3}"
    finally:
        h3.docker("rm", "-f", "bridged", check=False)
        os.killpg(listen.pid, signal.SIGKILL)
        listen.wait(10)
        run("ip", "netns", "del", ATTACKER_NS, check=False)
        run("ip", "link", "del", "vb-vxatk", check=False)


def test_mtu_and_a_full_size_transfer_through_the_tunnel(bed):
    x1, x3 = bed.c["x1"], bed.c["x3"]
    assert "mtu 1450" in x1.sh("ip link show eth0").stdout
    assert "mtu 1450" in bed.hosts[0].sh("ip", "link", "show", "l3vxlan").stdout
    assert transfer(x1, x3) > 1300, "full-size segments"


def transfer(a, b, size=4194304):
    """``size`` bytes over TCP from ``a`` to ``b`` (through the tunnel), counted at ``b``;
    returns the connection's MSS."""
    server = subprocess.Popen([*b.nsenter(), sys.executable, "-c",
                               "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                               "s.bind(('0.0.0.0', 7000)); s.listen(); print('ready', flush=True)\n"
                               "c, _ = s.accept(); c.settimeout(10); n = 0\n"
                               "while True:\n d = c.recv(65536)\n if not d: break\n n += len(d)\n"
                               "print(n, flush=True)"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.run([*a.nsenter(), sys.executable, "-c",
                                 f"import socket\ns = socket.create_connection(('{b.ip}', 7000), timeout=10)\n"
                                 "print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))\n"
                                 f"s.sendall(b'x' * {size}); s.close()"], capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr
        assert server.communicate(timeout=30)[0].strip() == str(size)
        return int(client.stdout.split()[0])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def test_the_mtu_option_on_an_encapsulated_network(bed):
    """-o com.docker.network.driver.mtu below the tunnel's: honoured; above it: refused."""
    h1, _, h3 = bed.hosts
    res = h1.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet", "10.153.0.0/24",
                    "--ipam-opt", "encap=cross-subnet", "-o", "com.docker.network.driver.mtu=1460", "mbig", check=False)
    assert res.returncode != 0 and "does not fit pool 10.153.0.0/24's VXLAN tunnel: at most 1450" in res.stderr, res.stderr
    made = []
    try:
        for host, name in ((h1, "m1"), (h3, "m3")):
            host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet", "10.153.0.0/24",
                        "--ipam-opt", "encap=cross-subnet", "-o", "com.docker.network.driver.mtu=1400", "mnet")
            host.docker("run", "-d", "--name", name, "--net", "mnet", TEST_IMAGE, "sleep", "600")
            made.append((host, name))
        m1, m3 = Ctr(h1, "m1", "mnet"), Ctr(h3, "m3", "mnet")
        assert "mtu 1400" in m1.sh("ip link show eth0").stdout and "mtu 1400" in m3.sh("ip link show eth0").stdout
        wait_for(lambda: m1.sh(f"ping -c1 -W1 {m3.ip}").returncode == 0, 20, "m1 -> m3 through the tunnel")
        assert transfer(m1, m3, 1048576) <= 1360, "the MSS follows the network's MTU"
    finally:
        for host, name in made:
            host.docker("rm", "-f", name, check=False)
        for host in (h1, h3):
            host.docker("network", "rm", "mnet", check=False)


def test_hosts_stay_closed_to_containers_through_the_tunnel(bed):
    """x3 (host 3, other subnet) reaches no service of host 1; host 2 (a node) does."""
    h1, h2, _ = bed.hosts
    server = subprocess.Popen(["nsenter", "-t", str(h1.anchor.pid), "-n", sys.executable, PROBE, "serve", "7777", ""],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        probe = [sys.executable, PROBE, "probe", json.dumps([[h1.ip, "tcp", 7777]])]
        from_h2 = subprocess.run(["nsenter", "-t", str(h2.anchor.pid), "-n", *probe], capture_output=True, text=True,
                                 timeout=30).stdout
        assert json.loads(from_h2) == [f"ok {h2.ip}"]
        assert bed.c["x3"].probe(h1.ip, "tcp", 7777) is None
        assert bed.c["x1"].probe(h1.ip, "tcp", 7777) is None
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)


def test_an_ip_moved_to_the_other_subnet_is_reachable(bed):
    h1, _, h3 = bed.hosts
    x2 = bed.c["x2"]
    for host in (h1, h3):
        host.docker("run", "-d", "--name", "mover", "--net", "xnet", "--ip", "10.150.0.200", TEST_IMAGE, "sleep", "600")
        try:
            wait_for(lambda: x2.sh("ping -c1 -W1 10.150.0.200").returncode == 0, 10, f"the moved ip on {host.name}")
        finally:
            host.docker("rm", "-f", "mover", check=False)


def test_a_deleted_tunnel_device_is_put_back(bed):
    """Someone deletes host 1's VXLAN device (its routes and entries go with it): the agent's
    drift check writes it again within seconds, and x1 reaches x3 again."""
    h1 = bed.hosts[0]
    x1, x3 = bed.c["x1"], bed.c["x3"]
    h1.sh("ip", "link", "del", "l3vxlan")
    start = time.monotonic()
    wait_for(lambda: "dev l3vxlan" in h1.sh("ip", "route", "get", x3.ip, check=False).stdout, 10, "the tunnel back")
    wait_for(lambda: x1.probe(x3.ip) == f"ok {x1.ip}", 10, "x1 -> x3 again")
    print(f"tunnel device back after {time.monotonic() - start:.1f}s")
