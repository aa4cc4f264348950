"""Edges of validation: a trailing newline (which ``$`` accepts) or an out-of-range number
never passes an identifier or port check, at the socket, in the CLI or in the agent."""

import pytest

from core import validate
from core.errors import L3netError
from plugin.calc import _valid_rule, valid_ports
from plugin.config import Config


@pytest.mark.parametrize("check,value", [
    (lambda v: validate.docker_id(v, "NetworkID"), "a" * 64 + "\n"),
    (validate.mac, "02:42:ac:11:00:02\n"),
    (validate.hostname, "host1\n"),
])
def test_trailing_newline_is_refused(check, value):
    with pytest.raises(L3netError):
        check(value)
    check(value.rstrip("\n"))           # the same value without it is fine


def test_etcd_prefix_with_a_newline_is_refused():
    with pytest.raises(L3netError):
        Config(etcd_prefix="/l3net\n").check()


@pytest.mark.parametrize("ports,ok", [("80", True), ("1-65535", True), ("0", False), ("70000", False),
                                      ("9000-100", False), ("80\n", False), ("80-", False), (80, False)])
def test_port_ranges(ports, ok):
    assert valid_ports(ports) is ok


def test_agent_rule_checks_use_full_matches():
    pools = {"10.20.0.0/24": []}
    rule = {"id": "p1", "from": "10.20.0.0/24", "to": "10.20.0.0/24", "proto": "tcp", "ports": "5432"}
    assert _valid_rule(rule, pools)
    assert not _valid_rule({**rule, "id": "p1\n"}, pools)
    assert not _valid_rule({**rule, "ports": "5432\n"}, pools)
    host = {"id": "h1", "proto": "tcp", "ports": "22", "node": "h1\n"}
    assert not _valid_rule(host, pools, host_rule=True)
    assert _valid_rule({**host, "node": "h1"}, pools, host_rule=True)


def test_etcd_tls_options_need_https_endpoints(tmp_path):
    """A TLS option with an http:// endpoint would talk to etcd in clear: refused at start by
    the plugin (exit 2, nothing created), by l3netctl and by the store, with one clear line."""
    import os
    import subprocess
    import sys

    from plugin.store import EtcdStore, check_tls
    ca = tmp_path / "ca.pem"
    ca.write_text("not really a certificate")
    with pytest.raises(L3netError, match="--etcd-ca-cert given, but etcd endpoint"):
        EtcdStore("http://127.0.0.1:2379", ca_cert=str(ca))
    with pytest.raises(L3netError, match="127.0.0.1:2380 are http://"):
        check_tls("https://127.0.0.1:2379,http://127.0.0.1:2380", ca_cert=str(ca))
    with pytest.raises(L3netError, match="go together"):
        check_tls("https://127.0.0.1:2379", cert=str(ca))
    with pytest.raises(L3netError, match="No such file"):
        check_tls("https://127.0.0.1:2379", ca_cert=str(tmp_path / "missing.pem"))
    check_tls("https://127.0.0.1:2379", ca_cert=str(ca))
    with pytest.raises(L3netError, match="go together"):
        EtcdStore("http://127.0.0.1:2379", user="root")
    bindir = os.path.dirname(sys.executable)
    res = subprocess.run([os.path.join(bindir, "l3net-plugin"), "--etcd-endpoints", "http://127.0.0.1:2379",
                          "--etcd-ca-cert", str(ca), "--socket", f"{tmp_path}/x.sock", "--state-dir",
                          str(tmp_path / "state")], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "are http://" in res.stderr, res.stderr
    assert not os.path.exists(f"{tmp_path}/x.sock") and not os.path.exists(tmp_path / "state")
    res = subprocess.run([os.path.join(bindir, "l3netctl"), "--etcd-endpoints", "http://127.0.0.1:2379",
                          "--etcd-cert", str(ca), "--etcd-key", str(ca), "status"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "are http://" in res.stderr, res.stderr


class _Endpoint:
    last_failed = 0

    def fail(self):
        self.last_failed = 1


class _Client:
    """What EtcdStore._call touches of python-etcd3's multi-endpoint client."""
    def __init__(self, n):
        self.endpoints = {i: _Endpoint() for i in range(n)}
        self.endpoint_in_use = self.endpoints[0]

    def _clear_old_stubs(self):
        pass


def _flaky(failures):
    """A call that says "unavailable" ``failures`` times (a leader election), then answers."""
    import etcd3.exceptions
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= failures:
            raise etcd3.exceptions.ConnectionFailedError()
        return "value"
    return call, calls


def test_a_leader_election_is_waited_out_with_several_endpoints():
    """Every member says "unavailable" for a moment (a new leader being elected): the call is
    tried again after a pause, within its timeout, and the shunned endpoints are used again."""
    from plugin.store import EtcdStore
    store = EtcdStore("http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379", timeout=3)
    store._client = _Client(3)
    call, calls = _flaky(7)
    assert store._call(call) == "value" and len(calls) == 8


def test_unavailable_for_longer_than_the_timeout_is_an_error():
    import time

    from plugin.store import EtcdStore, StoreError
    store = EtcdStore("http://10.0.0.1:2379,http://10.0.0.2:2379", timeout=1)
    store._client = _Client(2)
    call, calls = _flaky(10 ** 6)
    began = time.monotonic()
    with pytest.raises(StoreError, match="is unreachable"):
        store._call(call)
    assert time.monotonic() - began < 1.5 and len(calls) > 2


def test_one_endpoint_unreachable_is_said_at_once():
    from plugin.store import EtcdStore, StoreError
    store = EtcdStore("http://10.0.0.1:2379", timeout=5)
    store._client = _Client(1)
    call, calls = _flaky(1)
    with pytest.raises(StoreError, match="is unreachable"):
        store._call(call)
    assert len(calls) == 1
