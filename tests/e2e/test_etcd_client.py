"""The etcd client against real etcds: a three-member cluster losing members under a plugin that
serves its own dockerd (test-bed host), and auth tokens that expire. (TLS options refused with
an http:// endpoint: tests/unit/test_edges.py.)
"""

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

from tests.conftest import BIN, TEST_IMAGE, bed_up, free_ports, unavailable, wait_for
from tests.testbed import Testbed, veth_names

NET = "198.18.10"


@pytest.fixture(scope="module")
def bed(docker_ready):
    # (a tag must not start with "l3h": l3net takes interfaces named l3h* for its veths)
    testbed = bed_up(Testbed(1, prefix=f"/l3ec-{uuid.uuid4().hex[:6]}", tag="l3ec", net=NET,
                             etcd_port=23860, etcd_members=3))
    yield testbed
    testbed.cleanup()


def test_three_member_etcd_losing_members(bed):
    """Each member stopped in turn (whichever one the plugin was talking to): containers
    start as before. Two stopped (no quorum): a docker run fails within bounded time with an
    etcd error and leaves nothing behind, running containers keep talking; quorum back: on as
    before."""
    host = bed.hosts[0]
    def network_made():
        if host.docker("network", "inspect", "ha", check=False).returncode != 0:
            host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net", "--subnet",
                        "10.97.0.0/24", "ha", check=False)
        return host.docker("network", "inspect", "ha", check=False).returncode == 0
    wait_for(network_made, 60, "the first network (a cluster that just formed may be slow at first)")

    def start(name):
        host.docker("run", "-d", "--name", name, "--net", "ha", TEST_IMAGE, "sleep", "600")
        return json.loads(host.docker("inspect", name).stdout)[0]["NetworkSettings"]["Networks"]["ha"]["IPAddress"]

    def pings(name, ip):
        return wait_for(lambda: host.docker("exec", name, "ping", "-c1", "-W1", ip, check=False).returncode == 0,
                        10, f"{name} to ping {ip}")

    first = start("ha0")
    for i in range(3):
        bed.stop_member(i)
        try:
            began = time.monotonic()
            start(f"ha{i + 1}")
            assert time.monotonic() - began < 20
            pings(f"ha{i + 1}", first)
        finally:
            bed.start_member(i)
    veths = veth_names(host)
    bed.stop_member(0)
    bed.stop_member(1)
    try:
        began = time.monotonic()
        res = host.docker("run", "--rm", "--net", "ha", TEST_IMAGE, "true", check=False, timeout=90)
        assert res.returncode != 0 and "etcd" in res.stderr, res.stderr
        assert time.monotonic() - began < 45
        assert veth_names(host) == veths
        pings("ha1", first)
    finally:
        bed.start_member(0)
        bed.start_member(1)
    wait_for(lambda: host.docker("run", "--rm", "--net", "ha", TEST_IMAGE, "true", check=False).returncode == 0,
             60, "docker run with the quorum back")
    start("ha9")
    pings("ha9", first)


@pytest.fixture
def auth_etcd(tmp_path):
    """A private etcd with authentication on and JWT tokens that expire after 2 s."""
    if not shutil.which("etcd") or not shutil.which("openssl"):
        unavailable("etcd and openssl are needed")
    key, pub = tmp_path / "priv.pem", tmp_path / "pub.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True,
                   capture_output=True)
    port, peer = free_ports(2)
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "etcd.log", "w")
    proc = subprocess.Popen(
        ["etcd", "--name", "auth", "--data-dir", str(tmp_path / "data"), "--listen-client-urls", url,
         "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"auth=http://127.0.0.1:{peer}",
         "--auth-token", f"jwt,pub-key={pub},priv-key={key},sign-method=RS256,ttl=2s"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        ctl = ["etcdctl", "--endpoints", url]
        wait_for(lambda: subprocess.run([*ctl, "endpoint", "health"], capture_output=True).returncode == 0,
                 30, "etcd")
        for args in (["user", "add", "root:secret-pw"], ["role", "add", "root"],
                     ["user", "grant-role", "root", "root"], ["auth", "enable"]):
            subprocess.run([*ctl, *args], check=True, capture_output=True)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_auth_token_is_renewed_when_it_expires(auth_etcd):
    from plugin.store import EtcdStore, StoreError

    store = EtcdStore(auth_etcd, user="root", password="secret-pw")
    store.put("/l3auth/a", "1")
    began = time.monotonic()
    # the token lives 2 s: every read, write and transaction must go on past its end, twice
    while store.reauthentications < 2:
        assert time.monotonic() - began < 20, "the token was not renewed twice in 20 s"
        assert store.get("/l3auth/a")[0] == "1"
        assert store.txn({}, put={"/l3auth/b": str(time.monotonic())})
        time.sleep(0.5)
    with pytest.raises(StoreError, match="authentication failed"):
        EtcdStore(auth_etcd, user="root", password="wrong").get("/l3auth/a")
    # l3netctl, the same client: with the password from the environment, never on the command line
    env = dict(os.environ, L3NET_ETCD_PASSWORD="secret-pw")
    res = subprocess.run([os.path.join(BIN, "l3netctl"), "--etcd-endpoints", auth_etcd,
                          "--etcd-prefix", "/l3auth", "--etcd-user", "root", "pool", "list", "--json"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 0 and json.loads(res.stdout) == [], res.stderr
