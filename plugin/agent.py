"""The agent: the long-running half of a node, beside the API.

It computes from a watch-fed copy of etcd (cache.Cache: read once, then followed event by
event; read in full again only when the watch is lost). When that copy changes, and at least
every ``RESYNC`` seconds, it
  1. keeps this node's registry record alive (an etcd lease: a dead node's record vanishes;
     every ``interval`` seconds it checks whether a beat is due),
  2. computes the BGP desired state from the copy (calc.desired_bgp: nodes, BGP settings, the
     mesh or route reflection, pools, this node's blocks), renders it (birdconf.render) and makes
     BIRD run with it (bird.Bird.apply: only on change; a BIRD that died is started again),
  3. computes the policy desired state (calc.desired_policy: networks and their members on
     every host, policies, host rules, nodes) and puts it in force (firewall.Firewall.apply:
     only what changed: a new member anywhere is one ``ipset add``),
  4. every ``drift_every`` seconds, checks that our chains, hooks and sets are still what it
     wrote, and writes them again if not.
Errors are logged and retried at the next tick; nothing here can block a Docker call.
"""

import json
import logging
import os
import threading
import time

from core.errors import L3netError

from . import metrics
from .birdconf import render
from .cache import Cache
from .calc import (
    MemberIndex,
    desired_bgp,
    desired_policy,
    desired_tunnel,
    node_asn,
    nodes,
    warn,
)
from .encap import vtep_mac
from .firewall import NoFirewall
from .store import StoreError

log = logging.getLogger("l3net.agent")

LEASE_TTL = 30
HEARTBEAT = 10
DEBOUNCE = 0.1      # seconds to let a burst of etcd changes settle before a sync
# Seconds between full computations when nothing changed: a safety net only (changes come by
# watch, the kernel's state is checked every drift_every s). Not shorter: a full computation
# costs in proportion to the cluster (every member record), and an idle node must not.
RESYNC = 300.0
# After a lost watch (etcd restarted), the agents of a cluster of RELOAD_SPREAD_FROM nodes or
# more load their copies again spread over this much time per node, at most the max: 1,000
# nodes reload over 10 s; a smaller cluster at once.
RELOAD_SPREAD_FROM = 50
RELOAD_SPREAD_PER_NODE = 0.01
RELOAD_SPREAD_MAX = 10.0


class Registry:
    """This node's record under <prefix>/nodes/<name>, kept alive by a lease. Besides its
    address and AS it publishes what every node must protect from containers and keep pools
    off: all its IPv4 addresses, its connected networks and the etcd endpoints it uses
    (``facts``: a callable returning {"addresses", "networks", "etcd"}, asked at each beat,
    so a new address is protected within a heartbeat)."""

    def __init__(self, store, keys, name, ip, ttl=LEASE_TTL, facts=None):
        self.store, self.keys, self.name, self.ip, self.ttl = store, keys, name, ip, ttl
        self.facts = facts or (lambda: {})
        self._lease = None
        self._last = 0.0
        self._facts = {}            # the last facts gathered (kept when gathering fails)
        self._known = None          # the addresses last written to the node's lasting record
        self._record = None         # the record last written (without its time)

    def heartbeat(self, asn, force=False, present=True):
        """Refresh the lease (and the record, when it changed) if a beat is due. Returns
        whether etcd was asked (and answered). ``present``: whether the record is in etcd as
        far as the caller knows (deleted by someone: written again)."""
        now = time.time()
        if not force and self._lease is not None and now - self._last < HEARTBEAT:
            return False
        renewed = False
        if self._lease is None or not self.store.refresh(self._lease):
            conflict = self.identity_conflict()
            if conflict:
                raise L3netError(conflict)
            self._lease = self.store.lease(self.ttl)
            renewed = True
            log.info("registered node %s (%s) with a %ds lease", self.name, self.ip, self.ttl)
        try:
            self._facts = {**self._facts, **self.facts()}
        except Exception as e:  # noqa: BLE001 - the last facts gathered still hold
            warn("could not list this host's addresses (publishing the last known): %s", e)
        facts = self._facts
        record = {"name": self.name, "ip": self.ip, "as": asn, "vtep_mac": vtep_mac(self.ip),
                  **{k: facts[k] for k in ("addresses", "networks", "etcd") if k in facts}}
        if renewed or record != self._record or not present:
            # Written only when it changes (or with a new lease): liveness is the lease's, and
            # a record rewritten every beat would wake every other node's agent each time.
            self.store.put(self.keys.node(self.name), json.dumps(dict(record, since=round(now, 3)),
                                                                 sort_keys=True), lease=self._lease)
            self._record = record
        self._last = now
        known = sorted(set(facts.get("addresses", [])) | {self.ip})
        if known != self._known:
            # Without a lease: every node keeps protecting these addresses while this node is
            # away (its plugin stopped or cut off from etcd), until `l3netctl node remove`.
            self.store.put(self.keys.node_addresses(self.name), json.dumps({"name": self.name, "addresses": known}))
            self._known = known
        return True


    def identity_conflict(self):
        """Why this node may not register (a live node holds its name with another address:
        two hosts under one name would share blocks and announce each other's containers), or
        None."""
        value, _ = self.store.get(self.keys.node(self.name))
        try:
            record = json.loads(value) if value is not None else None
        except ValueError:
            return None
        other = record.get("ip") if isinstance(record, dict) else None
        if other is None or other == self.ip:
            return None
        return (f"node name {self.name!r} is held by a live node at {other}, not this host ({self.ip}): give "
                f"each host its own --hostname (L3NET_HOSTNAME). If that node was this host before its "
                f"address changed, its record expires within {self.ttl} s")


class Agent:
    """Runs sync() when its copy of etcd changes (the cache's watches wake it) and at least
    every ``interval`` seconds (a beat due, a reload after a lost watch), and checks the kernel
    for drift every ``drift_every`` seconds."""

    def __init__(self, store, keys, name, ip, bird=None, firewall=None, interval=1.0, drift_every=2.0,
                 status_path=None, facts=None, uplinks=None, bgp_passwords=None, tunnel=None):
        self.store, self.keys, self.name, self.ip = store, keys, name, ip
        self.bgp_passwords = bgp_passwords or {}
        self.uplinks_of = uplinks             # (own ip, [other nodes' ips]) -> [interface names]
        self._uplinks = (None, 0.0, [])       # (node ips asked about, when, answer)
        self.registry = Registry(store, keys, name, ip, facts=facts)
        self.bird = bird
        self.tunnel = tunnel                  # tunnel.Tunnel: the VXLAN device of encapsulated pools
        self.firewall = firewall or NoFirewall()
        self.interval, self.drift_every = interval, drift_every
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._policy_lock = threading.Lock()
        self._thread = None
        self._last_drift_check = 0.0
        self.last_sync = None
        self.last_error = None
        self.etcd_down_since = None     # when the agent last failed to read etcd (None: it reads)
        self._mesh_seen = {}            # mesh peer ip -> (Peer, when last in etcd): keep_departed
        self.stats = {}
        self.status_path = status_path   # where `l3netctl status` reads this agent's state
        self.cache = Cache(store, keys.agent_view(name), on_change=self._wake.set, spread=self._reload_spread)
        self.index = MemberIndex(keys, name)   # the members as last computed (calc.MemberIndex)
        self._computed = -RESYNC        # when everything was last computed (monotonic)
        self._full_due = True           # the last sync failed: compute everything at the next
        self._applied_revision = {}     # {prefix: revision} of the policy the driver put in force
        self._status_written = (None, 0.0)  # (status without its times, when): write_status

    def _reload_spread(self, items):
        """Seconds over which the cluster's agents spread their loads after a lost watch:
        none below RELOAD_SPREAD_FROM nodes, then in proportion to the nodes."""
        prefix = self.keys.nodes()
        count = sum(1 for k in items if k.startswith(prefix))
        return 0.0 if count < RELOAD_SPREAD_FROM else min(RELOAD_SPREAD_MAX, RELOAD_SPREAD_PER_NODE * count)

    def sync(self):
        """Follow the copy: a change to member records only is applied as what it changes
        (calc.MemberIndex: set entries, BGP only for a borrowed address); anything else, a
        load, or RESYNC seconds without a full computation computes everything from a view.
        BGP and policy are synced independently: a BIRD problem must not freeze the firewall,
        nor the reverse. The first error is raised after both were tried (and the next sync
        computes in full)."""
        errors = []
        generation = self.firewall.generation()        # before the read: see Firewall.apply
        reloads = self.cache.reloads
        try:
            changes = self.cache.changes()
        except Exception:
            # etcd is away: nothing is recomputed, so rules, sets, routes and BIRD stay as
            # they were (fail closed, last good state) until it answers again
            if self.etcd_down_since is None:
                self.etcd_down_since = time.time()
            raise
        answered = self.cache.reloads != reloads       # etcd was read just now
        try:
            # First, and on its own: a node whose BGP state cannot be computed is still alive,
            # and its record (with the addresses every node protects) must not expire.
            answered |= self.registry.heartbeat(node_asn(self.cache, self.keys, self.name),
                                                present=self.cache.get(self.keys.node(self.name))[0] is not None)
        except StoreError as e:
            # the copy may still be followed (a hung etcd keeps the watch open): the beat
            # is what tells; it is tried again at every tick until it goes through
            if self.etcd_down_since is None:
                self.etcd_down_since = time.time()
            errors.append(e)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        if answered and self.etcd_down_since is not None:
            log.info("etcd answers again after %.0f s", time.time() - self.etcd_down_since)
            self.etcd_down_since = None
        if changes:
            # this host's endpoint and network records are the sweeper's, not the
            # calculation's: a local docker run must not cost a full computation
            inert = (self.keys.endpoints(self.name), self.keys.networks(self.name))
            changes = {k: v for k, v in changes.items() if not k.startswith(inert)}
        members = self.keys.all_members()
        full = changes is None or self._full_due or time.monotonic() - self._computed >= RESYNC or \
            (self.bird is not None and self.bird.pid() is None) or \
            not all(k.startswith(members) for k in changes)
        try:
            if full:
                self._compute_all(errors, generation)
            elif changes:
                self._compute_members(changes, errors, generation)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        self._full_due = bool(errors)
        if errors:
            metrics.SYNC_ERRORS.inc()
            raise errors[0]
        if full:
            self._computed = time.monotonic()
        self.last_sync = time.time()

    def _compute_all(self, errors, generation):
        """Everything from a view of the copy: BGP, the policy, the member index."""
        view = self.cache.view()
        metrics.COMPUTATIONS.labels("full").inc()
        try:
            self._sync_bgp(view)
        except Exception as e:  # noqa: BLE001 - reported by sync(), after the policy sync
            errors.append(e)
        try:
            self.sync_policy(view, generation)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        try:
            self._sync_tunnel(view)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        self.index.load(view)
        self.stats = self.index.stats()

    def _compute_members(self, changes, errors, generation):
        """Member records changed, nothing else: what they change, and only that."""
        delta = self.index.apply(changes)
        self.stats = self.index.stats()
        metrics.COMPUTATIONS.labels("members").inc()
        if delta.bgp:
            view = self.cache.view()
            for step in (self._sync_bgp, self._sync_tunnel):
                try:
                    step(view)
                except Exception as e:  # noqa: BLE001
                    errors.append(e)
        if delta.policy:
            self.sync_policy(self.cache.view(), generation)
            return
        with self._policy_lock:
            done = self.firewall.apply_members(delta.add, delta.remove, generation)
        if done is False:
            self.sync_policy(self.cache.view(), generation)
        elif done:
            log.info("%s", done)
            metrics.POLICY_WRITES.labels("member").inc()

    def _sync_bgp(self, view):
        state, _ = desired_bgp(view, self.keys, self.name, self.ip)
        state.peers = self.keep_departed(state.peers, {n["ip"] for n in nodes(view, self.keys)})
        state.passwords = self.bgp_passwords
        if self.bird is not None:
            self.bird.apply(render(state))

    def _sync_tunnel(self, view):
        """The VXLAN device and its routes (encapsulated pools). After the policy: a device
        that listens is created only once the filter that admits VXLAN from nodes alone is
        in force."""
        if self.tunnel is None:
            return
        state = desired_tunnel(view, self.keys, self.name, self.ip)
        applied = getattr(self.firewall, "applied", None)
        if state and not isinstance(self.firewall, NoFirewall) and not getattr(applied, "encap", False):
            raise L3netError("the VXLAN device waits for the policy that filters it (not in force yet)")
        done = self.tunnel.apply(state)
        if done:
            log.info("%s", done)

    def sync_policy(self, view=None, generation=None, fresh=()):
        """Compute the desired policy and put it in force. ``view``: the cache's (the loop),
        with the firewall's ``generation`` taken before it was taken. None (the driver, after
        a network is created or a port published: its rules must be in force before the call
        returns, whatever the watch has delivered yet): the pools, this node's published ports
        and the ``fresh`` prefixes (the endpoint's member record) are read from etcd now, the
        rest of the cluster taken from the cache (never read again: that would cost etcd the
        whole cluster per docker run -p)."""
        with self._policy_lock:
            if view is None:
                generation = self.firewall.generation()
                prefixes = [self.keys.pools(), self.keys.ports(self.name), *fresh]
                items, _ = self.store.read(prefixes)
                view = self.cache.view().overlay(prefixes, items)
            elif any(view.revision.get(p, 0) < r for p, r in self._applied_revision.items()):
                return      # older than what the driver put in force: the watch catches up
            desired = desired_policy(view, self.keys, self.name)
            desired.uplinks = self.uplinks(sorted(set(desired.nodes.values()) - {self.ip}))
            done = self.firewall.apply(desired, generation)
            for p, r in view.revision.items():
                self._applied_revision[p] = max(self._applied_revision.get(p, 0), r)
            if done:
                log.info("%s", done)
                metrics.POLICY_WRITES.labels("full" if "in full" in done else "update").inc()

    MESH_GRACE = 60.0

    def keep_departed(self, peers, registered=None):
        """Mesh peers whose registry record vanished stay configured for MESH_GRACE seconds:
        when etcd comes back after an outage longer than a lease, every node's record has
        expired for the second it takes them to register again, and dropping their sessions
        then would withdraw every route in the cluster. A node really gone loses its routes
        by the BGP hold time anyway; only its (idle) session is kept a while longer.
        ``registered``: the addresses of the nodes registered now; a session with one of
        them that the desired state no longer has (the topology changed: the mesh turned
        off for route reflectors) goes at once."""
        now = time.monotonic()
        current = {p.ip: p for p in peers}
        for p in peers:
            if p.allowed is not None:
                self._mesh_seen[p.ip] = (p, now)
        for ip, (p, seen) in list(self._mesh_seen.items()):
            if ip in current:
                continue
            if now - seen < self.MESH_GRACE and ip not in (registered or ()):
                current[ip] = p
            else:
                del self._mesh_seen[ip]
        return list(current.values())

    UPLINKS_EVERY = 30.0

    def uplinks(self, others):
        """The interfaces towards the other nodes (asked again when the nodes change, and every
        UPLINKS_EVERY seconds: routes change rarely). On failure, none: then pool sources
        from the uplinks are checked by their routes too, which is stricter, not looser."""
        if self.uplinks_of is None:
            return []
        asked, when, answer = self._uplinks
        if asked != others or time.monotonic() - when >= self.UPLINKS_EVERY:
            try:
                answer = self.uplinks_of(self.ip, others)
            except Exception as e:  # noqa: BLE001
                warn("could not tell the uplinks: %s", e)
                answer = []
            self._uplinks = (others, time.monotonic(), answer)
        return answer

    def check_drift(self):
        now = time.monotonic()
        if now - self._last_drift_check < self.drift_every:
            return
        self._last_drift_check = now
        try:
            moved = self.tunnel.drift() if self.tunnel is not None else None
            if moved:
                log.warning("drift: %s; writing the tunnel again", moved)
                self.tunnel.applied = None
                self._sync_tunnel(self.cache.view())
        except Exception as e:  # noqa: BLE001 - the firewall's check below must still run
            log.warning("tunnel: %s", e)
            self._full_due = True
        reason = self.firewall.drift()
        if reason:
            log.warning("drift: %s; writing the policy again", reason)
            metrics.POLICY_WRITES.labels("drift").inc()
            self.sync_policy()

    def _loop(self):
        while not self._stop.is_set():
            self._wake.clear()
            error = None
            for step in (self.sync, self.check_drift):
                try:
                    step()          # (the drift check runs even when a sync failed)
                except Exception as e:  # noqa: BLE001 - log, retry at the next tick
                    error = error or e
            if error is None:
                if self.last_error:
                    log.info("agent back in sync")
            elif str(error) != str(self.last_error):
                log.warning("agent sync failed: %s", error)
            self.last_error = error
            self.write_status()
            if self._wake.wait(self.interval):
                # One docker run is several writes within milliseconds (address, endpoint
                # record): one sync for the burst, not one each, off the CPU dockerd needs.
                self._stop.wait(DEBOUNCE)

    STATUS_EVERY = 5.0      # seconds: the status file's freshness (cli.STALE is 10 s)

    def write_status(self):
        """This node's view for `l3netctl status` (a small JSON file, replaced atomically):
        when it says something new, and every STATUS_EVERY seconds so that its last_sync
        stays fresh (not at every tick: an idle node would spend most of its CPU on it)."""
        if not self.status_path:
            return
        applied = getattr(self.firewall, "applied", None)
        status = {"node": self.name, "ip": self.ip, "pid": os.getpid(),
                  "last_error": str(self.last_error) if self.last_error else None,
                  "etcd_down_since": self.etcd_down_since,
                  "watch": self.cache.following, "datastore_reloads": self.cache.reloads,
                  "datastore_events": self.cache.events, **self.stats,
                  "policy": None if applied is None else {
                      "networks": len(applied.pools), "policies": len(applied.rules),
                      "host_rules": len(applied.host_rules),
                      "members": sum(len(m) for m in applied.members.values())}}
        now = time.monotonic()
        if status == self._status_written[0] and now - self._status_written[1] < self.STATUS_EVERY:
            return
        self._status_written = (status, now)
        status = dict(status, written=time.time(), last_sync=self.last_sync)
        try:
            tmp = self.status_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(status, f)
            os.replace(tmp, self.status_path)
        except OSError as e:
            log.debug("cannot write %s: %s", self.status_path, e)

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="l3net-agent", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.cache.stop()           # (a watch that is already dead is fine)
        # BIRD is left running: a plugin restart (an upgrade) costs no route, and the next
        # plugin adopts it (bird.py). A node down for good leaves the mesh when its registry
        # lease expires: the other nodes drop their sessions with it.
