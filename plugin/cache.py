"""The agent's datastore cache: what it computes from, read once and then followed by watch.

Felix's split, in l3net: this module is the *datastore* half (etcd -> an in-memory copy of the
prefixes the agent needs), the pure functions in calc.py are the *calculation* (desired BGP and
policy state from a view), bird.py and firewall.py the *dataplane* writers.

``load()`` reads the prefixes at one etcd revision, then a watch per prefix (one gRPC stream)
follows them from the next revision and applies each change to the copy (other hosts'
endpoint and network records never reach a node), so an idle cluster costs a node
nothing but its own heartbeat, and a change anywhere costs every node that one small event,
not a re-read of everything. The watch breaking (etcd restarted, a member lost) or having been
compacted past makes the next ``view()`` load again in full, counted in ``reloads`` (metric
``l3net_datastore_reloads_total``). While it cannot load, ``view()`` raises: the agent then
changes nothing (fail closed, last good state).
"""

import bisect
import logging
import random
import threading
import time

log = logging.getLogger("l3net.datastore")

MOST_CHANGES = 256      # more keys changed than this since the last computation: compute all


class View:
    """A frozen copy of the cache answering ``get`` / ``get_prefix`` like a store (what the
    calculation functions read). ``memo``: where the calculation keeps what it parsed, by key
    and revision, from one view to the next (calc.allocations): shared by every view of one
    cache, so a change costs the parsing of what changed, not of the cluster. ``derived``:
    what it computed from this view itself, kept for the view's other readers."""

    def __init__(self, items, revision=None, memo=None):
        # {prefix: the newest etcd revision of it known here}: the watches of several prefixes
        # deliver in order each, not with each other
        self.revision = dict(revision or {})
        self.memo = {} if memo is None else memo
        self.derived = {}           # what the calculation derived from this view (calc._once_per_view)
        self._items = sorted((k, v, r) for k, (v, r) in items.items())
        self._keys = [k for k, _, _ in self._items]
        self._index = {k: (v, r) for k, v, r in self._items}

    def overlay(self, prefixes, items):
        """This view with everything under ``prefixes`` replaced by ``items`` ({key: (value,
        revision)}, read from etcd just now): what the driver computes from when its own write
        must count before the watch has brought it (the rest of the cluster from the copy, not
        read again). The revisions of the copy's prefixes take the fresh records' in."""
        prefixes = tuple(prefixes)
        merged = {k: (v, r) for k, v, r in self._items if not k.startswith(prefixes)}
        merged.update(items)
        revision = dict(self.revision)
        for key, (_, r) in items.items():
            for p in revision:
                if key.startswith(p):
                    revision[p] = max(revision[p], r)
        return View(merged, revision, self.memo)

    def get(self, key):
        return self._index.get(key, (None, 0))

    def get_prefix(self, prefix):
        start = bisect.bisect_left(self._keys, prefix)
        end = bisect.bisect_left(self._keys, prefix + "\U0010ffff", start)
        return self._items[start:end]


class Cache:
    def __init__(self, store, prefixes, on_change=None, spread=None):
        """``prefixes``: what to copy and follow; ``on_change()``: called after each batch of
        changes (the agent's wake-up); ``spread(items)``: seconds over which to spread the load
        after a lost watch (see ``_on``), from the copy; default none."""
        self.store, self.prefixes = store, tuple(prefixes)
        self.on_change = on_change or (lambda: None)
        self.spread = spread or (lambda items: 0.0)
        self._reload_at = None      # a lost watch: when to load again (the copy serves till then)
        self._lock = threading.Lock()
        self._items = None          # key -> (value, revision); None: not loaded (or broken)
        self._seen = {}             # prefix -> newest revision loaded or followed
        self._cancel = None
        self._epoch = 0             # which load the watch callbacks belong to
        self.generation = 0         # bumped on every change: "anything new since I computed?"
        self._view = None           # (generation, View)
        self.reloads = 0
        self.events = 0
        self.memo = {}              # the calculation's parsed records (View.memo)
        self._dirty = None          # keys changed since changes() was last asked; None: all (a load)

    def view(self):
        """The current copy (loading it first if needed). Raises when etcd cannot be read."""
        with self._lock:
            if self._items is not None and (self._reload_at is None or time.monotonic() < self._reload_at):
                return self._current()
        self.load()
        with self._lock:
            if self._items is None:
                return View({})
            return self._current()

    def changes(self, most=None):
        """{key: value, or None if deleted} of what changed in the copy since the last call
        (loading it first if needed; raises when etcd cannot be read), or None when
        everything must be taken as new: a load (the first, or after a lost watch), or more
        than ``most`` (MOST_CHANGES) keys changed: computing all then costs less. A caller
        that cannot finish with the changes must compute in full next time."""
        with self._lock:
            current = self._items is not None and (self._reload_at is None or time.monotonic() < self._reload_at)
        if not current:
            self.load()
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            if dirty is None or len(dirty) > (most or MOST_CHANGES) or self._items is None:
                return None
            return {k: self._items[k][0] if k in self._items else None for k in dirty}

    def get(self, key):
        """(value, revision) of one key of the copy ((None, 0): absent, or no copy)."""
        with self._lock:
            return (self._items or {}).get(key, (None, 0))

    def _current(self):
        """The View of this generation, made once (the agent asks every second; copying the
        cluster's records each time would cost CPU in proportion to the cluster)."""
        if self._view is None or self._view[0] != self.generation:
            self._view = (self.generation, View(self._items, self._seen, self.memo))
        return self._view[1]

    @property
    def following(self):
        return self._cancel is not None

    def load(self):
        items, revision = self.store.read(self.prefixes)
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            cancel, self._cancel = self._cancel, None
            self._items = items
            self._dirty = None
            self._reload_at = None
            self._seen = {p: revision for p in self.prefixes}
            self.generation += 1
            self.reloads += 1
        if cancel is not None:
            cancel()
        stops = []

        def stop():
            """Cancel this load's watches (one already dead is fine)."""
            for cancel in stops:
                try:
                    cancel()
                except Exception:  # noqa: BLE001 - the watch may be dead already
                    pass
        try:
            for prefix in self.prefixes:
                stops.append(self.store.follow(prefix, revision, lambda change: self._on(epoch, change)))
        except Exception:
            stop()
            with self._lock:
                if self._epoch == epoch:
                    self._items = None      # not followed: load again next time
            raise
        with self._lock:
            if self._epoch == epoch:
                self._cancel = stop
                return
        stop()      # a newer load happened meanwhile

    def _on(self, epoch, change):
        with self._lock:
            if epoch != self._epoch or self._items is None:
                return
            if isinstance(change, Exception):
                # Every agent of the cluster loses its watch at the same moment when etcd
                # restarts: each loads again after a random delay that grows with the cluster
                # (``spread``), so etcd does not send every copy at once. Till then the copy
                # it had serves (the last good state; not followed, so nothing new is learned).
                delay = random.uniform(0, max(0.0, self.spread(self._items)))
                log.info("etcd watch lost (%s): loading again in %.1f s", change, delay)
                self._cancel = None
                if delay > 0:
                    self._reload_at = time.monotonic() + delay
                    return      # nothing new to compute from; the agent's tick loads it in time
                self._items = None
            else:
                relevant = 0
                before = dict(self._seen)   # (one transaction: several changes, one revision)
                for key, value, revision in change:
                    prefix = next((p for p in self.prefixes if key.startswith(p)), None)
                    if prefix is None or revision <= before.get(prefix, 0):
                        continue        # not ours, or already in the load
                    self._seen[prefix] = max(self._seen.get(prefix, 0), revision)
                    if self._dirty is not None:
                        self._dirty.add(key)
                    if value is None:
                        self._items.pop(key, None)
                    else:
                        self._items[key] = (value, revision)
                    relevant += 1
                self.events += relevant
                if not relevant:
                    return
            self.generation += 1
        self.on_change()

    def stop(self):
        with self._lock:
            self._epoch += 1
            cancel, self._cancel = self._cancel, None
            self._items = None
        if cancel is not None:
            cancel()
