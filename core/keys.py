"""The etcd key layout: the one place that knows where things live.

Everything l3net stores sits under one prefix (``--etcd-prefix``, default ``/l3net``)::

    <prefix>/ipam/pools/<pool>                 pool record (JSON), shared by all hosts
    <prefix>/ipam/blocks/<pool>/<block>        block record (JSON): owner host + allocations
    <prefix>/ipam/affinity/<host>/<block>      "<pool cidr>": the blocks a host owns
    <prefix>/ipam/members/<pool>/<address>     {"host", "handle", "time"} of one allocation: the block's
                                               entry, written in the same transaction (what the agents
                                               follow: a container start is one small event, not a block)
    <prefix>/hosts/<host>/networks/<id>        Docker network created on that host (JSON)
    <prefix>/hosts/<host>/endpoints/<id>       endpoint (veth) on that host (JSON)
    <prefix>/nodes/<host>                      node registry: address, AS, since (leased; written on change only)
    <prefix>/bgp/config                        cluster BGP settings: default AS, mesh on/off
    <prefix>/bgp/peers/<ip>                    global BGP peers (route reflectors, ToR routers)
    <prefix>/bgp/nodes/<host>                  per-node BGP settings: AS, peers
    <prefix>/policy/rules/<id>                 policy: --from network may reach --to network
    <prefix>/policy/hosts/<id>                 host service (or --to destination) containers may reach
    <prefix>/policy/protected/<cidr>           a range containers may not reach (l3netctl host protect)
    <prefix>/policy/nodes/<host>               every address a node registered (no lease: kept
                                               protected until l3netctl node remove)
    <prefix>/ipam/ranges                       the ranges pools must lie in (l3netctl pool ranges set)
    <prefix>/ipam/members-synced               the member records of every block were written once

``<pool>`` and ``<block>`` are CIDRs with the ``/`` written as ``-`` (``10.20.0.0-16``), so a
CIDR never adds a path level. Host names are validated before they reach a key (no ``/``).
"""

from netaddr import IPNetwork


def cidr_key(cidr):
    """``10.20.0.0/16`` -> ``10.20.0.0-16`` (one key segment)."""
    return str(IPNetwork(cidr)).replace("/", "-")


def key_cidr(segment):
    """Inverse of :func:`cidr_key`."""
    return segment.replace("-", "/")


class Keys:
    def __init__(self, prefix):
        self.prefix = "/" + prefix.strip("/")

    def agent_view(self, host):
        """The prefixes the agent of ``host`` copies and follows: pools, block ownership, one
        small record per allocation (not the blocks: each holds up to 1,024 allocations and
        changes with every container of its host), nodes, BGP, policy, and of the hosts'
        records only its own (published ports; endpoints and networks, for the sweeper)."""
        return [self.pools(), self.all_affinities(), self.pool_ranges(), self.all_members(),
                f"{self.prefix}/nodes/", f"{self.prefix}/bgp/", f"{self.prefix}/policy/", self.ports(host),
                self.endpoints(host), self.networks(host)]

    # IPAM --------------------------------------------------------------
    def pools(self):
        return f"{self.prefix}/ipam/pools/"

    def pool(self, cidr):
        return f"{self.prefix}/ipam/pools/{cidr_key(cidr)}"

    def pool_ranges(self):
        """One record: {"ranges": [CIDR, ...]} (absent: pools may be anywhere but infrastructure)."""
        return f"{self.prefix}/ipam/ranges"

    def blocks(self, pool_cidr):
        return f"{self.prefix}/ipam/blocks/{cidr_key(pool_cidr)}/"

    def all_blocks(self):
        return f"{self.prefix}/ipam/blocks/"

    def block(self, pool_cidr, block_cidr):
        return f"{self.blocks(pool_cidr)}{cidr_key(block_cidr)}"

    def all_members(self):
        return f"{self.prefix}/ipam/members/"

    def members_synced(self):
        """Present once the member records of every block were written (Ipam.ensure_members)."""
        return f"{self.prefix}/ipam/members-synced"

    def members(self, pool_cidr):
        return f"{self.all_members()}{cidr_key(pool_cidr)}/"

    def member(self, pool_cidr, address):
        return f"{self.members(pool_cidr)}{address}"

    def affinities(self, host):
        return f"{self.prefix}/ipam/affinity/{host}/"

    def affinity(self, host, block_cidr):
        return f"{self.affinities(host)}{cidr_key(block_cidr)}"

    def all_affinities(self):
        return f"{self.prefix}/ipam/affinity/"

    # Host-scoped driver state -----------------------------------------
    def all_hosts(self):
        return f"{self.prefix}/hosts/"

    def host_of(self, key):
        """The host segment of a key under all_hosts(), all_affinities() or bgp_nodes()."""
        for root in (self.all_hosts(), self.all_affinities(), self.bgp_nodes()):
            if key.startswith(root):
                return key[len(root):].split("/")[0]
        raise ValueError(f"{key} is not a per-host key")

    def host(self, host):
        return f"{self.prefix}/hosts/{host}/"

    def networks(self, host):
        return f"{self.prefix}/hosts/{host}/networks/"

    def network(self, host, network_id):
        return f"{self.networks(host)}{network_id}"

    def endpoints(self, host):
        return f"{self.prefix}/hosts/{host}/endpoints/"

    def ports(self, host):
        """Host ports published on ``host`` (docker run -p), one key per protocol and port."""
        return f"{self.host(host)}ports/"

    def port(self, host, proto, host_port):
        return f"{self.ports(host)}{proto}-{int(host_port)}"

    def endpoint(self, host, endpoint_id):
        return f"{self.endpoints(host)}{endpoint_id}"

    # Nodes and BGP -------------------------------------------------------
    def nodes(self):
        return f"{self.prefix}/nodes/"

    def node(self, host):
        return f"{self.nodes()}{host}"

    def bgp_config(self):
        return f"{self.prefix}/bgp/config"

    def bgp_peers(self):
        return f"{self.prefix}/bgp/peers/"

    def bgp_peer(self, ip):
        return f"{self.bgp_peers()}{ip}"

    def bgp_nodes(self):
        return f"{self.prefix}/bgp/nodes/"

    def bgp_node(self, host):
        return f"{self.bgp_nodes()}{host}"

    # Policy -------------------------------------------------------------
    def policy_rules(self):
        return f"{self.prefix}/policy/rules/"

    def policy_rule(self, rule_id):
        return f"{self.policy_rules()}{rule_id}"

    def host_rules(self):
        return f"{self.prefix}/policy/hosts/"

    def host_rule(self, rule_id):
        return f"{self.host_rules()}{rule_id}"

    def all_node_addresses(self):
        return f"{self.prefix}/policy/nodes/"

    def node_addresses(self, host):
        return f"{self.all_node_addresses()}{host}"

    def protected_ranges(self):
        return f"{self.prefix}/policy/protected/"

    def protected_range(self, cidr):
        return f"{self.protected_ranges()}{cidr_key(cidr)}"
