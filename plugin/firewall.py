"""Apply policy state to this host's kernel: ipsets and iptables (the side-effect half of
policy.py), and notice when someone changed them behind our back.

Everything is written with ``ipset restore`` and ``iptables-restore --noflush``: our chains
are declared in the input, so each table's chains are flushed and refilled in one commit (no
moment with half a rule set), and Docker's chains are never touched. Sets are rebuilt by swap
or changed entry by entry. The order matters: sets first (rules may only name sets that
exist), then rules, then stale sets are destroyed (a referenced set cannot be).

One ``Firewall`` per node, shared by the agent (full syncs) and the driver (a new local
container is added to its network's set at once, so its first packet passes); a lock keeps
them from interleaving.
"""

import bisect
import logging
import os
import threading
import time
from dataclasses import replace

from core.errors import L3netError, run_tool

from . import policy as P

log = logging.getLogger("l3net.firewall")

TIMEOUT = 15
WAIT = ["-w", "5"]          # xtables lock: wait up to 5 s for another writer (dockerd)


# iptables binaries: the host's own by default; the managed plugin brings its own iptables,
# which must write where dockerd writes (nft or legacy kernel tables): see choose_backend().
IPTABLES = {t: t for t in ("iptables", "iptables-save", "iptables-restore",
                           "ip6tables", "ip6tables-save", "ip6tables-restore")}
BACKENDS = ("nft", "legacy")


def count_rules(saved):
    """Rules in ``iptables-save`` output (l3net's own not counted: they follow the choice)."""
    return sum(1 for line in saved.splitlines() if line.startswith("-A ") and "L3NET" not in line)


def pick_backend(counts):
    """{backend: rules found} -> the backend to use, or None (no evidence: keep the default).
    The one holding the host's rules (dockerd's): rules written to the other would be
    bypassed, silently."""
    found = {b: n for b, n in counts.items() if n}
    return max(found, key=found.get) if found else None


_backend = {"settled": True, "saved": None, "checked": 0.0}


def _use(backend):
    for tool in IPTABLES:
        IPTABLES[tool] = tool if backend is None else tool.replace("tables", f"tables-{backend}", 1)


def _detect():
    counts = {}
    for backend in BACKENDS:
        try:
            counts[backend] = count_rules(_run([f"iptables-{backend}-save"]))
        except L3netError:
            counts[backend] = 0         # that variant is not installed, or its tables not loaded
    return pick_backend(counts), ", ".join(f"{n} rules in {b}" for b, n in counts.items())


def choose_backend(setting="auto", state_dir=None):
    """Write with iptables-nft or iptables-legacy: ``setting``, or for "auto" the one a
    previous run settled on (``<state_dir>/iptables-backend``), else the one that holds the
    host's rules (dockerd's), else plain ``iptables`` for now: then the firewall keeps looking
    (backend_drift) until dockerd's rules show where they are. Returns a line for the log."""
    _use(None)
    _backend.update(settled=True, saved=os.path.join(state_dir, "iptables-backend") if state_dir else None)
    if setting in BACKENDS:
        _use(setting)
        return f"iptables: {setting} (as configured)"
    if setting != "auto":
        raise L3netError(f"invalid iptables backend {setting!r}: auto, nft or legacy")
    try:
        with open(_backend["saved"]) as f:
            saved = f.read().strip()
        if saved in BACKENDS:
            _use(saved)
            return f"iptables: {saved} (settled before: {_backend['saved']})"
    except (OSError, TypeError):
        pass
    chosen, why = _detect()
    if chosen is None:
        _backend.update(settled=False, checked=time.monotonic())
        return f"iptables: the default for now ({why}; looking again until dockerd's rules appear)"
    _settle(chosen)
    return f"iptables: {chosen} ({why})"


def _settle(backend):
    _use(backend)
    _backend["settled"] = True
    if _backend["saved"]:
        try:
            with open(_backend["saved"], "w") as f:
                f.write(backend + "\n")
        except OSError as e:
            log.warning("could not save the iptables backend: %s", e)


def backend_drift(every=10.0):
    """While the backend is not settled, look again (every ``every`` s) for the host's rules:
    found in a backend, settle on it; if our rules went to the other one, take them off
    there and return a reason to write everything again. Else None."""
    if _backend["settled"] or time.monotonic() - _backend["checked"] < every:
        return None
    _backend["checked"] = time.monotonic()
    chosen, why = _detect()
    if chosen is None:
        return None
    default = "legacy" if "legacy" in run_tool(["iptables", "-V"], "install iptables").stdout else "nft"
    if chosen == default:
        _settle(chosen)
        log.info("iptables: %s (%s)", chosen, why)
        return None
    for what in remove_all(sets=False):
        log.info("removed %s from the default iptables", what)
    _settle(chosen)
    return f"iptables backend is {chosen} ({why}): our rules moved there"


def _run(args, stdin=None):
    args = [IPTABLES.get(args[0], args[0]), *args[1:]]
    res = run_tool(args, "install iptables and ipset", f"{args[0]} (xtables lock held?)", TIMEOUT, stdin)
    if res.returncode != 0:
        raise L3netError(f"{args[0]} failed: {res.stderr.strip()[:500]}")
    return res.stdout


NETLINK_MAX = 32     # entry changes up to this many go over netlink; more: one ipset restore


_local = threading.local()


def _netlink(ops):
    """Run [(op, set, address)] with op "add" / "del" / "create" over netlink (pyroute2, one
    socket per thread like datapath's: well under 1 ms each, no fork on the path of a container
    start). Returns False when netlink cannot be used (then the caller uses the ipset tool)."""
    try:
        from pyroute2.ipset import IPSet

        ips = getattr(_local, "ipset", None)
        if ips is None:
            ips = _local.ipset = IPSet()
        for op, name, address in ops:
            if op == "create":
                ips.create(name, stype="hash:ip", exclusive=False)
            elif op == "add":
                ips.add(name, address, etype="ip", exclusive=False)
            else:
                try:
                    ips.delete(name, address, etype="ip")
                except Exception as e:  # noqa: BLE001 - already gone is fine (like -exist)
                    if getattr(e, "code", None) != IPSET_ERR_EXIST:
                        raise
        return True
    except Exception as e:  # noqa: BLE001 - use the tool instead
        _local.ipset = None
        log.debug("ipset over netlink failed (%s); using the ipset tool", e)
        return False


IPSET_ERR_EXIST = 4103     # "element does not exist" (ipset's IPSET_ERR_EXIST)


def nft_generation():
    """The generation of this network namespace's nf_tables rule set, or None (not known:
    netlink failed). The kernel bumps it with every change to any nf_tables table
    (iptables-nft, ip6tables-nft and nft all write there): while it stays the same, no rule
    changed, and the drift check need not read the rules (one netlink request instead of
    running iptables-save and ip6tables-save every few seconds)."""
    try:
        from pyroute2.netlink import NLM_F_REQUEST
        from pyroute2.netlink.nfnetlink.nftsocket import (
            NFT_MSG_GETGEN,
            NFTSocket,
            nft_gen_msg,
        )

        nft = getattr(_local, "nft", None)
        if nft is None:
            nft = _local.nft = NFTSocket()
        ids = [m.get_attr("NFTA_GEN_ID") for m in nft.request_get(nft_gen_msg(), NFT_MSG_GETGEN,
                                                                    msg_flags=NLM_F_REQUEST)]
        return ids[0] if ids and isinstance(ids[0], int) else None
    except Exception as e:  # noqa: BLE001 - then the rules are read
        _local.nft = None
        log.debug("nf_tables generation over netlink failed: %s", e)
        return None


def ipset_sizes():
    """{our set name: number of entries}, over netlink (what ``ipset list -t`` prints, without
    running it); the tool when netlink fails."""
    try:
        from pyroute2.ipset import IPSet
        from pyroute2.netlink.nfnetlink.ipset import IPSET_FLAG_LIST_HEADER

        ips = getattr(_local, "ipset", None)
        if ips is None:
            ips = _local.ipset = IPSet()
        sizes = {}
        for msg in ips.list(flags=IPSET_FLAG_LIST_HEADER):
            name, data = msg.get_attr("IPSET_ATTR_SETNAME"), msg.get_attr("IPSET_ATTR_DATA")
            count = data.get_attr("IPSET_ATTR_ELEMENTS") if data is not None else None
            if isinstance(name, str) and name.startswith(P.SET_PREFIX):
                if not isinstance(count, int):
                    raise ValueError(f"no entry count for {name}")
                sizes[name] = count
        return sizes
    except Exception as e:  # noqa: BLE001 - use the tool instead
        _local.ipset = None
        log.debug("ipset sizes over netlink failed (%s); using the ipset tool", e)
        return set_sizes(_run(["ipset", "list", "-t"]))


def writes_to_nf_tables():
    """Whether our iptables tools write to nf_tables (iptables-nft), so that nft_generation()
    tells their changes; asked of ``iptables -V`` once per backend."""
    tool = IPTABLES["iptables"]
    if tool not in _nft_tools:
        try:
            _nft_tools[tool] = "nf_tables" in _run([tool, "-V"])
        except L3netError:
            _nft_tools[tool] = False
    return _nft_tools[tool]


_nft_tools = {}


def ipset_add(name, address, exists=False):
    """Add ``address`` to set ``name``, creating the set first unless it ``exists``."""
    ops = [] if exists else [("create", name, None)]
    if not _netlink(ops + [("add", name, address)]):
        ipset_restore(f"create {name} hash:ip family inet -exist\nadd {name} {address} -exist\n")


def ipset_changes(text):
    """Apply ``ipset restore`` input; a few plain add/del lines go over netlink instead."""
    lines = text.splitlines()
    ops = [line.split()[:3] for line in lines]
    if 0 < len(lines) <= NETLINK_MAX and all(len(o) == 3 and o[0] in ("add", "del") for o in ops):
        if _netlink([tuple(o) for o in ops]):
            return
    ipset_restore(text)


def ipset_restore(text):
    if text:
        _run(["ipset", "restore"], text)


def iptables_restore(text, family=4):
    if text:
        _run([f"{_ip(family)}tables-restore", *WAIT, "--noflush"], text)


def _ip(family):
    return "ip" if family == 4 else "ip6"


def ipv6_enabled():
    """False when the kernel has no IPv6 (booted with ipv6.disable=1): nothing to drop then,
    and ip6tables would fail."""
    return os.path.exists("/proc/net/if_inet6")


def saved_rules(family=4):
    return _run([f"{_ip(family)}tables-save"])


# Rules that may come before our hooks: Docker's DOCKER-USER (the admin's own rules, and it
# RETURNs by default). Anything else first could accept traffic for our containers before
# policy sees it: dockerd puts "-i docker0 ! -o docker0 -j ACCEPT" at the top of FORWARD
# whenever it sets a bridge up, which would let --net bridge containers past isolation.
MAY_PRECEDE = ("-j DOCKER-USER",)


def hooks_found(saved, hooks=None):
    """From ``iptables-save`` output: {hook: (count, in place)} for each of ``hooks`` (default
    P.HOOKS) present. In place: only MAY_PRECEDE rules (or other hooks of ours) come before it
    in its chain."""
    table, found, clean = None, {}, {}
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
            continue
        for hook in hooks or P.HOOKS:
            t, chain, ours = hook
            if t != table or not line.startswith(f"-A {chain} "):
                continue
            if line == P.hook_line(chain, ours):
                count, _ = found.get(hook, (0, False))
                found[hook] = (count + 1, clean.get((t, chain), True))
            elif not line.endswith(MAY_PRECEDE):
                clean[(t, chain)] = False
    return found


def our_rules(saved, family=4):
    """From ``iptables-save`` (``ip6tables-save``) output: (table, line) of every rule in our
    chains and of every hook into them, as the kernel prints them (what a drift check
    compares), a hook marked when it is not in place or not alone."""
    hooks, chains = (P.HOOKS, P.CHAINS) if family == 4 else (P.HOOKS6, P.CHAINS6)
    table, out = None, set()
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and line.split()[1] in chains.get(table, ()):
            out.add((table, line))
    for (t, chain, c), (count, in_place) in hooks_found(saved, hooks).items():
        mark = "" if in_place and count == 1 else f" (x{count}, in place: {in_place})"
        out.add((t, P.hook_line(chain, c) + mark))
    return out


def hooks_to_fix(saved, hooks=None):
    """[(hook, copies to delete first)] for every hook that is missing, misplaced or doubled."""
    found = hooks_found(saved, hooks)
    return [(h, found.get(h, (0, False))[0]) for h in hooks or P.HOOKS
            if found.get(h, (0, False)) != (1, True)]


def set_sizes(listing):
    """``ipset list -t`` output -> {our set name: number of entries}."""
    sizes, name = {}, None
    for line in listing.splitlines():
        if line.startswith("Name: "):
            name = line[6:].strip()
        elif line.startswith("Number of entries: ") and name and name.startswith(P.SET_PREFIX):
            sizes[name] = int(line.split(":")[1])
    return sizes


class Firewall:
    def __init__(self):
        self._lock = threading.Lock()
        self.applied = None        # the PolicyState in force (None: unknown, apply in full)
        self._rules = None         # render_iptables(applied): what our chains hold
        self._snapshot = None      # our_rules() right after our last write
        self._snapshot6 = None     # the same for ip6tables (None: not written: IPv6 off, or failed)
        self._ipv6_error = None
        self._generation = 0       # bumped by every local add_member
        self._local = []           # (generation, pool, address) added since the last sync read
        self._stale = set()        # sets to destroy (the kernel frees a set's last reference late)
        self._checked_generation = None  # nft_generation() when the rules last checked out unchanged

    # -- the agent's side ---------------------------------------------------
    def generation(self):
        """Call before reading the desired state from etcd; pass the value to apply()."""
        with self._lock:
            return self._generation

    def apply(self, desired, generation=None):
        """Make the kernel match ``desired``; cheap when nothing changed. Members a local
        container added after the desired state was read are kept (the next read has them).
        Returns a short description of what was done, or None."""
        with self._lock:
            if generation is not None:
                for g, pool, address in self._local:
                    if g > generation and pool in desired.members:
                        if address not in desired.members[pool]:
                            desired.members[pool] = sorted(desired.members[pool] + [address])
                self._local = [x for x in self._local if x[0] > generation]
            old = self.applied
            rules = P.render_iptables(desired)
            if old is not None and self._rules == rules and P.sets(old) == P.sets(desired):
                self._destroy_stale()
                return None
            if old is None:
                what = self._apply_full(desired, rules)
            else:
                what = self._apply_changes(old, desired, rules)
            self.applied, self._rules = desired, rules
            self._destroy_stale()
            return what

    def apply_members(self, add, remove, generation=None):
        """Add and remove set entries ({pool: {address}}) in the state in force: what a member
        record's change makes of it (calc.MemberIndex), without computing or comparing the
        whole state: one ``ipset`` entry per change, over netlink. Entries of pools not in
        force are not the agent's to touch (the next full computation decides). A member a
        local container added after ``generation`` is not removed (the copy the removal came
        from may predate its record). Returns a short description, or None (nothing to do);
        False when there is no state in force to change (apply() it in full)."""
        with self._lock:
            if self.applied is None:
                return False
            # (a copy: the state in force may be the caller's object)
            self.applied = replace(self.applied, members=dict(self.applied.members))
            members = self.applied.members
            young = {(p, a) for g, p, a in self._local if generation is None or g > generation}
            lines, added, removed = [], 0, 0
            for pool, addresses in sorted(remove.items()):
                if pool not in members:
                    continue
                entries = members[pool] = list(members[pool])
                for address in sorted(addresses):
                    i = bisect.bisect_left(entries, address)
                    if i == len(entries) or entries[i] != address or (pool, address) in young:
                        continue
                    del entries[i]
                    lines.append(f"del {P.set_name(pool)} {address} -exist")
                    removed += 1
            for pool, addresses in sorted(add.items()):
                if pool not in members:
                    continue
                entries = members[pool] = list(members[pool])
                for address in sorted(addresses):
                    i = bisect.bisect_left(entries, address)
                    if i < len(entries) and entries[i] == address:
                        continue
                    entries.insert(i, address)
                    lines.append(f"add {P.set_name(pool)} {address} -exist")
                    added += 1
            if not lines:
                return None
            try:
                ipset_changes("\n".join(lines) + "\n")
            except Exception:
                self.applied = None         # unknown now: the next apply() writes everything
                raise
            return f"policy updated (+{added}/-{removed} members)"

    def _apply_full(self, desired, rules):
        ipset_restore(P.render_ipsets(desired))
        saved = _run(["iptables-save"])
        iptables_restore(rules + P.render_hooks(hooks_to_fix(saved)))
        self._snapshot = our_rules(_run(["iptables-save"]))
        self._apply_ipv6()
        wanted = set(P.sets(desired))
        self._stale |= {n for n in set_sizes(_run(["ipset", "list", "-t"])) if n not in wanted}
        return f"policy applied in full ({len(desired.pools)} networks, {len(desired.rules)} policies)"

    def _apply_changes(self, old, desired, rules):
        before, stale = P.render_set_changes(old, desired)
        ipset_changes(before)
        if self._rules != rules:
            iptables_restore(rules)
            self._snapshot = our_rules(_run(["iptables-save"]))
        self._stale |= set(stale)
        added = sum(len(set(v) - set(old.members.get(k, []))) for k, v in desired.members.items())
        removed = sum(len(set(v) - set(desired.members.get(k, []))) for k, v in old.members.items())
        return f"policy updated (+{added}/-{removed} members)"

    def _apply_ipv6(self):
        """The IPv6 drops (static: written with every full apply, and on drift). A failure
        here (no ip6tables, no raw table) must not hold the IPv4 rules hostage: it is logged
        and tried again at the next drift check (``_snapshot6`` stays None until it worked;
        the host side of every veth has IPv6 off anyway)."""
        if not ipv6_enabled():
            return
        try:
            saved = saved_rules(6)
            iptables_restore(P.render_ip6tables() + P.render_hooks(hooks_to_fix(saved, P.HOOKS6)), 6)
            self._snapshot6 = our_rules(saved_rules(6), 6)
        except L3netError as e:
            self._snapshot6 = None
            if str(e) != self._ipv6_error:
                log.warning("IPv6 drops not written (retrying): %s", e)
            self._ipv6_error = str(e)

    def _destroy_stale(self):
        """Destroy sets no rule uses any more. Right after the rule that used a set is gone,
        nf_tables may still hold it for a moment ("in use by a kernel component"): such a set
        stays on the list and is tried again at the next sync."""
        for name in sorted(self._stale, key=_tag_sets_first):
            if name in P.sets(self.applied or P.PolicyState()):
                self._stale.discard(name)       # wanted again
                continue
            try:
                _run(["ipset", "destroy", name])
                self._stale.discard(name)
            except L3netError as e:
                if "does not exist" in str(e):
                    self._stale.discard(name)
                else:
                    log.debug("stale ipset %s not destroyed yet: %s", name, e)

    def drift(self):
        """What differs between the kernel and what we last applied (a reason), or None.
        Checks our rules and hooks, and the size of each of our sets."""
        with self._lock:
            if self.applied is None:
                return None
            moved = backend_drift()
            if moved:
                self.applied = None
                return moved
            # Unchanged nf_tables generation since a check found nothing: no rule can have
            # changed (ours or anyone's), only the sets are left to check.
            generation = nft_generation() if writes_to_nf_tables() else None
            reason = None
            if generation is None or generation != self._checked_generation:
                if our_rules(_run(["iptables-save"])) != self._snapshot:
                    reason = "iptables rules changed"
                elif ipv6_enabled() and (self._snapshot6 is None or our_rules(saved_rules(6), 6) != self._snapshot6):
                    reason = "ip6tables rules changed" if self._snapshot6 is not None else "ip6tables rules missing"
            if reason is None:
                sizes = ipset_sizes()
                want = {n: len(e) for n, (_, e) in P.sets(self.applied).items()}
                bad = sorted(n for n in want if sizes.get(n) != want[n])
                if not bad:
                    self._checked_generation = generation      # (read before the rules were)
                    return None
                reason = f"ipset {bad[0]} changed"
            self.applied = None       # the next apply() writes everything again
            return reason

    # -- the driver's side --------------------------------------------------
    def add_member(self, pool, address):
        """A container of ``pool`` starts here: put it in the set now (one ipset call)."""
        name = P.set_name(pool)
        with self._lock:
            ipset_add(name, address, exists=self.applied is not None and pool in self.applied.members)
            self._generation += 1
            self._local.append((self._generation, str(pool), str(address)))
            if self.applied is not None and pool in self.applied.members and \
                    address not in self.applied.members[pool]:
                self.applied.members[pool] = sorted(self.applied.members[pool] + [address])


def remove_all(sets=True):
    """Take l3net's rules off this host: hooks, chains (IPv4 and IPv6), and unless ``sets`` is
    false its sets (``l3net-plugin --remove-rules``, after the plugin is stopped for good).
    Returns what was removed."""
    removed = []
    for family, hooks, chains in ((4, P.HOOKS, P.CHAINS), (6, P.HOOKS6, P.CHAINS6)):
        if family == 6 and not ipv6_enabled():
            continue
        tool, saved = f"{_ip(family)}tables", saved_rules(family)
        label = "" if family == 4 else f"{tool} "
        for (table, chain, ours), (count, _) in hooks_found(saved, hooks).items():
            for _ in range(count):
                _run([tool, *WAIT, "-t", table, "-D", chain, "-j", ours])
            removed.append(f"hook {label}{table}/{chain} -> {ours}")
        present = [(t, n) for t, names in chains.items() for n in names if f":{n} " in _table(saved, t)]
        for table, name in present:
            _run([tool, *WAIT, "-t", table, "-F", name])
        for table, name in present:
            _run([tool, *WAIT, "-t", table, "-X", name])
            removed.append(f"chain {label}{table}/{name}")
    return removed + (destroy_sets() if sets else [])


def _table(saved, table):
    """The part of ``iptables-save`` output for one table."""
    start = saved.find(f"*{table}\n")
    return "" if start < 0 else saved[start:saved.find("COMMIT", start)]


def _tag_sets_first(name):
    return not name.startswith(P.SET_PREFIX + "tag-"), name


def destroy_sets():
    """Destroy l3net's ipsets (none may still be referenced by a rule). Returns what went.
    The tag sets first: they hold the network sets, which cannot go while they do."""
    removed = []
    for name in sorted(set_sizes(_run(["ipset", "list", "-t"])), key=_tag_sets_first):
        _run(["ipset", "destroy", name])
        removed.append(f"ipset {name}")
    return removed


class NoFirewall:
    """For tests and hosts without policy: does nothing."""
    applied = None

    def generation(self):
        return 0

    def apply(self, desired, generation=None):
        return None

    def drift(self):
        return None

    def add_member(self, pool, address):
        pass
