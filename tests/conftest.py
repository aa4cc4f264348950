"""Shared fixtures: a private etcd, an l3net-plugin process, the docker CLI.

Everything real is started here and stopped at the end, also when a test fails. When the
environment asks for it (CI=true or L3NET_REQUIRE_E2E=1) a missing piece is a failure, not a skip:
a green run must mean the end-to-end tests ran.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from tests.testbed import etcd_command

REQUIRE = os.environ.get("CI") == "true" or os.environ.get("L3NET_REQUIRE_E2E") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TEST_IMAGE = "l3net-test/busybox:latest"


def unavailable(why):
    if REQUIRE:
        pytest.fail(f"required for the end-to-end tests: {why}")
    pytest.skip(why)


# ---------------------------------------------------------------- what a test needs
# Every test is marked by what it needs, so that `pytest -m "not etcd and not root and not
# docker and not bird"` (make check) runs the pure ones in seconds on any machine:
#   etcd: a real etcd (started by the session fixture); root: netlink, iptables, namespaces;
#   docker: dockerd and the docker CLI (every end-to-end test; they need root and etcd too);
#   bird: the bird binary.
# The end-to-end tests are marked by their folder, the etcd ones by their fixtures; the others
# say it with @pytest.mark.root / .bird. A missing piece skips the test, or fails it where a
# green run must mean everything ran (CI=true, L3NET_REQUIRE_E2E=1: make test).
NEEDS = {
    "etcd": "a real etcd (apt-get install etcd-server)",
    "root": "root (netlink, iptables, ipset, network namespaces)",
    "docker": "dockerd and the docker CLI",
    "bird": "bird2 (apt-get install bird2)",
}


def pytest_configure(config):
    for name, what in NEEDS.items():
        config.addinivalue_line("markers", f"{name}: the test needs {what}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "e2e" in item.path.parts:
            for name in ("docker", "root", "etcd"):
                item.add_marker(name)
        if {"etcd", "etcd_store"} & set(getattr(item, "fixturenames", ())):
            item.add_marker("etcd")


def pytest_runtest_setup(item):
    marks = {m.name for m in item.iter_markers()}
    if "root" in marks and os.geteuid() != 0:
        unavailable("the test needs root")
    missing = [tool for tool in ("ipset", "unshare", "iptables-restore") if not shutil.which(tool)]
    if "root" in marks and "docker" not in marks and missing:
        unavailable(f"the test needs {', '.join(missing)} (make setup installs them)")
    if "bird" in marks and not shutil.which("bird"):
        unavailable("the test needs bird2 (apt-get install bird2)")


def bed_up(testbed):
    """Start a multi-host test bed (tests/testbed.py), or skip/fail like unavailable()."""
    try:
        return testbed.up()
    except Exception as e:  # noqa: BLE001
        testbed.cleanup()
        if REQUIRE:
            raise
        pytest.skip(f"test bed could not start: {e}")


def wait_for(predicate, timeout, what, interval=0.05):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_ports(n):
    """``n`` distinct TCP ports nobody listens on right now (etcd's, the plugin's metrics):
    all bound at once, so two calls cannot hand out the same port."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- etcd
class Etcd:
    def __init__(self):
        if not shutil.which("etcd"):
            unavailable("etcd is not installed (apt-get install etcd-server)")
        self.dir = tempfile.mkdtemp(prefix="l3net-etcd-")
        self.port, peer = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(self.dir, "etcd.log"), "w")
        self.proc = subprocess.Popen(
            etcd_command("l3net-test", os.path.join(self.dir, "data"), self.url, peer),
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.healthy, 30, "etcd to start")

    def healthy(self):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            conn.request("GET", "/health")
            return b"true" in conn.getresponse().read()
        except OSError:
            return False

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd():
    server = Etcd()
    yield server
    server.stop()


@pytest.fixture
def etcd_store(etcd):
    from plugin.store import EtcdStore

    store = EtcdStore(etcd.url, timeout=5)
    yield store
    store.close()


@pytest.fixture
def prefix():
    return f"/l3test-{uuid.uuid4().hex[:8]}"


def _last_lines(path, n):
    """The last ``n`` lines of a log, or None when it cannot be read."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return None


# ---------------------------------------------------------------- plugin over a unix socket
class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=30):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def post(sock_path, method, body=b"", headers=None, timeout=30):
    """POST raw bytes to the plugin; returns (status, parsed JSON or raw bytes)."""
    conn = UnixHTTPConnection(sock_path, timeout)
    try:
        conn.request("POST", f"/{method}", body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data


class Plugin:
    """An l3net-plugin process under the test name ``l3nettest`` (socket l3nettest.sock), so
    the tests never collide with a real l3net on the same machine."""

    name = "l3nettest"

    def __init__(self, etcd_url, prefix, name=None, socket=None, metrics_port=0, log_format="text"):
        self.name = name or Plugin.name
        self.log_format = log_format
        self.metrics_port = metrics_port
        self.socket = socket or f"/run/docker/plugins/{self.name}.sock"
        self.state = tempfile.mkdtemp(prefix="l3net-state-")
        self.etcd_url = etcd_url
        self.prefix = prefix
        self.logpath = os.path.join(self.state, "plugin.log")
        self.proc = None
        self.start()

    def start(self):
        self.log = open(self.logpath, "a")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "l3net-plugin"), "--socket", self.socket,
             "--etcd-endpoints", self.etcd_url, "--etcd-prefix", self.prefix,
             "--state-dir", self.state, "--hostname", "e2e-host", "--no-bgp",
             "--sweep-every", "2", "--sweep-grace", "8",
             "--metrics-port", str(self.metrics_port), "--log-format", self.log_format],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.ready, 30, "l3net-plugin to answer on its socket")

    def ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"l3net-plugin exited:\n{self.tail()}")
        try:
            return post(self.socket, "Plugin.Activate", timeout=2)[0] == 200
        except OSError:
            return False

    def kill9(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()

    def tail(self, n=40):
        return _last_lines(self.logpath, n) or ""

    def call(self, method, payload=None):
        body = b"" if payload is None else json.dumps(payload).encode()
        return post(self.socket, method, body)


def docker(*args, check=True, timeout=120):
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
    return res


@pytest.fixture(scope="session")
def docker_ready():
    if os.geteuid() != 0:
        unavailable("the end-to-end tests need root")
    if not shutil.which("docker"):
        unavailable("docker is not installed")
    res = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        unavailable(f"dockerd is not running: {res.stderr.strip()[:200]}")
    if docker("image", "inspect", TEST_IMAGE, check=False).returncode != 0:
        subprocess.run([os.path.join(ROOT, "scripts", "test-image.sh")], check=True, timeout=120)
    return True


@pytest.fixture(scope="session")
def plugin(docker_ready, etcd):
    p = Plugin(etcd.url, f"/l3e2e-{uuid.uuid4().hex[:8]}", metrics_port=free_ports(1)[0], log_format="json")
    yield p
    # Leave nothing behind: containers and networks of the tests, then the plugin.
    ids = docker("ps", "-aq", "--filter", "label=l3net-test", check=False).stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)
    nets = docker("network", "ls", "-q", "--filter", f"driver={Plugin.name}", check=False).stdout.split()
    for net in nets:
        docker("network", "rm", net, check=False)
    p.stop()
    shutil.rmtree(p.state, ignore_errors=True)
    # and its firewall: the test pools must not stay blocked towards this machine
    subprocess.run([os.path.join(BIN, "l3net-plugin"), "--remove-rules"], capture_output=True, timeout=60)


# ---------------------------------------------------------------- logs of a failed test
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the end of the logs of the plugins it used (the test
    plugin's, each test-bed host's and its etcds'): CI keeps only what pytest prints, and the
    directories holding the logs are removed with the test bed."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or call.when == "teardown":
        return
    logs = {}       # what: (path, lines)
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Plugin):
            logs["l3net-plugin"] = (value.logpath, 60)
        value = getattr(value, "testbed", value)        # a fixture's wrapper around a bed
        hosts = getattr(value, "hosts", None)
        if isinstance(hosts, list) and hasattr(value, "dir"):
            for host in hosts:
                logs[f"{host.name} l3net-plugin"] = (os.path.join(host.dir, "plugin.log"), 60)
                logs[f"{host.name} dockerd"] = (os.path.join(host.dir, "dockerd.log"), 15)
            for name in sorted(os.listdir(value.dir)) if os.path.isdir(value.dir) else ():
                if name.endswith(".log"):
                    logs[f"test bed {name[:-4]}"] = (os.path.join(value.dir, name), 15)
    for what, (path, lines) in logs.items():
        text = _last_lines(path, lines)
        if text:
            report.sections.append((f"end of the {what} log ({path})", text))
