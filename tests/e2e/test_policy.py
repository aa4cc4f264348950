"""Isolation and policy on two hosts (tests/testbed.py), with real dockerd, etcd, BIRD,
iptables and ipsets.

Networks web, db and ops each have a container on both hosts; every container serves TCP 5432
and 80 and UDP 5353. A truth table in the style of the Kubernetes network-policy e2e suite is
built for every ordered pair and kind of probe, compared with what the packets do, and the
difference printed on failure. Also: hosts are out of reach until ``host allow``, the outside
is reachable through outgoing NAT only, spoofed sources get nothing through, Docker's own
bridge keeps working and stays out, rules do not grow with members, drift is repaired.

Probes run inside the containers' network namespaces (tests/e2e/netprobe.py): the packets
are the containers' own.
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

from tests.conftest import BIN, bed_up, wait_for
from tests.testbed import TEST_IMAGE, Testbed, run

NET = "198.18.2"
SUBNETS = {"web": "10.81.0.0/24", "db": "10.82.0.0/24", "ops": "10.83.0.0/24"}
NONAT = "10.84.0.0/24"
NONAT2 = "10.86.0.0/24"
INTERNAL = "10.87.0.0/24"
LATE = "10.88.0.0/24"
OUTSIDE = f"{NET}.254"                 # "the internet": on the underlay, no route to any pool
OUTSIDE_NS = "l3polx"
KINDS = [("icmp", 0), ("tcp", 5432), ("tcp", 80), ("udp", 5353)]
HOST_PORTS = (7777, 7778)
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netprobe.py")


class Container:
    def __init__(self, host, name, net, ip, pid):
        self.host, self.name, self.net, self.ip, self.pid = host, name, net, ip, pid

    def __repr__(self):
        return self.name

    def probe(self, targets, timeout=1.0):
        """[(ip, proto, port)] -> [answer or None], all at once from this container, each
        given ``timeout`` seconds."""
        res = subprocess.run(["nsenter", "-t", str(self.pid), "-n", sys.executable, PROBE, "probe",
                              json.dumps(targets), str(timeout)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def reaches(self, ip, proto="tcp", port=5432, timeout=1.0):
        return self.probe([[ip, proto, port]], timeout)[0]

    def opens(self, ip, proto="tcp", port=5432):
        """Whether ``ip`` answers a quick probe (for timing a change: see in_force_within)."""
        return self.reaches(ip, proto, port, timeout=QUICK) is not None


QUICK = 0.5     # a probe polled to time a change: an open path answers in milliseconds


def in_force_within(check, limit, what):
    """Poll ``check`` until it holds (for up to 15 s) and fail unless the attempt that first
    saw it began within ``limit`` seconds: the time a change takes to be in force, measured
    at the granularity of one quick probe (a refused one takes QUICK s), not of a slow one."""
    start = time.monotonic()
    while True:
        began = time.monotonic()
        if check():
            break
        if began - start > 15:
            pytest.fail(f"{what}: not in force after 15 s")
    took = began - start
    assert took < limit, f"{what}: in force after {took:.2f}s, more than {limit}s"
    return took


class Bed:
    """The two-host bed with its containers, servers and helpers."""

    def __init__(self, testbed):
        self.testbed = testbed
        self.h1, self.h2 = testbed.hosts
        self.servers = []
        self.containers = {}

    def serve(self, nsenter, tcp, udp):
        proc = subprocess.Popen([*nsenter, sys.executable, PROBE, "serve", ",".join(map(str, tcp)),
                                 ",".join(map(str, udp))], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        self.servers.append(proc)
        assert proc.stdout.readline().strip() == "ready"

    def start(self, host, net, name=None, *args, serve=True):
        name = name or f"{net}-{uuid.uuid4().hex[:6]}"
        host.docker("run", "-d", "--name", name, "--net", net, *args, TEST_IMAGE, "sleep", "3600")
        info = json.loads(host.docker("inspect", name).stdout)[0]
        ip = info["NetworkSettings"]["Networks"][net]["IPAddress"]
        c = Container(host, name, net, ip, info["State"]["Pid"])
        if serve:
            self.serve(["nsenter", "-t", str(c.pid), "-n"], [5432, 80], [5353])
        self.containers[name] = c
        return c

    def remove(self, c):
        c.host.docker("rm", "-f", c.name, check=False)
        self.containers.pop(c.name, None)

    def ctl(self, *args, check=True):
        res = subprocess.run([os.path.join(BIN, "l3netctl"), "--etcd-endpoints", self.testbed.etcd_url,
                              "--etcd-prefix", self.testbed.prefix, *args], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "DOCKER_HOST": self.h1.docker_host})
        if check:
            assert res.returncode == 0, res.stderr
        return res

    def allow(self, *args):
        """``l3netctl ... allow``: returns the new rule's id (the last line printed)."""
        return self.ctl(*args).stdout.strip().splitlines()[-1]

    def stop(self):
        for proc in self.servers:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


@pytest.fixture(scope="module")
def bed(docker_ready):
    testbed = bed_up(Testbed(2, prefix=f"/l3pol-{uuid.uuid4().hex[:6]}", tag="l3pol", net=NET,
                             etcd_port=23810))
    b = Bed(testbed)
    try:
        add_outside(testbed)
        b.serve(["nsenter", f"--net=/run/netns/{OUTSIDE_NS}"], [8080], [])
        for host in testbed.hosts:
            b.serve(["nsenter", "-t", str(host.anchor.pid), "-n"], HOST_PORTS, [])
        b.ctl("pool", "add", NONAT, "--no-nat-outgoing")
        for host in testbed.hosts:
            for net, subnet in [*SUBNETS.items(), ("nonat", NONAT)]:
                tags = ["-o", "l3net.tags=needs-db"] if net == "web" else []    # (no policy names it yet)
                host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net",
                            "--subnet", subnet, *tags, net)
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda a: b.start(a[0], a[1], f"{a[1]}{a[2]}"),
                          [(h, net, i) for net in SUBNETS for i, h in enumerate(testbed.hosts, 1)]))
        yield b
    finally:
        b.stop()
        testbed.cleanup()
        run("ip", "netns", "del", OUTSIDE_NS, check=False)


def add_outside(testbed, ns=OUTSIDE_NS, address=OUTSIDE, extra=()):
    """A namespace ``ns`` on the underlay standing for the internet (or any machine outside the
    cluster): ``address`` on the underlay, ``extra`` addresses beside it; it knows no route to
    the pools."""
    run("ip", "netns", "del", ns, check=False)
    run("ip", "netns", "add", ns)
    run("ip", "link", "add", f"vb-{ns}", "type", "veth", "peer", "name", f"ve-{ns}")
    run("ip", "link", "set", f"vb-{ns}", "master", testbed.bridge, "up")
    run("ip", "link", "set", f"ve-{ns}", "netns", ns)
    for cidr in (f"{address}/24", *extra):
        run("ip", "-n", ns, "addr", "add", cidr, "dev", f"ve-{ns}")
    run("ip", "-n", ns, "link", "set", f"ve-{ns}", "up")
    run("ip", "-n", ns, "link", "set", "lo", "up")


# -- the truth table ----------------------------------------------------------------------
def matrix_containers(b):
    return [b.containers[f"{net}{i}"] for net in SUBNETS for i in (1, 2)]


def expected(b, extra=()):
    """{(src, dst, kind): allowed}: same network, or opened by one of ``extra``
    (src net, dst net, kind)."""
    cs = matrix_containers(b)
    return {(s.name, d.name, f"{p}/{port}" if port else p):
            s.net == d.net or (s.net, d.net, (p, port)) in extra
            for s in cs for d in cs if s is not d for p, port in KINDS}


def actual(b):
    cs = matrix_containers(b)

    def from_one(s):
        targets = [(d, p, port) for d in cs if d is not s for p, port in KINDS]
        answers = s.probe([[d.ip, p, port] for d, p, port in targets])
        return {(s.name, d.name, f"{p}/{port}" if port else p): a is not None
                for (d, p, port), a in zip(targets, answers)}
    got = {}
    with ThreadPoolExecutor(len(cs)) as pool:
        for part in pool.map(from_one, cs):
            got.update(part)
    return got


def difference(want, got):
    return [f"  {s:>5} -> {d:<5} {k:<9} expected {'allow' if want[(s, d, k)] else 'deny':5} "
            f"got {'allow' if got[(s, d, k)] else 'deny'}"
            for (s, d, k) in sorted(want) if want[(s, d, k)] != got[(s, d, k)]]


def assert_matrix(b, extra=(), within=10, what="defaults"):
    """Probe until the matrix is as expected (a change takes effect within 2 s, a denied
    probe takes 1 s); on failure print every wrong pair. Returns the seconds it took."""
    want, start = expected(b, extra), time.monotonic()
    while True:
        got = actual(b)
        if got == want:
            took = time.monotonic() - start
            print(f"truth table '{what}': {len(want)} probes as expected after {took:.2f}s")
            assert_diagnose_agrees(b, got, what)
            return took
        if time.monotonic() - start > within:
            pytest.fail(f"truth table '{what}': {len(difference(want, got))} of {len(want)} probes wrong:\n"
                        + "\n".join(difference(want, got)))


def assert_diagnose_agrees(b, got, what):
    """`l3netctl diagnose` computes what the agents enforce (diagnose.gather, the agents'
    calculation): its verdict on every probe of the table is what the packets did."""
    from core.keys import Keys
    from plugin.diagnose import diagnose, gather
    from plugin.store import EtcdStore

    store = EtcdStore(b.testbed.etcd_url)
    try:
        facts = gather(store, Keys(b.testbed.prefix), b.h1.name)
    finally:
        store.close()
    cs = {c.name: c for c in matrix_containers(b)}
    wrong = []
    for (s, d, kind), allowed in sorted(got.items()):
        proto, _, port = kind.partition("/")
        verdict, steps = diagnose(cs[s].ip, cs[d].ip, facts, proto, int(port) if port else None)
        if (verdict == "REACHABLE") != allowed:
            wrong.append(f"  {s} -> {d} {kind}: packets {'allowed' if allowed else 'denied'}, diagnose says "
                         f"{verdict} ({steps[-1].what})")
    assert not wrong, f"truth table '{what}': diagnose disagrees with the packets:\n" + "\n".join(wrong)


def test_truth_table_defaults_policy_removal_and_udp(bed):
    assert_matrix(bed, what="defaults")
    rule = bed.allow("policy", "allow", "--from", "web", "--to", "db", "--proto", "tcp", "--port", "5432")
    assert re.match(r"^[0-9a-f]{8}$", rule)
    assert_matrix(bed, {("web", "db", ("tcp", 5432))}, what="web->db tcp/5432")
    bed.ctl("policy", "remove", rule)
    assert_matrix(bed, what="after removing it")
    rule = bed.allow("policy", "allow", "--from", "ops", "--to", SUBNETS["db"], "--proto", "udp",
                     "--port", "5000-5400")
    assert_matrix(bed, {("ops", "db", ("udp", 5353))}, what="ops->db udp/5000-5400")
    bed.ctl("policy", "remove", rule)
    rule = bed.allow("policy", "allow", "--from", "db", "--to", "ops")
    assert_matrix(bed, {("db", "ops", k) for k in KINDS}, what="db->ops everything")
    bed.ctl("policy", "remove", rule)
    assert_matrix(bed, what="all removed")


def test_policy_change_in_force_on_the_other_host_within_2s(bed):
    web1, db2 = bed.containers["web1"], bed.containers["db2"]
    assert web1.reaches(db2.ip) is None
    rule = bed.allow("policy", "allow", "--from", "web", "--to", "db", "--proto", "tcp", "--port", "5432")
    opened = in_force_within(lambda: web1.opens(db2.ip), 2, "web1 -> db2 tcp/5432 open")
    bed.ctl("policy", "remove", rule)
    closed = in_force_within(lambda: not web1.opens(db2.ip), 2, "web1 -> db2 tcp/5432 closed")
    assert web1.reaches(db2.ip) is None
    print(f"policy in force {opened:.2f}s after l3netctl returned, removed after {closed:.2f}s "
          f"(to within a probe of {QUICK} s)")


def test_new_container_reachable_from_the_other_host_at_once(bed):
    web1 = bed.containers["web1"]
    c = bed.start(bed.h2, "web")
    try:
        took = in_force_within(lambda: web1.opens(c.ip), 2, "the new container from the other host")
        wait_for(lambda: c.reaches(web1.ip) is not None, 10, "the new container -> web1")
        print(f"new container on host 2 reachable from host 1 {took:.2f}s after its server started")
    finally:
        bed.remove(c)


# -- hosts, outside, spoofing, Docker's bridge ---------------------------------------------
def test_hosts_out_of_reach_until_host_allow(bed):
    h1, h2 = bed.h1, bed.h2
    web1, web2 = bed.containers["web1"], bed.containers["web2"]
    for c in (web1, web2):
        assert c.probe([[h.ip, proto, port] for h in (h1, h2) for proto, port in
                        [("tcp", 7777), ("tcp", 7778), ("icmp", 0)]]) == [None] * 6, c
    rule = bed.allow("host", "allow", "--proto", "tcp", "--port", "7777")
    only_h2 = bed.allow("host", "allow", "--proto", "tcp", "--port", "7778", "--node", h2.name)
    try:
        def opened(c):
            got = c.probe([[h1.ip, "tcp", 7777], [h2.ip, "tcp", 7777], [h1.ip, "tcp", 7778],
                           [h2.ip, "tcp", 7778], [h1.ip, "icmp", 0], [h2.ip, "icmp", 0]])
            return [a is not None for a in got] == [True, True, False, True, False, False]
        for c in (web1, web2):
            wait_for(lambda: opened(c), 5, f"{c}: exactly the opened host ports")
        # the host sees the container's own address (no NAT towards cluster hosts)
        assert web1.reaches(h2.ip, "tcp", 7777) == f"ok {web1.ip}"
    finally:
        bed.ctl("host", "remove", rule)
        bed.ctl("host", "remove", only_h2)
    wait_for(lambda: web1.probe([[h1.ip, "tcp", 7777], [h2.ip, "tcp", 7778]]) == [None, None], 15,
             "host ports closed again")


def test_outside_reachable_through_nat_only(bed):
    web1 = bed.containers["web1"]
    answer = wait_for(lambda: web1.reaches(OUTSIDE, "tcp", 8080), 10, "web1 -> the outside")
    assert answer == f"ok {bed.h1.ip}", "masqueraded to the host's address"
    assert web1.reaches(OUTSIDE, "icmp") == "ok"
    # NAT off: by `l3netctl pool add --no-nat-outgoing` (nonat), or by --ipam-opt (nonat2)
    bed.h1.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet", NONAT2,
                  "--ipam-opt", "nat-outgoing=false", "nonat2")
    nonat = bed.start(bed.h1, "nonat", serve=False)
    nonat2 = bed.start(bed.h1, "nonat2", serve=False)
    try:
        for c in (nonat, nonat2):
            assert c.probe([[OUTSIDE, "tcp", 8080], [OUTSIDE, "icmp", 0]]) == [None, None], c
        pools = json.loads(bed.ctl("pool", "list", "--json").stdout)
        assert {p["cidr"]: p["nat_outgoing"] for p in pools}[NONAT] is False
        assert {p["cidr"]: p["nat_outgoing"] for p in pools}[NONAT2] is False
    finally:
        bed.remove(nonat)
        bed.remove(nonat2)
        bed.h1.docker("network", "rm", "nonat2", check=False)


def test_internal_network_stays_inside(bed):
    """docker network create --internal: members reach each other across hosts, and other
    networks by policy, but nothing leaves the pools (no NAT, no outside); a network on the
    same subnet without --internal is refused, on any host."""
    for host in (bed.h1, bed.h2):
        host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--internal",
                    "--subnet", INTERNAL, "inner")
    i1, i2 = bed.start(bed.h1, "inner"), bed.start(bed.h2, "inner")
    db2 = bed.containers["db2"]
    rule = None
    try:
        wait_for(lambda: i1.reaches(i2.ip) == f"ok {i1.ip}", 10, "inner on host 1 -> inner on host 2")
        assert i1.probe([[OUTSIDE, "tcp", 8080], [OUTSIDE, "icmp", 0], [db2.ip, "tcp", 5432]]) == [None] * 3
        rule = bed.allow("policy", "allow", "--from", "inner", "--to", "db", "--proto", "tcp", "--port", "5432")
        wait_for(lambda: i1.reaches(db2.ip) == f"ok {i1.ip}", 10, "inner -> db by policy")
        assert i1.reaches(OUTSIDE, "tcp", 8080) is None
        pools = {p["cidr"]: p for p in json.loads(bed.ctl("pool", "list", "--json").stdout)}
        assert pools[INTERNAL]["internal"] is True and pools[SUBNETS["web"]]["internal"] is False
        out = bed.ctl("diagnose", i1.ip, OUTSIDE, check=False).stdout
        assert "is internal" in out and out.rstrip().endswith("NOT REACHABLE"), out
        res = bed.h2.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet",
                            SUBNETS["web"], "--internal", "web-internal", check=False)
        assert res.returncode != 0 and "is not internal" in res.stderr, res.stderr
    finally:
        if rule:
            bed.ctl("policy", "remove", rule, check=False)
        bed.remove(i1)
        bed.remove(i2)
        for host in (bed.h1, bed.h2):
            host.docker("network", "rm", "inner", check=False)


def probe_from(nsenter, targets):
    res = subprocess.run([*nsenter, sys.executable, PROBE, "probe", json.dumps(targets)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def flows_of(host, ip):
    """Connection-tracking entries to, from or DNATed to ``ip`` on ``host``."""
    return [line for match in ("--orig-src", "--orig-dst", "--reply-src")
            for line in host.sh("conntrack", "-L", match, ip, check=False).stdout.splitlines()]


def test_published_ports(bed):
    """docker run -p HOSTPORT:PORT: the container's host answers on HOSTPORT for the outside
    and the hosts (the client's own address reaches the container: no SNAT); containers keep
    reaching each other by network and policy only; clear errors for a port taken, a random
    port and a port a host process holds; the port is released with the container."""
    h1, h2 = bed.h1, bed.h2
    outside = ["nsenter", f"--net=/run/netns/{OUTSIDE_NS}"]
    host2 = ["nsenter", "-t", str(h2.anchor.pid), "-n"]
    pub = bed.start(h1, "web", "pub", "-p", "18080:80", "-p", "15353:5353/udp")
    failed = []

    def refused(*args):
        name = f"refused-{uuid.uuid4().hex[:6]}"
        failed.append(name)
        res = h1.docker("run", "-d", "--name", name, "--net", "web", *args, TEST_IMAGE, "sleep", "60",
                        check=False)
        assert res.returncode != 0, f"docker run {args} worked"
        return res.stderr
    try:
        # (polled: a first packet may wait on ARP longer than the probe's 1 s under load)
        wait_for(lambda: probe_from(outside, [[h1.ip, "tcp", 18080], [h1.ip, "udp", 15353]])
                 == [f"ok {OUTSIDE}", f"ok {OUTSIDE}"], 10, "the published ports from outside")
        assert probe_from(outside, [[h2.ip, "tcp", 18080]]) == [None]
        assert probe_from(host2, [[h1.ip, "tcp", 18080]]) == [f"ok {h2.ip}"]
        rows = json.loads(bed.ctl("endpoint", "list", "--json").stdout)
        assert [r["published"] for r in rows if r["address"] == pub.ip] == [
            "0.0.0.0:15353->5353/udp, 0.0.0.0:18080->80/tcp"], rows
        # another application: not through the published port either (on either host)
        ops1, ops2 = bed.containers["ops1"], bed.containers["ops2"]
        for c in (ops1, ops2):
            assert c.probe([[h1.ip, "tcp", 18080], [pub.ip, "tcp", 80]]) == [None, None], c
        assert "tcp/18080 is already published" in refused("-p", "18080:80")
        assert "fixed host ports only" in refused("-p", "80")
        assert f"tcp/{HOST_PORTS[0]} is in use on this host" in refused("-p", f"{HOST_PORTS[0]}:80")
        assert flows_of(h1, pub.ip), "the probes' connections are tracked"
    finally:
        bed.remove(pub)
        for name in failed:
            h1.docker("rm", "-f", name, check=False)
    # its address goes to the next container: its tracked connections must not
    wait_for(lambda: not flows_of(h1, pub.ip), 10, "the removed container's connections forgotten")
    assert probe_from(outside, [[h1.ip, "tcp", 18080]]) == [None]
    again = bed.start(h1, "web", None, "-p", "18080:80")
    try:
        assert wait_for(lambda: probe_from(outside, [[h1.ip, "tcp", 18080]])[0], 10,
                        "the published port of the address's next holder") == f"ok {OUTSIDE}"
    finally:
        bed.remove(again)


def icmp_echoes_received(c):
    """The receiving container's own count of echo requests (checked on the receiver)."""
    snmp = subprocess.run(["nsenter", "-t", str(c.pid), "-n", "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, check=True).stdout
    names, values = [line.split() for line in snmp.splitlines() if line.startswith("Icmp:")][:2]
    return int(values[names.index("InEchos")])


def test_spoofed_source_gets_nothing_through(bed):
    web1, web2 = bed.containers["web1"], bed.containers["web2"]
    spoofer = bed.start(bed.h1, "ops", None, "--cap-add", "NET_ADMIN", serve=False)
    try:
        for victim, target in [(web1, web2), (web2, web1)]:   # across hosts, and on the same host
            before = icmp_echoes_received(target)
            assert victim.reaches(target.ip, "icmp") == "ok"   # the counter does count
            wait_for(lambda: icmp_echoes_received(target) >= before + 1, 15, "the real echo counted")
            before = icmp_echoes_received(target)
            res = spoofer.host.docker(
                "exec", spoofer.name, "sh", "-c",
                f"ip addr add {victim.ip}/32 dev eth0 && ping -c 3 -W 1 -I {victim.ip} {target.ip}; "
                f"ip addr del {victim.ip}/32 dev eth0", check=False)
            assert "0 packets received" in res.stdout, res.stdout + res.stderr
            assert icmp_echoes_received(target) == before, f"a packet from fake {victim.ip} reached {target}"
    finally:
        bed.remove(spoofer)


def test_docker_bridge_containers_work_and_stay_out(bed):
    """Docker's chains keep working for --net bridge containers on the same host (NAT to the
    outside), and they do not get past isolation (our FORWARD hook comes before Docker's)."""
    web1 = bed.containers["web1"]
    h1 = bed.h1
    h1.docker("run", "-d", "--name", "plain", "--net", "bridge", TEST_IMAGE, "sleep", "3600")
    try:
        pid = json.loads(h1.docker("inspect", "plain").stdout)[0]["State"]["Pid"]
        plain = Container(h1, "plain", "bridge", None, pid)
        assert plain.reaches(OUTSIDE, "tcp", 8080) == f"ok {h1.ip}"
        assert plain.probe([[web1.ip, "tcp", 5432], [web1.ip, "icmp", 0]]) == [None, None]
    finally:
        h1.docker("rm", "-f", "plain", check=False)


# -- scale and drift ------------------------------------------------------------------------
def rule_count(host):
    return sum(1 for line in host.sh("iptables-save").stdout.splitlines() if line.startswith("-A "))


def set_size(host, cidr):
    """Members in the network's set on ``host``; None when there is no such set."""
    from plugin.policy import set_name
    res = host.sh("ipset", "list", "-t", set_name(cidr), check=False)
    if res.returncode != 0:
        return None
    return int(re.search(r"Number of entries: (\d+)", res.stdout).group(1))


def test_500_members_add_no_rules(bed):
    """500 addresses allocated in web by another host: h1's set grows by 500, its rules do not."""
    from core.keys import Keys
    from ipam.allocator import Ipam
    from plugin.store import EtcdStore

    h1, web = bed.h1, "10.85.0.0/22"
    store = EtcdStore(bed.testbed.etcd_url)
    ipam = Ipam(store, Keys(bed.testbed.prefix), "phantom")
    bed.ctl("pool", "add", web)
    pool_id, _, _ = ipam.request_pool(web)
    wait_for(lambda: set_size(h1, web) == 0, 10, "the new network's set on host 1")
    rules, size = rule_count(h1), set_size(h1, web)
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: ipam.request_address(pool_id), range(500)))
        wait_for(lambda: set_size(h1, web) == size + 500, 20, "500 members in host 1's set")
        assert rule_count(h1) == rules
    finally:
        ipam.release_host("phantom")
        ipam.release_pool(pool_id)
        bed.ctl("pool", "remove", web, check=False)
        store.close()
    wait_for(lambda: set_size(h1, web) is None, 10, "the pool's set gone with the pool")


def test_drift_is_repaired(bed):
    from plugin.policy import set_name
    h1 = bed.h1
    web1, web2 = bed.containers["web1"], bed.containers["web2"]
    def repaired():
        saved = h1.sh("iptables-save").stdout
        hook = saved.find("-A FORWARD -j L3NET-FORWARD")
        intruder = saved.find("-A FORWARD -o l3h+ -j ACCEPT")
        return ("-A L3NET-TO-CONTAINER -m comment" in saved and hook >= 0
                and (intruder < 0 or hook < intruder) and (set_size(h1, SUBNETS["web"]) or 0) >= 2)
    try:
        for breakage in (["iptables", "-F", "L3NET-TO-CONTAINER"],
                         ["iptables", "-D", "FORWARD", "-j", "L3NET-FORWARD"],
                         ["ipset", "flush", set_name(SUBNETS["web"])],
                         # someone's ACCEPT above our hook (dockerd does that when it sets up a bridge)
                         ["iptables", "-I", "FORWARD", "1", "-o", "l3h+", "-j", "ACCEPT"]):
            h1.sh(*breakage)
            wait_for(repaired, 10, f"repair after {' '.join(breakage)}")
            wait_for(lambda: web2.reaches(web1.ip) is not None, 15, "web2 -> web1 again")
            assert bed.containers["db2"].reaches(web1.ip) is None, "isolation back too"
    finally:
        h1.sh("iptables", "-D", "FORWARD", "-o", "l3h+", "-j", "ACCEPT", check=False)


def test_a_container_on_two_networks_keeps_its_way_out(bed):
    """A container on web and ops reaches the outside (NAT) through its default route, and
    again once the network that held the default route (web) is disconnected; it then reaches
    ops' members, not web's."""
    h1 = bed.h1
    c = bed.start(h1, "web", serve=False)
    try:
        h1.docker("network", "connect", "ops", c.name)
        assert c.reaches(OUTSIDE, "tcp", 8080) == f"ok {h1.ip}"
        h1.docker("network", "disconnect", "web", c.name)
        wait_for(lambda: c.reaches(OUTSIDE, "tcp", 8080) == f"ok {h1.ip}", 15, "the outside after leaving web")
        ops2, web2 = bed.containers["ops2"], bed.containers["web2"]
        assert c.probe([[ops2.ip, "tcp", 5432], [web2.ip, "tcp", 5432]])[1] is None
        wait_for(lambda: c.reaches(ops2.ip) is not None, 15, "ops2 from its address on ops")
    finally:
        bed.remove(c)


def test_a_policy_naming_a_tag_follows_the_tags(bed):
    """web carries needs-db since its creation (-o l3net.tags), ops (the untagged application)
    does not. A policy tag:needs-db -> db tcp/5432 opens web -> db on both hosts, not ops,
    not ICMP; tagging ops opens it within 2 s, untagging web closes web's; diagnose names the
    tag; a tagged network created later is covered without touching the policy; removing the
    policy closes everything."""
    h1, h2 = bed.h1, bed.h2
    ops1, web1, db1, db2 = (bed.containers[n] for n in ("ops1", "web1", "db1", "db2"))
    tags = {r["tag"]: r["networks"] for r in json.loads(bed.ctl("tag", "list", "--json").stdout)}
    assert tags == {"needs-db": [SUBNETS["web"]]}
    rule = bed.allow("policy", "allow", "--from", "tag:needs-db", "--to", "db", "--proto", "tcp", "--port", "5432")
    late = None
    try:
        assert [r["from"] for r in json.loads(bed.ctl("policy", "list", "--json").stdout)] == ["tag:needs-db"]
        assert_matrix(bed, {("web", "db", ("tcp", 5432))}, what="tag:needs-db -> db tcp/5432")
        bed.ctl("tag", "add", "ops", "needs-db")
        took = in_force_within(lambda: ops1.opens(db2.ip), 2, "ops1 -> db2 once ops is tagged")
        print(f"tag add in force on the other host {took:.2f}s after l3netctl returned")
        assert_matrix(bed, {("web", "db", ("tcp", 5432)), ("ops", "db", ("tcp", 5432))}, what="ops tagged too")
        bed.ctl("tag", "remove", "web", "needs-db")
        in_force_within(lambda: not web1.opens(db2.ip), 2, "web1 -> db2 closed once web is untagged")
        assert_matrix(bed, {("ops", "db", ("tcp", 5432))}, what="web untagged")
        out = bed.ctl("diagnose", web1.ip, db2.ip, "--proto", "tcp", "--port", "5432", check=False).stdout
        assert f"policy {rule}" in out and f"{SUBNETS['web']} lacks tag needs-db" in out, out
        out = bed.ctl("diagnose", ops1.ip, db2.ip, "--proto", "tcp", "--port", "5432", check=False).stdout
        assert f"policy {rule} allows {SUBNETS['ops']} (tag needs-db)" in out, out
        # a network tagged at its creation, after the policy: covered at once
        for host in (h1, h2):
            host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet", LATE,
                        "-o", "l3net.tags=needs-db,batch", "late")
        late = bed.start(h2, "late", serve=False)
        wait_for(lambda: late.reaches(db1.ip) is not None and late.reaches(db2.ip) is not None, 10,
                 "the late network's container -> db on both hosts")
        assert late.probe([[db1.ip, "icmp", 0], [db1.ip, "tcp", 80]]) == [None, None]
        # a later network on the same subnet with other tags: refused, clearly
        res = h1.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet", LATE,
                        "-o", "l3net.tags=other", "late-other", check=False)
        assert res.returncode != 0 and "carries tags batch,needs-db" in res.stderr, res.stderr
        bed.ctl("policy", "remove", rule)
        rule = None
        in_force_within(lambda: not ops1.opens(db2.ip), 2, "ops1 -> db2 closed once the policy is removed")
        assert_matrix(bed, what="the tag's policy removed")
        assert late.probe([[db1.ip, "tcp", 5432]]) == [None]
    finally:
        if rule:
            bed.ctl("policy", "remove", rule)
        bed.ctl("tag", "add", "web", "needs-db")
        bed.ctl("tag", "remove", "ops", "needs-db")
        if late is not None:
            bed.remove(late)
        for host in (h1, h2):
            host.docker("network", "rm", "late", check=False)


def test_diagnose_explains_what_the_packets_do(bed):
    """l3netctl diagnose, run on host 1 (its dockerd, routes and BIRD), agrees with the probes."""
    h1, h2 = bed.h1, bed.h2
    web1, web2, db2 = bed.containers["web1"], bed.containers["web2"], bed.containers["db2"]

    def diagnose(*args):
        return h1.sh(os.path.join(BIN, "l3netctl"), "--etcd-endpoints", bed.testbed.etcd_url,
                     "--etcd-prefix", bed.testbed.prefix, "diagnose", "--hostname", h1.name, *args,
                     check=False)
    res = diagnose("web1", web2.ip)
    assert res.returncode == 0 and res.stdout.strip().endswith("REACHABLE"), res.stdout + res.stderr
    assert f"via {h2.ip}" in res.stdout
    res = diagnose("web1", db2.ip, "--proto", "tcp", "--port", "5432")
    assert res.returncode == 1 and "policy denies" in res.stdout, res.stdout + res.stderr
    assert web1.reaches(db2.ip) is None
    rule = bed.allow("policy", "allow", "--from", "web", "--to", "db", "--proto", "tcp", "--port", "5432")
    try:
        res = diagnose("web1", db2.ip, "--proto", "tcp", "--port", "5432")
        assert res.returncode == 0 and f"policy {rule} allows" in res.stdout, res.stdout
        wait_for(lambda: web1.reaches(db2.ip) is not None, 15, "the probe agreeing")
    finally:
        bed.ctl("policy", "remove", rule)
    res = diagnose("web1", h2.ip, "--proto", "tcp", "--port", "7777")
    assert res.returncode == 1 and "host rule denies" in res.stdout, res.stdout
    res = diagnose("web1", OUTSIDE)
    assert res.returncode == 0 and "outgoing NAT on" in res.stdout, res.stdout


def test_published_port_survives_a_dockerd_crash(bed):
    """The host's Docker killed at once (dockerd, containerd, the container: no revoke, no
    DeleteEndpoint reach the plugin) with a --restart always container publishing a port:
    restarted, dockerd starts it again, its new endpoint gets the port and the port answers.
    LAST in this module: dockerd's restart stops every other container on host 1."""
    h1 = bed.h1
    outside = ["nsenter", f"--net=/run/netns/{OUTSIDE_NS}"]
    h1.docker("run", "-d", "--name", "crashpub", "--restart", "always", "--net", "web", "-p", "18090:80",
              TEST_IMAGE, "sh", "-c", "while true; do nc -l -p 80 -e echo pub; done")
    try:
        wait_for(lambda: probe_from(outside, [[h1.ip, "tcp", 18090]]) == ["pub"], 10, "the port before")
        old_endpoint = json.loads(h1.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                            "crashpub").stdout)["web"]["EndpointID"]
        h1.crash_docker(["crashpub"])
        h1.start_dockerd()
        wait_for(lambda: json.loads(h1.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                              "crashpub").stdout)["web"]["EndpointID"] not in ("", old_endpoint),
                 60, "the container back with a new endpoint")
        wait_for(lambda: probe_from(outside, [[h1.ip, "tcp", 18090]]) == ["pub"], 20, "the port after")
    finally:
        h1.docker("rm", "-f", "crashpub", check=False)
