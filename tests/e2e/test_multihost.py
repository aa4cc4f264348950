"""Three hosts on one machine (tests/testbed.py): one network across hosts, routes by BGP.

Every host runs its own dockerd and l3net-plugin (with BIRD); they share one etcd. No tunnel
anywhere: a packet to a container on another host leaves through the underlay with that host
as the next hop.
"""

import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import BIN, bed_up, wait_for
from tests.testbed import NET, Testbed, pings, still_pings, veth_names

SUBNET = "10.40.0.0/16"


@pytest.fixture(scope="module")
def bed(docker_ready):
    bed = bed_up(Testbed(3, prefix=f"/l3bed-{uuid.uuid4().hex[:6]}"))
    try:
        for host in bed.hosts:
            host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net",
                        "--subnet", SUBNET, "web")
        yield bed
    finally:
        bed.cleanup()


@pytest.fixture
def containers(bed):
    """Start containers on hosts; all removed after the test."""
    started = []

    def start(host, *args, name=None):
        name = name or f"c-{uuid.uuid4().hex[:8]}"
        host.docker("run", "-d", "--name", name, "--net", "web", *args,
                    "l3net-test/busybox", "sleep", "600")
        started.append((host, name))
        return name, ip_of(host, name)
    yield start
    for host, name in started:
        host.docker("rm", "-f", name, check=False)


def ip_of(host, name):
    out = host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout
    return json.loads(out)["web"]["IPAddress"]


def routes(host):
    return host.sh("ip", "-4", "route").stdout


def test_every_container_reaches_every_other_across_hosts(bed, containers):
    running = [(h, *containers(h)) for h in bed.hosts for _ in range(2)]
    for src_host, src, _ in running:
        for _, _, dst_ip in running:
            wait_for(lambda: pings(src_host, src, dst_ip), 20,
                     f"{src} on {src_host.name} to reach {dst_ip}")


def test_routes_come_from_bgp_via_the_peer_and_no_tunnel(bed, containers):
    h1, h2, h3 = bed.hosts
    name, ip = containers(h2)
    wait_for(lambda: re.search(rf"via {re.escape(h2.ip)} dev eth0 proto bird", routes(h1)), 20,
             "a BGP route on host 1 via host 2")
    got = h1.sh("ip", "route", "get", ip).stdout
    assert f"via {h2.ip} dev eth0" in got, got
    # host 2 announces its block, not a /32 per container inside it
    assert not re.search(rf"^{re.escape(ip)} via", routes(h1), re.M), routes(h1)
    assert re.search(r"^blackhole 10\.40\.\S+/26 proto bird", routes(h2), re.M), routes(h2)
    for host in bed.hosts:
        links = host.sh("ip", "-d", "link", "show").stdout
        for kind in ("vxlan", "ipip", "gre", "geneve", "wireguard", "sit"):
            assert f" {kind} " not in links, f"{kind} device on {host.name}"
        protocols = host.sh("birdc", "-s", "/run/l3net/bird.ctl", "show", "protocols").stdout
        assert protocols.count("Established") == 2, protocols
    # the operator's view of the same: every peer by address and node name
    status = json.loads(h1.sh(f"{BIN}/l3netctl", "--etcd-endpoints", bed.etcd_url, "--etcd-prefix",
                              bed.prefix, "bgp", "status", "--json").stdout)
    assert sorted((s["peer"], s["node"], s["established"]) for s in status) == [
        (h.ip, h.name, True) for h in (h2, h3)], status


def test_ip_moves_from_host1_to_host2(bed, containers):
    h1, h2, h3 = bed.hosts
    watcher, _ = containers(h3)
    moving = "10.40.250.250"
    name, _ = containers(h1, "--ip", moving)
    wait_for(lambda: pings(h3, watcher, moving), 20, "the address on host 1 from host 3")
    h1.docker("rm", "-f", name)
    containers(h2, "--ip", moving)
    start = time.monotonic()
    wait_for(lambda: pings(h3, watcher, moving), 15, "the moved address on host 2 from host 3")
    elapsed = time.monotonic() - start
    assert re.search(rf"^{re.escape(moving)} via {re.escape(h2.ip)} ", routes(h3), re.M), routes(h3)
    print(f"moved address reachable again after {elapsed:.2f}s")


def test_parallel_starts_on_all_hosts_get_unique_addresses(bed, containers):
    jobs = [h for h in bed.hosts for _ in range(5)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda h: containers(h)[1], jobs))
    assert len(set(got)) == len(got) == 15, got


def test_vanished_host_routes_withdrawn_then_restored(bed, containers):
    """A host that vanishes (its link down: no goodbye, no keepalive) loses its routes on the
    others within the BGP hold time; back, it gets them again."""
    h1, h2, h3 = bed.hosts
    name1, _ = containers(h1)
    _, ip2 = containers(h2)
    wait_for(lambda: pings(h1, name1, ip2), 20, "host 2's container from host 1")
    h2.sh("ip", "link", "set", "eth0", "down")
    try:
        hold = 9
        wait_for(lambda: h2.ip not in routes(h1) and h2.ip not in routes(h3), hold + 5,
                 "host 2's routes withdrawn on hosts 1 and 3")
        assert not pings(h1, name1, ip2)
    finally:
        h2.sh("ip", "link", "set", "eth0", "up")
        h2.sh("ip", "route", "replace", "default", "via", f"{NET}.1")
    wait_for(lambda: pings(h1, name1, ip2), 30, "host 2's container reachable again")


def test_killed_plugin_and_bird_keep_their_routes(bed, containers):
    """The plugin and its BIRD killed (a crash; a managed plugin's BIRD dies with the plugin on
    an upgrade) while the host lives: BGP graceful restart, peers keep its routes, the kernel
    keeps its own, traffic flows on; the new BIRD converges without a gap."""
    h1, h2, _ = bed.hosts
    name1, ip1 = containers(h1)
    name2, ip2 = containers(h2)
    wait_for(lambda: pings(h1, name1, ip2) and pings(h2, name2, ip1), 20, "both ways before")
    h2.kill_plugin()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert f"via {h2.ip}" in h1.sh("ip", "route", "get", ip2).stdout, "withdrawn on host 1"
        assert f"via {h1.ip}" in h2.sh("ip", "route", "get", ip1).stdout, "gone from host 2's kernel"
    wait_for(lambda: pings(h1, name1, ip2) and pings(h2, name2, ip1), 15, "traffic while BIRD is dead")
    h2.start_plugin()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert f"via {h2.ip}" in h1.sh("ip", "route", "get", ip2).stdout
        assert f"via {h1.ip}" in h2.sh("ip", "route", "get", ip1).stdout
    wait_for(lambda: h2.sh("birdc", "-s", "/run/l3net/bird.ctl", "show", "protocols",
                           check=False).stdout.count("Established") == 2, 30, "host 2's sessions up again")


def test_plugin_restart_moves_no_route(bed, containers):
    """A plugin stopped and started again (an upgrade of the host service): its BIRD stays and
    is adopted, the other hosts keep the route, and traffic flows all along."""
    h1, h2, _ = bed.hosts
    name1, _ = containers(h1)
    _, ip2 = containers(h2)
    wait_for(lambda: pings(h1, name1, ip2), 20, "host 2's container from host 1")
    bird = h2.sh("cat", "/run/l3net/bird.pid").stdout.strip()
    route = h1.sh("ip", "route", "get", ip2).stdout
    assert f"via {h2.ip}" in route, route
    h2.stop_plugin()
    deadline = time.monotonic() + 3        # the plugin down: routes and traffic as before
    while time.monotonic() < deadline:
        assert f"via {h2.ip}" in h1.sh("ip", "route", "get", ip2).stdout
    assert still_pings(h1, name1, ip2), "traffic while the plugin is down"
    started = time.time()
    h2.start_plugin()

    def synced():
        with open(os.path.join(h2.dir, "state", "status.json")) as f:
            return (json.load(f).get("last_sync") or 0) > started
    wait_for(synced, 10, "the new plugin's first sync")
    assert h2.sh("cat", "/run/l3net/bird.pid").stdout.strip() == bird, "BIRD adopted, not restarted"
    assert still_pings(h1, name1, ip2) and f"via {h2.ip}" in h1.sh("ip", "route", "get", ip2).stdout


def test_bird_that_dies_is_restarted(bed, containers):
    h1, _, h3 = bed.hosts
    name1, _ = containers(h1)
    _, ip3 = containers(h3)
    wait_for(lambda: pings(h1, name1, ip3), 20, "host 3's container from host 1")
    h3.kill_bird()
    wait_for(lambda: h3.sh("birdc", "-s", "/run/l3net/bird.ctl", "show", "protocols",
                           check=False).stdout.count("Established") == 2, 30,
             "BIRD on host 3 restarted with both sessions up")
    wait_for(lambda: pings(h1, name1, ip3), 20, "host 3's container reachable again")


ROGUE_CONF = """
router id {ip};
protocol device {{ }}
protocol static {{
  ipv4;
  route 0.0.0.0/0 blackhole;          # a default route: must not be imported
  route {underlay} blackhole;          # the hosts' own network: must not be imported
  route 10.40.99.0/24 blackhole;      # inside the pool: imported, via the router
}}
protocol bgp node1 {{
  local {ip} as 65000;
  neighbor {node_ip} as 64512;
  multihop;
  ipv4 {{ import all; export all; next hop self; }};
}}
"""


def test_router_peer_only_pool_routes_are_imported(bed, tmp_path):
    """A per-node peer (a top-of-rack router, here a BIRD in the root namespace) that
    announces a default route, the underlay and a pool prefix: only the pool prefix lands."""
    import subprocess

    h1 = bed.hosts[0]
    router_ip = f"{NET}.1"
    conf = tmp_path / "rogue.conf"
    conf.write_text(ROGUE_CONF.format(ip=router_ip, node_ip=h1.ip, underlay=f"{NET}.0/24"))
    sock = str(tmp_path / "rogue.ctl")
    rogue = subprocess.Popen(["bird", "-f", "-c", str(conf), "-s", sock],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctl = [f"{BIN}/l3netctl", "--etcd-endpoints", bed.etcd_url, "--etcd-prefix", bed.prefix]
    try:
        subprocess.run([*ctl, "bgp", "peer", "add", router_ip, "--as", "65000", "--node", h1.name,
                        "--name", "tor"], check=True, capture_output=True, timeout=30)
        wait_for(lambda: "10.40.99.0/24 via 198.18.0.1" in routes(h1), 30,
                 "the pool route from the router on host 1")
        table = routes(h1)
        assert "default via 198.18.0.1 dev eth0 proto bird" not in table, table
        assert table.count("default") == 1, table
        assert f"{NET}.0/24 via" not in table, table
    finally:
        subprocess.run([*ctl, "bgp", "peer", "remove", router_ip, "--node", h1.name],
                       capture_output=True, timeout=30)
        rogue.kill()
        rogue.wait(10)
    wait_for(lambda: "10.40.99.0/24" not in routes(h1), 30, "the router's route gone with it")


def test_dockerd_restart_with_the_legacy_plugin_up(bed, containers):
    """The plugin runs as a host service and stays up while dockerd restarts: a --restart
    always container comes back with its --ip and reaches the other hosts again."""
    h1, _, h3 = bed.hosts
    _, peer_ip = containers(h1)
    name, ip = containers(h3, "--restart", "always", "--ip", "10.40.251.7")
    wait_for(lambda: pings(h3, name, peer_ip), 20, "before the restart")
    h3.stop_dockerd()
    h3.start_dockerd()
    wait_for(lambda: h3.docker("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip()
             == "true", 60, "the container running again")
    assert ip_of(h3, name) == ip == "10.40.251.7"
    wait_for(lambda: pings(h3, name, peer_ip), 30, "its network back")
    wait_for(lambda: pings(h1, containers(h1)[0], ip), 30, "reachable from host 1 again")


def test_a_container_on_two_networks_reaches_both_across_hosts(bed, containers):
    """A container on host 1 on web and back reaches web's and back's members on host 2 (each
    from its own address there: the other network's isolation would drop anything else);
    disconnecting web leaves back intact."""
    h1, h2, _ = bed.hosts
    for host in (h1, h2):
        host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet", "10.44.0.0/24", "back")
    try:
        name, web_ip = containers(h1)
        h1.docker("network", "connect", "back", name)
        _, web_peer = containers(h2)
        back_peer = f"bp-{uuid.uuid4().hex[:6]}"
        h2.docker("run", "-d", "--name", back_peer, "--net", "back", "l3net-test/busybox", "sleep", "600")
        back_peer_ip = json.loads(h2.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                            back_peer).stdout)["back"]["IPAddress"]
        wait_for(lambda: pings(h1, name, web_peer) and pings(h1, name, back_peer_ip), 20,
                 "host 1's container on two networks to reach both peers on host 2")
        h1.docker("network", "disconnect", "web", name)
        wait_for(lambda: pings(h1, name, back_peer_ip), 10, "back after leaving web")
        assert not pings(h1, name, web_peer), "web is left: its members are out of reach"
        h1.docker("network", "connect", "web", name)
        wait_for(lambda: pings(h1, name, web_peer) and pings(h1, name, back_peer_ip), 20, "both again")
        assert web_ip
    finally:
        for host in (h1, h2):
            ids = host.docker("ps", "-aq", "--filter", "network=back").stdout.split()
            if ids:
                host.docker("rm", "-f", *ids, check=False)
            host.docker("network", "rm", "back", check=False)


def test_compose_projects_on_two_hosts_share_a_network(bed):
    """The Compose example up on host 1, a second project (its web service only) on host 2 on
    the same subnets: one network; down on both leaves no record, veth or route."""
    from tests.e2e.test_compose import HTTP_GET, compose
    from tests.testbed import TEST_IMAGE
    h1, h2, _ = bed.hosts
    env = {"L3NET_DRIVER": "l3net", "IMAGE": TEST_IMAGE, "FRONT_SUBNET": "10.45.0.0/24",
           "BACK_SUBNET": "10.45.1.0/24", "DB_ADDRESS": "10.45.1.10"}
    projects = [(h1, f"one{uuid.uuid4().hex[:4]}", ()), (h2, f"two{uuid.uuid4().hex[:4]}", ("web",))]
    links = {h.name: veth_names(h) for h in (h1, h2)}

    def web_of(host, project):
        ids = host.docker("ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                          "--filter", "label=com.docker.compose.service=web").stdout.split()
        ip = json.loads(host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", ids[0]).stdout)
        return ids[0], ip[f"{project}_front"]["IPAddress"]
    try:
        for host, project, services in projects:
            compose(project, "up", "-d", *services, env={**env, "DOCKER_HOST": host.docker_host})
        (web1, ip1), (web2, ip2) = web_of(h1, projects[0][1]), web_of(h2, projects[1][1])
        for host, c, ip in ((h1, web1, ip2), (h2, web2, ip1)):
            wait_for(lambda: "web-ok" in host.docker("exec", c, "sh", "-c", HTTP_GET.format(ip),
                                                    check=False).stdout, 20, f"{c} -> web at {ip}")
    finally:
        for host, project, _ in projects:
            compose(project, "down", "--timeout", "0", env={**env, "DOCKER_HOST": host.docker_host}, check=False)
    for host in (h1, h2):
        wait_for(lambda: not veth_names(host) - links[host.name], 10, f"{host.name}'s veths removed")
        wait_for(lambda: "10.45." not in routes(host), 10, f"{host.name}'s routes to the example's pools gone")
    ctl = [f"{BIN}/l3netctl", "--etcd-endpoints", bed.etcd_url, "--etcd-prefix", bed.prefix]
    import subprocess
    pools = subprocess.run([*ctl, "pool", "list", "--json"], capture_output=True, text=True, timeout=30)
    assert "10.45." not in pools.stdout, "the example's pools forgotten once no network uses them"
