"""The IPAM: pools, block claims and address allocation over the store, safe across hosts.

Every change to a pool or block record is a compare-and-swap transaction on the record's etcd
revision; a conflict (another host or thread got there first) re-reads and retries, a bounded
number of times. Two allocators can therefore never hand out the same address.

Order of preference for an automatic address (as Calico does):
  1. a free address in a block this host already owns;
  2. a new block claimed for this host (create-if-absent, so two hosts never share a claim);
  3. a single address borrowed from another host's block;
  4. otherwise the pool is exhausted.
"""

import json
import logging
import threading
import time

from netaddr import AddrFormatError, IPAddress, IPNetwork

from core import infra
from core import records as R
from core.errors import L3netError
from core.validate import MAX_TAGS

from . import blocks as B
from . import pools as P

log = logging.getLogger("l3net.ipam")

MAX_ATTEMPTS = 64
GATEWAY_TYPE = "com.docker.network.gateway"
# What Docker shows as the network's gateway. Containers really route via 169.254.1.x, the
# network's own on its host (driver.Join);
# answering a gateway here keeps dockerd from spending a pool address on one.
POOL_GATEWAY = "169.254.1.1/32"


class Ipam:
    def __init__(self, store, keys, host, default_range="10.250.0.0/16", default_prefix=24,
                 block_prefix=26, infrastructure=None):
        """``infrastructure``: a callable returning ([(IPNetwork, why)], [allowed CIDR]): what no
        pool may overlap and where pools must lie (plugin/infra.py; the node passes one that
        reads etcd). By default only the reserved ranges are refused."""
        self.store = store
        self.infrastructure = infrastructure or (lambda: (infra.infrastructure([], [], []), []))
        self.keys = keys
        self.host = host
        self.default_range = IPNetwork(default_range)
        self.default_prefix = int(default_prefix)
        self.block_prefix = int(block_prefix)
        self._locks = {}
        self._locks_guard = threading.Lock()
        # Caches that save an etcd read per call. A pool's block size never changes while the
        # pool exists; this host's block affinities change only through this object (an
        # operator removing a node's blocks does so when the node is gone).
        self._block_prefix = {}
        self._mine = {}
        self._blocks = {}     # block key -> (JSON, revision) as last read or written here

    # -- small helpers -------------------------------------------------
    def _member_writes(self, pool, old, allocations):
        """(puts, deletes) that bring the member records of a block's addresses in line with
        its ``allocations``, from ``old`` (``B.members`` of the block as read, taken before it
        was changed): written in the block's own transaction, so the two never disagree. Only
        what changed."""
        new = B.members(allocations)
        puts = {self.keys.member(pool, ip): json.dumps(m, sort_keys=True)
                for ip, m in new.items() if old.get(ip) != m}
        return puts, [self.keys.member(pool, ip) for ip in old if ip not in new]

    def sync_members(self, dry_run=False):
        """Write the member records every block implies and delete those no block implies (a
        cluster written by an l3net without them, or a record written by hand), each block in
        a transaction on its revision. Returns the number of records changed (``dry_run``:
        that would change, nothing written)."""
        changed = 0
        present = {}
        for key, value, _ in self.store.get_prefix(self.keys.all_members()):
            present[key] = value
        implied = set()
        for key, value, rev in self.store.get_prefix(self.keys.all_blocks()):
            try:
                block = json.loads(value)
                pool, allocations = block["pool"], block["allocations"]
            except (ValueError, KeyError, TypeError):
                continue
            want = {self.keys.member(pool, ip): json.dumps(m, sort_keys=True)
                    for ip, m in B.members(allocations).items()}
            implied |= set(want)
            puts = {k: v for k, v in want.items() if present.get(k) != v}
            if puts and (dry_run or self.store.txn({key: rev}, put=puts)):
                changed += len(puts)
        stale = [k for k in present if k not in implied]
        if stale and not dry_run:
            # (an address allocated between the two reads has its record from its own txn,
            # and its block is then newer: only records of no block at all are dropped here,
            # checked once more against a fresh read)
            fresh = set(self.store.keys(self.keys.all_members()))
            blocks_now = {self.keys.member(b["pool"], ip) for b in self.blocks() for ip in b["allocations"]}
            stale = [k for k in stale if k in fresh and k not in blocks_now]
            if stale:
                self.store.txn({}, delete=stale)
        return changed + len(stale)

    def ensure_members(self):
        """At plugin start: the member records of a cluster an older l3net wrote are made once
        (a marker key says it was done: later starts cost one small read, not the cluster)."""
        marker = self.keys.members_synced()
        if self.store.get(marker)[0] is not None:
            return 0
        changed = self.sync_members()
        self.store.put(marker, json.dumps({"host": self.host, "time": round(time.time(), 3)}))
        return changed

    def _load(self, key):
        value, rev = self.store.get(key)
        return (json.loads(value) if value is not None else None), rev

    def _pool_block_prefix(self, pool, required=True):
        """The effective block prefix of an existing pool (cached), or None if it is gone."""
        prefix = self._block_prefix.get(str(pool))
        if prefix is None:
            record, _ = self._load(self.keys.pool(pool))
            if record is None:
                if required:
                    raise L3netError(f"pool {pool} does not exist in l3net (was it released?)")
                return None
            prefix = self._block_prefix[str(pool)] = P.effective_block_prefix(pool, record["block_prefix"])
        return prefix

    def _my_blocks(self, pool):
        mine = self._mine.get(str(pool))
        if mine is None:
            mine = {R.cidr_of_key(k)
                    for k, v, _ in self.store.get_prefix(self.keys.affinities(self.host)) if v == str(pool)}
            self._mine[str(pool)] = mine
        return mine

    def _pool_cidrs(self):
        return [R.cidr_of_key(k) for k, _, _ in self.store.get_prefix(self.keys.pools())]

    def _update_pool(self, pool, change):
        """Apply ``change(record) -> record | None (delete)`` to a pool record with CAS."""
        key = self.keys.pool(pool)
        for _ in range(MAX_ATTEMPTS):
            record, rev = self._load(key)
            new = change(record)
            if new is None:
                ok = rev == 0 or self.store.txn({key: rev}, delete=[key])
            else:
                ok = self.store.txn({key: rev}, put={key: json.dumps(new, sort_keys=True)})
            if ok:
                return new
        raise L3netError(f"too much contention updating pool {pool}; try again")

    # -- pools ---------------------------------------------------------
    def request_pool(self, pool="", subpool="", options=None, v6=False):
        """RequestPool: create or join a pool. Returns (pool_id, cidr, data)."""
        if v6:
            raise L3netError("l3net does not support IPv6 yet; create the network without --ipv6")
        opts = P.parse_pool_options(options)
        if opts["block_prefix"] is None:
            opts["block_prefix"] = self.block_prefix
            opts["block_explicit"] = False
        if pool:
            cidr = P.parse_cidr(pool)
            if not P.MIN_POOL_PREFIX <= cidr.prefixlen <= P.MAX_POOL_PREFIX:
                raise L3netError(f"subnet {cidr}: prefix length must be between "
                                 f"/{P.MIN_POOL_PREFIX} and /{P.MAX_POOL_PREFIX}")
            sub = P.parse_cidr(subpool, "ip-range") if subpool else None
            if sub is not None and sub not in cidr:
                raise L3netError(f"ip-range {sub} is not inside subnet {cidr}")
            existing = self._pool_cidrs()
            clash = P.overlapping(cidr, existing)
            if clash is not None:
                raise L3netError(f"subnet {cidr} overlaps pool {clash} already defined in l3net")
            if str(cidr) not in existing:
                # only a new pool is judged: an existing one stays usable on every host even if
                # some host's address later falls into it (a Docker bridge created there)
                self.check_not_infrastructure(cidr)
            claim = self._join_pool(cidr, opts, auto=False)
        else:
            if subpool:
                raise L3netError("--ip-range needs --subnet")
            cidr, claim = self._claim_auto_pool(opts)
            sub = None
        if sub is not None and sub == cidr:
            sub = None
        return P.make_pool_id(cidr, sub, claim), str(cidr), {GATEWAY_TYPE: POOL_GATEWAY}

    def _join_pool(self, cidr, opts, auto):
        """Count one more network of this host on the pool (a new claim). Returns the claim."""
        claim = P.new_claim()

        def join(record):
            if record is None:
                record = P.new_pool_record(cidr, opts["block_prefix"], opts["nat_outgoing"], auto, opts["encap"])
            elif opts.get("block_explicit", True) and opts["block_prefix"] != record["block_prefix"]:
                raise L3netError(f"pool {cidr} already exists with block-size "
                                 f"{record['block_prefix']}, not {opts['block_prefix']}")
            elif opts["nat_outgoing"] is not None and opts["nat_outgoing"] != record["nat_outgoing"]:
                raise L3netError(f"pool {cidr} already exists with nat-outgoing="
                                 f"{str(record['nat_outgoing']).lower()}")
            elif opts["encap"] is not None and opts["encap"] != P.encap_of(record):
                raise L3netError(f"pool {cidr} already exists with encap={P.encap_of(record)}: create this "
                                 f"network with --ipam-opt encap={P.encap_of(record)} or without the option")
            P.add_claim(record, self.host, claim)
            return record
        record = self._update_pool(cidr, join)
        self._block_prefix[str(cidr)] = P.effective_block_prefix(cidr, record["block_prefix"])
        return claim

    def check_not_infrastructure(self, cidr):
        """Refuse a pool over the cluster's infrastructure or outside the allowed ranges."""
        reserved, allowed = self.infrastructure()
        why = infra.pool_conflict(cidr, reserved, allowed)
        if why:
            raise L3netError(why)

    def _claim_auto_pool(self, opts):
        """Pick a free /24 (default) of the default range and create it, first come first
        served, away from the infrastructure and inside the allowed ranges."""
        reserved, allowed = self.infrastructure()
        for _ in range(MAX_ATTEMPTS):
            taken = self._pool_cidrs() + [str(net) for net, _ in reserved]
            cidr = P.choose_free_subnet(self.default_range, self.default_prefix, taken,
                                        within=[IPNetwork(c) for c in allowed])
            if cidr is None:
                raise L3netError(f"no free /{self.default_prefix} left in the default range "
                                 f"{self.default_range}; pass --subnet")
            record = P.new_pool_record(cidr, opts["block_prefix"], opts["nat_outgoing"], auto=True,
                                       encap=opts["encap"])
            claim = P.new_claim()
            P.add_claim(record, self.host, claim)
            key = self.keys.pool(cidr)
            if self.store.txn({key: 0}, put={key: json.dumps(record, sort_keys=True)}):
                self._block_prefix[str(cidr)] = P.effective_block_prefix(cidr, record["block_prefix"])
                return cidr, claim
        raise L3netError("too much contention choosing a default pool; try again")

    def release_pool(self, pool_id):
        """ReleasePool: drop the PoolID's claim; when its host has no network left on the pool,
        free that host's empty blocks (if it is this host); forget a pool nobody uses.
        Idempotent: a re-sent call finds its claim gone and changes nothing. Returns whether
        a claim was dropped."""
        pool, _ = P.parse_pool_id(pool_id)
        claim = P.claim_of(pool_id)
        owner = []

        def leave(record):
            owner.clear()
            if record is None:
                return None
            entry = record.get("claims", {}).get(claim)
            if P.drop_claim(record, self.host, claim):
                owner.append(entry["host"] if entry else self.host)
            return record
        record = self._update_pool(pool, leave)
        if not owner:
            log.info("ReleasePool %s: nothing to release (a re-sent call?)", pool_id)
            return False
        if record is None or record["refs"].get(owner[0]):
            return True
        if owner[0] == self.host:
            self._free_empty_blocks(pool)
        if not record["refs"] and not record.get("pinned"):
            key = self.keys.pool(pool)
            value, rev = self.store.get(key)
            if value is not None and not json.loads(value)["refs"] and \
                    not self.store.get_prefix(self.keys.blocks(pool)):
                if self.store.txn({key: rev}, delete=[key]):
                    self._block_prefix.pop(str(pool), None)
        return True

    def set_internal(self, cidr, internal):
        """A network created with(out) ``--internal`` on pool ``cidr`` (CreateNetwork, after its
        RequestPool). Being internal is the pool's, cluster-wide, like outgoing NAT."""
        return self._pool_decides(
            cidr, "internal", internal, lambda record: bool(record.get("internal", False)),
            lambda now: f"pool {cidr} is {'' if now else 'not '}internal (its other networks, or "
                        f"l3netctl pool add, decided): create this network "
                        f"{'with' if now else 'without'} --internal, or use another subnet")

    def set_tags(self, cidr, tags):
        """A network created with ``-o l3net.tags=...`` on pool ``cidr`` (CreateNetwork, after
        its RequestPool). Tags are the pool's, cluster-wide; a network joining a pool may also
        name none (``tags`` None): it takes the pool's as they are."""
        if tags is None:
            return None
        return self._pool_decides(
            cidr, "tags", tags, lambda record: sorted(record.get("tags") or []),
            lambda now: f"pool {cidr} carries tags {','.join(now) or '(none)'} (its other networks, or "
                        f"l3netctl tag, decided): create this network with -o l3net.tags={','.join(now)} "
                        "or without the option, or change the pool's tags with l3netctl tag add/remove")

    def _pool_decides(self, cidr, field, wanted, current, refusal):
        """A property of the pool a network asks for at CreateNetwork: the pool's only network
        decides it; a pool other networks (or an operator) already use must have it already,
        else the network is refused with ``refusal(what the pool has)``."""
        def mark(record):
            if record is None:
                raise L3netError(f"pool {cidr} is not known to l3net")
            now = current(record)
            if now == wanted:
                return record
            if sum(record["refs"].values()) <= 1 and not record.get("pinned"):
                record[field] = wanted
                return record
            raise L3netError(refusal(now))
        return self._update_pool(P.parse_cidr(cidr), mark)

    def change_tags(self, cidr, add=(), remove=()):
        """``l3netctl tag add/remove``: the pool's tags plus ``add`` minus ``remove``. Returns
        the pool's tags after."""
        def change(record):
            if record is None:
                raise L3netError(f"pool {cidr} is not known to l3net")
            tags = sorted((set(record.get("tags") or []) | set(add)) - set(remove))
            if len(tags) > MAX_TAGS:
                raise L3netError(f"a network carries at most {MAX_TAGS} tags")
            record["tags"] = tags
            return record
        return self._update_pool(P.parse_cidr(cidr), change)["tags"]

    def add_pool(self, cidr, block_prefix=None, nat_outgoing=True, internal=False, encap="never"):
        """An operator's pool (``l3netctl pool add``): stays when no network uses it."""
        cidr = P.parse_cidr(cidr)
        if not P.MIN_POOL_PREFIX <= cidr.prefixlen <= P.MAX_POOL_PREFIX:
            raise L3netError(f"pool {cidr}: prefix length must be between "
                             f"/{P.MIN_POOL_PREFIX} and /{P.MAX_POOL_PREFIX}")
        options = {"nat-outgoing": str(bool(nat_outgoing)).lower(), "encap": encap}
        if block_prefix is not None:
            options["block-size"] = str(block_prefix)
        opts = P.parse_pool_options(options)
        clash = P.overlapping(cidr, self._pool_cidrs())
        if clash is not None:
            raise L3netError(f"pool {cidr} overlaps pool {clash}")
        self.check_not_infrastructure(cidr)
        record = P.new_pool_record(cidr, opts["block_prefix"] or self.block_prefix, opts["nat_outgoing"],
                                   encap=opts["encap"])
        record["pinned"] = True
        if internal:
            record["internal"] = True
        key = self.keys.pool(cidr)
        if not self.store.txn({key: 0}, put={key: json.dumps(record, sort_keys=True)}):
            raise L3netError(f"pool {cidr} already exists")
        return record

    def remove_pool(self, cidr):
        """Forget an operator's pool; refused while a network or an address uses it."""
        cidr = P.parse_cidr(cidr)
        key = self.keys.pool(cidr)
        value, rev = self.store.get(key)
        if value is None:
            raise L3netError(f"no pool {cidr}")
        record = json.loads(value)
        if record["refs"]:
            raise L3netError(f"pool {cidr} is used by networks on {', '.join(sorted(record['refs']))}")
        if self.store.get_prefix(self.keys.blocks(cidr)):
            raise L3netError(f"pool {cidr} still has allocated blocks")
        if not self.store.txn({key: rev}, delete=[key]):
            raise L3netError(f"pool {cidr} changed meanwhile; try again")

    def _free_empty_blocks(self, pool):
        for key, value, rev in self.store.get_prefix(self.keys.blocks(pool)):
            block = json.loads(value)
            if block["host"] == self.host and not block["allocations"]:
                if self.store.txn({key: rev}, delete=[key, self.keys.affinity(self.host, block["cidr"])]):
                    self._my_blocks(pool).discard(block["cidr"])
                    self._remember(key, None, 0)

    # -- addresses -----------------------------------------------------
    def request_address(self, pool_id, address="", options=None):
        """RequestAddress: returns "ip/32". ``address`` set = exactly that one (or an error)."""
        pool, rng = P.parse_pool_id(pool_id)
        block_prefix = self._pool_block_prefix(pool)
        options = options or {}
        if address:
            try:
                ip = IPAddress(address, 4)
            except (AddrFormatError, ValueError, TypeError):
                raise L3netError(f"invalid address {address!r}") from None
            if ip not in pool:
                raise L3netError(f"address {ip} is not in pool {pool}")
            gateway = options.get("RequestAddressType") == GATEWAY_TYPE
            self.assign(pool, ip, block_prefix, P.claim_of(pool_id), gateway)
            return f"{ip}/32"
        ip = self.auto_assign(pool, rng, block_prefix, R.pending_handle(self.host))
        return f"{ip}/32"

    def assign(self, pool, ip, block_prefix, claim, gateway=False):
        """Allocate exactly ``ip`` for the PoolID claim ``claim``. A block nobody owns yet is
        claimed for this host.

        A gateway becomes a reservation at once. Any other explicit address is ``pending``
        (dockerd asks the same way for ``--ip`` and ``--aux-address``): CreateEndpoint or
        CreateNetwork decides which. An address another network reserved is shared: the claim
        joins its users (an aux address of that network asked for again, or a --ip that
        CreateEndpoint then refuses, whose ReleaseAddress takes the claim out again)."""
        if int(ip) in B.reserved(pool):
            raise L3netError(f"address {ip} is the network or broadcast address of {pool}")
        cidr = B.block_of(ip, pool, block_prefix)
        affinity = self.keys.affinity(self.host, cidr)
        claimed = []

        def take(block):
            extra = {}
            claimed.clear()
            if block is None:
                block, extra = B.new_block(cidr, pool, self.host), {affinity: str(pool)}
                claimed.append(True)
            held = block["allocations"].get(str(ip))
            if held is None:
                block["allocations"][str(ip)] = (
                    B.reservation(pool, {claim: self.host}) if gateway
                    else B.allocation(R.pending_handle(self.host), self.host, claim=claim))
                return ip, block, extra
            users = B.reservation_users(held)
            if users is None:
                raise L3netError(f"address {ip} is already in use")
            if claim in users:
                if gateway:
                    return ip, None, None  # the same gateway requested again (re-sent call)
                raise L3netError(f"address {ip} is already in use (reserved by this network)")
            users[claim] = self.host
            return ip, block, extra
        result = self._update_block(self.keys.block(pool, cidr), take)
        if claimed:
            self._my_blocks(pool).add(str(cidr))
        return result

    def auto_assign(self, pool, rng, block_prefix, handle):
        ip = self._from_own_blocks(pool, rng, handle)
        if ip is not None:
            return ip
        # One claim at a time per pool in this process: threads that lost the race find the
        # block another thread just claimed instead of each claiming one more.
        with self._claim_lock(pool):
            ip = self._from_own_blocks(pool, rng, handle)
            if ip is None:
                ip = self._claim_block(pool, rng, block_prefix, handle)
        if ip is not None:
            return ip
        # Every block of the range is claimed: borrow a single address from any of them.
        for key, value, _ in self.store.get_prefix(self.keys.blocks(pool)):
            cidr = IPNetwork(json.loads(value)["cidr"])
            if cidr.first <= rng.last and rng.first <= cidr.last:
                ip = self._allocate_in(pool, rng, cidr, handle, owner=None)
                if ip is not None:
                    return ip
        what = f"ip-range {rng} of pool {pool}" if rng != pool else f"pool {pool}"
        raise L3netError(f"no free address left in {what}")

    def _claim_lock(self, pool):
        with self._locks_guard:
            return self._locks.setdefault(str(pool), threading.Lock())

    def _from_own_blocks(self, pool, rng, handle):
        for cidr in sorted(IPNetwork(c) for c in self._my_blocks(pool)):
            if cidr.first <= rng.last and rng.first <= cidr.last:
                ip = self._allocate_in(pool, rng, cidr, handle, owner=self.host)
                if ip is not None:
                    return ip
        return None

    def _claim_block(self, pool, rng, block_prefix, handle):
        """Create the first unclaimed block of the range for this host, with the address in it.
        Create-if-absent: a block another host claims first is skipped."""
        existing = {R.cidr_of_key(k) for k in self.store.keys(self.keys.blocks(pool))}
        for cidr in B.candidate_blocks(pool, rng, block_prefix):
            if str(cidr) in existing:
                continue
            block = B.new_block(cidr, pool, self.host)
            ip = B.free_address(block, pool, rng)
            if ip is None:
                continue
            block["allocations"][str(ip)] = B.allocation(handle, self.host)
            key = self.keys.block(pool, cidr)
            text = json.dumps(block, sort_keys=True)
            members, _ = self._member_writes(pool, {}, block["allocations"])
            revision = self.store.txn({key: 0}, put={key: text, self.keys.affinity(self.host, cidr): str(pool),
                                                     **members})
            if revision:
                self._remember(key, text, revision)
                log.info("claimed block %s of pool %s", cidr, pool)
                self._my_blocks(pool).add(str(cidr))
                return ip
        return None

    def _allocate_in(self, pool, rng, cidr, handle, owner):
        """One free address of an existing block (CAS, retried), or None when it is full."""
        def take(block):
            if block is None or (owner is not None and block["host"] != owner):
                self._my_blocks(pool).discard(str(cidr))
                return None, None, None
            ip = B.free_address(block, pool, rng)
            if ip is None:
                return None, None, None
            block["allocations"][str(ip)] = B.allocation(handle, self.host)
            return ip, block, None
        return self._update_block(self.keys.block(pool, cidr), take, verify=owner is None)

    # -- the block cache and the CAS loop for changes to one existing or new block --
    # (claims, frees and release_host write blocks with their affinity keys directly)
    def _read_block(self, key, fresh):
        if not fresh:
            cached = self._blocks.get(key)
            if cached is not None:
                return json.loads(cached[0]), cached[1]
        value, rev = self.store.get(key)
        self._remember(key, value, rev)
        return (json.loads(value) if value is not None else None), rev

    def _remember(self, key, value, rev):
        with self._locks_guard:
            if value is None:
                self._blocks.pop(key, None)
            elif rev > self._blocks.get(key, (None, 0))[1]:   # never replace newer with older
                self._blocks[key] = (value, rev)

    def _update_block(self, key, change, verify=True):
        """Read a block (from the cache first), let ``change(block)`` decide, write it with CAS.

        ``change`` returns (result, block to write or None, extra puts). A cached copy may be
        stale: a conflict, and any decision made without writing ("full", "not allocated",
        "already in use"), is taken again on a fresh read before it counts; unless ``verify``
        is false (this host's own blocks, which only this host fills: a block the cache says is
        full is passed over without reading it, up to 1,024 allocations, from etcd again for
        every container; at worst an address freed by another host waits for the next read)."""
        fresh = False
        for _ in range(MAX_ATTEMPTS):
            block, rev = self._read_block(key, fresh)
            before = B.members(block["allocations"]) if block else {}
            try:
                result, new, extra = change(block)
            except L3netError:
                if fresh:
                    raise
                fresh = True
                continue
            if new is None:
                if fresh or not verify:
                    return result
                fresh = True
                continue
            text = json.dumps(new, sort_keys=True)
            members, gone = self._member_writes(new["pool"], before, new["allocations"])
            revision = self.store.txn({key: rev}, put={key: text, **(extra or {}), **members}, delete=gone)
            if revision:
                self._remember(key, text, revision)
                return result
            fresh = True
        raise L3netError(f"too much contention on {key.rsplit('/', 1)[1]}; try again")

    def _locate(self, pool, address):
        """(key, IPAddress) of the block record that would hold ``address``, or None."""
        try:
            ip = IPAddress(str(address).split("/")[0], 4)
        except (AddrFormatError, ValueError, TypeError):
            raise L3netError(f"invalid address {address!r}") from None
        if ip not in pool:
            return None, ip
        block_prefix = self._pool_block_prefix(pool, required=False)
        if block_prefix is None:
            return None, ip
        cidr = B.block_of(ip, pool, block_prefix)
        return self.keys.block(pool, cidr), ip

    def release_address(self, pool_id, address, in_use=None, asked_at=None):
        """ReleaseAddress: idempotent; an address outside the pool (our gateway) is a no-op.
        ``asked_at``: when dockerd asked (a release retried later): an address requested
        after that (pending since) is someone else's now and stays.

        dockerd re-sends calls after a connection error, and a slow one can arrive after the
        address went to the next container: an address held by a live endpoint is not freed.
        ``in_use(endpoint_id)`` says whether an endpoint of this host is live; one held by
        another host's endpoint is never freed from here. Returns whether it was freed."""
        pool, _ = P.parse_pool_id(pool_id)
        key, ip = self._locate(pool, address)
        if key is None:
            return False

        claim = P.claim_of(pool_id)

        def drop(block):
            held = (block or {}).get("allocations", {}).get(str(ip))
            if held is None:
                return False, None, None
            users = B.reservation_users(held)
            if users is not None:        # a gateway or aux address: this network's share only
                if claim not in users:
                    return False, None, None
                del users[claim]
                if users:
                    held["host"] = next(iter(users.values()))
                    return False, block, None
                del block["allocations"][str(ip)]
                return True, block, None
            handle = str(held.get("handle", ""))
            if asked_at is not None and R.is_pending(handle) and \
                    float(held.get("time", 0)) > asked_at:
                return False, None, None
            if in_use is not None and R.is_endpoint(handle) and \
                    (held.get("host") != self.host or in_use(R.endpoint_of(handle))):
                log.info("ReleaseAddress %s: kept, it is held by a live endpoint (a late or "
                         "re-sent call)", ip)
                return False, None, None
            del block["allocations"][str(ip)]
            return True, block, None
        return self._update_block(key, drop)

    def reserve_for_network(self, pool, address):
        """CreateNetwork: an ``--aux-address`` (asked for like a ``--ip``, so still pending)
        becomes a reservation of the network's claim. Idempotent."""
        key, ip = self._locate(IPNetwork(pool), address)

        def mark(block):
            held = (block or {}).get("allocations", {}).get(str(ip))
            if held is None:
                raise L3netError(f"aux address {ip} is not allocated (released meanwhile?)")
            if B.reservation_users(held) is not None:
                return None, None, None
            if held["handle"] != R.pending_handle(self.host):
                raise L3netError(f"aux address {ip} is held by {held['handle']}")
            block["allocations"][str(ip)] = B.reservation(pool, {held.get("claim", ""): self.host})
            return None, block, None
        if key is None:
            raise L3netError(f"aux address {ip} is not in pool {pool}")
        self._update_block(key, mark)

    def release_held(self, pool, address, handle):
        """Release ``address`` only if ``handle`` still holds it (ipam check --fix: a leak
        that meanwhile got a new holder is left alone). True if it was released."""
        key, ip = self._locate(IPNetwork(pool), address)
        done = []

        def drop(block):
            held = (block or {}).get("allocations", {}).get(str(ip))
            if held is None or held["handle"] != handle:
                return None, None, None
            del block["allocations"][str(ip)]
            done.append(True)
            return None, block, None
        if key is not None:
            self._update_block(key, drop)
        return bool(done)

    def set_handle(self, pool, address, handle, also_put=None):
        """Record who holds an address (the endpoint, once CreateEndpoint knows it), in one
        transaction with ``also_put`` (the caller's own records), which is written in any case.
        Only an address this host requested (``pending:<host>``) or that ``handle`` holds
        already: anything else is an error and changes nothing."""
        key, ip = self._locate(pool, address)
        found = []

        def mark(block):
            held = (block or {}).get("allocations", {}).get(str(ip))
            if held is not None and held["handle"] == handle:
                return None, None, None
            self._may_take(ip, held)
            held["handle"] = handle
            held.pop("claim", None)
            found.append(True)
            return None, block, also_put
        if key is not None:
            self._update_block(key, mark)
        if not found and also_put:
            self.store.txn({}, put=also_put)
        return bool(found)

    def _may_take(self, ip, held):
        """Only an address this host's RequestAddress took and nobody holds yet: never a free
        one, nor another endpoint's (a late or re-sent CreateEndpoint)."""
        if held is None:
            raise L3netError(f"address {ip} is not allocated (released meanwhile?): request it again")
        if B.reservation_users(held) is not None:
            raise L3netError(f"address {ip} is reserved by a network on its pool (--gateway or "
                             "--aux-address): choose another --ip")
        if held["handle"] != R.pending_handle(self.host):
            raise L3netError(f"address {ip} is held by {held['handle']}, not by a request of this host")

    def check_can_take(self, pool, address, handle):
        """set_handle's check, before anything is built for the endpoint (its veth would
        replace the /32 route of the address's holder): from this host's cache (it wrote
        the pending allocation itself), confirmed on a fresh read before refusing."""
        key, ip = self._locate(pool, address)
        if key is None:
            raise L3netError(f"address {address} is not in pool {pool}")

        for fresh in (False, True):
            block, _ = self._read_block(key, fresh)
            held = (block or {}).get("allocations", {}).get(str(ip))
            if held is not None and held["handle"] in (handle, R.pending_handle(self.host)):
                return
        if held is None or held["handle"] != handle:
            self._may_take(ip, held)

    def holder(self, pool, address):
        key, ip = self._locate(pool, address)
        if key is None:
            return None
        block, _ = self._load(key)
        return (block or {}).get("allocations", {}).get(str(ip))

    def release_host(self, host):
        """Forget a node that is gone for good: release every address it held, free its
        blocks (a block still holding other hosts' addresses stays, owned by nobody) and drop
        its pool references. Returns (addresses released, blocks freed)."""
        released = freed = 0
        for key, value, rev in self.store.get_prefix(self.keys.all_blocks()):
            for _ in range(MAX_ATTEMPTS):
                block = json.loads(value)
                before = B.members(block["allocations"])
                shared = False      # reservations it shares with other hosts: only its claims go
                for a in block["allocations"].values():
                    users = B.reservation_users(a) or {}
                    others = {c: h for c, h in users.items() if h != host}
                    if others and (len(others) < len(users) or a["host"] == host):
                        a["users"], a["host"] = others, next(iter(others.values()))
                        shared = True
                mine = [ip for ip, a in block["allocations"].items() if a["host"] == host]
                owned = block["host"] == host
                if not mine and not owned and not shared:
                    break
                for ip in mine:
                    del block["allocations"][ip]
                deletes, puts = [], {}
                if owned:
                    deletes.append(self.keys.affinity(host, block["cidr"]))
                    block["host"] = ""
                if owned and not block["allocations"]:
                    deletes.append(key)
                else:
                    puts[key] = json.dumps(block, sort_keys=True)
                members, gone = self._member_writes(block["pool"], before, block["allocations"])
                puts.update(members)
                deletes += gone
                if self.store.txn({key: rev}, put=puts, delete=deletes):
                    released += len(mine)
                    freed += owned
                    self._blocks.pop(key, None)
                    break
                value, rev = self.store.get(key)
                if value is None:
                    break
        for pool in self.pools():
            if host in pool["refs"] or host in {c["host"] for c in pool.get("claims", {}).values()}:
                def drop(record):
                    if record is not None:
                        record["refs"].pop(host, None)
                        record["claims"] = {c: e for c, e in record.get("claims", {}).items()
                                            if e["host"] != host}
                    return record
                self._update_pool(pool["cidr"], drop)
        return released, freed

    # -- reading -------------------------------------------------------
    def pools(self):
        return [json.loads(v) for _, v, _ in self.store.get_prefix(self.keys.pools())]

    def blocks(self, pool=None):
        prefix = self.keys.blocks(pool) if pool else self.keys.all_blocks()
        return [json.loads(v) for _, v, _ in self.store.get_prefix(prefix)]
