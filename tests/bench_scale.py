"""``make bench-scale``: how l3net scales with hosts and endpoints, on one machine.

No dockerd anywhere: each simulated host (tests/testbed.py with ``dockerd=False``: a network
namespace and a private mount namespace, its own l3net-plugin and BIRD, one shared etcd) has
its plugin socket driven the way dockerd drives it (docs/protocol.md):

  * handshake: Plugin.Activate, both GetCapabilities, GetDefaultAddressSpaces;
  * ``docker network create --subnet S`` on every host (one l3net network spans the hosts
    that created it): RequestPool (its answer names the gateway, so no gateway RequestAddress)
    then CreateNetwork;
  * ``docker run``: RequestAddress, CreateEndpoint, Join, ProgramExternalConnectivity,
    EndpointOperInfo, then what dockerd does with the Join answer: the veth peer it names is
    moved from the host's namespace into a fresh "container" namespace (``l3scc-<host>-<i>``),
    renamed DstPrefix+0, given its MAC and the IPAM address, the static routes and the default
    route via the gateway, brought up;
  * ``docker rm``: RevokeExternalConnectivity, Leave, the interface renamed back and moved to the
    host, the namespace deleted, DeleteEndpoint, ReleaseAddress; ``docker network rm``:
    ReleaseAddress (gateway), ReleasePool, DeleteNetwork.
Set-ups run ``L3NET_SCALE_PARALLEL`` at a time across the cluster (dockerd calls in parallel
for parallel runs); each endpoint's set-up is timed on its own (plugin calls alone, and with
the namespace work: ``docker run``'s network part).

Parts (each on a fresh test bed, torn down at the end, also after a failure):

  1. a cluster per N in ``L3NET_SCALE_N`` (default 3,10,20), ``L3NET_SCALE_M`` endpoints per
     host (default 100): set-up latency; time from the end of a new endpoint's set-up on host 1
     until it answers pings from a container on host 2 (and, apart, the same when the pings
     arrive while it is being set up); time from the start of ``l3netctl policy allow --from A
     --to B`` until a container of network A reaches one of B on every host (B's endpoint on
     host i pinged from A's on host i+1); after the cluster settled (``L3NET_SCALE_SETTLE`` s),
     over ``L3NET_SCALE_IDLE`` s: etcd bytes sent per second per host (etcd's own
     ``etcd_network_client_grpc_sent_bytes_total``, all clients), plugin and BIRD CPU and RSS;
     then the etcd bytes one endpoint start costs per host (``L3NET_SCALE_STARTS`` starts in a
     window as long as the idle one, its idle traffic taken off); BGP routes and iptables rules
     per host; teardown and what it leaves. Keep ``L3NET_SCALE_IDLE`` a multiple of the
     plugin's sweep period (30 s): each host's sweep reads its endpoint records, a burst that
     shorter windows catch or miss;
  2. one host, ``L3NET_SCALE_ONE_HOST`` endpoints (default 2000; 0 skips): set-up p95 of the
     first hundred against the last, iptables rules and RSS as endpoints are added, and what
     teardown leaves (veths, routes, etcd records and allocations);
  3. agent-only (``L3NET_SCALE_AGENTS`` agents, default 100; 0 skips): the agents (the etcd-
     following half of a node) without BIRD and firewall, many per process, each with its own
     etcd connection, beside one real plugin (``--no-bgp``) whose endpoint starts they all
     follow: idle etcd bytes per agent, bytes per endpoint start per agent, agent CPU.

Results are printed as tables and written as JSON to ``L3NET_BENCH_SCALE_OUT``
(default /tmp/bench-scale.json). Other knobs: ``L3NET_SCALE_PARALLEL`` (set-ups in flight, 4),
``L3NET_SCALE_ROUNDS`` (reachability rounds, 5), ``L3NET_SCALE_POLICY_ROUNDS`` (3),
``L3NET_SCALE_AGENTS_PER_PROC`` (25). The default run should take about 20 minutes on 2 cores
(estimated from small runs). Tags: ``l3sc`` (underlay 198.18.14.0/24, etcd port 23900) and
``l3sa`` for the agent-only bed (198.18.16.0/24, port 23920).
"""

import json
import math
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.conftest import UnixHTTPConnection  # noqa: E402
from tests.testbed import Testbed, _descendants, run, wait_until  # noqa: E402


def _env_list(name, default):
    return [int(x) for x in os.environ.get(name, default).replace(" ", "").split(",") if x]


NS = _env_list("L3NET_SCALE_N", "3,10,20")
M = int(os.environ.get("L3NET_SCALE_M", "100"))
ONE_HOST = int(os.environ.get("L3NET_SCALE_ONE_HOST", "2000"))
AGENTS = int(os.environ.get("L3NET_SCALE_AGENTS", "100"))
IDLE = float(os.environ.get("L3NET_SCALE_IDLE", "30"))
SETTLE = float(os.environ.get("L3NET_SCALE_SETTLE", "15"))
PARALLEL = int(os.environ.get("L3NET_SCALE_PARALLEL", "4"))
STARTS = int(os.environ.get("L3NET_SCALE_STARTS", "10"))
ROUNDS = int(os.environ.get("L3NET_SCALE_ROUNDS", "5"))            # reachability rounds
POLICY_ROUNDS = int(os.environ.get("L3NET_SCALE_POLICY_ROUNDS", "3"))
AGENTS_PER_PROC = int(os.environ.get("L3NET_SCALE_AGENTS_PER_PROC", "25"))
OUT = os.environ.get("L3NET_BENCH_SCALE_OUT", "/tmp/bench-scale.json")

TAG, NET, PORT = "l3sc", "198.18.14", 23900
AGENT_TAG, AGENT_NET, AGENT_PORT = "l3sa", "198.18.16", 23920
NET_A, NET_B = "10.60.0.0/16", "10.61.0.0/16"       # the bench's networks (pools)
CTL = os.path.join(os.path.dirname(sys.executable), "l3netctl")
TICK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()


def say(text):
    print(f"[{time.monotonic() - T0:7.1f}s] {text}", flush=True)


def pct(values, q):
    """The q-th percentile (nearest rank) of ``values``; None for none."""
    if not values:
        return None
    xs = sorted(values)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]


def poll(predicate, timeout, interval=0.2):
    """Like wait_until, but answers whether it came true instead of raising."""
    try:
        wait_until(predicate, timeout, "", interval)
        return True
    except RuntimeError:
        return False


# ----------------------------------------------------------------- the plugin's socket
class PluginError(RuntimeError):
    pass


class Docker:
    """What one host's dockerd would do with its l3net plugin (docs/protocol.md), no dockerd."""

    def __init__(self, host):
        self.host = host
        self.sock = f"/proc/{host.anchor.pid}/root/run/docker/plugins/l3net.sock"
        self.networks = {}          # subnet -> {"id", "pool_id", "subnet"}
        self.endpoints = []         # live Endpoints of this host
        self.b_endpoint = None      # its endpoint on network B (policy measurement)
        self.lock = threading.Lock()
        self.counter = 0

    def call(self, method, body=None, timeout=60):
        # dockerd: no Content-Type, an empty body for argument-less calls
        data = b"" if body is None else json.dumps(body).encode()
        conn = UnixHTTPConnection(self.sock, timeout)
        try:
            conn.request("POST", f"/{method}", body=data)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
        if resp.status != 200 or not isinstance(answer, dict):
            err = answer.get("Err") if isinstance(answer, dict) else raw[:200]
            raise PluginError(f"{self.host.name}: {method}: HTTP {resp.status}: {err}")
        return answer

    def handshake(self):
        assert "NetworkDriver" in self.call("Plugin.Activate")["Implements"]
        self.call("NetworkDriver.GetCapabilities")
        self.call("IpamDriver.GetCapabilities")
        self.call("IpamDriver.GetDefaultAddressSpaces")

    def create_network(self, subnet):
        """``docker network create -d l3net --ipam-driver l3net --subnet S`` on this host."""
        pool = self.call("IpamDriver.RequestPool", {"AddressSpace": "l3net", "Pool": subnet, "SubPool": "",
                                                    "Options": {}, "V6": False})
        gateway = (pool.get("Data") or {}).get("com.docker.network.gateway")
        if gateway is None:     # (l3net names one; dockerd would ask otherwise)
            gateway = self.call("IpamDriver.RequestAddress", {
                "PoolID": pool["PoolID"], "Address": "",
                "Options": {"RequestAddressType": "com.docker.network.gateway"}})["Address"]
        network = {"id": secrets.token_hex(32), "pool_id": pool["PoolID"], "subnet": pool["Pool"],
                   "gateway": gateway}
        self.call("NetworkDriver.CreateNetwork", {
            "NetworkID": network["id"],
            "Options": {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": {}},
            "IPv4Data": [{"AddressSpace": "l3net", "Pool": pool["Pool"], "Gateway": gateway,
                          "AuxAddresses": None}],
            "IPv6Data": []})
        self.networks[subnet] = network
        return network

    def delete_network(self, subnet):
        """``docker network rm``: the IPAM releases, then DeleteNetwork."""
        network = self.networks.pop(subnet)
        self.call("IpamDriver.ReleaseAddress", {"PoolID": network["pool_id"],
                                                "Address": network["gateway"].split("/")[0]})
        self.call("IpamDriver.ReleasePool", {"PoolID": network["pool_id"]})
        self.call("NetworkDriver.DeleteNetwork", {"NetworkID": network["id"]})

    def run(self, subnet, ns_prefix, on_address=None):
        """``docker run --net <network>``'s network part. Returns the Endpoint (with its
        timings: plugin calls alone, and all of it). ``on_address(ip)``: called once the
        address is known (its time is not counted)."""
        network = self.networks[subnet]
        with self.lock:
            self.counter += 1
            ns = f"{ns_prefix}-{self.host.index}-{self.counter}"
        start = time.monotonic()
        address = self.call("IpamDriver.RequestAddress", {"PoolID": network["pool_id"], "Address": "",
                                                          "Options": {}})["Address"]
        ep = Endpoint(self, network, secrets.token_hex(32), address, ns)
        if on_address is not None:
            hook = time.monotonic()
            on_address(ep.ip)
            start += time.monotonic() - hook
        ep.started = start
        opts = {"com.docker.network.endpoint.exposedports": [], "com.docker.network.portmap": []}
        try:
            answer = self.call("NetworkDriver.CreateEndpoint", {
                "NetworkID": network["id"], "EndpointID": ep.id,
                "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": ""}, "Options": opts})
        except Exception:
            self.call("IpamDriver.ReleaseAddress", {"PoolID": network["pool_id"], "Address": ep.ip})
            raise
        ep.created = True
        with self.lock:
            self.endpoints.append(ep)       # from now on, teardown removes it
        ep.mac = ((answer.get("Interface") or {}).get("MacAddress"))
        join = self.call("NetworkDriver.Join", {"NetworkID": network["id"], "EndpointID": ep.id,
                                                "SandboxKey": f"/var/run/docker/netns/{ns}", "Options": {}})
        self.call("NetworkDriver.ProgramExternalConnectivity", {"NetworkID": network["id"],
                                                                "EndpointID": ep.id, "Options": opts})
        self.call("NetworkDriver.EndpointOperInfo", {"NetworkID": network["id"], "EndpointID": ep.id})
        ep.t_plugin = time.monotonic() - start
        ep.src = join["InterfaceName"]["SrcName"]
        ep.plumb(join)
        ep.t_total = time.monotonic() - start
        return ep


class Endpoint:
    def __init__(self, docker, network, endpoint_id, address, ns):
        self.docker, self.network, self.id, self.address, self.ns = docker, network, endpoint_id, address, ns
        self.ip = address.split("/")[0]
        self.mac = self.src = None
        self.created = self.joined = self.moved = False
        self.t_plugin = self.t_total = self.started = None

    def plumb(self, join):
        """What dockerd does with the Join answer: the interface into the container's
        namespace, named, addressed and routed."""
        host = self.docker.host
        run("ip", "netns", "add", self.ns)
        _NAMESPACES.add(self.ns)
        self.joined = True
        run("ip", "-n", host.name, "link", "set", "dev", self.src, "netns", self.ns)
        self.moved = True
        dev = join["InterfaceName"]["DstPrefix"] + "0"
        lines = [f"link set dev {self.src} name {dev}"]
        if self.mac:
            lines.append(f"link set dev {dev} address {self.mac}")
        lines += [f"addr add {self.address} dev {dev}", f"link set dev {dev} up", "link set dev lo up"]
        for route in join.get("StaticRoutes") or []:
            if route.get("RouteType") == 1:
                lines.append(f"route add {route['Destination']} dev {dev} scope link")
            else:
                lines.append(f"route add {route['Destination']} via {route['NextHop']} dev {dev}")
        if join.get("Gateway"):
            lines.append(f"route add default via {join['Gateway']} dev {dev}")
        run("ip", "-n", self.ns, "-batch", "-", input="\n".join(lines) + "\n")

    def remove(self):
        """``docker rm -f``: dockerd's order."""
        d, net = self.docker, self.network
        ids = {"NetworkID": net["id"], "EndpointID": self.id}
        if self.created:
            d.call("NetworkDriver.RevokeExternalConnectivity", ids)
            d.call("NetworkDriver.Leave", ids)
        if self.moved:      # the interface back to the host, under its old name
            run("ip", "-n", self.ns, "-batch", "-", check=False,
                input=f"link set dev eth0 down\nlink set dev eth0 name {self.src}\n"
                      f"link set dev {self.src} netns {d.host.name}\n")
        if self.joined:
            run("ip", "netns", "del", self.ns, check=False)
            _NAMESPACES.discard(self.ns)
        if self.created:
            d.call("NetworkDriver.DeleteEndpoint", ids)
        d.call("IpamDriver.ReleaseAddress", {"PoolID": net["pool_id"], "Address": self.ip})
        with d.lock:
            if self in d.endpoints:
                d.endpoints.remove(self)


_NAMESPACES = set()         # container namespaces this run made (deleted at the end whatever happens)
_PROCS = set()              # helper processes (probers, agent workers)


def run_many(fn, items, parallel=PARALLEL, progress=None):
    """``fn`` over ``items``, ``parallel`` at a time; results in order. ``progress``: a label,
    to say how far it got every 500 items."""
    items = list(items)
    done, lock = [0], threading.Lock()

    def one(item):
        out = fn(item)
        if progress:
            with lock:
                done[0] += 1
                if done[0] % 500 == 0 and done[0] < len(items):
                    say(f"{progress}: {done[0]} of {len(items)}")
        return out
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        return list(pool.map(one, items))


def set_up(dockers, per_host, subnet=NET_A, ns_prefix="l3scc"):
    """``per_host`` endpoints on each host, PARALLEL at a time across the cluster, hosts
    interleaved. Returns the Endpoints in start order."""
    order = [d for _ in range(per_host) for d in dockers]
    return run_many(lambda d: d.run(subnet, ns_prefix), order, progress="set-up")


def tear_down(dockers):
    eps = [ep for d in dockers for ep in list(d.endpoints)]
    start = time.monotonic()
    run_many(lambda ep: ep.remove(), eps, progress="teardown")
    for d in dockers:
        for subnet in list(d.networks):
            d.delete_network(subnet)
    return time.monotonic() - start


# ----------------------------------------------------------------- measuring
def etcd_sent(url):
    """etcd's own count of bytes it sent to gRPC clients (all label sets)."""
    with urllib.request.urlopen(f"{url.split(',')[0]}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("etcd_network_client_grpc_sent_bytes_total"))


def _stat(pid):
    """(utime+stime, cutime+cstime) ticks of ``pid``: its own CPU, and that of its children
    it reaped (the iptables and ipset tools a plugin runs); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = [int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15]]
        return fields[0] + fields[1], fields[2] + fields[3]
    except (OSError, IndexError, ValueError):
        return None


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def bird_pid(host):
    try:
        with open(f"/proc/{host.anchor.pid}/root/run/l3net/bird.pid") as f:
            pid = int(f.read().strip())
        return pid if os.path.exists(f"/proc/{pid}") else None
    except (OSError, ValueError):
        return None


def plugin_pids(host):
    """The plugin's processes (gunicorn master and worker), BIRD and its children left out."""
    bird = bird_pid(host)
    skip = {bird, *_descendants(bird)} if bird else set()
    return [p for p in [host.plugin.pid, *_descendants(host.plugin.pid)] if p not in skip]


def cpu_snapshot(hosts):
    """{host name: ({pid: ticks} of the plugin, {pid: ticks} of BIRD)}"""
    out = {}
    for h in hosts:
        bird = bird_pid(h)
        out[h.name] = ({p: _stat(p) for p in plugin_pids(h)}, {bird: _stat(bird)} if bird else {})
    return out


def cpu_percent(before, after, seconds):
    """{host: (plugin %, of which the tools it ran %, BIRD %)} of one core over ``seconds``."""
    def used(b, a, part):
        return sum(t[part] - (b.get(p) or (0, 0))[part] for p, t in a.items() if t is not None) / TICK / seconds * 100
    out = {}
    for name in after:
        if name in before:
            (p0, b0), (p1, b1) = before[name], after[name]
            tools = used(p0, p1, 1)
            out[name] = (used(p0, p1, 0) + tools, tools, used(b0, b1, 0) + used(b0, b1, 1))
    return out


def rss_mb(host):
    plugin = sum(rss_kb(p) for p in plugin_pids(host)) / 1024
    bird = bird_pid(host)
    return plugin, (rss_kb(bird) / 1024 if bird else 0.0)


def count_routes(host):
    """BIRD's routes in the host: (learned from other hosts, blackholes of its own blocks)."""
    lines = run("ip", "-n", host.name, "route", "show", "proto", "bird").stdout.splitlines()
    own = sum(1 for line in lines if line.startswith(("blackhole", "unreachable", "prohibit")))
    return len(lines) - own, own


def count_rules(host):
    return sum(1 for line in host.sh("iptables-save").stdout.splitlines() if line.startswith("-A "))


def etcdctl(bed, *args):
    return run("etcdctl", "--endpoints", bed.etcd_url, *args, timeout=60).stdout


def etcd_keys(bed, prefix):
    return [k for k in etcdctl(bed, "get", "--prefix", prefix, "--keys-only").splitlines() if k.strip()]


def leftovers(bed):
    """What teardown left: our veths and routes in the hosts, container namespaces, etcd
    records under hosts/, allocations held by endpoints (or pending), blocks and pools."""
    out = {"veths": 0, "routes": 0, "namespaces": len(_NAMESPACES)}
    for h in bed.hosts:
        links = run("ip", "-n", h.name, "-o", "link", "show").stdout.splitlines()
        out["veths"] += sum(1 for line in links if re.match(r"\d+: l3[ht]", line))
        routes = run("ip", "-n", h.name, "-4", "route", "show").stdout.splitlines()
        out["routes"] += sum(1 for line in routes if " dev l3h" in line or " dev l3t" in line)
    out["etcd_host_keys"] = len(etcd_keys(bed, f"{bed.prefix}/hosts/"))
    held = blocks = 0
    for line in etcdctl(bed, "get", "--prefix", f"{bed.prefix}/ipam/blocks/", "--print-value-only").splitlines():
        if line.startswith("{"):
            blocks += 1
            held += sum(1 for a in json.loads(line).get("allocations", {}).values()
                        if str(a.get("handle", "")).startswith(("endpoint:", "pending:")))
    out["allocations"] = held
    out["blocks"] = blocks
    out["pools"] = len(etcd_keys(bed, f"{bed.prefix}/ipam/pools/"))
    # all of it: pools, blocks, affinities, members (but the marker that member records exist,
    # written once per cluster and meant to stay)
    out["ipam_keys"] = len([k for k in etcd_keys(bed, f"{bed.prefix}/ipam/") if not k.endswith("/ipam/members-synced")])
    return out


def clean(left):
    return not any(left.values())


# ICMP echo from inside a container namespace, every 10 ms, until a reply or the deadline.
# Prints "ready" once started, reads the address to ping from stdin (started ahead, it is
# told when to go: its own start-up is not in the figure), then prints the CLOCK_MONOTONIC
# time of the first reply (exit 0), or exits 1 at the deadline.
PROBER = r"""
import os, socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xffff
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xffff)
    return ~(t + (t >> 16)) & 0xffff
print("ready", flush=True)
ip = sys.stdin.readline().strip()
deadline = time.monotonic() + float(sys.argv[1])
seq = 0
while ip and time.monotonic() < deadline:
    seq = (seq + 1) & 0xffff
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"l3scale!"
    try:
        s.sendto(struct.pack("!BBHHH", 8, 0, csum(body), ident, seq) + b"l3scale!", (ip, 0))
    except OSError:
        pass
    until = time.monotonic() + 0.01
    while True:
        left = until - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data, addr = s.recvfrom(2048)
        except (socket.timeout, OSError):
            break
        h = (data[0] & 15) * 4
        kind, _, _, rid, _ = struct.unpack("!BBHHH", data[h:h + 8])
        if kind == 0 and rid == ident and addr[0] == ip:
            print(time.monotonic(), flush=True)
            sys.exit(0)
sys.exit(1)
"""


class Prober:
    """Pings an address from container namespace ``ns`` until it answers: started ahead,
    told the address with ``go`` (or at once, given ``ip``)."""

    def __init__(self, ns, deadline, ip=None):
        self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", PROBER,
                                      str(deadline)], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        _PROCS.add(self.proc)
        self.deadline = deadline
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError("prober did not start")
        if ip is not None:
            self.go(ip)

    def go(self, ip):
        self.proc.stdin.write(ip + "\n")
        self.proc.stdin.close()

    def answered_at(self):
        """CLOCK_MONOTONIC of the first reply, or None."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()         # never told: it gives up at once
        # (readline, not communicate(): "ready" was read through the same buffered pipe)
        line = self.proc.stdout.readline().strip()
        self.proc.wait(10)
        self.proc.stdout.close()
        _PROCS.discard(self.proc)
        return float(line) if self.proc.returncode == 0 and line else None


def answers(ns, ip, within=1.0):
    return Prober(ns, within, ip).answered_at() is not None


# ----------------------------------------------------------------- a test bed without dockerd
def iptables_backend():
    """The backend plain ``iptables`` writes to (nft or legacy)."""
    return "legacy" if "legacy" in run("iptables", "-V").stdout else "nft"


def bed_up(n, tag=TAG, net=NET, port=PORT, plugin_args=()):
    """A bed of ``n`` hosts without dockerd, each with its plugin (started four at a time)
    and the plugin's handshake done. The iptables backend is given: on a host without
    dockerd's rules ``auto`` would keep looking for them (two more iptables-save every 10 s)."""
    bed = Testbed(n, prefix=f"/{tag}-{uuid.uuid4().hex[:6]}", tag=tag, net=net, etcd_port=port,
                  legacy_plugin=False, dockerd=False)
    bed.up()
    args = ("--iptables-backend", iptables_backend(), *plugin_args)
    try:
        run_many(lambda h: h.start_plugin(*args), bed.hosts, parallel=4)
        dockers = [Docker(h) for h in bed.hosts]
        for d in dockers:
            wait_until(lambda: d.handshake() is None, 30, f"the plugin of {d.host.name} to answer")
        wait_until(lambda: len(etcd_keys(bed, f"{bed.prefix}/nodes/")) >= n, 60, "every node registered")
    except BaseException:
        bed_down(bed)
        raise
    return bed, dockers


def bed_down(bed):
    for proc in list(_PROCS):
        if proc.poll() is None:
            proc.kill()
    for ns in list(_NAMESPACES):
        run("ip", "netns", "del", ns, check=False)
        _NAMESPACES.discard(ns)
    bed.cleanup()


def remove_old_leftovers():
    """Container namespaces of an earlier run that died (ours by name only)."""
    for line in run("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if re.fullmatch(r"(l3scc|l3sac)-\d+-\d+", name):
            run("ip", "netns", "del", name, check=False)


def connected(dockers, timeout=120):
    """Wait until the first endpoint of each host answers pings from the previous host's."""
    firsts = [d.endpoints[0] for d in dockers]

    def pair(i):
        a, b = firsts[i - 1], firsts[i]
        wait_until(lambda: answers(a.ns, b.ip), timeout, f"{b.ip} on {b.docker.host.name} from "
                                                         f"{a.docker.host.name}", interval=0.5)
    run_many(pair, range(len(firsts)), parallel=len(firsts))


# ----------------------------------------------------------------- part 1: a cluster of N
def reachability(dockers, rounds=ROUNDS):
    """Seconds until a new endpoint on host 1 answers pings from a container on host 2, from
    the end of its set-up (``docker run`` returning: the prober, started ahead, is told the
    address then). Also ``early``: the prober told the address as soon as the IPAM gave it,
    so that packets reach host 1 while the "container" is still being plumbed (a client that
    knows the address already: a recycled one), from the end of the set-up too."""
    h1, h2 = dockers[0], dockers[1]
    src = h2.endpoints[0]
    after_return, from_start, early = [], [], []
    for _ in range(rounds):
        prober = Prober(src.ns, 20)
        ep = h1.run(NET_A, "l3scc")
        done = time.monotonic()
        prober.go(ep.ip)
        at = prober.answered_at()
        if at is None:
            raise RuntimeError(f"new endpoint {ep.ip} on {h1.host.name} not reachable from {h2.host.name}")
        after_return.append(max(0.0, at - done))
        from_start.append(at - ep.started)
    for _ in range(rounds):
        prober = Prober(src.ns, 20)
        ep = h1.run(NET_A, "l3scc", on_address=prober.go)
        done = time.monotonic()
        at = prober.answered_at()
        if at is None:
            raise RuntimeError(f"new endpoint {ep.ip} on {h1.host.name} not reachable from {h2.host.name}")
        early.append(max(0.0, at - done))
    return after_return, from_start, early


def policy_in_force(bed, dockers, rounds=POLICY_ROUNDS):
    """Seconds from the start of ``l3netctl policy allow --from A --to B`` (and from its end)
    until a container of A reaches one of B on every host (B's endpoint on host i probed from
    A's on host i+1: every host enforces as source and as destination). Median over rounds
    of the slowest host."""
    n = len(dockers)
    pairs = [(dockers[(i + 1) % n].endpoints[0], d.b_endpoint) for i, d in enumerate(dockers)]
    ctl = [CTL, "--etcd-endpoints", bed.etcd_url, "--etcd-prefix", bed.prefix]
    from_start, from_return = [], []
    for _ in range(rounds):
        wait_until(lambda: not any(run_many(lambda p: answers(p[0].ns, p[1].ip, 0.5), pairs, parallel=n)),
                   30, "network B closed to A everywhere", interval=0.5)
        probers = run_many(lambda p: Prober(p[0].ns, 20), pairs, parallel=n)
        for prober, (_, dst) in zip(probers, pairs):
            prober.go(dst.ip)
        start = time.monotonic()
        out = run(*ctl, "policy", "allow", "--from", NET_A, "--to", NET_B).stdout
        done = time.monotonic()
        times = [p.answered_at() for p in probers]
        run(*ctl, "policy", "remove", out.split()[-1])
        if None in times:
            raise RuntimeError(f"policy not in force on {times.count(None)} host(s) after 20 s")
        from_start.append(max(times) - start)
        from_return.append(max(0.0, max(times) - done))
    return from_start, from_return


def bytes_per_start(bed, dockers, idle_rate, starts=STARTS, window=IDLE):
    """etcd bytes sent for one endpoint start (the whole cluster's): ``starts`` starts, one
    after another, round robin over the hosts, at the beginning of a window as long as the
    idle one, whose traffic (``idle_rate``) is taken off. (The same length matters: every
    host's sweep, every 30 s, reads its endpoint records, a burst larger than a start's
    events at M=100; a window of the idle one's length holds as many sweeps.)"""
    before, t0 = etcd_sent(bed.etcd_url), time.monotonic()
    for i in range(starts):
        dockers[i % len(dockers)].run(NET_A, "l3scc")
    time.sleep(max(2.0, t0 + window - time.monotonic()))     # a fixed window, no synchronisation
    after, t1 = etcd_sent(bed.etcd_url), time.monotonic()
    return (after - before - idle_rate * (t1 - t0)) / starts, after - before, t1 - t0


def idle_figures(bed, dockers, seconds=IDLE):
    """Over ``seconds`` of an idle cluster: etcd bytes/s (all clients), CPU and RSS per host."""
    hosts = [d.host for d in dockers]
    cpu0, b0, t0 = cpu_snapshot(hosts), etcd_sent(bed.etcd_url), time.monotonic()
    time.sleep(seconds)
    cpu1, b1, t1 = cpu_snapshot(hosts), etcd_sent(bed.etcd_url), time.monotonic()
    cpu = cpu_percent(cpu0, cpu1, t1 - t0)
    rss = {h.name: rss_mb(h) for h in hosts}
    return {"etcd_bytes_per_s": (b1 - b0) / (t1 - t0), "seconds": t1 - t0,
            "plugin_cpu_pct": [cpu[h.name][0] for h in hosts],
            "plugin_tools_cpu_pct": [cpu[h.name][1] for h in hosts],   # (part of plugin_cpu_pct)
            "bird_cpu_pct": [cpu[h.name][2] for h in hosts],
            "plugin_rss_mb": [rss[h.name][0] for h in hosts], "bird_rss_mb": [rss[h.name][1] for h in hosts]}


def cluster(result, n, m):
    """Part 1 for one N; figures go into ``result`` as they come (kept if a later step fails)."""
    say(f"N={n}: bringing up {n} hosts (plugin + BIRD each, no dockerd)")
    bed, dockers = bed_up(n)
    result.update(N=n, M=m)
    try:
        for d in dockers:
            d.create_network(NET_A)
        t = time.monotonic()
        eps = set_up(dockers, m)
        result["setup_seconds"] = time.monotonic() - t
        result["setup_ms"] = [round(ep.t_total * 1000, 2) for ep in eps]
        result["setup_plugin_ms"] = [round(ep.t_plugin * 1000, 2) for ep in eps]
        say(f"N={n}: {len(eps)} endpoints set up in {result['setup_seconds']:.1f} s "
            f"(p50 {pct(result['setup_ms'], 50):.0f} ms, p95 {pct(result['setup_ms'], 95):.0f} ms)")
        if n >= 2:
            connected(dockers)
            say(f"N={n}: every host reaches the next one's containers")
            back, from_start, early = reachability(dockers)
            result["reach_ms"] = [round(x * 1000, 1) for x in back]
            result["reach_from_start_ms"] = [round(x * 1000, 1) for x in from_start]
            result["reach_early_probe_ms"] = [round(x * 1000, 1) for x in early]
            say(f"N={n}: new endpoint reachable from another host after {statistics.median(back) * 1000:.0f} ms "
                f"(median; max {max(back) * 1000:.0f} ms)")
            for d in dockers:
                d.create_network(NET_B)
            for d in dockers:
                d.b_endpoint = d.run(NET_B, "l3scc")
            start, back = policy_in_force(bed, dockers)
            result["policy_ms"] = [round(x * 1000, 1) for x in start]
            result["policy_from_return_ms"] = [round(x * 1000, 1) for x in back]
            say(f"N={n}: policy in force on every host after {statistics.median(start) * 1000:.0f} ms "
                f"(median over {len(start)} rounds of the slowest host)")
        say(f"N={n}: settling {SETTLE:.0f} s, then {IDLE:.0f} s idle")
        time.sleep(SETTLE)
        idle = idle_figures(bed, dockers)
        result["idle"] = idle
        result["idle_bytes_per_s_per_host"] = idle["etcd_bytes_per_s"] / n
        per_start, raw, window = bytes_per_start(bed, dockers, idle["etcd_bytes_per_s"])
        result["bytes_per_start"] = per_start
        result["bytes_per_start_per_host"] = per_start / n
        result["bytes_per_start_window"] = {"bytes": raw, "seconds": window, "starts": STARTS}
        routes = [count_routes(d.host) for d in dockers]
        result["routes_per_host"] = [learned for learned, _ in routes]
        result["own_block_routes_per_host"] = [own for _, own in routes]
        result["rules_per_host"] = [count_rules(d.host) for d in dockers]
        result["endpoints_per_host"] = [len(d.endpoints) for d in dockers]
        say(f"N={n}: idle {result['idle_bytes_per_s_per_host']:.0f} B/s per host, "
            f"{result['bytes_per_start_per_host']:.0f} B per start per host; tearing down")
        result["teardown_seconds"] = tear_down(dockers)
        poll(lambda: clean(leftovers(bed)), 60, interval=1)
        result["leftovers"] = leftovers(bed)
        say(f"N={n}: torn down in {result['teardown_seconds']:.1f} s, left: {result['leftovers']}")
    finally:
        bed_down(bed)


# ----------------------------------------------------------------- part 2: one host, many
def one_host(result, total):
    say(f"one host: {total} endpoints")
    bed, (d,) = bed_up(1)
    result["endpoints"] = total
    try:
        d.create_network(NET_A)
        host = d.host
        result["rss_mb_start"], result["bird_rss_mb_start"] = rss_mb(host)
        result["rules_start"] = count_rules(host)
        eps, samples = [], []
        t = time.monotonic()
        while len(eps) < total:
            batch = min(100, total - len(eps))
            eps += set_up([d], batch)
            rss = rss_mb(host)[0]
            samples.append({"endpoints": len(eps), "rules": count_rules(host), "rss_mb": round(rss, 1),
                            "p95_ms": round(pct([e.t_total * 1000 for e in eps[-batch:]], 95), 1)})
            if len(eps) % 500 == 0 or len(eps) == total:
                say(f"one host: {len(eps)} endpoints, {samples[-1]['rules']} rules, RSS {rss:.0f} MB, "
                    f"p95 of the last {batch}: {samples[-1]['p95_ms']:.0f} ms")
        result["setup_seconds"] = time.monotonic() - t
        result["samples"] = samples
        lat = [e.t_total * 1000 for e in eps]
        plug = [e.t_plugin * 1000 for e in eps]
        k = min(100, len(eps))
        result["setup_ms"] = [round(x, 2) for x in lat]
        result["setup_plugin_ms"] = [round(x, 2) for x in plug]
        result["first_p50_ms"], result["first_p95_ms"] = pct(lat[:k], 50), pct(lat[:k], 95)
        result["last_p50_ms"], result["last_p95_ms"] = pct(lat[-k:], 50), pct(lat[-k:], 95)
        result["first_plugin_p95_ms"], result["last_plugin_p95_ms"] = pct(plug[:k], 95), pct(plug[-k:], 95)
        result["rules_first"] = samples[0]["rules"]
        result["rules_last"] = samples[-1]["rules"]
        result["rss_mb_end"], result["bird_rss_mb_end"] = rss_mb(host)
        result["routes_static"] = sum(1 for line in run("ip", "-n", host.name, "route").stdout.splitlines()
                                      if " dev l3h" in line)
        result["teardown_seconds"] = tear_down([d])
        poll(lambda: clean(leftovers(bed)), 90, interval=1)
        result["leftovers"] = leftovers(bed)
        result["rss_mb_after_teardown"] = rss_mb(host)[0]
        say(f"one host: torn down in {result['teardown_seconds']:.1f} s, left: {result['leftovers']}")
    finally:
        bed_down(bed)
    return result


# ----------------------------------------------------------------- part 3: agents only
def agent_ip(i):
    return f"198.19.{i // 250}.{i % 250 + 1}"


def agent_worker(etcd, prefix, first, count):
    """``python -m tests.bench_scale agents ETCD PREFIX FIRST COUNT``: ``count`` agents in this
    process, each its own node with its own etcd connection, no BIRD, no firewall; they stop
    when stdin closes."""
    import logging

    from core.keys import Keys
    from plugin.agent import Agent
    from plugin.config import Config, make_store
    from plugin.firewall import NoFirewall

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    keys = Keys(prefix)
    agents = []
    for i in range(first, first + count):
        store = make_store(Config(etcd_endpoints=etcd, etcd_prefix=prefix))
        agent = Agent(store, keys, f"{AGENT_TAG}-agent{i}", agent_ip(i), bird=None, firewall=NoFirewall())
        agent.start()
        agents.append(agent)
    print("ready", flush=True)
    sys.stdin.read()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda a: a.stop(), agents))
    return 0


def agents_only(result, count):
    say(f"agent-only: one plugin host (--no-bgp) and {count} agents without BIRD or firewall")
    bed, (d,) = bed_up(1, tag=AGENT_TAG, net=AGENT_NET, port=AGENT_PORT, plugin_args=("--no-bgp",))
    # (BGP off: BIRD would try sessions with the agents' made-up node addresses)
    result["agents"] = count
    workers = []
    try:
        d.create_network(NET_A)
        set_up([d], min(20, max(M, 1)), ns_prefix="l3sac")
        log = open(os.path.join(bed.dir, "agents.log"), "w")
        for first in range(0, count, AGENTS_PER_PROC):
            proc = subprocess.Popen([sys.executable, "-m", "tests.bench_scale", "agents", bed.etcd_url,
                                     bed.prefix, str(first), str(min(AGENTS_PER_PROC, count - first))],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            _PROCS.add(proc)
            workers.append(proc)
        for proc in workers:
            if proc.stdout.readline().strip() != "ready":
                log.flush()
                with open(log.name) as f:
                    tail = f.read()[-2000:]
                raise RuntimeError(f"an agent worker did not start:\n{tail}")
        nodes = count + 1
        wait_until(lambda: len(etcd_keys(bed, f"{bed.prefix}/nodes/")) >= nodes, 120, "every agent registered")
        say(f"agent-only: {count} agents registered in {len(workers)} processes; settling {SETTLE:.0f} s, "
            f"then {IDLE:.0f} s idle")
        time.sleep(SETTLE)
        ticks0 = {p.pid: _stat(p.pid) for p in workers}
        rss = sum(rss_kb(p.pid) for p in workers) / 1024
        idle = idle_figures(bed, [d])
        ticks1 = {p.pid: _stat(p.pid) for p in workers}
        used = sum(sum(ticks1[p] or (0, 0)) - sum(ticks0[p] or (0, 0)) for p in ticks0) / TICK
        result["idle_bytes_per_s"] = idle["etcd_bytes_per_s"]
        result["idle_bytes_per_s_per_node"] = idle["etcd_bytes_per_s"] / nodes
        result["agent_cpu_pct_per_agent"] = 100 * used / idle["seconds"] / count
        result["agent_rss_mb_per_agent"] = rss / count
        result["plugin_cpu_pct"] = idle["plugin_cpu_pct"][0]
        per_start, raw, window = bytes_per_start(bed, [d], idle["etcd_bytes_per_s"])
        result["bytes_per_start"] = per_start
        result["bytes_per_start_per_node"] = per_start / nodes
        result["bytes_per_start_window"] = {"bytes": raw, "seconds": window, "starts": STARTS}
        say(f"agent-only: idle {result['idle_bytes_per_s_per_node']:.0f} B/s per node, "
            f"{result['bytes_per_start_per_node']:.0f} B per start per node")
        for proc in workers:
            proc.stdin.close()
        for proc in workers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            _PROCS.discard(proc)
        tear_down([d])
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        bed_down(bed)
    return result


# ----------------------------------------------------------------- report
def fmt(x, spec=".0f", none="-"):
    return none if x is None else format(x, spec)


def mean(xs):
    return statistics.mean(xs) if xs else None


def med(xs):
    return statistics.median(xs) if xs else None


def report(results):
    clusters = [r for r in results.get("clusters", []) if "error" not in r]
    for r in results.get("clusters", []):
        if "error" in r:
            print(f"\nN={r['N']}: FAILED: {r['error']}")
    if clusters:
        print(f"\nl3net scale bench: N simulated hosts (plugin + BIRD + firewall each, no dockerd) on one "
              f"machine, {PARALLEL} set-ups in flight across the cluster; idle figures over {IDLE:.0f} s after "
              f"{SETTLE:.0f} s settling; bytes per start over {STARTS} starts, idle traffic taken off")
        print(f"  {'N':>3} {'M':>4} {'idle B/s':>8} {'B/start':>8} {'set-up ms':>11} {'plugin ms':>10} "
              f"{'reach ms':>9} {'policy ms':>10} {'routes':>6} {'rules':>5} {'CPU %':>12} {'RSS':>4} "
              f"{'BIRD':>5} {'BIRD':>5}")
        print(f"  {'':>3} {'':>4} {'/host':>8} {'/host':>8} {'p50/p95':>11} {'p50/p95':>10} {'med/max':>9} "
              f"{'med/max':>10} {'/host':>6} {'/host':>5} {'(tools)':>12} {'MB':>4} {'CPU %':>5} {'MB':>5}")
        for r in clusters:
            idle = r["idle"]
            reach, pol = r.get("reach_ms") or [], r.get("policy_ms") or []
            print(f"  {r['N']:>3} {r['M']:>4} {r['idle_bytes_per_s_per_host']:>8.0f} "
                  f"{r['bytes_per_start_per_host']:>8.0f} "
                  f"{fmt(pct(r['setup_ms'], 50)):>5}/{fmt(pct(r['setup_ms'], 95)):<5} "
                  f"{fmt(pct(r['setup_plugin_ms'], 50)):>4}/{fmt(pct(r['setup_plugin_ms'], 95)):<5} "
                  f"{fmt(med(reach)):>4}/{fmt(max(reach) if reach else None):<4} "
                  f"{fmt(med(pol)):>5}/{fmt(max(pol) if pol else None):<4} "
                  f"{fmt(mean(r['routes_per_host']), '.1f'):>6} {fmt(mean(r['rules_per_host']), '.0f'):>5} "
                  f"{fmt(mean(idle['plugin_cpu_pct']), '.2f'):>5} ({fmt(mean(idle['plugin_tools_cpu_pct']), '.2f')}) "
                  f"{fmt(mean(idle['plugin_rss_mb']), '.0f'):>4} "
                  f"{fmt(mean(idle['bird_cpu_pct']), '.2f'):>5} {fmt(mean(idle['bird_rss_mb']), '.1f'):>5}")
        print("  (reach: from the end of the set-up, as docker run returning; policy: from the start of "
              "l3netctl, until\n   every host lets the flow through; CPU: of one core, plugin processes with "
              "the tools they ran\n   (iptables-save, ipset ...) in brackets; BIRD apart)")
        for r in clusters:
            early = r.get("reach_early_probe_ms")
            print(f"  N={r['N']}: set-up {r['setup_seconds']:.1f} s for {r['N'] * r['M']} endpoints, teardown "
                  f"{r['teardown_seconds']:.1f} s; plugin CPU max {max(r['idle']['plugin_cpu_pct']):.2f}%, RSS max "
                  f"{max(r['idle']['plugin_rss_mb']):.0f} MB" +
                  (f"; policy in force {med(r['policy_from_return_ms']):.0f} ms after l3netctl returned"
                   if r.get("policy_from_return_ms") else "") +
                  (f"; pinged while being set up: reachable {med(early):.0f} ms (max {max(early):.0f}) after it"
                   if early else "") +
                  f"; leftovers: {'none' if clean(r['leftovers']) else r['leftovers']}")
    one = results.get("one_host")
    if one and "error" in one:
        print(f"\none host: FAILED: {one['error']}")
    elif one:
        print(f"\none host, {one['endpoints']} endpoints ({PARALLEL} set-ups in flight):")
        print(f"  set-up p50/p95 ms, first 100: {one['first_p50_ms']:.1f} / {one['first_p95_ms']:.1f}   "
              f"last 100: {one['last_p50_ms']:.1f} / {one['last_p95_ms']:.1f}   "
              f"(plugin calls p95: {one['first_plugin_p95_ms']:.1f} -> {one['last_plugin_p95_ms']:.1f})")
        print(f"  iptables rules: {one['rules_start']} with no endpoint, {one['rules_first']} at "
              f"{one['samples'][0]['endpoints']}, {one['rules_last']} at {one['endpoints']}")
        print(f"  plugin RSS: {one['rss_mb_start']:.0f} MB at start, {one['rss_mb_end']:.0f} MB with "
              f"{one['endpoints']} endpoints, {one['rss_mb_after_teardown']:.0f} MB after teardown "
              f"(BIRD {one['bird_rss_mb_start']:.1f} -> {one['bird_rss_mb_end']:.1f} MB)")
        marks = [x for x in one["samples"] if x["endpoints"] in (100, 500, 1000, 1500, 2000)
                 or x is one["samples"][-1]]
        print("  " + "   ".join(f"{x['endpoints']}: p95 {x['p95_ms']:.0f} ms, {x['rules']} rules, "
                                f"{x['rss_mb']:.0f} MB" for x in marks))
        print(f"  set-up {one['setup_seconds']:.1f} s, teardown {one['teardown_seconds']:.1f} s; leftovers: "
              f"{'none' if clean(one['leftovers']) else one['leftovers']}")
    agents = results.get("agents")
    if agents and "error" in agents:
        print(f"\nagent-only: FAILED: {agents['error']}")
    elif agents:
        print(f"\nagent-only: {agents['agents']} agents (no BIRD, no firewall) + 1 plugin host, one etcd:")
        print(f"  idle etcd egress {agents['idle_bytes_per_s']:.0f} B/s in all, "
              f"{agents['idle_bytes_per_s_per_node']:.0f} B/s per node; one endpoint start "
              f"{agents['bytes_per_start']:.0f} B in all, {agents['bytes_per_start_per_node']:.0f} B per node; "
              f"agent CPU {agents['agent_cpu_pct_per_agent']:.3f}% of a core and "
              f"{agents['agent_rss_mb_per_agent']:.1f} MB RSS per agent")
    checks = []
    if clusters:
        idle = [r["idle_bytes_per_s_per_host"] for r in clusters]
        checks.append(("idle etcd egress per host <= 1 kB/s", f"{max(idle):.0f} B/s at most", max(idle) <= 1000))
        if len(idle) > 1:
            # "the same within noise": within 25% of the largest, or 100 B/s
            checks.append(("idle etcd egress per host the same at every N", f"{min(idle):.0f}..{max(idle):.0f} B/s",
                           max(idle) - min(idle) <= max(100.0, 0.25 * max(idle))))
        per_start = [r["bytes_per_start_per_host"] for r in clusters]
        checks.append(("etcd egress per container start <= 2 kB per host", f"{max(per_start):.0f} B at most",
                       max(per_start) <= 2000))
        big = max(clusters, key=lambda r: r["N"])
        if big.get("reach_ms"):
            m = med(big["reach_ms"])
            checks.append((f"new endpoint reachable from another host < 1 s (N={big['N']}, median)",
                           f"{m:.0f} ms (max {max(big['reach_ms']):.0f})", m < 1000))
        if big.get("policy_ms"):
            m = med(big["policy_ms"])
            checks.append((f"policy in force on every host < 2 s (N={big['N']}, median of the slowest host)",
                           f"{m:.0f} ms (max {max(big['policy_ms']):.0f})", m < 2000))
        cpu = [c for r in clusters for c in r["idle"]["plugin_cpu_pct"]]
        checks.append(("idle plugin CPU <= 1% of a core per host", f"{statistics.mean(cpu):.2f}% mean, "
                       f"{max(cpu):.2f}% max", max(cpu) <= 1.0))
    if one and "error" not in one:
        checks.append(("one host: set-up p95 of the last 100 within 25% of the first 100's",
                       f"{one['first_p95_ms']:.0f} -> {one['last_p95_ms']:.0f} ms",
                       one["last_p95_ms"] <= 1.25 * one["first_p95_ms"]))
        checks.append(("one host: iptables rules constant", f"{one['rules_first']} -> {one['rules_last']}",
                       one["rules_first"] == one["rules_last"]))
        checks.append(("one host: teardown leaves nothing", "none" if clean(one["leftovers"]) else
                       str(one["leftovers"]), clean(one["leftovers"])))
    if checks:
        print("\ntargets:")
    for what, value, ok in checks:
        print(f"  {what}: {value}: {'OK' if ok else 'MISSED'}")
    results["targets"] = [{"target": w, "value": v, "ok": ok} for w, v, ok in checks]


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "agents":
        return agent_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    if os.geteuid() != 0:
        print("bench_scale: run as root (namespaces, veths, iptables)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # finally: clauses tear down
    remove_old_leftovers()
    results = {"config": {"N": NS, "M": M, "one_host": ONE_HOST, "agents": AGENTS, "idle_s": IDLE,
                          "settle_s": SETTLE, "parallel": PARALLEL, "starts": STARTS, "rounds": ROUNDS,
                          "policy_rounds": POLICY_ROUNDS, "started": time.time()}}
    failed = []

    def part(name, fn, *args):
        """One part; a failure is reported and recorded with the figures it had, the next
        part runs."""
        result = {}
        try:
            fn(result, *args)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            say(f"{name} FAILED: {e}")
            failed.append(name)
            result["error"] = f"{type(e).__name__}: {e}"
        return result
    try:
        results["clusters"] = []
        for n in NS:
            results["clusters"].append(dict(part(f"N={n}", cluster, n, M), N=n, M=M))
        if ONE_HOST > 0:
            results["one_host"] = part("one host", one_host, ONE_HOST)
        if AGENTS > 0:
            results["agents"] = part("agent-only", agents_only, AGENTS)
    finally:
        results["config"]["seconds"] = time.monotonic() - T0
        report_ok = True
        try:
            report(results)
        except Exception as e:  # noqa: BLE001 - a partial run: keep its JSON anyway
            report_ok = False
            print(f"bench_scale: no report: {e}", file=sys.stderr)
        with open(OUT, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nresults: {OUT} ({results['config']['seconds']:.0f} s)" + ("" if report_ok else " (partial)"))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
