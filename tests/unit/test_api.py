"""The HTTP layer with Flask's test client, an in-memory store and a fake data path."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.keys import Keys
from ipam.allocator import Ipam
from plugin.app import create_app
from plugin.datapath import LinkExists
from plugin.driver import Driver
from plugin.journal import Journal
from plugin.store import MemoryStore

NET = "a" * 64
EP = "b" * 64
EP2 = "c" * 64


class FakeDatapath:
    def __init__(self):
        self.links = {}
        self.fail_create = False
        self.forgotten = []

    host_ifname = staticmethod(lambda eid: "l3h" + eid[:11])
    temp_ifname = staticmethod(lambda eid: "l3t" + eid[:11])

    uplink = 1500

    def uplink_mtu(self):
        return self.uplink

    def create(self, endpoint_id, address, mac=None, mtu=None):
        self.mtu = mtu
        if self.fail_create:
            raise RuntimeError("netlink exploded")
        if self.host_ifname(endpoint_id) in self.links:
            raise LinkExists("exists")
        self.links[self.host_ifname(endpoint_id)] = address
        return mac or "aa:bb:cc:dd:ee:ff"

    def delete(self, endpoint_id):
        return self.links.pop(self.host_ifname(endpoint_id), None) is not None

    deferred = None         # a list: background deletions wait there until the test runs them

    def delete_later(self, endpoint_id, then=None):
        def work():
            self.delete(endpoint_id)
            if then:
                then()
        if self.deferred is not None:
            self.deferred.append(work)
        else:
            work()

    def prepare_host(self):
        pass

    busy_ports = set()

    def host_port_free(self, proto, host_ip, port):
        return (proto, port) not in self.busy_ports

    def link_exists(self, ifname):
        return ifname in self.links

    def forget_flows(self, address):
        self.forgotten.append(address)


@pytest.fixture
def node(tmp_path):
    store = MemoryStore()
    keys = Keys("/l3net")
    ipam = Ipam(store, keys, "h1")
    dp = FakeDatapath()
    driver = Driver(store, keys, ipam, dp, Journal(str(tmp_path)), "h1")
    app = create_app(driver, ipam)
    app.testing = True

    class Node:
        pass
    n = Node()
    n.store, n.dp, n.client, n.driver = store, dp, app.test_client(), driver

    def call(method, body=None, raw=None):
        data = raw if raw is not None else (b"" if body is None else json.dumps(body))
        resp = n.client.post(f"/{method}", data=data)   # no Content-Type, like dockerd
        return resp.status_code, resp.get_json()
    n.call = call
    n.snapshot = lambda: dict(store._data)
    return n


def ok(result):
    status, body = result
    assert status == 200, body
    return body


def setup_network(node, subnet="10.20.0.0/16"):
    pool = ok(node.call("IpamDriver.RequestPool", {"AddressSpace": "l3net", "Pool": subnet,
                                                    "SubPool": "", "Options": {}, "V6": False}))
    ok(node.call("NetworkDriver.CreateNetwork", {
        "NetworkID": NET, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "l3net", "Pool": subnet, "Gateway": "169.254.1.1/32"}],
        "IPv6Data": []}))
    return pool["PoolID"]


def test_handshake_with_empty_bodies(node):
    assert ok(node.call("Plugin.Activate")) == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert ok(node.call("NetworkDriver.GetCapabilities")) == {"Scope": "local",
                                                              "ConnectivityScope": "global",
                                                              "GwAllocChecker": True}
    assert ok(node.call("IpamDriver.GetCapabilities"))["RequiresMACAddress"] is False
    assert ok(node.call("IpamDriver.GetDefaultAddressSpaces", raw=b"null")) == {
        "LocalDefaultAddressSpace": "l3net", "GlobalDefaultAddressSpace": "l3net"}


def test_every_protocol_method_answers(node):
    for method in ("NetworkDriver.DiscoverNew", "NetworkDriver.DiscoverDelete",
                   "NetworkDriver.AllocateNetwork", "NetworkDriver.FreeNetwork"):
        assert ok(node.call(method, {"NetworkID": NET})) == {}
    for method in ("NetworkDriver.ProgramExternalConnectivity", "NetworkDriver.RevokeExternalConnectivity"):
        assert ok(node.call(method, {"NetworkID": NET, "EndpointID": EP, "Options": {}})) == {}
    status, body = node.call("NetworkDriver.Nonsense", {})
    assert status == 404 and "unknown method" in body["Err"]


def test_full_lifecycle_leaves_nothing(node):
    pool_id = setup_network(node)
    addr = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": "",
                                                      "Options": None}))["Address"]
    assert addr == "10.20.0.1/32"
    created = ok(node.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr, "MacAddress": ""}}))
    assert created == {"Interface": {"MacAddress": "aa:bb:cc:dd:ee:ff"}}
    # dockerd re-sends after a connection error: same answer, nothing new
    assert ok(node.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr}})) == created
    joined = ok(node.call("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP,
                                                 "SandboxKey": "/var/run/docker/netns/x"}))
    assert joined == {"InterfaceName": {"SrcName": "l3t" + EP[:11], "DstPrefix": "eth"},
                      "Gateway": "169.254.1.1", "DisableGatewayService": True,
                      "StaticRoutes": [{"Destination": "169.254.1.1/32", "RouteType": 1},
                                       {"Destination": "10.20.0.0/16", "RouteType": 0,
                                        "NextHop": "169.254.1.1"}]}
    assert ok(node.call("NetworkDriver.EndpointOperInfo", {"NetworkID": NET, "EndpointID": EP}))
    for _ in range(2):
        ok(node.call("NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP}))
        ok(node.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP}))
        ok(node.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": addr}))
    ok(node.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": "169.254.1.1"}))
    ok(node.call("IpamDriver.ReleasePool", {"PoolID": pool_id}))
    ok(node.call("NetworkDriver.DeleteNetwork", {"NetworkID": NET}))
    assert node.dp.links == {}
    assert node.dp.forgotten[:1] == ["10.20.0.1"], "its old connections forgotten"
    assert node.store.get_prefix("/") == []


def test_mac_given_by_docker_is_not_echoed(node):
    pool_id = setup_network(node)
    addr = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool_id}))["Address"]
    body = ok(node.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP,
        "Interface": {"Address": addr, "MacAddress": "02:42:0a:14:00:01"}}))
    assert body == {"Interface": None}


def test_failed_create_endpoint_leaves_nothing(node):
    pool_id = setup_network(node)
    addr = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool_id}))["Address"]
    before = node.snapshot()
    node.dp.fail_create = True
    status, body = node.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr}})
    assert status == 500 and "RuntimeError: netlink exploded" in body["Err"]
    assert "Traceback" not in body["Err"]
    assert node.snapshot() == before and node.dp.links == {}


def test_other_ipam_driver_is_rejected_with_advice(node):
    status, body = node.call("NetworkDriver.CreateNetwork", {
        "NetworkID": NET, "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "172.18.0.0/16"}]})
    assert status == 500 and "--ipam-driver l3net" in body["Err"]
    assert node.store.get_prefix("/") == []


HOSTILE = [
    ("NetworkDriver.CreateEndpoint", b"{not json"),
    ("NetworkDriver.CreateEndpoint", b"[1, 2]"),
    ("NetworkDriver.CreateEndpoint", b"\xff\xfe"),
    ("NetworkDriver.CreateEndpoint", json.dumps({"NetworkID": NET, "EndpointID": "b" * 63})),
    ("NetworkDriver.CreateEndpoint", json.dumps({"NetworkID": NET, "EndpointID": "../" * 21 + "b"})),
    ("NetworkDriver.CreateEndpoint", json.dumps({"NetworkID": NET, "EndpointID": EP,
                                                 "Interface": {"Address": "10.20.0.1/32; reboot"}})),
    ("NetworkDriver.CreateEndpoint", json.dumps({"NetworkID": NET, "EndpointID": EP,
                                                 "Interface": "eth0"})),
    ("NetworkDriver.CreateEndpoint", json.dumps({"NetworkID": NET, "EndpointID": EP,
                                                 "Interface": {"Address": "10.99.0.1/32"}})),
    ("NetworkDriver.CreateEndpoint", json.dumps({"NetworkID": NET, "EndpointID": EP,
                                                 "Interface": {"Address": "10.20.0.9/32",
                                                               "MacAddress": "zz;rm"}})),
    ("NetworkDriver.CreateNetwork", json.dumps({"NetworkID": NET.upper()})),
    ("NetworkDriver.CreateNetwork", json.dumps({"NetworkID": 12345})),
    ("NetworkDriver.CreateNetwork", json.dumps({"NetworkID": "d" * 64, "IPv4Data": "10.0.0.0/8"})),
    ("NetworkDriver.CreateNetwork", json.dumps({"NetworkID": "d" * 64, "IPv4Data": [
        {"AddressSpace": "l3net", "Pool": "10.77.0.0/16"}]})),          # pool never requested
    ("NetworkDriver.Join", json.dumps({"NetworkID": NET, "EndpointID": EP2})),
    ("IpamDriver.RequestPool", json.dumps({"Pool": "10.0.0.0/33"})),
    ("IpamDriver.RequestPool", json.dumps({"Pool": "10.20.0.0/16;ls"})),
    ("IpamDriver.RequestPool", json.dumps({"Pool": "../../etc/passwd"})),
    ("IpamDriver.RequestPool", json.dumps({"Pool": ["10.0.0.0/8"]})),
    ("IpamDriver.RequestPool", json.dumps({"Pool": "10.30.0.0/16", "V6": "yes"})),
    ("IpamDriver.RequestAddress", json.dumps({"PoolID": "../x", "Address": ""})),
    ("IpamDriver.RequestAddress", json.dumps({"PoolID": "10.20.0.0/16", "Address": "10.20.0.999"})),
    ("IpamDriver.RequestAddress", json.dumps({"PoolID": "10.21.0.0/16"})),   # unknown pool
    ("IpamDriver.ReleaseAddress", json.dumps({"PoolID": "10.20.0.0/16", "Address": {"a": 1}})),
    ("IpamDriver.ReleasePool", json.dumps({"PoolID": "10.20.0.0/16/../../x"})),
]


@pytest.mark.parametrize("method,raw", HOSTILE)
def test_hostile_requests_get_clear_error_and_change_nothing(node, method, raw):
    setup_network(node)
    before = node.snapshot()
    status, body = node.call(method, raw=raw if isinstance(raw, bytes) else raw.encode())
    assert status == 500
    assert isinstance(body, dict) and body["Err"] and "Traceback" not in body["Err"]
    assert node.snapshot() == before
    assert node.dp.links == {}


METHODS = ["Plugin.Activate", "NetworkDriver.CreateNetwork", "NetworkDriver.DeleteNetwork",
           "NetworkDriver.CreateEndpoint", "NetworkDriver.EndpointOperInfo",
           "NetworkDriver.DeleteEndpoint", "NetworkDriver.Join", "NetworkDriver.Leave",
           "IpamDriver.RequestPool", "IpamDriver.ReleasePool", "IpamDriver.RequestAddress",
           "IpamDriver.ReleaseAddress", "NetworkDriver.DiscoverNew"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["NetworkID", "EndpointID", "PoolID", "Pool", "Address", "Interface",
                         "IPv4Data", "Options", "SubPool", "V6", "MacAddress", "x"]),
        children, max_size=5),
    max_leaves=12)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=st.sampled_from(METHODS), payload=json_values)
def test_fuzz_never_crashes(node, method, payload):
    """Whatever arrives: 200 with JSON or 500 with a message, never a traceback or other status."""
    status, body = node.call(method, raw=json.dumps(payload).encode())
    assert status in (200, 500), (status, body)
    assert isinstance(body, dict)
    if status == 500:
        assert body["Err"] and "Traceback" not in body["Err"]
        assert not body["Err"].startswith("internal error"), body["Err"]


def test_restarted_plugin_answers_resent_create_endpoint_and_finishes_deletions(node, tmp_path):
    """A new driver over the same store and journal (a restarted plugin) answers a re-sent
    CreateEndpoint from its veth and record, and finishes a deletion the old one accepted."""
    pool_id = setup_network(node)
    addr = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool_id}))["Address"]
    body = {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr}}
    first = ok(node.call("NetworkDriver.CreateEndpoint", body))

    keys = Keys("/l3net")
    journal = Journal(str(tmp_path))
    restarted = Driver(node.store, keys, Ipam(node.store, keys, "h1"), node.dp, journal, "h1")
    app = create_app(restarted, restarted.ipam)
    resp = app.test_client().post("/NetworkDriver.CreateEndpoint", data=json.dumps(body))
    assert resp.status_code == 200 and resp.get_json() == first
    assert len(node.dp.links) == 1

    journal.add(EP)                      # the old process accepted DeleteEndpoint, then died
    restarted.resume()
    assert node.dp.links == {}
    assert journal.pending() == []
    assert node.store.get(keys.endpoint("h1", EP)) == (None, 0)


def test_leftover_veth_without_record_is_replaced(node):
    pool_id = setup_network(node)
    addr = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool_id}))["Address"]
    node.dp.links["l3h" + EP[:11]] = "10.20.9.9"     # from an attempt that died before its record
    ok(node.call("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP,
                                                  "Interface": {"Address": addr}}))
    assert node.dp.links == {"l3h" + EP[:11]: addr.split("/")[0]}


def test_call_logs_carry_ids_as_fields_and_json_lines(node, caplog):
    """One log record per call, with method, status, duration and the IDs as fields; the
    JSON formatter (--log-format json) writes them as one object per line."""
    import logging

    from plugin.logfmt import JsonFormatter
    caplog.set_level(logging.INFO, logger="l3net.api")
    setup_network(node)
    record = [r for r in caplog.records if getattr(r, "method", None) == "NetworkDriver.CreateNetwork"][-1]
    assert record.status == 200 and record.network == NET[:12] and record.ms >= 0
    line = json.loads(JsonFormatter().format(record))
    assert line["network"] == NET[:12] and line["method"] == "NetworkDriver.CreateNetwork"
    assert line["level"] == "info" and line["time"].endswith("Z") and "\n" not in JsonFormatter().format(record)


def binding(host_port=8080, port=80, proto=6, host_ip="", end=None):
    return {"Proto": proto, "IP": "", "Port": port, "HostIP": host_ip, "HostPort": host_port,
            "HostPortEnd": host_port if end is None else end}


def endpoint(node, endpoint_id, pool_id):
    addr = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": "", "Options": None}))
    ok(node.call("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": endpoint_id,
                                                  "Interface": {"Address": addr["Address"]}}))


def publish(node, endpoint_id, *bindings):
    return node.call("NetworkDriver.ProgramExternalConnectivity", {
        "NetworkID": NET, "EndpointID": endpoint_id,
        "Options": {"com.docker.network.portmap": list(bindings),
                    "com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": 80}]}})


def port_keys(node):
    return sorted(k.rsplit("/", 1)[1] for k in node.store._data if "/ports/" in k)


def test_published_ports_are_claimed_per_host_and_released(node):
    pool_id = setup_network(node)
    ep2 = EP2
    endpoint(node, EP, pool_id)
    endpoint(node, ep2, pool_id)
    ok(publish(node, EP, binding(8080), binding(5353, 53, proto=17)))
    ok(publish(node, EP, binding(8080), binding(5353, 53, proto=17)))     # re-sent: same answer
    assert port_keys(node) == ["tcp-8080", "udp-5353"]
    status, body = publish(node, ep2, binding(9090), binding(8080))
    assert status == 500 and "tcp/8080 is already published" in body["Err"]
    assert port_keys(node) == ["tcp-8080", "udp-5353"], "all or nothing"
    ok(node.call("NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NET, "EndpointID": EP}))
    assert port_keys(node) == []
    ok(publish(node, ep2, binding(8080)))
    # a container that dies without the revoke: DeleteEndpoint releases its ports
    ok(node.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": ep2}))
    assert port_keys(node) == []
    # ... and if nobody calls anything (the host crashed: its veth is gone), the next container
    # takes the port over
    ok(publish(node, EP, binding(8080)))
    node.dp.links.pop("l3h" + EP[:11])
    ep3 = "e" * 64
    endpoint(node, ep3, pool_id)
    ok(publish(node, ep3, binding(8080)))
    assert json.loads(node.store.get("/l3net/hosts/h1/ports/tcp-8080")[0])["endpoint"] == ep3


@pytest.mark.parametrize("bad,why", [
    ([binding(0)], "fixed host ports only"),
    ([binding(8080, end=8090)], "fixed host ports only"),
    ([binding(proto=132)], "TCP and UDP ports only"),
    ([binding(host_ip="::")], "IPv4 addresses only"),
    ([binding(host_ip="not-an-ip")], "HostIP"),
    ([binding(port=0)], "Port 0"),
    ([binding(port="80")], "Port '80'"),
    ([binding(8080), binding(8080, 81)], "published twice"),
    (["8080:80"], "expected an object"),
])
def test_bad_port_bindings_are_refused_and_change_nothing(node, bad, why):
    pool_id = setup_network(node)
    endpoint(node, EP, pool_id)
    before = node.snapshot()
    status, body = publish(node, EP, *bad)
    assert status == 500 and why in body["Err"], body
    assert node.snapshot() == before


def test_port_in_use_on_the_host_or_internal_network_refused(node):
    pool_id = setup_network(node)
    endpoint(node, EP, pool_id)
    node.dp.busy_ports = {("tcp", 2222)}
    status, body = publish(node, EP, binding(2222, 22))
    assert status == 500 and "tcp/2222 is in use on this host" in body["Err"]
    # an --internal network publishes nothing
    net2, ep2 = "c" * 64, "d" * 64
    pool2 = ok(node.call("IpamDriver.RequestPool", {"AddressSpace": "l3net", "Pool": "10.30.0.0/24"}))["PoolID"]
    ok(node.call("NetworkDriver.CreateNetwork", {
        "NetworkID": net2, "Options": {"com.docker.network.generic": {}, "com.docker.network.internal": True},
        "IPv4Data": [{"AddressSpace": "l3net", "Pool": "10.30.0.0/24"}]}))
    addr = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool2, "Address": ""}))["Address"]
    ok(node.call("NetworkDriver.CreateEndpoint", {"NetworkID": net2, "EndpointID": ep2,
                                                  "Interface": {"Address": addr}}))
    status, body = node.call("NetworkDriver.ProgramExternalConnectivity", {
        "NetworkID": net2, "EndpointID": ep2, "Options": {"com.docker.network.portmap": [binding(8080)]}})
    assert status == 500 and "internal" in body["Err"]
    assert port_keys(node) == []


def test_a_reused_address_keeps_its_new_holders_connections(node):
    """The deletion runs late (in the background): if the address already went to a new
    container, the tracked connections are that container's and stay."""
    pool_id = setup_network(node)
    addr = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": ""}))["Address"]
    ok(node.call("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr}}))
    node.dp.deferred = []
    ok(node.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP}))
    ok(node.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": addr}))
    again = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": ""}))["Address"]
    assert again == addr
    ok(node.call("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP2, "Interface": {"Address": addr}}))
    for work in node.dp.deferred:        # EP's deletion, late
        work()
    node.dp.deferred = None
    assert node.dp.forgotten == []
    ok(node.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP2}))
    assert node.dp.forgotten == [addr.split("/")[0]]


def holder(node, address):
    for _, value, _ in node.store.get_prefix("/l3net/ipam/blocks/"):
        allocation = json.loads(value)["allocations"].get(address)
        if allocation:
            return allocation["handle"]
    return None


def test_a_late_release_does_not_free_the_next_containers_address(node):
    """Container A goes (DeleteEndpoint, ReleaseAddress), container B gets the same address,
    then dockerd's first ReleaseAddress for A arrives again (re-sent after a timeout): B keeps it."""
    pool = setup_network(node)
    a = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool, "Address": "", "Options": {}}))["Address"]
    ok(node.call("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP,
                                                  "Interface": {"Address": a}, "Options": {}}))
    ok(node.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP}))
    ok(node.call("IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": a}))
    assert holder(node, a.split("/")[0]) is None, "the normal release frees it"
    b = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool, "Address": a.split("/")[0], "Options": {}}))["Address"]
    ok(node.call("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP2,
                                                  "Interface": {"Address": b}, "Options": {}}))
    ok(node.call("IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": a}))      # the late one
    assert holder(node, a.split("/")[0]) == f"endpoint:{EP2}"


def test_create_endpoint_takes_only_an_address_this_host_requested(node):
    pool = setup_network(node)
    free = "10.20.0.77/32"
    status, body = node.call("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP,
                                                              "Interface": {"Address": free}, "Options": {}})
    assert status == 500 and "not allocated" in body["Err"]
    assert holder(node, "10.20.0.77") is None and not node.dp.links, "nothing left behind"
    a = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool, "Address": "", "Options": {}}))["Address"]
    ok(node.call("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP,
                                                  "Interface": {"Address": a}, "Options": {}}))
    status, body = node.call("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP2,
                                                              "Interface": {"Address": a}, "Options": {}})
    assert status == 500 and f"endpoint:{EP}" in body["Err"], body
    assert holder(node, a.split("/")[0]) == f"endpoint:{EP}"
    assert list(node.dp.links) == [node.dp.host_ifname(EP)], "no veth (no /32 route taken over) for the refused one"
    ok(node.call("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP,       # re-sent
                                                  "Interface": {"Address": a}, "Options": {}}))


def create_network(node, network_id, subnet):
    pool = ok(node.call("IpamDriver.RequestPool", {"AddressSpace": "l3net", "Pool": subnet,
                                                    "SubPool": "", "Options": {}, "V6": False}))
    ok(node.call("NetworkDriver.CreateNetwork", {
        "NetworkID": network_id, "Options": {}, "IPv6Data": [],
        "IPv4Data": [{"AddressSpace": "l3net", "Pool": subnet, "Gateway": "169.254.1.1/32"}]}))
    return pool["PoolID"]


def join(node, network_id, endpoint_id, pool_id):
    addr = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": ""}))["Address"]
    ok(node.call("NetworkDriver.CreateEndpoint", {"NetworkID": network_id, "EndpointID": endpoint_id,
                                                  "Interface": {"Address": addr}}))
    return ok(node.call("NetworkDriver.Join", {"NetworkID": network_id, "EndpointID": endpoint_id,
                                               "SandboxKey": "/var/run/docker/netns/x"}))


def test_each_network_of_a_host_has_its_own_gateway(node):
    """A container on two networks gets one on-link gateway route per interface: with one
    gateway address for all, the second would clash with the first ("file exists")."""
    n1, n2, n3 = "1" * 64, "2" * 64, "3" * 64
    p1, p2 = create_network(node, n1, "10.20.0.0/24"), create_network(node, n2, "10.30.0.0/24")
    first, second = join(node, n1, "d" * 64, p1), join(node, n2, "e" * 64, p2)
    assert first["Gateway"] == "169.254.1.1" and second["Gateway"] == "169.254.1.2"
    assert second["StaticRoutes"] == [{"Destination": "169.254.1.2/32", "RouteType": 1},
                                      {"Destination": "10.30.0.0/24", "RouteType": 0,
                                       "NextHop": "169.254.1.2"}]
    # a re-sent CreateNetwork keeps its gateway; a removed network's gateway is reused
    create_network(node, n2, "10.30.0.0/24")
    assert join(node, n2, "f" * 64, p2)["Gateway"] == "169.254.1.2"
    ok(node.call("NetworkDriver.DeleteNetwork", {"NetworkID": n1}))
    p3 = create_network(node, n3, "10.40.0.0/24")
    assert join(node, n3, "0" * 64, p3)["Gateway"] == "169.254.1.1"


@pytest.mark.parametrize("bad", [None, "10.0.0.1", "169.254.1", "169.254.1.2/24", 7, "junk"])
def test_a_bad_gateway_in_a_network_record_falls_back_to_the_default(node, bad):
    pool_id = setup_network(node)
    key = Keys("/l3net").network("h1", NET)
    record = json.loads(node.store.get(key)[0])
    node.store.put(key, json.dumps(dict(record, gateway=bad)))
    node.driver._networks.clear()          # as a restarted plugin reads it
    assert join(node, NET, EP, pool_id)["Gateway"] == "169.254.1.1"


def create_with_options(node, generic, subnet="10.20.0.0/24", top=None):
    ok(node.call("IpamDriver.RequestPool", {"AddressSpace": "l3net", "Pool": subnet, "Options": {}}))
    return node.call("NetworkDriver.CreateNetwork", {
        "NetworkID": NET, "Options": {"com.docker.network.generic": generic, **(top or {})}, "IPv6Data": [],
        "IPv4Data": [{"AddressSpace": "l3net", "Pool": subnet, "Gateway": "169.254.1.1/32"}]})


def test_mtu_option_sets_the_interfaces_mtu(node):
    ok(create_with_options(node, {"com.docker.network.driver.mtu": "1400"}))
    pool_id = ok(node.call("IpamDriver.RequestPool", {"AddressSpace": "l3net", "Pool": "10.20.0.0/24",
                                                       "Options": {}}))["PoolID"]
    join(node, NET, EP, pool_id)
    assert node.dp.mtu == 1400


@pytest.mark.parametrize("value, why", [
    ("abc", "expected a number from 576 to 9216"), ("575", "expected a number"),
    ("9217", "expected a number"), ("-1", "expected a number"), ("9000", "uplink carries (1500)"),
    ({"x": 1}, "expected a number")])
def test_bad_mtu_refused_and_nothing_written(node, value, why):
    before = node.snapshot()
    status, body = create_with_options(node, {"com.docker.network.driver.mtu": value})
    assert status == 500 and why in body["Err"], body
    assert not [k for k in node.snapshot() if "/networks/" in k] and len(node.snapshot()) >= len(before)


def test_unknown_network_option_names_the_ones_l3net_takes(node):
    status, body = create_with_options(node, {"l3net.tag": "db"})
    assert status == 500 and "l3net.tag" in body["Err"]
    assert "com.docker.network.driver.mtu" in body["Err"]
    assert not [k for k in node.snapshot() if "/networks/" in k]


def test_dockers_own_options_l3net_does_not_know_are_tolerated(node):
    """A newer Docker adds options in its namespace (28: enable_ipv4, top level and, from an
    older client's -o, in the generic ones): a network create must not fail on them."""
    ok(create_with_options(node, {"com.docker.network.enable_ipv4": "true",
                                  "com.docker.network.bridge.name": "br0"},
                           top={"com.docker.network.enable_ipv4": True,
                                "com.docker.network.enable_ipv6": False,
                                "com.docker.network.some_future_flag": True}))
    assert [k for k in node.snapshot() if "/networks/" in k]


def test_ipv4_false_is_refused_clearly_and_nothing_written(node):
    status, body = create_with_options(node, {}, top={"com.docker.network.enable_ipv4": False})
    assert status == 500 and "--ipv4=false" in body["Err"], body
    assert not [k for k in node.snapshot() if "/networks/" in k]


def test_gw_alloc_check_skips_both_families(node):
    assert ok(node.call("NetworkDriver.GwAllocCheck", {"Options": {
        "com.docker.network.enable_ipv4": True, "com.docker.network.generic": {}}})) == {
        "SkipIPv4": True, "SkipIPv6": True}
    assert ok(node.call("NetworkDriver.GwAllocCheck")) == {"SkipIPv4": True, "SkipIPv6": True}
    status, body = node.call("NetworkDriver.GwAllocCheck", {"Options": ["x"]})
    assert status == 500 and "Options" in body["Err"]


def test_endpoint_interface_name_refused_clearly_and_nothing_left(node):
    """Docker 28's com.docker.network.endpoint.ifname never reaches a plugin's interface name
    (dockerd names it eth<N>): refused, with no veth, record or address holder left."""
    pool_id = setup_network(node)
    addr = ok(node.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": ""}))["Address"]
    before = node.snapshot()
    status, body = node.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr},
        "Options": {"com.docker.network.endpoint.ifname": "web0"}})
    assert status == 500 and "com.docker.network.endpoint.ifname" in body["Err"], body
    assert node.snapshot() == before and not node.dp.links
    # the other options Docker sends there are its own business
    ok(node.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr},
        "Options": {"com.docker.network.endpoint.sysctls": "net.ipv4.conf.IFNAME.log_martians=1",
                    "com.docker.network.endpoint.exposedports": [], "com.docker.network.portmap": []}}))


def test_tags_option_tags_the_pool(node):
    ok(create_with_options(node, {"l3net.tags": "needs-db,frontend"}))
    record = json.loads(node.store.get(Keys("/l3net").pool("10.20.0.0/24"))[0])
    assert record["tags"] == ["frontend", "needs-db"]


@pytest.mark.parametrize("value", ["Needs-DB", "a b", "ok,,x", "x" * 64, "tag:x"])
def test_a_bad_tag_is_refused_and_nothing_written(node, value):
    status, body = create_with_options(node, {"l3net.tags": value})
    assert status == 500 and "tag" in body["Err"], body
    assert not [k for k in node.snapshot() if "/networks/" in k]
    record = json.loads(node.store.get(Keys("/l3net").pool("10.20.0.0/24"))[0])
    assert "tags" not in record


def test_networks_of_an_older_l3net_get_their_own_gateways_on_resume(node):
    """Records without a gateway (all used 169.254.1.1): the oldest keeps it, the others get
    their own, so that a container can join several of them."""
    keys = Keys("/l3net")
    for i, created in enumerate((30.0, 10.0, 20.0)):
        node.store.put(keys.network("h1", str(i) * 64), json.dumps(
            {"id": str(i) * 64, "pools": [f"10.{20 + i}.0.0/24"], "aux": [], "internal": False, "created": created}))
    node.store.put(keys.network("h1", "bad"), "not json")
    node.driver.resume()
    def gateways():
        return {i: json.loads(node.store.get(keys.network("h1", str(i) * 64))[0])["gateway"] for i in range(3)}
    assert gateways() == {1: "169.254.1.1", 2: "169.254.1.2", 0: "169.254.1.3"}
    node.driver.resume()                                  # nothing more to do
    assert gateways() == {1: "169.254.1.1", 2: "169.254.1.2", 0: "169.254.1.3"}


def test_an_encapsulated_pool_fits_its_tunnel(node):
    """The uplink's MTU less the VXLAN overhead by default; more than that is refused."""
    def create(generic, network_id):
        ok(node.call("IpamDriver.RequestPool", {"AddressSpace": "l3net", "Pool": "10.120.0.0/24",
                                                 "Options": {"encap": "cross-subnet"}}))
        return node.call("NetworkDriver.CreateNetwork", {
            "NetworkID": network_id, "Options": {"com.docker.network.generic": generic}, "IPv6Data": [],
            "IPv4Data": [{"AddressSpace": "l3net", "Pool": "10.120.0.0/24", "Gateway": "169.254.1.1/32"}]})
    ok(create({}, NET))
    assert json.loads(node.store.get(Keys("/l3net").network("h1", NET))[0])["mtu"] == 1450
    status, body = create({"com.docker.network.driver.mtu": "1460"}, "9" * 64)
    assert status == 500 and "does not fit pool 10.120.0.0/24's VXLAN tunnel: at most 1450" in body["Err"]
    ok(create({"com.docker.network.driver.mtu": "1400"}, "8" * 64))
    assert json.loads(node.store.get(Keys("/l3net").network("h1", "8" * 64))[0])["mtu"] == 1400
