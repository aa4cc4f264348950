"""``make bench`` (network part): cross-host container throughput, packet rate and latency of
l3net against baselines built in the same run between the same two simulated hosts.

Paths, all between host 1 and host 2 of a 2-host test bed (tests/testbed.py):
  (a) underlay      host to host, no container: the ceiling of the machine
  (b) routed        hand-built: a namespace per side, veth, /32, proxy ARP, static routes, no
                    filtering: the limit for any veth-based container network
  (c) vxlan         an overlay: namespaces on a bridge with a VXLAN device per host
                    (what flannel or Docker overlay do)
  (d) docker-nat    Docker without an overlay: a --net bridge container reaching a port
                    published (-p) by a --net bridge container on the other host
  (e) l3net         containers on an l3net network on each host
  (e1) l3net with the agents paused (SIGSTOP; BIRD runs on): the data path alone, without the
                    CPU the agents take on this 2-core machine
  (e0) (e1) without the rules that close the attacker's doors of issue 10 (pool sources only
                    from their veth, the uplinks, or where the routes say they live; the
                    protected-destination drop): (e1)/(e0) is what those rules cost, in one run
  (c2) vxlan, across the router: (c) between host 1 and host 3, which is on another L2
                    segment behind a router namespace (tests/testbed.py ``remote``)
  (f) l3net VXLAN   containers of host 1 and host 3 on an l3net network whose pool is
                    encap=cross-subnet: through the tunnel and the router
Tools run in the right namespace with nsenter: the host's iperf3 and ping. (e) goes through
l3net's policy (conntrack, ipset membership, anti-spoofing), like every l3net container.
Also measured: how long a new container's route takes to reach the other host, how long a
new container takes to be reachable from the other host (route and ipset membership), and how
long a policy takes to be in force on the other host.
"""

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.testbed import Testbed, run, wait_until  # noqa: E402

RUNS = int(os.environ.get("L3NET_BENCH_RUNS", "7"))
# L3NET_BENCH_ONLY=l3net: only the l3net paths (e), (e1), (e0), for a tighter look at the
# cost of the issue-10 rules with more rounds in the same time.
# L3NET_BENCH_ONLY=vxlan: only (c), (e) and (f), the encapsulation's cost.
ONLY_L3NET = os.environ.get("L3NET_BENCH_ONLY") == "l3net"
ONLY_VXLAN = os.environ.get("L3NET_BENCH_ONLY") == "vxlan"
VXLAN = "(f) l3net cross-subnet VXLAN"
ACROSS = "(c2) VXLAN overlay across the router"
SECONDS = int(os.environ.get("L3NET_BENCH_SECONDS", "5"))


class Endpoint:
    """Somewhere to run a tool: a command prefix that enters the namespace."""

    def __init__(self, prefix, ip, port=None, ping_ip=None):
        self.prefix, self.ip, self.port, self.ping_ip = prefix, ip, port, ping_ip

    def run(self, *args, timeout=60, check=True):
        return run(*self.prefix, *args, timeout=timeout, check=check)

    def popen(self, *args):
        return subprocess.Popen([*self.prefix, *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def netns_of_pid(pid):
    return ["nsenter", "-t", str(pid), "-n"]


def measure_all(paths, around=None):
    """{name: (TCP Gbit/s, UDP 64-byte delivered kpps, RTT ms)}, medians over RUNS rounds.
    Rounds are interleaved across paths, in alternating order, so slow drifts of the machine
    and the order of measurement hit every path alike.
    ``around``: {name: context manager factory} entered around each measurement of that path."""
    around = around or {}
    servers = []
    try:
        for port, (client, server) in enumerate(paths.values(), start=5301):
            servers.append(server.popen("iperf3", "-s", "-p", str(server.port or port)))
        for port, (client, server) in enumerate(paths.values(), start=5301):
            port = server.port or port
            wait_until(lambda: client.run("iperf3", "-c", server.ip, "-p", str(port), "-n", "1K",
                                          timeout=10, check=False).returncode == 0, 15, "iperf3 server")
        tcp = {name: [] for name in paths}
        udp = {name: [] for name in paths}
        ports = {name: str(server.port or port) for port, (name, (_, server)) in enumerate(paths.items(), start=5301)}
        for round_ in range(RUNS):
            # every other round in reverse order: no path always runs right after another's
            # pause or resume, or always first after a warm-up
            order = list(paths.items()) if round_ % 2 == 0 else list(reversed(paths.items()))
            for name, (client, server) in order:
                port = ports[name]
                with around.get(name, contextlib.nullcontext)():
                    out = json.loads(client.run("iperf3", "-c", server.ip, "-p", port, "-t", str(SECONDS),
                                                "-J", timeout=SECONDS + 30).stdout)
                    tcp[name].append(out["end"]["sum_received"]["bits_per_second"] / 1e9)
                    out = json.loads(client.run("iperf3", "-c", server.ip, "-p", port, "-u", "-b", "0",
                                                "-l", "64", "-t", str(SECONDS), "-J",
                                                timeout=SECONDS + 30).stdout)
                total = out["end"]["sum"]
                udp[name].append((total["packets"] - total["lost_packets"]) / total["seconds"] / 1000)
    finally:
        for srv in servers:
            srv.kill()
            srv.wait(10)
    results = {}
    for name, (client, server) in paths.items():
        with around.get(name, contextlib.nullcontext)():
            ping = client.run("ping", "-c", "50", "-i", "0.01", "-q", server.ping_ip or server.ip,
                              timeout=30).stdout
        rtt = float(ping.split("rtt")[1].split("=")[1].split("/")[1])
        results[name] = (statistics.median(tcp[name]), statistics.median(udp[name]), rtt)
    return results


# The issue-10 rules on the data path, as iptables prints them (taken out for path (e0)).
NEWEST_RULES = [
    ("raw", "L3NET-PREROUTING", ["!", "-i", "l3h+", "-m", "set", "--match-set", "l3n-pools", "src", "-m",
                                 "rpfilter", "--invert", "-m", "comment", "--comment",
                                 "pool source on a foreign interface", "-j", "DROP"]),
    ("filter", "L3NET-FROM-CONTAINER", ["-m", "set", "--match-set", "l3n-protected", "dst", "-m", "comment",
                                        "--comment", "protected", "-j", "DROP"]),
    ("raw", "L3NET-PREROUTING", ["-i", "eth0", "-m", "comment", "--comment", "uplink", "-j", "RETURN"])]


@contextlib.contextmanager
def without_newest_rules(bed, remove=True):
    """Pause every host's plugin (SIGSTOP: its agent would repair the "drift" at once; BIRD,
    a process of its own, keeps running), take NEWEST_RULES out (unless not ``remove``: then
    only the agents' own CPU is out of the picture), yield; then let the agents go on and
    wait until they have put the rules back."""
    paused = []
    for host in bed.hosts:
        pids = [host.plugin.pid] + [int(p) for p in run("pgrep", "-P", str(host.plugin.pid),
                                                         check=False).stdout.split()]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            paused.append(pid)
    try:
        for host in bed.hosts:
            for table, chain, spec in NEWEST_RULES if remove else ():
                host.sh("iptables", "-w", "5", "-t", table, "-D", chain, *spec)
        yield
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
    def printed(comment):
        return f'--comment "{comment}" -j' if " " in comment else f"--comment {comment} -j"
    for host in bed.hosts:
        wait_until(lambda: all(printed(spec[-3]) in host.sh("iptables-save", "-t", table).stdout
                               for table, _, spec in NEWEST_RULES), 15, f"the rules back on {host.name}")


def docker_dns_nat(ns):
    """The NAT rules dockerd puts in every container of a user-defined network (its embedded
    DNS at 127.0.0.11): they make the kernel track connections inside the namespace."""
    n = ["ip", "netns", "exec", ns, "iptables", "-t", "nat"]
    run(*n, "-N", "DOCKER_OUTPUT")
    run(*n, "-A", "OUTPUT", "-d", "127.0.0.11/32", "-j", "DOCKER_OUTPUT")
    run(*n, "-A", "DOCKER_OUTPUT", "-d", "127.0.0.11/32", "-p", "udp", "--dport", "53",
        "-j", "DNAT", "--to-destination", "127.0.0.11:5353")


def wired_ns(host, ns):
    """A namespace ``ns`` (made from the root) with ``eth0``, the other end of its veth in
    ``host``. Returns (host side name, ``ip -n ns`` prefix)."""
    run("ip", "netns", "add", ns)
    hv, cv = f"h{ns}"[:15], f"c{ns}"[:15]
    run("ip", "link", "add", hv, "type", "veth", "peer", "name", cv)
    run("ip", "link", "set", cv, "netns", ns)
    run("ip", "link", "set", hv, "netns", str(host.anchor.pid))
    n = ["ip", "-n", ns]
    run(*n, "link", "set", cv, "name", "eth0")
    run(*n, "link", "set", "lo", "up")
    return hv, n


def veth_ns(host, ns, address, gw_routes):
    """A namespace wired into ``host`` like a container of any routed network: /32, proxy ARP."""
    hv, n = wired_ns(host, ns)
    run(*n, "addr", "add", f"{address}/32", "dev", "eth0")
    run(*n, "link", "set", "eth0", "up")
    run(*n, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    run(*n, "route", "add", "default", "via", "169.254.1.1")
    host.sh("ip", "link", "set", hv, "up")
    host.sh("sysctl", "-qw", f"net.ipv4.conf.{hv}.proxy_arp=1", f"net.ipv4.neigh.{hv}.proxy_delay=0")
    host.sh("ip", "route", "add", f"{address}/32", "dev", hv)
    for dst, via in gw_routes:
        host.sh("ip", "route", "add", dst, "via", via)
    # dockerd's FORWARD policy is DROP: the hand-built path gets its own accept, no filtering.
    host.sh("iptables", "-I", "FORWARD", "-i", hv, "-j", "ACCEPT")
    host.sh("iptables", "-I", "FORWARD", "-o", hv, "-j", "ACCEPT")
    return Endpoint(["ip", "netns", "exec", ns], address)


def vxlan_ns(host, peer, ns, address, vni=42):
    """A namespace on a bridge with a VXLAN device towards ``peer``: a flannel-style overlay
    (device vx<vni>, bridge brvx<vni>)."""
    dev, bridge = f"vx{vni}", f"brvx{vni}"
    hv, n = wired_ns(host, ns)
    run(*n, "link", "set", "eth0", "mtu", "1450")
    run(*n, "addr", "add", f"{address}/24", "dev", "eth0")
    run(*n, "link", "set", "eth0", "up")
    host.sh("ip", "link", "add", bridge, "type", "bridge")
    host.sh("ip", "link", "add", dev, "type", "vxlan", "id", str(vni), "local", host.ip,
            "remote", peer.ip, "dstport", "4789")
    for link in (dev, hv):
        host.sh("ip", "link", "set", link, "master", bridge, "up")
    host.sh("ip", "link", "set", bridge, "up")
    host.sh("iptables", "-I", "FORWARD", "-i", bridge, "-j", "ACCEPT")
    return Endpoint(["ip", "netns", "exec", ns], address)


def container_endpoint(host, name, network):
    info = json.loads(host.docker("inspect", name).stdout)[0]
    ip = info["NetworkSettings"]["Networks"][network]["IPAddress"]
    return Endpoint(netns_of_pid(info["State"]["Pid"]), ip)


def route_propagation(h1, h2, rounds=5):
    """Seconds from `docker run --ip X` on host 2 (X outside its blocks: a new /32 route) until
    host 1 has a route to X; median."""
    times = []
    for i in range(rounds):
        ip = f"10.41.{200 + i}.{10 + i}"
        name = f"prop-{uuid.uuid4().hex[:6]}"
        start = time.monotonic()
        h2.docker("run", "-d", "--name", name, "--net", "l3bench", "--ip", ip,
                  "l3net-test/busybox", "sleep", "600")
        wait_until(lambda: f"via {h2.ip} " in h1.sh("ip", "route", "get", ip).stdout, 30,
                   f"route to {ip} on host 1", interval=0.02)
        times.append(time.monotonic() - start)
        h2.docker("rm", "-f", name)
    return statistics.median(times)


PROBER = r"""
import socket, sys, time
ip, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
print("ready", flush=True)
while time.monotonic() < deadline:
    try:
        socket.create_connection((ip, port), 0.05).close()
        print(time.monotonic(), flush=True)
        sys.exit(0)
    except OSError:
        time.sleep(0.01)
sys.exit(1)
"""


def time_until_reachable(client, ip, port, action, timeout=15):
    """(seconds from the start, from the end of ``action()``) until a TCP connection from
    ``client`` to ip:port succeeds (tried every 10 ms, 50 ms each, by a prober started before
    the action)."""
    proc = subprocess.Popen([*client.prefix, sys.executable, "-c", PROBER, ip, str(port), str(timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            text=True)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("prober did not start")
    start = time.monotonic()
    action()
    end = time.monotonic()
    out, _ = proc.communicate(timeout=timeout + 5)
    if proc.returncode != 0:
        raise RuntimeError(f"{ip}:{port} not reachable within {timeout}s")
    return float(out.strip()) - start, float(out.strip()) - end


def connects(client, ip, port):
    return client.run(sys.executable, "-c", f"import socket; socket.create_connection(('{ip}', {port}), 0.2)",
                      timeout=10, check=False).returncode == 0


def policy_timings(bed, a, rounds=5):
    """(new container reachable after docker run, policy in force after l3netctl): medians.
    ``a`` is the l3net container on host 1; the targets run on host 2."""
    h1, h2 = bed.hosts[:2]
    reachable = []
    for i in range(rounds):
        ip, name = f"10.41.210.{10 + i}", f"new-{uuid.uuid4().hex[:6]}"
        reachable.append(time_until_reachable(a, ip, 80, lambda: h2.docker(
            "run", "-d", "--name", name, "--net", "l3bench", "--ip", ip, "l3net-test/busybox",
            "nc", "-ll", "-p", "80", "-e", "/bin/echo", "ok"))[1])
        h2.docker("rm", "-f", name)
    h2.docker("run", "-d", "--name", "l3db", "--net", "l3bench2", "l3net-test/busybox",
              "nc", "-ll", "-p", "5432", "-e", "/bin/echo", "ok")
    db = container_endpoint(h2, "l3db", "l3bench2")
    ctl = [os.path.join(os.path.dirname(sys.executable), "l3netctl"), "--etcd-endpoints", bed.etcd_url,
           "--etcd-prefix", bed.prefix]
    in_force, rule = [], []
    for _ in range(rounds):
        wait_until(lambda: not connects(a, db.ip, 5432), 10, "db closed to web")
        in_force.append(time_until_reachable(a, db.ip, 5432, lambda: rule.append(run(
            *ctl, "policy", "allow", "--from", "10.41.0.0/16", "--to", "10.42.0.0/16", "--proto", "tcp",
            "--port", "5432").stdout.split()[-1]))[0])
        run(*ctl, "policy", "remove", rule[-1])
    return statistics.median(reachable), statistics.median(in_force)


PAUSED = "(e1) l3net, agents paused"
WITHOUT = "(e0) (e1) without issue-10 rules"


def main():
    # host 3 sits on a second segment behind a router: the cross-subnet paths (c2) and (f)
    bed = Testbed(3, prefix=f"/l3bench-{uuid.uuid4().hex[:6]}", remote={3}, remote_net="198.18.31")
    namespaces = ["rt1", "rt2", "rd1", "rd2", "vx1", "vx2", "vy1", "vy3"]
    paths = {}
    try:
        bed.up()
        h1, h2, h3 = bed.hosts
        paths["(a) underlay host-host"] = (Endpoint(h1.nsenter()[:3] + ["-n"], h1.ip),
                                           Endpoint(h2.nsenter()[:3] + ["-n"], h2.ip))
        paths["(b) hand-built routed veth"] = (
            veth_ns(h1, "rt1", "10.97.1.1", [("10.97.2.1/32", h2.ip)]),
            veth_ns(h2, "rt2", "10.97.2.1", [("10.97.1.1/32", h1.ip)]))
        paths["(b') (b) + Docker's DNS NAT rules"] = (
            veth_ns(h1, "rd1", "10.97.3.1", [("10.97.4.1/32", h2.ip)]),
            veth_ns(h2, "rd2", "10.97.4.1", [("10.97.3.1/32", h1.ip)]))
        docker_dns_nat("rd1")
        docker_dns_nat("rd2")
        paths["(c) VXLAN overlay"] = (vxlan_ns(h1, h2, "vx1", "10.96.0.1"),
                                      vxlan_ns(h2, h1, "vx2", "10.96.0.2"))
        paths[ACROSS] = (vxlan_ns(h1, h3, "vy1", "10.95.0.1", vni=43), vxlan_ns(h3, h1, "vy3", "10.95.0.3", vni=43))
        h2.docker("run", "-d", "--name", "natsrv", "-p", "5202:5202", "-p", "5202:5202/udp",
                  "l3net-test/busybox", "sleep", "3600")
        h1.docker("run", "-d", "--name", "natcli", "l3net-test/busybox", "sleep", "3600")
        srv = container_endpoint(h2, "natsrv", "bridge")
        paths["(d) docker bridge + -p (NAT)"] = (container_endpoint(h1, "natcli", "bridge"),
                                                 Endpoint(srv.prefix, h2.ip, port=5202))
        for host in bed.hosts[:2]:
            host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net",
                        "--subnet", "10.41.0.0/16", "l3bench")
            host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net",
                        "--subnet", "10.42.0.0/16", "l3bench2")
            host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net",
                        "--subnet", "10.43.0.0/16", "--ipam-opt", "encap=cross-subnet", "l3benchvx")
        h1.docker("run", "-d", "--name", "l3a", "--net", "l3bench", "l3net-test/busybox", "sleep", "3600")
        h2.docker("run", "-d", "--name", "l3b", "--net", "l3bench", "l3net-test/busybox", "sleep", "3600")
        a, b = container_endpoint(h1, "l3a", "l3bench"), container_endpoint(h2, "l3b", "l3bench")
        wait_until(lambda: a.run("ping", "-c1", "-W1", b.ip, timeout=5).returncode == 0, 30, "l3net path")
        paths["(e) l3net"] = (a, b)
        paths[PAUSED] = (a, Endpoint(b.prefix, b.ip))
        paths[WITHOUT] = (a, Endpoint(b.prefix, b.ip))
        h1.docker("run", "-d", "--name", "l3vxa", "--net", "l3benchvx", "l3net-test/busybox", "sleep", "3600")
        h3.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net",
                  "--subnet", "10.43.0.0/16", "--ipam-opt", "encap=cross-subnet", "l3benchvx")
        h3.docker("run", "-d", "--name", "l3vxb", "--net", "l3benchvx", "l3net-test/busybox", "sleep", "3600")
        va, vb = container_endpoint(h1, "l3vxa", "l3benchvx"), container_endpoint(h3, "l3vxb", "l3benchvx")
        wait_until(lambda: va.run("ping", "-c1", "-W1", vb.ip, timeout=5).returncode == 0, 30, "l3net VXLAN path")
        assert "l3vxlan" in h1.sh("ip", "route", "get", vb.ip).stdout, "the encapsulated path is not tunnelled"
        paths[VXLAN] = (va, vb)
        if ONLY_L3NET:
            paths = {k: v for k, v in paths.items() if k.startswith("(e")}
        if ONLY_VXLAN:
            paths = {k: v for k, v in paths.items() if k.startswith(("(c", "(e) ", "(f)"))}
        results = measure_all(paths, {PAUSED: lambda: without_newest_rules(bed, remove=False),
                                      WITHOUT: lambda: without_newest_rules(bed)})
        if ONLY_VXLAN:
            propagation = reachable = in_force = 0.0
        else:
            propagation = route_propagation(h1, h2)
            reachable, in_force = policy_timings(bed, a)
    finally:
        for ns in namespaces:
            run("ip", "netns", "del", ns, check=False)
        bed.cleanup()

    l3 = results["(e) l3net"]
    base = results.get("(b) hand-built routed veth", l3)
    print(f"\nl3net network bench: {RUNS} interleaved rounds x {SECONDS}s per figure, medians; "
          "host 1 -> host 2")
    print(f"  {'path':36s} {'TCP Gbit/s':>10s} {'64B UDP kpps':>13s} {'RTT ms':>8s}   l3net/this: TCP  pps")
    for name, (tcp, pps, rtt) in results.items():
        print(f"  {name:36s} {tcp:10.2f} {pps:13.1f} {rtt:8.3f}   {l3[0] / tcp:15.2f}x {l3[1] / pps:4.2f}x")
    if VXLAN in results and ACROSS in results:
        vx, hand = results[VXLAN], results[ACROSS]
        print(f"  l3net cross-subnet VXLAN (f) / hand-built VXLAN across the router (c2): TCP {vx[0] / hand[0]:.2f}x, "
              f"64B pps {vx[1] / hand[1]:.2f}x; / l3net routed within a segment (e): TCP {vx[0] / l3[0]:.2f}x, "
              f"64B pps {vx[1] / l3[1]:.2f}x")
    if ONLY_VXLAN:
        return 0
    l3_1, l3_0 = results[PAUSED], results[WITHOUT]
    print(f"  the issue-10 rules' cost, (e1)/(e0): TCP {l3_1[0] / l3_0[0]:.3f}x, 64B pps {l3_1[1] / l3_0[1]:.3f}x "
          f"(goal >= 0.99x): {'OK' if l3_1[0] >= 0.99 * l3_0[0] and l3_1[1] >= 0.99 * l3_0[1] else 'MISSED'}")
    over = all(l3[i] > results.get(k, (0, 0))[i] for k in ("(c) VXLAN overlay", "(d) docker bridge + -p (NAT)")
               for i in (0, 1))
    print(f"  goals vs (b): TCP >= 0.95x: {'OK' if l3[0] >= 0.95 * base[0] else 'MISSED'}, "
          f"64B pps >= 0.90x: {'OK' if l3[1] >= 0.90 * base[1] else 'MISSED'}; "
          f"above (c) and (d) on both: {'OK' if over else 'MISSED'}")
    print(f"  new container's route on the other host after (median of 5): {propagation:.2f}s "
          f"(goal < 2s) {'OK' if propagation < 2 else 'MISSED'}")
    print(f"  new container on host 2 reachable from host 1 after docker run returns (median of 5): "
          f"{reachable:.2f}s (goal < 2s) {'OK' if reachable < 2 else 'MISSED'}")
    print(f"  policy in force on host 2 after l3netctl starts (median of 5, including the CLI's "
          f"own start-up): {in_force:.2f}s "
          f"(goal < 2s) {'OK' if in_force < 2 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
