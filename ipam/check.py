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

Addresses held by nodes that are gone for good are ``l3netctl node remove``'s business.
"""

import json
from dataclasses import asdict, dataclass

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


def find(store, keys, now, min_age=MIN_AGE):
    blocks = [b for _, b in _records(store, keys.all_blocks())]
    endpoints, aux = {}, set()
    for key, record in _records(store, keys.all_hosts()):
        host = keys.host_of(key)
        if "/endpoints/" in key:
            endpoints[record["id"]] = (key, host, record)
        elif "/networks/" in key:
            aux.update(record.get("aux", []))
    held = {}
    findings = []
    for block in blocks:
        for ip, a in block["allocations"].items():
            handle = a["handle"]
            held[ip] = handle
            old = now - a.get("time", now) >= min_age
            if handle.startswith("pending:") and old and ip not in aux:
                findings.append(Finding("leaked address", ip, block["pool"], a["host"], handle,
                                        "requested but never given to an endpoint"))
            elif handle.startswith("endpoint:") and old and handle[9:] not in endpoints:
                findings.append(Finding("leaked address", ip, block["pool"], a["host"], handle,
                                        "its endpoint is gone"))
    for endpoint_id, (key, host, record) in sorted(endpoints.items()):
        if now - record.get("created", 0) < min_age:
            continue
        if held.get(record["address"]) != f"endpoint:{endpoint_id}":
            findings.append(Finding("orphaned endpoint", record["address"], record.get("pool", ""),
                                    host, f"endpoint:{endpoint_id}",
                                    f"its address is held by {held.get(record['address'], 'nobody')}",
                                    key=key))
    return findings


def fix(store, ipam, findings):
    """Release leaked addresses (only if the same holder still has them) and delete orphaned
    endpoint records; marks each finding fixed or not."""
    for f in findings:
        if f.kind == "leaked address":
            f.fixed = ipam.release_held(f.pool, f.address, f.handle)
        else:
            store.delete(f.key)
            f.fixed = True
    return findings
