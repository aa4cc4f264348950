"""The vocabulary of l3net's records: who holds an address, and which CIDR a key names. One home,
so that every reader (IPAM, driver, agent calculation, tunnel, sweeper, ipam check, CLI) parses
them alike.

An allocation's ``handle`` says who holds the address:

    endpoint:<endpoint id>   a Docker endpoint (a container's interface) holds it
    pending:<host>           handed out to dockerd on <host> (RequestAddress), no endpoint yet
    reserved:<pool>          a --gateway or --aux-address, held by the networks in its ``users``
    gateway:<PoolID>         the same, as an older l3net wrote it (read as a reservation)

A container's address is one held by an endpoint or pending for one; a reservation is never a
container's (no route, no set entry, no tunnel route). A container's address outside every
block its host owns is *borrowed* (its host's blocks were full, or an --ip moved there): its
host announces it, and tunnels carry it, as a /32 of its own.
"""

from .keys import key_cidr

ENDPOINT = "endpoint:"
PENDING = "pending:"
RESERVED = "reserved:"
OLD_GATEWAY = "gateway:"


def endpoint_handle(endpoint_id):
    return f"{ENDPOINT}{endpoint_id}"


def pending_handle(host):
    return f"{PENDING}{host}"


def endpoint_of(handle):
    """The endpoint ID an ``endpoint:`` handle names, else None."""
    return handle[len(ENDPOINT):] if isinstance(handle, str) and handle.startswith(ENDPOINT) else None


def is_endpoint(handle):
    return isinstance(handle, str) and handle.startswith(ENDPOINT)


def is_pending(handle):
    return isinstance(handle, str) and handle.startswith(PENDING)


def is_container(handle):
    """Held by a container's endpoint, or handed out for one about to be created."""
    return isinstance(handle, str) and handle.startswith((ENDPOINT, PENDING))


def is_reservation(handle):
    """A --gateway or --aux-address (also as an older l3net wrote a gateway)."""
    return isinstance(handle, str) and handle.startswith((RESERVED, OLD_GATEWAY))


def cidr_of_key(key):
    """The CIDR a key's last segment names (``.../10.20.0.0-26`` -> ``10.20.0.0/26``)."""
    return key_cidr(key.rsplit("/", 1)[1])


def ip_int(text):
    """Dotted quad -> int, without netaddr's (measurable) parsing cost."""
    a, b, c, d = text.split(".")
    return (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)


def block_ranges(cidrs):
    """[(first, last)] of the blocks ``cidrs`` (as ints), for :func:`borrowed`."""
    from netaddr import IPNetwork
    return [(IPNetwork(c).first, IPNetwork(c).last) for c in cidrs]


def borrowed(ip, record, ranges):
    """Whether the allocation ``record`` of ``ip`` is a container's address outside every block
    its host owns (``ranges``: {host: block_ranges}). The one rule the BGP announcements, the
    agent's incremental index and the VXLAN routes all apply."""
    if not is_container(record["handle"]):
        return False
    value = ip_int(ip)
    return not any(first <= value <= last for first, last in ranges.get(record["host"], ()))
