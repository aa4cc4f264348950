"""Blocks: the pieces of a pool that hosts claim, and the allocations inside them (pure logic).

A pool is carved into aligned blocks (/26 by default). A block belongs to one host (its
*affinity*): that host hands out addresses from it first, and (with BGP) announces the block as
one aggregate route. A block record holds every allocation in it::

    {"cidr": "10.20.0.0/26", "pool": "10.20.0.0/16", "host": "node-1",
     "allocations": {"10.20.0.5": {"handle": "endpoint:<id>", "host": "node-1", "time": ...}}}

so that who holds each address, and since when, can always be read back (leak hunting).
"""

import time

from netaddr import IPAddress, IPNetwork

from core.records import OLD_GATEWAY, RESERVED, ip_int


def block_of(address, pool, block_prefix):
    """The aligned block of ``pool`` that contains ``address``."""
    return IPNetwork(f"{address}/{block_prefix}").cidr


def candidate_blocks(pool, rng, block_prefix):
    """Every block of the pool that has addresses inside ``rng``, in address order."""
    if rng.prefixlen >= block_prefix:
        yield block_of(rng.ip, pool, block_prefix)
        return
    yield from rng.subnet(block_prefix)


def new_block(cidr, pool, host):
    return {"cidr": str(cidr), "pool": str(pool), "host": host, "allocations": {}}


def reserved(pool):
    """Addresses of the pool never handed out: its network and broadcast address."""
    if pool.prefixlen >= 31:
        return set()
    return {pool.first, pool.last}


def free_address(block, pool, rng):
    """The lowest free address of ``block`` inside ``rng``, or None."""
    net = IPNetwork(block["cidr"])
    first, last = max(net.first, rng.first), min(net.last, rng.last)
    skip = reserved(pool)
    used = {ip_int(a) for a in block["allocations"]}
    for value in range(first, last + 1):
        if value not in skip and value not in used:
            return IPAddress(value, 4)
    return None


def allocation(handle, host, claim=None):
    """``claim``: the PoolID's claim of an explicit address (--ip, --aux-address) still pending."""
    record = {"handle": handle, "host": host, "time": round(time.time(), 3)}
    if claim is not None:
        record["claim"] = claim
    return record


def members(allocations):
    """{address: member record} of a block's allocations: the small copy every agent follows
    (who holds the address, on which host, since when), without a reservation's users."""
    return {ip: {"host": a.get("host", ""), "handle": str(a.get("handle", "")), "time": a.get("time", 0)}
            for ip, a in allocations.items() if isinstance(a, dict)}


def reservation(pool, users):
    """A --gateway or --aux-address: held by networks, ``users`` = {PoolID claim: host}, one
    per network that asked for it (networks on one pool on several hosts may share it), and
    free again when the last of them releases it."""
    return {"handle": f"{RESERVED}{pool}", "host": next(iter(users.values())), "users": dict(users),
            "time": round(time.time(), 3)}


def reservation_users(held):
    """{claim: host} of a reservation, None for any other allocation. A gateway of an older
    l3net (``gateway:<PoolID>``, no users) belongs to the claim-less PoolIDs of that time."""
    handle = str(held.get("handle", ""))
    if handle.startswith(RESERVED):
        return held.setdefault("users", {})
    if handle.startswith(OLD_GATEWAY):
        held["handle"] = RESERVED + handle[len(OLD_GATEWAY):].partition("@")[0]
        held["users"] = {"": held.get("host", "")}
        return held["users"]
    return None
