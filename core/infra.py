"""The cluster's infrastructure as l3net sees it: what containers may not reach, and what no pool
may cover (pure: records in, CIDRs and reasons out).

A container is an untrusted program. Whatever its host can reach, a container NATed to the
host's address could reach too, unless the firewall stops it; and a pool drawn over the hosts'
own network would make every node filter and route those addresses as containers'. So:

  * ``RESERVED`` ranges are never pools: "this network", loopback, link-local (the cloud
    instance-metadata service at 169.254.169.254 and the containers' gateway 169.254.1.1),
    multicast and the reserved class E;
  * *protected* destinations are dropped from containers unless a host rule with ``--to`` opens
    them: link-local, the etcd endpoints, the BGP peers, and the ranges an operator adds with
    ``l3netctl host protect``. Every address of every node is protected too, as a cluster host
    (the ``l3n-hosts`` set; host rules open services on them);
  * a pool may not overlap any of these, nor a node's connected networks, and when the operator
    set allowed ranges (``l3netctl pool ranges set``) it must lie inside one of them.
"""

import re

from netaddr import AddrFormatError, IPAddress, IPNetwork

LINK_LOCAL = "169.254.0.0/16"
# Instance-metadata services outside link-local (Azure's WireServer, Alibaba Cloud's), closed
# like 169.254.169.254.
METADATA = ["168.63.129.16/32", "100.100.100.200/32"]
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
RESERVED = [("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
            ("127.0.0.0/8", "loopback (127.0.0.0/8)"),
            (LINK_LOCAL, "link-local (169.254.0.0/16: cloud metadata, the containers' gateway)"),
            ("224.0.0.0/3", "multicast and reserved addresses (224.0.0.0 and above)")]


def canonical_ip(value):
    """``value`` if it is an IPv4 address written the canonical way, else None: what reaches
    ipset / iptables-restore input from etcd is exactly an address, nothing more."""
    try:
        return value if isinstance(value, str) and str(IPAddress(value, 4)) == value else None
    except (ValueError, TypeError, AddrFormatError):
        return None


def unicast_ip(value):
    """``value`` if it is a canonical IPv4 address a host or a container can have (not in
    0.0.0.0/8, 127/8, 224.0.0.0 and above: ipset refuses 0.0.0.0, and none of these belongs in
    a set of hosts or members), else None."""
    ip = canonical_ip(value)
    if ip is None or any(IPAddress(ip) in IPNetwork(c) for c in ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/3")):
        return None
    return ip


def canonical_cidr(value):
    """``value`` if it is an IPv4 CIDR with no host bits, written the canonical way, else None."""
    try:
        net = IPNetwork(value, version=4) if isinstance(value, str) and "/" in value else None
    except (ValueError, TypeError, AddrFormatError):
        return None
    return value if net is not None and str(net) == value and net.ip == net.network else None


def node_facts(record):
    """A node registry record -> {"name", "ip", "addresses", "networks", "etcd"} with only
    well-formed entries kept, or None when the record has no name and address. (Records come
    from etcd: anyone who can write there could put anything in them.)"""
    if not isinstance(record, dict) or not isinstance(record.get("name"), str) or \
            not NODE_NAME.fullmatch(record["name"]):
        return None
    ip = unicast_ip(record.get("ip"))
    if ip is None:
        return None

    def listed(field, check):
        values = record.get(field)
        return sorted({v for v in values[:MAX_LISTED] if check(v)}) if isinstance(values, list) else []
    addresses = sorted(set(listed("addresses", unicast_ip)) | {ip})
    return {"name": record["name"], "ip": ip, "addresses": addresses,
            "networks": listed("networks", canonical_cidr), "etcd": listed("etcd", unicast_ip)}


MAX_LISTED = 256        # addresses, networks or etcd endpoints a node record may list


def protected(nodes, peers, operator):
    """CIDRs containers may not reach (``l3n-protected``), beside the nodes' addresses:
    link-local, every node's etcd endpoints, the BGP peers' addresses, the operator's ranges."""
    out = {LINK_LOCAL, *METADATA}
    out |= {f"{ip}/32" for n in nodes for ip in n["etcd"]}
    out |= {f"{ip}/32" for ip in peers if unicast_ip(ip)}
    out |= {c for c in operator if canonical_cidr(c) and not c.endswith("/0")}   # ipset: /1../32
    return sorted(out, key=lambda c: (IPNetwork(c).first, IPNetwork(c).prefixlen))


def infrastructure(nodes, peers, operator, networks=True):
    """[(IPNetwork, why)] no pool may overlap: the reserved ranges, every node's addresses and
    (``networks``) connected networks, the etcd endpoints, the BGP peers and the operator's
    protected ranges. The agent asks without networks and operator ranges for the pools it
    refuses to put in force (one written into etcd behind l3netctl's back): those are the
    pools that would take the hosts' own addresses."""
    out = [(IPNetwork(c), why) for c, why in RESERVED]
    for n in nodes:
        out += [(IPNetwork(f"{a}/32"), f"node {n['name']}'s address {a}") for a in n["addresses"]]
        if networks:
            out += [(IPNetwork(c), f"node {n['name']}'s network {c}") for c in n["networks"]]
        out += [(IPNetwork(f"{a}/32"), f"the etcd endpoint {a}") for a in n["etcd"]]
    out += [(IPNetwork(f"{ip}/32"), f"the BGP peer {ip}") for ip in peers if unicast_ip(ip)]
    out += [(IPNetwork(c), f"the protected range {c} (l3netctl host protect)")
            for c in operator if canonical_cidr(c)]
    return out


def overlaps(a, b):
    return a.first <= b.last and b.first <= a.last


def pool_conflict(cidr, infra, allowed=()):
    """Why ``cidr`` may not be a pool (one clear sentence, naming the most specific thing it
    covers), or None when it may."""
    cidr = IPNetwork(cidr)
    for net, why in sorted(infra, key=lambda item: -item[0].prefixlen):
        if overlaps(cidr, net):
            return f"subnet {cidr} overlaps {why}: pick a subnet away from the cluster's infrastructure"
    allowed = [IPNetwork(c) for c in allowed if canonical_cidr(c)]
    if allowed and not any(cidr in a for a in allowed):
        return (f"subnet {cidr} is outside the ranges allowed for pools "
                f"({', '.join(map(str, allowed))}; l3netctl pool ranges)")
    return None

