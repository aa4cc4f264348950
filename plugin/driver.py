"""The network driver: Docker networks and endpoints on this host.

State lives in etcd under the host's keys (see keys.py), so a restarted plugin carries on:
dockerd replays nothing to a restarted legacy plugin, and a container started before the
restart must still be stoppable afterwards.

Order of CreateEndpoint, and why: the veth and route are created first and the endpoint
record written last, so a record always describes something that exists; a failure at any
step removes what was created (dockerd then releases the address).
"""

import json
import logging
import threading
import time

from netaddr import IPAddress, IPNetwork

from core import records as R
from core import validate as V
from core.errors import L3netError
from core.infra import LINK_LOCAL
from ipam import pools as P

from .datapath import LinkExists
from .ports import PortClaims
from .ports import describe as describe_port
from .store import StoreError, get_json

log = logging.getLogger("l3net.driver")

GATEWAY = "169.254.1.1"
# Each network on a host has its own gateway address, 169.254.1.1 for the first: a container on
# several l3net networks gets an on-link route to each network's gateway through that network's
# interface, and two identical "169.254.1.1/32 dev ethN" routes would clash ("file exists").
# The host side of every veth answers ARP for any of them (proxy ARP), so they cost nothing.
GATEWAYS = 1024                               # networks per host: 169.254.1.1 ... 169.254.5.0
ADDRESS_SPACE = "l3net"
GENERIC = "com.docker.network.generic"
INTERNAL = "com.docker.network.internal"      # docker network create --internal
ENABLE_IPV4 = "com.docker.network.enable_ipv4"  # Docker 28+: false for --ipv4=false
# Options in Docker's own namespace that l3net does not know are tolerated (and logged): a newer
# Docker adds some (28 added enable_ipv4, which older clients send through -o), and refusing
# them would break every network create on it. Unknown options of any other name are refused
# (a mistyped l3net option must not be silently ignored).
DOCKERS = "com.docker."
MTU = "com.docker.network.driver.mtu"        # Docker's standard driver option (-o, driver_opts)
MTU_RANGE = (576, 9216)
TAGS = "l3net.tags"                           # -o l3net.tags=frontend,needs-db (the pool's tags)
IFNAME = "com.docker.network.endpoint.ifname"  # docker run --network name=N,driver-opt=...
# -o options l3net understands on `docker network create`.
NETWORK_OPTIONS = {MTU: "the MTU of the containers' interfaces on the network",
                   TAGS: "the network's tags, for policies that name a tag"}


class Driver:
    def __init__(self, store, keys, ipam, datapath, journal, host, name="l3net", firewall=None,
                 sync_policy=None):
        self.store = store
        self.keys = keys
        self.ipam = ipam
        self.datapath = datapath
        self.journal = journal
        self.host = host
        self.name = name
        # Policy (see agent.py / firewall.py): a new network's rules are written before the
        # network exists for Docker, a new container joins its network's ipset at once.
        self.firewall = firewall
        self.sync_policy = sync_policy
        # Read-through caches of this host's records (etcd stays the truth: only this process
        # writes them, and a restarted process starts empty and reads etcd).
        self._networks = {}
        self._endpoints = {}
        self.ports = PortClaims(store, keys, host)
        from .retry import Retrier
        self.releases = Retrier("l3net-releases", cap=10.0)
        self._creating = threading.Lock()     # one gateway address per network (create_network)

    # -- records ----------------------------------------------------------
    def _cached(self, cache, key, record_id):
        record = cache.get(record_id)
        if record is None:
            record = get_json(self.store, key)
            if record is not None:
                cache[record_id] = record
        return record

    def network(self, network_id):
        return self._cached(self._networks, self.keys.network(self.host, network_id), network_id)

    def endpoint(self, endpoint_id):
        return self._cached(self._endpoints, self.keys.endpoint(self.host, endpoint_id), endpoint_id)

    def resume(self):
        """After a restart: finish deletions a previous process had accepted but not done, and
        give networks of an older l3net their own gateways."""
        for endpoint_id in self.journal.pending():
            log.info("finishing deletion of endpoint %s", endpoint_id[:12])
            self._delete_later(endpoint_id)
        self._give_networks_gateways()

    def _give_networks_gateways(self):
        """Networks an older l3net recorded have no gateway of their own (all used 169.254.1.1):
        each gets one, the oldest keeping 169.254.1.1, so that a container can join several.
        Harmless for running containers: their routes keep the old address, which the host side
        of every veth still answers (proxy ARP answers for any of them)."""
        with self._creating:
            records = self._network_records()
            taken = {gateway_of(r) for _, r, _ in records if "gateway" in r}
            old = [(r.get("created") or 0, key, r, rev) for key, r, rev in records if "gateway" not in r]
            for _, key, record, rev in sorted(old, key=lambda o: (o[0], o[1])):
                record["gateway"] = lowest_free_gateway(taken)
                taken.add(record["gateway"])
                if self.store.txn({key: rev}, put={key: json.dumps(record, sort_keys=True)}):
                    self._networks.pop(record["id"], None)
                    log.info("network %s: gateway %s", record["id"][:12], record["gateway"])

    def _network_records(self):
        """[(key, record, revision)] of this host's network records that are well formed (a bad
        one is not ours to judge here: the sweeper logs it)."""
        out = []
        for key, value, rev in self.store.get_prefix(self.keys.networks(self.host)):
            try:
                record = json.loads(value)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                out.append((key, record, rev))
        return out

    # -- networks ---------------------------------------------------------
    def create_network(self, network_id, ipv4_data, ipv6_data, options):
        if ipv6_data:
            raise L3netError("l3net does not support IPv6 yet; create the network without --ipv6")
        generic = options.get(GENERIC) or {}
        if not isinstance(generic, dict):
            raise L3netError("invalid network options")
        others = sorted(set(generic) - set(NETWORK_OPTIONS))
        unknown = [k for k in others if not k.startswith(DOCKERS)]
        if unknown:
            raise L3netError(f"unknown option(s) {', '.join(unknown)}: l3net takes -o "
                             f"{', '.join(NETWORK_OPTIONS)}; pool settings go in --ipam-opt")
        ignored = [k for k in others if k.startswith(DOCKERS)]
        if ignored:
            log.info("network %s: Docker's option(s) %s do not apply to l3net: ignored",
                     network_id[:12], ", ".join(ignored))
        if str(options.get(ENABLE_IPV4, "true")).lower() == "false":
            raise L3netError("l3net networks need IPv4 (--ipv4=false is not supported)")
        uplink = self.datapath.uplink_mtu()
        mtu = self._mtu(generic.get(MTU), uplink)
        tags = V.tag_list(generic[TAGS]) if TAGS in generic else None
        if not ipv4_data:
            raise L3netError("no IPv4 pool given")
        pools, aux = [], []
        for data in ipv4_data:
            space, pool = data.get("AddressSpace"), data.get("Pool")
            if space != ADDRESS_SPACE:
                raise L3netError(f"the {self.name} network driver needs its own IPAM: create the "
                                 f"network with --ipam-driver {self.name}")
            cidr = P.parse_cidr(pool, "pool")
            value = self.store.get(self.keys.pool(cidr))[0]
            if value is None:
                raise L3netError(f"pool {cidr} is not known to l3net; create the network with "
                                 f"--ipam-driver {self.name}")
            if P.encap_of(json.loads(value)) != "never":
                mtu = self._mtu_through_tunnel(mtu, cidr, uplink)
            pools.append(str(cidr))
            aux += [(cidr, a) for a in self._aux_addresses(data.get("AuxAddresses"))]
        internal = str(options.get(INTERNAL, "")).lower() == "true"
        for cidr in pools:
            self.ipam.set_internal(cidr, internal)
            self.ipam.set_tags(cidr, tags)
        for cidr, address in aux:
            self.ipam.reserve_for_network(cidr, address)
        self.datapath.prepare_host()
        if self.sync_policy is not None:
            self.sync_policy()
        with self._creating:
            record = {
                "id": network_id,
                "pools": pools,
                "aux": sorted(a for _, a in aux),   # --aux-address reservations
                "internal": internal,
                "gateway": self._free_gateway(network_id),
                "created": time.time(),
            }
            if mtu:
                record["mtu"] = mtu
            self.store.put(self.keys.network(self.host, network_id), json.dumps(record, sort_keys=True))
        self._networks[network_id] = record
        log.info("network %s created with pools %s (gateway %s)", network_id[:12], ",".join(pools),
                 record["gateway"])

    @staticmethod
    def _mtu(value, uplink):
        """-o com.docker.network.driver.mtu=N: an integer in MTU_RANGE, no more than the
        uplink carries (a bigger packet would leave the host fragmented, or not at all)."""
        if value in (None, ""):
            return None
        low, high = MTU_RANGE
        if not isinstance(value, (str, int)) or not str(value).isdigit() or not low <= int(value) <= high:
            raise L3netError(f"invalid {MTU} {str(value)[:20]!r}: expected a number from {low} to {high}")
        if uplink and int(value) > uplink:
            raise L3netError(f"{MTU}={int(value)} is more than this host's uplink carries ({uplink}): "
                             f"use {uplink} or less")
        return int(value)

    @staticmethod
    def _mtu_through_tunnel(mtu, cidr, uplink):
        """An encapsulated pool's MTU: the uplink's less the VXLAN overhead by default, and no
        more than that when asked for (a bigger packet would not fit the tunnel)."""
        from .encap import OVERHEAD
        uplink = uplink or 1500
        if mtu is None:
            return uplink - OVERHEAD
        if mtu > uplink - OVERHEAD:
            raise L3netError(f"{MTU}={mtu} does not fit pool {cidr}'s VXLAN tunnel: at most {uplink - OVERHEAD} "
                             f"(this host's uplink carries {uplink}, the encapsulation takes {OVERHEAD})")
        return mtu

    def _free_gateway(self, network_id):
        """The lowest gateway address no other network of this host has (the one it already
        has, for a CreateNetwork dockerd sends again). Records without one (older l3net) use
        169.254.1.1."""
        records = [r for _, r, _ in self._network_records()]
        own = next((r for r in records if r["id"] == network_id), None)
        if own is not None:
            return gateway_of(own)
        return lowest_free_gateway({gateway_of(r) for r in records})

    @staticmethod
    def _aux_addresses(value):
        """IPv4Data's AuxAddresses ({"name": "10.0.0.2/32"} or plain addresses) -> [address]."""
        if value in (None, {}):
            return []
        if not isinstance(value, dict):
            raise L3netError("AuxAddresses must be an object")
        return [str(V.ipv4_interface(address, f"aux address {name!r}")) for name, address in value.items()]

    def delete_network(self, network_id):
        self.store.delete(self.keys.network(self.host, network_id))
        self._networks.pop(network_id, None)

    # -- endpoints --------------------------------------------------------
    def check_endpoint_options(self, options):
        """CreateEndpoint's options (a container's per-network driver options). Docker 28's
        interface name option is refused: dockerd does not pass the name on to a network
        plugin's interface (it names it eth<N> whatever was asked), so honouring it silently
        would give the container another name than the one it was started with. Everything
        else there is Docker's own (sysctls it applies itself, ports, MAC) or not l3net's."""
        if options.get(IFNAME):
            raise L3netError(f"{IFNAME} is not supported with {self.name}: Docker names a network "
                             "plugin's interface eth<N> itself (leave the driver option out)")

    def create_endpoint(self, network_id, endpoint_id, address, mac):
        """Create the veth and /32 route. Returns the interface fields to answer (only those
        dockerd left empty: echoing a set field fails the endpoint)."""
        network = self.network(network_id)
        if network is None:
            raise L3netError(f"network {network_id[:12]} is not an {self.name} network on this host")
        if address is None:
            raise L3netError("no IPv4 address given: the network must use --ipam-driver "
                             f"{self.name}")
        pool = next((p for p in network["pools"] if address in IPNetwork(p)), None)
        if pool is None:
            raise L3netError(f"address {address} is not in the network's pools "
                             f"({', '.join(network['pools'])})")
        existing = self._endpoints.get(endpoint_id)
        if existing is None or existing.get("deleting"):
            self.ipam.check_can_take(IPNetwork(pool), address, R.endpoint_handle(endpoint_id))
            try:
                created_mac = self.datapath.create(endpoint_id, str(address), mac, mtu=mtu_of(network))
                existing = None
            except LinkExists:
                # Its veth is there: a re-sent call (maybe to a restarted plugin), or a
                # leftover of an attempt that died before writing its record.
                existing = self.endpoint(endpoint_id)
                if existing is None or existing.get("deleting"):
                    self.datapath.delete(endpoint_id)
                    created_mac = self.datapath.create(endpoint_id, str(address), mac, mtu=mtu_of(network))
                    existing = None
        if existing is not None:
            if existing["address"] != str(address):
                raise L3netError(f"endpoint {endpoint_id[:12]} already exists with address "
                                 f"{existing['address']}")
            # dockerd re-sent the call: answer as the first time.
            return {} if mac else {"MacAddress": existing["mac"]}
        record = {
            "id": endpoint_id,
            "network": network_id,
            "address": str(address),
            "pool": pool,
            "mac": created_mac,
            "host_ifname": self.datapath.host_ifname(endpoint_id),
            "temp_ifname": self.datapath.temp_ifname(endpoint_id),
            "created": time.time(),
        }
        key = self.keys.endpoint(self.host, endpoint_id)
        try:
            # One transaction: the endpoint record and the address's holder.
            self.ipam.set_handle(IPNetwork(pool), address, R.endpoint_handle(endpoint_id),
                                 also_put={key: json.dumps(record, sort_keys=True)})
            self._endpoints[endpoint_id] = record
        except Exception:
            self.datapath.delete(endpoint_id)
            try:
                self.store.delete(self.keys.endpoint(self.host, endpoint_id))
            except Exception:  # etcd is the reason we are here; the record may not exist
                log.warning("could not remove record of failed endpoint %s", endpoint_id[:12])
            raise
        if self.firewall is not None:
            try:
                self.firewall.add_member(pool, str(address))
            except L3netError as e:     # the agent adds it from etcd within a second anyway
                log.warning("endpoint %s: could not add %s to its network's set: %s",
                            endpoint_id[:12], address, e)
        return {} if mac else {"MacAddress": created_mac}

    def release_address(self, pool_id, address):
        """ReleaseAddress. dockerd never asks twice (it only logs an error), so one that meets
        an etcd that does not answer is kept and retried in the background until done, and
        answered as done (the sweeper would otherwise free the address only much later)."""
        asked_at = time.time()

        def release():
            self.ipam.release_address(pool_id, address, in_use=self.endpoint_in_use, asked_at=asked_at)
        try:
            release()
        except StoreError as e:
            log.warning("ReleaseAddress %s: %s; retried in the background until done", address, e)
            self.releases.submit(release, f"ReleaseAddress {address}")

    def endpoint_in_use(self, endpoint_id):
        """Whether an endpoint of this host is live: it exists and no DeleteEndpoint was
        accepted for it (ReleaseAddress frees only an address no live endpoint holds)."""
        if endpoint_id in self.journal.pending():
            return False
        record = self._endpoints.get(endpoint_id) or self.endpoint(endpoint_id)
        return record is not None and not record.get("deleting")

    def _require_endpoint(self, endpoint_id):
        record = self.endpoint(endpoint_id)
        if record is None:
            raise L3netError(f"endpoint {endpoint_id[:12]} not found on this host")
        return record

    def join(self, network_id, endpoint_id, sandbox_key):
        record = self._require_endpoint(endpoint_id)
        if record["network"] != network_id:
            raise L3netError(f"endpoint {endpoint_id[:12]} belongs to another network")
        network = self.network(network_id)
        pools = network["pools"] if network else [record["pool"]]
        gateway = gateway_of(network or {})
        return {
            "InterfaceName": {"SrcName": record["temp_ifname"], "DstPrefix": "eth"},
            # The gateway is outside the container's /32: dockerd needs an on-link route to it
            # first (RouteType 1), then adds "default via <gateway>" if this network is the
            # container's gateway network (dockerd picks one; it moves the default route to
            # another when that one is disconnected).
            "Gateway": gateway,
            # The network's pools via this interface too: a container on several networks
            # must reach each network's peers through its interface there, with its address
            # there (the kernel picks the source address of the route's device), not through
            # the default route, where isolation would drop it.
            "StaticRoutes": [{"Destination": f"{gateway}/32", "RouteType": 1}] +
                            [{"Destination": p, "RouteType": 0, "NextHop": gateway} for p in pools],
            "DisableGatewayService": True,
        }

    def leave(self, network_id, endpoint_id):
        """Nothing to undo: the veth stays until DeleteEndpoint (dockerd moves it back first)."""

    def delete_endpoint(self, network_id, endpoint_id):
        """Idempotent: a second call, or one for an endpoint whose container died, succeeds.

        The deletion is written to the local journal (no etcd round trip on the way out of
        ``docker rm``) and done in the background: the veth (see datapath.Reaper), then the
        endpoint record, then the journal entry. A crash in between is finished by resume()."""
        self.journal.add(endpoint_id)
        record = self._endpoints.get(endpoint_id)
        if record is not None:
            self._endpoints[endpoint_id] = dict(record, deleting=True)
        self._delete_later(endpoint_id)

    def _delete_later(self, endpoint_id):
        def forget():
            self.unpublish(endpoint_id)
            record = self._endpoints.get(endpoint_id) or self.endpoint(endpoint_id)
            if record is not None:
                self._forget_flows(record)
            self.store.delete(self.keys.endpoint(self.host, endpoint_id))
            self._endpoints.pop(endpoint_id, None)
            self.journal.remove(endpoint_id)
        self.datapath.delete_later(endpoint_id, then=forget)

    def _forget_flows(self, record):
        """The endpoint's tracked connections go with it, unless its address already has a new
        holder (deletion runs in the background, and the IPAM hands the lowest free address
        out first): then they may be the new container's. Checked on a fresh read just before;
        a new holder's first connection is a container start away."""
        held = self.ipam.holder(IPNetwork(record["pool"]), record["address"])
        if held is None or held.get("handle") == R.endpoint_handle(record["id"]):
            self.datapath.forget_flows(record["address"])
        else:
            log.debug("%s already has a new holder: its tracked connections stay", record["address"])

    # -- published ports (docker run -p; rules: policy.py, put in force by the agent) ------
    def publish(self, network_id, endpoint_id, mappings):
        """Claim the host ports (PortClaims), then put the DNAT rules in force before answering."""
        if not mappings:
            return
        record = self._require_endpoint(endpoint_id)
        if (self.network(network_id) or {}).get("internal"):
            raise L3netError("the network is internal (--internal): no ports can be published on it")
        self.ports.claim(endpoint_id, network_id, record["address"], mappings, self._endpoint_alive,
                         self.datapath.host_port_free)
        if self.sync_policy is not None:
            # (the rule needs the endpoint's member record: it was written a moment ago)
            self.sync_policy(fresh=[self.keys.member(record["pool"], record["address"])])
        log.info("endpoint %s: published %s", endpoint_id[:12], ", ".join(describe_port(m) for m in mappings))

    def _endpoint_alive(self, endpoint_id):
        """An endpoint of this host that still has its veth (a container's veth dies with its
        namespace, even when nobody tells the plugin)."""
        record = self.endpoint(endpoint_id) if isinstance(endpoint_id, str) else None
        return bool(record and not record.get("deleting") and self.datapath.link_exists(record["host_ifname"]))

    def unpublish(self, endpoint_id):
        """RevokeExternalConnectivity; DeleteEndpoint too, for a container that died without
        the revoke. Idempotent."""
        if self.ports.release(endpoint_id) and self.sync_policy is not None:
            self.sync_policy()

    def oper_info(self, network_id, endpoint_id):
        record = self.endpoint(endpoint_id)
        if record is None:
            return {}
        return {"hostInterface": record["host_ifname"], "address": record["address"]}

    def endpoints(self):
        return [json.loads(v) for _, v, _ in self.store.get_prefix(self.keys.endpoints(self.host))]

    def networks(self):
        return [json.loads(v) for _, v, _ in self.store.get_prefix(self.keys.networks(self.host))]



def gateway_of(network):
    """The containers' gateway on a network record: its own, or 169.254.1.1 for a record from
    an older l3net or one whose field is not a plain link-local address (a bad record must not
    send a container's traffic anywhere else)."""
    value = network.get("gateway")
    try:
        address = V.ipv4(value, "gateway")
    except L3netError:
        return GATEWAY
    return str(address) if address in IPNetwork(LINK_LOCAL) and str(address) == value else GATEWAY


def mtu_of(network):
    """The MTU of a network record's containers (None: the kernel's default); a bad value in
    the record (an operator's edit) counts as none."""
    value = network.get("mtu")
    return value if isinstance(value, int) and MTU_RANGE[0] <= value <= MTU_RANGE[1] else None


def lowest_free_gateway(taken):
    """The lowest of the GATEWAYS addresses from 169.254.1.1 not in ``taken``."""
    first = IPAddress(GATEWAY)
    for n in range(GATEWAYS):
        if str(first + n) not in taken:
            return str(first + n)
    raise L3netError(f"this host has {GATEWAYS} l3net networks already: remove some first")
