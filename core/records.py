"""The vocabulary of l3net's records: who holds an address, and which CIDR a key names. One home,
so that every reader (IPAM, driver, agent calculation, tunnel, sweeper, ipam check, CLI) parses
them alike.

An allocation's ``handle`` says who holds the address:

    endpoint:<endpoint id>   a Docker endpoint (a container's interface) holds it
    pending:<host>           handed out to dockerd on <host> (RequestAddress), no endpoint yet
    reserved:<pool>          a --gateway or --aux-address, held by the networks in its ``users``
    gateway:<PoolID>         the same, as an older l3net wrote it (read as a reservation)

A container's address is one held by an endpoint or pending for one; a reservation is never a
container's (no route, no set entry, no tunnel route).
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
