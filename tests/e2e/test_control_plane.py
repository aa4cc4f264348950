"""The control plane against mistakes and hostile records, on two test-bed hosts with real
dockerd, etcd, BIRD and iptables: a second plugin on a host, a second host under a live node's
name, bad BGP records written into etcd, and etcd going away for longer than a lease.
"""

import json
import os
import signal
import time
import uuid

import pytest

from tests.conftest import BIN, bed_up, wait_for
from tests.e2e.test_policy import Bed
from tests.testbed import Testbed

NET = "198.18.8"


@pytest.fixture(scope="module")
def bed(docker_ready):
    testbed = bed_up(Testbed(2, prefix=f"/l3cp-{uuid.uuid4().hex[:6]}", tag="l3cp", net=NET, etcd_port=23840))
    b = Bed(testbed)
    try:
        for host in testbed.hosts:
            for net, subnet in (("web", "10.95.0.0/24"), ("db", "10.96.0.0/24")):
                host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet", subnet, net)
        for i, host in enumerate(testbed.hosts, 1):
            b.start(host, "web", f"web{i}")
            b.start(host, "db", f"db{i}")
        yield b
    finally:
        b.stop()
        testbed.cleanup()


def plugin_run(host, *args, timeout=60):
    """Run another l3net-plugin on ``host`` to its end; (exit status, its output)."""
    res = host.sh(os.path.join(BIN, "l3net-plugin"), "--etcd-endpoints", host.bed.etcd_url, "--etcd-prefix",
                  host.bed.prefix, *args, check=False, timeout=timeout)
    return res.returncode, res.stdout + res.stderr


def connectivity_and_isolation(b):
    web1, web2, db2 = b.containers["web1"], b.containers["web2"], b.containers["db2"]
    return web1.reaches(web2.ip) == f"ok {web1.ip}" and web1.reaches(db2.ip) is None


def test_a_second_plugin_on_a_host_refuses_and_the_first_keeps_serving(bed):
    h1 = bed.h1
    code, out = plugin_run(h1, "--hostname", h1.name, "--host-ip", h1.ip, "--state-dir",
                           os.path.join(h1.dir, "state"))
    assert code != 0 and "another l3net-plugin" in out, out
    assert h1.sh("test", "-S", "/run/docker/plugins/l3net.sock", check=False).returncode == 0, "socket taken away"
    c = bed.start(h1, "web", serve=False)
    bed.remove(c)


def test_a_second_host_under_a_live_nodes_name_refuses_to_start(bed):
    h1, h2 = bed.h1, bed.h2
    before = json.loads(bed.ctl("node", "list", "--json").stdout)
    code, out = plugin_run(h2, "--hostname", h1.name, "--host-ip", h2.ip, "--state-dir",
                           os.path.join(h2.dir, "twin"), "--socket", "/run/docker/plugins/l3twin.sock")
    assert code != 0 and f"held by a live node at {h1.ip}" in out and h2.ip in out, out
    after = json.loads(bed.ctl("node", "list", "--json").stdout)
    assert {n["name"]: n["address"] for n in after} == {n["name"]: n["address"] for n in before}


def test_hostile_bgp_records_are_skipped_and_nothing_else_stops(bed):
    from core.keys import Keys
    from plugin.store import EtcdStore
    h1, h2 = bed.h1, bed.h2
    store, keys = EtcdStore(bed.testbed.etcd_url), Keys(bed.testbed.prefix)
    bad = {keys.bgp_peer("192.0.2.66"): json.dumps({"ip": "192.0.2.66", "as": 65066,
                                                    "name": "rr\n}\nprotocol static evil { ipv4; route 0.0.0.0/0 blackhole; }\n#"}),
           keys.bgp_peer("192.0.2.67"): "{not json",
           keys.bgp_peer("192.0.2.68"): json.dumps({"ip": "192.0.2.68", "as": "1; }"}),
           keys.bgp_node(h1.name): json.dumps({"peers": "nope", "as": "x"}),
           keys.node("evil\nprotocol"): json.dumps({"name": "evil\nprotocol", "ip": "198.18.8.99"})}
    began = time.time()
    try:
        for key, value in bad.items():
            store.put(key, value)
        conf = os.path.join(h1.dir, "state", "bird.conf")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:          # several syncs with the records in place
            with open(conf) as f:
                text = f.read()
            assert "evil" not in text and "192.0.2.6" not in text, text
            time.sleep(0.5)
        status = os.path.join(h1.dir, "state", "status.json")

        def beating():
            with open(status) as f:
                s = json.load(f)
            return s["last_sync"] > began + 12 and s["last_error"] is None     # a beat is due every 10 s
        wait_for(beating, 15, "host 1's agent (and heartbeat) going on without errors")
        assert store.get(keys.node(h1.name))[0] is not None
        rows = json.loads(h1.sh(os.path.join(BIN, "l3netctl"), "--etcd-endpoints", bed.testbed.etcd_url,
                                "--etcd-prefix", bed.testbed.prefix, "bgp", "status", "--json").stdout)
        assert [r["established"] for r in rows if r["peer"] == h2.ip] == [True], rows
        assert connectivity_and_isolation(bed)
        with open(os.path.join(h1.dir, "plugin.log")) as f:
            log = f.read()
        assert log.count("ignoring BGP peer") <= 3, "one warning per bad record, not one per second"
    finally:
        for key in bad:
            store.delete(key)
        store.close()


def test_etcd_away_longer_than_a_lease_changes_nothing(bed):
    """etcd stops answering for 35 s (more than the 30 s node lease): every node keeps its
    rules, sets, routes and BIRD; containers keep reaching their own network across hosts and
    stay apart from others; each node says etcd is away; afterwards all is as before."""
    h1, h2 = bed.h1, bed.h2
    assert connectivity_and_isolation(bed)
    def members(name):
        out = h1.sh("ipset", "list", name).stdout
        return sorted(out.split("Members:", 1)[1].split())
    hosts_set = members("l3n-hosts")
    os.kill(bed.testbed.etcd.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        status = os.path.join(h1.dir, "state", "status.json")
        wait_for(lambda: json.load(open(status)).get("etcd_down_since"), 20, "host 1 saying etcd is away")
        while time.monotonic() - start < 35:
            assert connectivity_and_isolation(bed), f"changed {time.monotonic() - start:.0f}s into the outage"
            assert h2.ip in h1.sh("ipset", "list", "l3n-hosts").stdout
            time.sleep(2)
    finally:
        os.kill(bed.testbed.etcd.pid, signal.SIGCONT)
    wait_for(lambda: not json.load(open(os.path.join(h1.dir, "state", "status.json"))).get("etcd_down_since"),
             30, "host 1 reading etcd again")
    wait_for(lambda: {n["name"] for n in json.loads(bed.ctl("node", "list", "--json").stdout)
                      if n["state"] == "up"} >= {h1.name, h2.name}, 30, "both nodes registered")
    assert members("l3n-hosts") == hosts_set
    for _ in range(10):           # and no flap as the nodes register again: every probe holds
        assert connectivity_and_isolation(bed)


ROGUE = """
router id {ip};
protocol device {{ }}
protocol static {{
  ipv4;
  route 0.0.0.0/0 blackhole;          # a default route
  route {victim}/32 blackhole;        # another node's container
  route {host}/32 blackhole;          # another node's own address
  route {pool} blackhole;             # a whole pool
}}
protocol bgp node1 {{
  local {ip} as 64512;
  neighbor {node_ip} as 64512;
  direct;
  ipv4 {{ import none; export all; next hop self; }};
}}
"""


def test_a_rogue_speaker_in_the_mesh_gets_nothing_installed(bed, tmp_path):
    """A BIRD on the underlay that got itself into the mesh (a node record of its own in
    etcd) announces host 2's container as a /32, a default route, host 2's own address and a
    whole pool: host 1 takes none of it (the session is up: the filter did it)."""
    import subprocess

    from core.keys import Keys
    from plugin.store import EtcdStore
    h1, h2, web2 = bed.h1, bed.h2, bed.containers["web2"]
    rogue_ip = f"{NET}.1"
    conf = tmp_path / "rogue.conf"
    conf.write_text(ROGUE.format(ip=rogue_ip, node_ip=h1.ip, victim=web2.ip, host=h2.ip, pool="10.95.0.0/24"))
    rogue = subprocess.Popen(["bird", "-f", "-c", str(conf), "-s", str(tmp_path / "rogue.ctl")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store, keys = EtcdStore(bed.testbed.etcd_url), Keys(bed.testbed.prefix)
    store.put(keys.node("rogue"), json.dumps({"name": "rogue", "ip": rogue_ip, "as": 64512}))
    proto = "l3_" + rogue_ip.replace(".", "_")
    try:
        def show():
            return h1.sh("birdc", "-s", "/run/l3net/bird.ctl", "show", "protocols", "all", proto, check=False).stdout

        wait_for(lambda: "Established" in show(), 40, "host 1's session with the rogue")
        wait_for(lambda: any(int(line.split()[2]) >= 4 for line in show().splitlines()
                             if line.strip().startswith("Import updates:")), 20, "the rogue's announcements")
        assert "0 imported" in show(), show()
        table = h1.sh("ip", "route", "show", "table", "all").stdout
        assert not [line for line in table.splitlines() if f"via {rogue_ip} " in line and "proto bird" in line], table
        assert connectivity_and_isolation(bed)
    finally:
        store.delete(keys.node("rogue"))
        store.close()
        rogue.kill()
        rogue.wait(10)


def test_signed_mesh_sessions_keep_an_unsigned_speaker_out(bed, tmp_path):
    """Both nodes get the mesh's password (--bgp-password-file, on the nodes only): their
    session comes back signed (TCP MD5); a speaker in the mesh without it never gets a session.
    LAST in this module: it restarts both plugins with the password."""
    import subprocess

    from core.keys import Keys
    from plugin.store import EtcdStore
    h1, h2 = bed.h1, bed.h2
    for host in (h1, h2):
        secret = os.path.join(host.dir, "bgp-passwords")
        with open(secret, "w") as f:
            f.write("l3net-mesh-S3cret\n")
        host.stop_plugin()
        host.start_plugin("--bgp-password-file", secret)

    def session(host, peer_ip):
        rows = json.loads(host.sh(os.path.join(BIN, "l3netctl"), "--etcd-endpoints", bed.testbed.etcd_url,
                                  "--etcd-prefix", bed.testbed.prefix, "bgp", "status", "--json").stdout)
        return [r["established"] for r in rows if r["peer"] == peer_ip] == [True]

    wait_for(lambda: 'password "' in open(os.path.join(h1.dir, "state", "bird.conf")).read(), 20,
             "host 1's BIRD configured with the password")
    wait_for(lambda: session(h1, h2.ip) and session(h2, h1.ip), 40, "the signed session up")
    with open(os.path.join(h1.dir, "plugin.log")) as f:
        assert "l3net-mesh-S3cret" not in f.read(), "the secret is never logged"
    assert oct(os.stat(os.path.join(h1.dir, "state", "bird.conf")).st_mode & 0o777) == "0o600"
    rogue_ip = f"{NET}.1"
    conf = tmp_path / "rogue.conf"
    conf.write_text(ROGUE.format(ip=rogue_ip, node_ip=h1.ip, victim=bed.containers["web2"].ip, host=h2.ip,
                                 pool="10.95.0.0/24"))
    rogue = subprocess.Popen(["bird", "-f", "-c", str(conf), "-s", str(tmp_path / "rogue.ctl")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store, keys = EtcdStore(bed.testbed.etcd_url), Keys(bed.testbed.prefix)
    store.put(keys.node("rogue"), json.dumps({"name": "rogue", "ip": rogue_ip, "as": 64512}))
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert not session(h1, rogue_ip), "an unsigned speaker got a session"
            time.sleep(1)
        assert session(h1, h2.ip) and connectivity_and_isolation(bed)
    finally:
        store.delete(keys.node("rogue"))
        store.close()
        rogue.kill()
        rogue.wait(10)
