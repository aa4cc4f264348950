"""``l3netctl ipam check``: find what the IPAM and the endpoint records disagree on (pure: it
reads records and returns findings; ``fix`` applies them through the allocator's CAS calls).

  * leaked address: allocated ``min_age`` seconds ago or more, and
      - ``pending:<host>`` (RequestAddress without a CreateEndpoint: a docker run that died,
        or etcd failing in between), unless it is an ``--aux-address`` of a network, or
      - ``endpoint:<id>`` whose endpoint record is gone (DeleteEndpoint happened, but the
        ReleaseAddress that follows never reached etcd);
  * orphaned endpoint: an endpoint record (created ``min_age`` ago or more) whose address is
    not held by that endpoint. (Right after a ReleaseAddress its record may linger for some
    milliseconds until the background deletion: deleting it then is harmless.)
  * unused pool claim: a host holds more claims on a pool (RequestPool calls) than it has
    networks on it, the extra ones ``min_age`` old (a re-sent RequestPool, or a failed create
    whose ReleasePool was lost): the pool would never be forgotten;
  * stale reservation: a --gateway/--aux-address still reserved for a claim its pool no longer
    has (the network's ReleaseAddress was lost, its ReleasePool was not);
  * gone container: an endpoint record of *this* host (``local`` given) whose veth is gone,
    created ``min_age`` ago or more: its container died while the plugin could not hear of it
    (each node's sweeper also clears these by itself, see plugin/sweep.py).

Addresses held by nodes that are gone for good are ``l3netctl node remove``'s business.
"""

import json
from dataclasses import asdict, dataclass

from core import records as R

from . import blocks as B
from . import pools as P

MIN_AGE = 300.0


@dataclass
class Finding:
    kind: str            # "leaked address" | "orphaned endpoint"
    address: str
    pool: str
    host: str
    handle: str
    detail: str
    key: str = ""        # the endpoint record's key, for orphans
    fixed: bool = False

    def row(self):
        return asdict(self)


def _records(store, prefix):
    return [(k, json.loads(v)) for k, v, _ in store.get_prefix(prefix)]


def find(store, keys, now, min_age=MIN_AGE, local=None):
    """``local``: (host, link_exists) to judge the endpoints of the host l3netctl runs on."""
    # blocks before pools: a reservation's claim is written before the reservation, so one seen
    # in a block is in the pool read after it unless it was released
    blocks = [b for _, b in _records(store, keys.all_blocks())]
    pools = {r["cidr"]: r for _, r in _records(store, keys.pools())}
    endpoints, aux, networks = {}, set(), {}
    for key, record in _records(store, keys.all_hosts()):
        host = keys.host_of(key)
        if "/endpoints/" in key:
            endpoints[record["id"]] = (key, host, record)
        elif "/networks/" in key:
            aux.update(a.split("/")[0] for a in record.get("aux", []))
            for cidr in record.get("pools", []):
                networks[(cidr, host)] = networks.get((cidr, host), 0) + 1
    held = {}
    referenced = {}         # pool -> claims some reservation names
    findings = []
    for block in blocks:
        for ip, a in block["allocations"].items():
            handle = a["handle"]
            held[ip] = handle
            old = now - a.get("time", now) >= min_age
            users = B.reservation_users(dict(a))
            if users is not None:
                referenced.setdefault(block["pool"], set()).update(users)
                claims = pools.get(block["pool"], {}).get("claims", {})
                for claim, host in sorted(users.items()):
                    if claim and claim not in claims:
                        findings.append(Finding("stale reservation", ip, block["pool"], host,
                                                f"claim:{claim}", "its network released the pool"))
                continue
            if R.is_pending(handle) and old and ip not in aux:
                findings.append(Finding("leaked address", ip, block["pool"], a["host"], handle,
                                        "requested but never given to an endpoint"))
            elif R.is_endpoint(handle) and old and R.endpoint_of(handle) not in endpoints:
                findings.append(Finding("leaked address", ip, block["pool"], a["host"], handle,
                                        "its endpoint is gone"))
    for endpoint_id, (key, host, record) in sorted(endpoints.items()):
        if now - record.get("created", 0) < min_age:
            continue
        if held.get(record["address"]) != R.endpoint_handle(endpoint_id):
            findings.append(Finding("orphaned endpoint", record["address"], record.get("pool", ""),
                                    host, R.endpoint_handle(endpoint_id),
                                    f"its address is held by {held.get(record['address'], 'nobody')}",
                                    key=key))
        elif local is not None and host == local[0] and not record.get("deleting") and \
                not local[1](record.get("host_ifname", "")):
            findings.append(Finding("gone container", record["address"], record.get("pool", ""), host,
                                    R.endpoint_handle(endpoint_id), "its veth is gone", key=key))
    for cidr, pool in sorted(pools.items()):
        for host in sorted(pool.get("refs", {})):
            for claim in P.excess_claims(pool, host, networks.get((cidr, host), 0), min_age, now,
                                         referenced.get(cidr, ())):
                findings.append(Finding("unused pool claim", "", cidr, host, f"claim:{claim}",
                                        "a RequestPool without a network"))
    return findings


def fix(store, ipam, findings):
    """Release leaked addresses (only if the same holder still has them) and delete orphaned
    endpoint records; marks each finding fixed or not."""
    for f in findings:
        claim = f.handle.partition(":")[2]
        if f.kind == "leaked address":
            f.fixed = ipam.release_held(f.pool, f.address, f.handle)
        elif f.kind == "unused pool claim":
            f.fixed = ipam.release_pool(P.make_pool_id(f.pool, None, claim))
        elif f.kind == "stale reservation":
            ipam.release_address(P.make_pool_id(f.pool, None, claim), f.address)
            f.fixed = True
        elif f.kind == "gone container":
            f.fixed = ipam.release_held(f.pool, f.address, f.handle)
            store.delete(f.key)
        else:
            store.delete(f.key)
            f.fixed = True
    return findings
