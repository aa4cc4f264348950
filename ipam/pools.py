"""Pools: the address ranges Docker networks draw from (pure logic, no I/O).

A pool is one CIDR shared by every host: ``--subnet 10.20.0.0/16`` on two hosts is the same pool.
Docker remembers the PoolID we return for ever (it never asks again: no request replay), so
each RequestPool gets its own: ``<cidr>[@<ip-range>]#<claim>``. The claim is a random token
recorded in the pool record (``claims``) with its host and time. A ReleasePool then drops
exactly that claim: a re-sent one finds nothing to drop, and can never take away what another
network on the same pool (on any host) still uses.
PoolIDs without a claim (given out by l3net before claims existed) still work.
"""

import re
import secrets
import time

from netaddr import AddrFormatError, IPNetwork

from core.errors import L3netError

MIN_POOL_PREFIX = 8
MAX_POOL_PREFIX = 30
# A block record holds its allocations (~140 bytes each) and is written whole on each change:
# a /22 (1,024 addresses, ~150 kB at most) stays a tenth of etcd's 1.5 MiB request limit.
MIN_BLOCK_PREFIX = 22
MAX_BLOCK_PREFIX = 32

# Options accepted with --ipam-opt (and their meaning, for the error message).
POOL_OPTIONS = {
    "block-size": "prefix length of the blocks hosts claim, e.g. 26",
    "nat-outgoing": "true|false: masquerade traffic leaving the pools",
    "encap": "never|cross-subnet|always: VXLAN between hosts (cross-subnet: only towards hosts "
             "outside this host's own subnet)",
}
ENCAP_MODES = ("never", "cross-subnet", "always")


def parse_cidr(text, what="subnet"):
    """An IPv4 network address with a prefix, exactly as the user should write it."""
    if not isinstance(text, str) or "/" not in text or len(text) > 18:
        raise L3netError(f"invalid {what} {text!r}: expected an IPv4 CIDR such as 10.20.0.0/16")
    try:
        net = IPNetwork(text, version=4)
    except (AddrFormatError, ValueError, TypeError):
        raise L3netError(f"invalid {what} {text!r}: expected an IPv4 CIDR such as 10.20.0.0/16") from None
    if net.ip != net.network:
        raise L3netError(f"invalid {what} {text}: host bits set (did you mean {net.cidr}?)")
    return net


_CLAIM = re.compile(r"[0-9a-f]{8,32}")


def new_claim():
    return secrets.token_hex(8)


def make_pool_id(cidr, subpool=None, claim=""):
    base = f"{cidr}@{subpool}" if subpool is not None else str(cidr)
    return f"{base}#{claim}" if claim else base


def claim_of(pool_id):
    """The claim token of a PoolID ("" for one without)."""
    return pool_id.partition("#")[2] if isinstance(pool_id, str) else ""


def parse_pool_id(pool_id):
    """PoolID -> (pool IPNetwork, range IPNetwork). The range is the pool without --ip-range."""
    if not isinstance(pool_id, str) or not pool_id or len(pool_id) > 72:
        raise L3netError(f"invalid PoolID {pool_id!r}")
    base, mark, claim = pool_id.partition("#")
    if mark and not _CLAIM.fullmatch(claim):
        raise L3netError(f"invalid PoolID {pool_id!r}")
    cidr, _, sub = base.partition("@")
    pool = parse_cidr(cidr, "PoolID")
    rng = parse_cidr(sub, "PoolID") if sub else pool
    if rng not in pool:
        raise L3netError(f"invalid PoolID {pool_id!r}: range outside the pool")
    return pool, rng


def parse_pool_options(options):
    """--ipam-opt values -> {"block_prefix": int or None, "nat_outgoing": bool or None}."""
    options = options or {}
    unknown = sorted(set(options) - set(POOL_OPTIONS))
    if unknown:
        known = ", ".join(f"{k} ({v})" for k, v in POOL_OPTIONS.items())
        raise L3netError(f"unknown --ipam-opt {', '.join(unknown)}; l3net knows: {known}")
    result = {"block_prefix": None, "nat_outgoing": None, "encap": None}
    if "block-size" in options:
        text = str(options["block-size"]).lstrip("/")
        if not text.isdigit() or not MIN_BLOCK_PREFIX <= int(text) <= MAX_BLOCK_PREFIX:
            raise L3netError(f"invalid block-size {options['block-size']!r}: expected a prefix "
                             f"length between {MIN_BLOCK_PREFIX} and {MAX_BLOCK_PREFIX} (a larger "
                             "block's record would grow past what etcd carries well)")
        result["block_prefix"] = int(text)
    if "nat-outgoing" in options:
        value = str(options["nat-outgoing"]).lower()
        if value not in ("true", "false", "1", "0", "yes", "no"):
            raise L3netError(f"invalid nat-outgoing {options['nat-outgoing']!r}: expected true or false")
        result["nat_outgoing"] = value in ("true", "1", "yes")
    if "encap" in options:
        value = str(options["encap"]).lower()
        if value not in ENCAP_MODES:
            raise L3netError(f"invalid encap {str(options['encap'])[:40]!r}: expected {', '.join(ENCAP_MODES)}")
        result["encap"] = value
    return result


def encap_of(record):
    """A pool record's encapsulation mode ("never" when absent or not one of the modes: a bad
    record must not send traffic into a tunnel)."""
    value = record.get("encap", "never") if isinstance(record, dict) else "never"
    return value if value in ENCAP_MODES else "never"


def new_pool_record(cidr, block_prefix, nat_outgoing=True, auto=False, encap=None):
    record = {
        "cidr": str(cidr),
        "block_prefix": int(block_prefix),
        "nat_outgoing": True if nat_outgoing is None else bool(nat_outgoing),
        "auto": auto,
        "refs": {},
        "created": time.time(),
    }
    if encap and encap != "never":
        record["encap"] = encap
    return record


def add_claim(record, host, claim, now=None):
    """Count one more network (one RequestPool) of ``host`` on the pool."""
    record.setdefault("claims", {})[claim] = {"host": host, "time": round(now or time.time(), 3)}
    record["refs"][host] = record["refs"].get(host, 0) + 1


def drop_claim(record, host, claim):
    """ReleasePool: drop ``claim`` (True), or nothing if it is not there (a re-sent call).
    A PoolID without a claim (older l3net) drops one of the host's references not backed by
    a claim, if there is one."""
    claims = record.setdefault("claims", {})
    if claim:
        entry = claims.pop(claim, None)
        if entry is None:
            return False
        host = entry["host"]
    elif record["refs"].get(host, 0) <= sum(1 for c in claims.values() if c["host"] == host):
        return False
    if record["refs"].get(host, 0) > 1:
        record["refs"][host] -= 1
    else:
        record["refs"].pop(host, None)
    return True


def excess_claims(record, host, networks, min_age, now, referenced=()):
    """Claims of ``host`` beyond the number of its networks on the pool (``networks``): a
    RequestPool whose network never came (a re-sent call, a failed create whose ReleasePool
    was lost). Claims are interchangeable, so any old enough and not naming a reservation
    will do (those no reservation names first); entries younger than ``min_age`` may be a
    network being made."""
    mine = [(e["time"], c) for c, e in record.get("claims", {}).items() if e["host"] == host]
    extra = record["refs"].get(host, 0) - networks     # references without claims are older
    if extra <= 0:
        return []
    old = sorted((c in referenced, c) for t, c in mine if now - t >= min_age)
    return [c for _, c in old[:extra]]


def effective_block_prefix(pool, block_prefix):
    """A block never spans more than its pool: a /28 pool with /26 blocks has one /28 block."""
    return max(int(block_prefix), pool.prefixlen)


def overlapping(cidr, existing):
    """The first CIDR of ``existing`` that overlaps ``cidr`` (but is not equal), else None."""
    for other in existing:
        other = IPNetwork(other)
        if other != cidr and (cidr.first <= other.last and other.first <= cidr.last):
            return other
    return None


def choose_free_subnet(default_range, prefix, existing, within=()):
    """The first ``/prefix`` subnet of ``default_range`` that overlaps nothing in ``existing``
    (pools, infrastructure) and, when ``within`` is given, lies inside one of those ranges."""
    taken = [IPNetwork(c) for c in existing]
    for candidate in default_range.subnet(prefix):
        if within and not any(candidate in w for w in within):
            continue
        if not any(candidate.first <= t.last and t.first <= candidate.last for t in taken):
            return candidate
    return None
