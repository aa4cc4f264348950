"""A multi-host test bed on one machine: N simulated hosts, one shared etcd.

Per host:
  * a network namespace ``<tag>N``, wired by a veth to the bridge ``<tag>0`` in the root
    namespace (the underlay, by default 198.18.0.0/24: the bridge is .1, host N is .10+N),
    default route via the bridge;
  * a private mount namespace with a tmpfs on ``/run`` (its own plugin socket, BIRD socket,
    xtables lock, docker exec root), held open by an anchor process; every process of the host
    is started with ``nsenter -t <anchor> -m -n`` (not ``ip netns exec``, which remounts /sys
    and hides the cgroup mounts dockerd needs);
  * its own dockerd (own --data-root, -H socket, pidfile; none with ``dockerd=False``, for
    benches that drive the plugin socket the way dockerd does) and its own l3net-plugin.
One etcd listens on the bridge address (``etcd_members=3``: a three-member cluster, every
member on its own port, the plugins given all three). Everything is torn down by ``down()``,
also after a failure half way through ``up()``.

Used by the multi-host tests (tag ``l3bed``) and by ``make demo`` (tag ``l3demo``, its own
underlay and etcd port), so a running demo and a test run do not collide.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
NET = "198.18.0"
TEST_IMAGE = "l3net-test/busybox:latest"


def run(*args, check=True, timeout=60, **kw):
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def etcd_command(name, data_dir, client_url, peer_port):
    """A single-member etcd serving ``client_url``, its peer port on loopback."""
    peer = f"http://127.0.0.1:{peer_port}"
    return ["etcd", "--name", name, "--data-dir", data_dir,
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}"]


def wait_until(predicate, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - keep polling
            pass
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descendants(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            children.setdefault(_ppid(int(entry)), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pings(host, name, address):
    """One ping answered (polled by the callers that wait for a change)."""
    return host.docker("exec", name, "ping", "-c1", "-W1", address, check=False).returncode == 0


def veth_names(host):
    """The host's l3net veths (l3h*), as a set: compare what is new, since a previous test's
    may still be going."""
    return {line.split(": ")[1].split("@")[0] for line in host.sh("ip", "-o", "link").stdout.splitlines()
            if line.split(": ")[1].startswith("l3h")}


def still_pings(host, name, address, tries=3):
    """A path that must work: a ping answered within ``tries`` (one lost packet on a loaded
    machine is not a broken path)."""
    return any(pings(host, name, address) for _ in range(tries))


class Host:
    def __init__(self, bed, index):
        self.bed = bed
        self.index = index
        self.name = f"{bed.tag}{index}"
        self.remote = index in bed.remote          # on the second segment, behind the router
        self.net = bed.remote_net if self.remote else bed.net
        self.ip = f"{self.net}.{10 + index}"
        self.dir = os.path.join(bed.dir, self.name)
        self.anchor = None
        self.dockerd = None
        self.plugin = None

    # -- running things inside the host -------------------------------------
    def nsenter(self):
        return ["nsenter", "-t", str(self.anchor.pid), "-m", "-n"]

    def sh(self, *args, check=True, timeout=60):
        return run(*self.nsenter(), *args, check=check, timeout=timeout)

    def docker(self, *args, check=True, timeout=120):
        return run("docker", "-H", self.docker_host, *args, check=check, timeout=timeout)

    @property
    def docker_host(self):
        # The host's docker socket, reached through its mount namespace.
        return f"unix:///proc/{self.anchor.pid}/root/run/docker.sock"

    # -- life cycle ---------------------------------------------------------
    def up(self):
        os.makedirs(self.dir, exist_ok=True)
        run("ip", "netns", "add", self.name)
        run("ip", "link", "add", f"vb-{self.name}", "type", "veth", "peer", "name", f"ve-{self.name}")
        run("ip", "link", "set", f"vb-{self.name}", "master",
            self.bed.remote_bridge if self.remote else self.bed.bridge, "up")
        run("ip", "link", "set", f"ve-{self.name}", "netns", self.name)
        ns = ["ip", "-n", self.name]
        run(*ns, "link", "set", f"ve-{self.name}", "name", "eth0")
        run(*ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        run(*ns, "link", "set", "eth0", "up")
        run(*ns, "link", "set", "lo", "up")
        if self.remote:
            run(*ns, "route", "add", "default", "via", f"{self.bed.remote_net}.254")
        else:
            run(*ns, "route", "add", "default", "via", f"{self.bed.net}.1")
            if self.bed.remote:
                run(*ns, "route", "add", f"{self.bed.remote_net}.0/24", "via", f"{self.bed.net}.254")
        self.anchor = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.name}", "unshare", "-m", "--propagation", "private",
             "sh", "-c", "mount -t tmpfs tmpfs /run && mkdir -p /run/docker/plugins /run/l3net "
                         "&& echo ready && exec sleep infinity"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            text=True, start_new_session=True)
        if self.anchor.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{self.name}: the namespace anchor did not start")
        if self.bed.dockerd:
            self.start_dockerd()
            if self.docker("image", "inspect", TEST_IMAGE, check=False).returncode != 0:
                run(os.path.join(ROOT, "scripts", "test-image.sh"), timeout=120,
                    env={**os.environ, "DOCKER_HOST": self.docker_host})
        if self.bed.legacy_plugin:
            self.start_plugin()

    def start_dockerd(self):
        log = open(os.path.join(self.dir, "dockerd.log"), "a")
        self.dockerd = subprocess.Popen(
            [*self.nsenter(), "dockerd", "--data-root", os.path.join(self.dir, "docker"),
             "-H", "unix:///run/docker.sock", "--pidfile", "/run/docker.pid"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: self.docker("info", check=False, timeout=10).returncode == 0, 90,
                   f"dockerd on {self.name}")

    def stop_dockerd(self):
        self.dockerd.terminate()
        try:
            self.dockerd.wait(60)
        except subprocess.TimeoutExpired:
            self.dockerd.kill()
            self.dockerd.wait(10)

    def crash_docker(self, containers=()):
        """kill -9 dockerd, its containerd and the given containers with their shims: the host's
        Docker dies at once (as in a power cut), nobody tells the plugin anything."""
        victims = {self.dockerd.pid}
        for name in containers:
            pid = int(self.docker("inspect", "-f", "{{.State.Pid}}", name).stdout)
            if pid:
                victims |= {pid, _ppid(pid)}
        victims |= set(_descendants(self.dockerd.pid))
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.dockerd.wait(10)
        # gone, or reaped (a Go process's leader shows Z while its other threads still exit:
        # a zombie is not dead enough; the host's init must reap it)
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}") and _ppid(p) != 0 for p in victims), 10,
                   f"Docker on {self.name} to die")

    def start_plugin(self, *extra):
        log = open(os.path.join(self.dir, "plugin.log"), "a")
        self.plugin = subprocess.Popen(
            [*self.nsenter(), os.path.join(BIN, "l3net-plugin"), "--etcd-endpoints", self.bed.etcd_url,
             "--etcd-prefix", self.bed.prefix, "--hostname", self.name, "--host-ip", self.ip,
             "--state-dir", os.path.join(self.dir, "state"), *extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: self.sh("test", "-S", "/run/docker/plugins/l3net.sock",
                                   check=False).returncode == 0, 30, f"plugin on {self.name}")

    def stop_plugin(self):
        """Stop the plugin as systemd would (SIGTERM; its BIRD is left running)."""
        try:
            os.killpg(self.plugin.pid, signal.SIGTERM)
            self.plugin.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.plugin.pid, signal.SIGKILL)
            self.plugin.wait(5)

    def kill_plugin(self):
        """kill -9 the plugin and its BIRD (a node dying)."""
        if self.plugin is not None:
            try:
                os.killpg(self.plugin.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.plugin.wait(10)
            self.plugin = None
        self.kill_bird()

    def kill_bird(self):
        """kill -9 this host's BIRD (by its pid file: the hosts share one pid namespace, so
        pkill would hit every host's)."""
        self.sh("sh", "-c", 'test -f /run/l3net/bird.pid && kill -9 "$(cat /run/l3net/bird.pid)"; true',
                check=False)

    def down(self):
        if self.anchor is not None:
            # Containers first, while the plugin still answers: without it dockerd retries
            # each endpoint deletion for a minute.
            ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split() if self.bed.dockerd else []
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=120)
            if self.plugin is not None:
                self.stop_plugin()
            if self.dockerd is not None:
                self.stop_dockerd()
            # Whatever else this host runs: its BIRD (the containerd shims went with dockerd).
            self.kill_bird()
            os.killpg(self.anchor.pid, signal.SIGKILL)
            self.anchor.wait(10)
        run("ip", "netns", "del", self.name, check=False)
        run("ip", "link", "del", f"vb-{self.name}", check=False)


class Testbed:
    __test__ = False   # not a test class, whatever pytest thinks of the name

    def __init__(self, n=3, workdir=None, prefix="/l3bed", tag="l3bed", net=NET, etcd_port=23790,
                 legacy_plugin=True, etcd_members=1, dockerd=True, remote=(), remote_net=None):
        self.dir = workdir or tempfile.mkdtemp(prefix=f"{tag}-")
        self.legacy_plugin = legacy_plugin     # False: the test installs a managed plugin itself
        self.dockerd = dockerd                 # False: no dockerd (and no test image) on the hosts:
                                               # the caller drives the plugin socket itself
        self.prefix = prefix
        self.tag, self.net, self.etcd_port = tag, net, etcd_port
        self.bridge = f"{tag}0"
        # remote: the hosts on a second L2 segment ``remote_net``.0/24 (bridge <tag>b), joined to
        # the first by a router namespace <tag>r (.254 on both) that forwards and knows nothing
        # else: no pool routes, no BGP. The root namespace reaches it through the router.
        self.remote, self.remote_net = set(remote), remote_net
        self.remote_bridge, self.router = f"{tag}b", f"{tag}r"
        self.hosts = [Host(self, i) for i in range(1, n + 1)]
        self.etcd = None
        self.etcd_url = None
        self.etcd_members = etcd_members
        self.members = []          # with etcd_members > 1: [(name, client url, peer url, Popen)]

    def up(self):
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self):
        os.makedirs(self.dir, exist_ok=True)
        self.down_leftovers()
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.net}.1/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        # dockerd's FORWARD policy is DROP and br_netfilter sends bridged frames through it.
        run("iptables", "-I", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT")
        if self.remote:
            self._router_up()
        port = self.etcd_port
        if self.etcd_members > 1:
            self._etcd_cluster()
        else:
            self.etcd_url = f"http://{self.net}.1:{port}"
            log = open(os.path.join(self.dir, "etcd.log"), "w")
            self.etcd = subprocess.Popen(
                etcd_command(self.tag, os.path.join(self.dir, "etcd"), self.etcd_url, port + 1),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: run("etcdctl", "--endpoints", self.etcd_url, "endpoint", "health",
                               check=False, timeout=5).returncode == 0, 30, "etcd")
        with ThreadPoolExecutor(len(self.hosts)) as pool:
            list(pool.map(lambda h: h.up(), self.hosts))

    def _router_up(self):
        run("ip", "link", "add", self.remote_bridge, "type", "bridge")
        run("ip", "link", "set", self.remote_bridge, "up")
        run("iptables", "-I", "FORWARD", "-i", self.remote_bridge, "-o", self.remote_bridge, "-j", "ACCEPT")
        run("ip", "netns", "add", self.router)
        ns = ["ip", "-n", self.router]
        for leg, bridge, net in (("a", self.bridge, self.net), ("b", self.remote_bridge, self.remote_net)):
            run("ip", "link", "add", f"vr-{self.tag}{leg}", "type", "veth", "peer", "name", f"r{leg}")
            run("ip", "link", "set", f"vr-{self.tag}{leg}", "master", bridge, "up")
            run("ip", "link", "set", f"r{leg}", "netns", self.router)
            run(*ns, "addr", "add", f"{net}.254/24", "dev", f"r{leg}")
            run(*ns, "link", "set", f"r{leg}", "up")
        run("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run("ip", "route", "replace", f"{self.remote_net}.0/24", "via", f"{self.net}.254")

    # -- a three-member etcd ----------------------------------------------
    def _etcd_cluster(self):
        port = self.etcd_port
        self.members = [(f"{self.tag}-m{i}", f"http://{self.net}.1:{port + 2 * i}",
                         f"http://127.0.0.1:{port + 2 * i + 1}", None) for i in range(self.etcd_members)]
        self.etcd_url = ",".join(url for _, url, _, _ in self.members)
        for i in range(len(self.members)):
            self.start_member(i, new=True)
        # a cluster that just formed answers health checks before it commits writes promptly
        wait_until(lambda: run("etcdctl", "--endpoints", self.etcd_url, "put", "/l3bed-ready", "1",
                               check=False, timeout=10).returncode == 0, 60, "the etcd cluster to take writes")

    def start_member(self, i, new=False):
        name, url, peer, _ = self.members[i]
        cluster = ",".join(f"{n}={p}" for n, _, p, _ in self.members)
        log = open(os.path.join(self.dir, f"{name}.log"), "a")
        proc = subprocess.Popen(
            ["etcd", "--name", name, "--data-dir", os.path.join(self.dir, name),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", cluster, "--initial-cluster-state", "new",
             "--initial-cluster-token", self.tag],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.members[i] = (name, url, peer, proc)
        if not new:
            wait_until(lambda: run("etcdctl", "--endpoints", url, "endpoint", "health",
                                   check=False, timeout=5).returncode == 0, 30, f"etcd member {name}")

    def stop_member(self, i):
        name, url, peer, proc = self.members[i]
        if proc is not None:
            proc.terminate()
            proc.wait(15)
        self.members[i] = (name, url, peer, None)

    def down(self):
        for host in self.hosts:
            try:
                host.down()
            except Exception as e:  # noqa: BLE001 - tear down the rest anyway
                print(f"testbed: {host.name}: {e}", file=sys.stderr)
        for i, (_, _, _, proc) in enumerate(self.members):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                self.members[i] = self.members[i][:3] + (None,)
        if self.etcd is not None:
            os.killpg(self.etcd.pid, signal.SIGKILL)
            self.etcd.wait(10)
            self.etcd = None
        self.down_leftovers()

    def down_leftovers(self):
        run("iptables", "-D", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT",
            check=False)
        run("ip", "link", "del", self.bridge, check=False)
        if self.remote:
            run("iptables", "-D", "FORWARD", "-i", self.remote_bridge, "-o", self.remote_bridge, "-j", "ACCEPT",
                check=False)
            run("ip", "route", "del", f"{self.remote_net}.0/24", check=False)
            run("ip", "netns", "del", self.router, check=False)
            for leg in "ab":
                run("ip", "link", "del", f"vr-{self.tag}{leg}", check=False)
            run("ip", "link", "del", self.remote_bridge, check=False)
        for host in self.hosts:
            run("ip", "netns", "del", host.name, check=False)
            run("ip", "link", "del", f"vb-{host.name}", check=False)

    def cleanup(self):
        self.down()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- a bed that outlives its process (make demo / make demo-down) ----------
    def save(self, path):
        state = {"dir": self.dir, "prefix": self.prefix, "tag": self.tag, "net": self.net,
                 "etcd_port": self.etcd_port, "etcd": self.etcd.pid, "etcd_url": self.etcd_url,
                 "hosts": [{"index": h.index, "anchor": h.anchor.pid, "dockerd": h.dockerd.pid,
                            "plugin": h.plugin.pid if h.plugin else None} for h in self.hosts]}
        with open(path, "w") as f:
            json.dump(state, f)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            state = json.load(f)
        bed = cls(len(state["hosts"]), workdir=state["dir"], prefix=state["prefix"], tag=state["tag"],
                  net=state["net"], etcd_port=state["etcd_port"])
        bed.etcd, bed.etcd_url = _Adopted(state["etcd"]), state["etcd_url"]
        for host, saved in zip(bed.hosts, state["hosts"]):
            host.anchor, host.dockerd = _Adopted(saved["anchor"]), _Adopted(saved["dockerd"])
            host.plugin = _Adopted(saved["plugin"]) if saved["plugin"] else None
        return bed


class _Adopted:
    """Enough of subprocess.Popen for down() on a process another run started."""

    def __init__(self, pid):
        self.pid = pid

    def _alive(self):
        return os.path.exists(f"/proc/{self.pid}")

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def send_signal(self, sig):
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout=None):
        deadline = time.monotonic() + (timeout or 3600)
        while self._alive():
            try:   # reap it if it happens to be our child
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return 0
            except ChildProcessError:
                pass
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return 0
