"""The sweeper: what a lost call, a hung etcd or a crash left behind on this node, removed.

dockerd sends each call once and only logs a failed release; etcd may hang in the middle of a
``docker rm``; a container may die while the plugin is down. So every ``every`` seconds the
sweeper compares this node's endpoint records and allocations (etcd) with its kernel, and
removes what nothing explains:

  * stray veth: a veth this node made (its alias says so) that no endpoint record, and no
    deletion in progress, explains;
  * stray route: a /32 route via one of our veths that is not its endpoint's address;
  * gone container: an endpoint record whose veth is gone (a container's veth dies with its
    network namespace): finished as DeleteEndpoint would;
  * leaked address: an address held by an endpoint of this node whose record is gone, or
    pending for this node (RequestAddress without CreateEndpoint) for ``PENDING_AGE``: released
    (only if that holder still has it).

Each is acted on only once it has been seen ``grace`` seconds in a row (a CreateEndpoint in
progress makes its veth before its record; dockerd's ReleaseAddress follows DeleteEndpoint),
and nothing at all is done in a round where etcd does not answer: the sweeper only removes
what it knows to be unexplained (fail closed). ``plan`` is pure; ``Sweeper`` does the I/O.
"""

import json
import logging
import threading
import time

from netaddr import IPNetwork

from core import records as R
from core.names import host_ifname

from . import calc

log = logging.getLogger("l3net.sweep")

PENDING_AGE = 600.0     # a docker run between RequestAddress and CreateEndpoint takes < 1 s


def plan(host, owner, endpoints, allocations, veths, routes, deleting, aux, now):
    """What this node should remove now (before the grace period): a dict {key: action}.

    ``endpoints``: {id: record} of this node; ``allocations``: [(pool, address, allocation)]
    of every block; ``veths``: {name: alias}; ``routes``: [(address, name)] of /32 routes via
    our veths; ``deleting``: endpoint IDs in the deletion journal; ``aux``: addresses the
    node's networks reserve (--aux-address of an older l3net, still ``pending``)."""
    actions = {}
    explained = {r.get("host_ifname"): r for r in endpoints.values()}
    explained.update({host_ifname(i): None for i in deleting})
    for name, alias in veths.items():
        if alias == owner and name not in explained:
            actions[("veth", name)] = ("stray veth", name)
    for address, name in routes:
        record = explained.get(name, False)
        if record is False or (record is not None and record.get("address") != address):
            actions[("route", address, name)] = ("stray route", address, name)
    for endpoint_id, record in endpoints.items():
        if endpoint_id not in deleting and not record.get("deleting") and \
                record.get("host_ifname") not in veths:
            actions[("gone", endpoint_id)] = ("gone container", record.get("network", ""), endpoint_id)
    for pool, address, held in allocations:
        if held.get("host") != host:
            continue
        handle = str(held.get("handle", ""))
        who = R.endpoint_of(handle)
        if (who is not None and who not in endpoints and who not in deleting) or \
                (handle == R.pending_handle(host) and address not in aux and
                 now - float(held.get("time", now)) >= PENDING_AGE):
            actions[("address", address, handle)] = ("leaked address", pool, address, handle)
    return actions


class Sweeper:
    def __init__(self, driver, ipam, every=30.0, grace=30.0, view=None):
        """``view()``: the agent's watch-fed copy of etcd (cache.Cache.view), which holds
        this node's endpoint and network records and every allocation: an idle node's sweep
        then costs etcd nothing (the grace period covers the watch's lag). None: read etcd."""
        self.driver, self.ipam = driver, ipam
        self.view = view
        self.every, self.grace = float(every), float(grace)
        self.seen = {}             # key -> when first seen unexplained
        self._stop = threading.Event()
        self._thread = None

    def facts(self):
        """Everything ``plan`` needs, or an exception (etcd away): then nothing is done."""
        d = self.driver
        source = self.view() if self.view is not None else d.store
        endpoints = {}
        for _, value, _ in source.get_prefix(d.keys.endpoints(d.host)):
            record = json.loads(value)
            endpoints[record["id"]] = record
        aux = set()
        for _, value, _ in source.get_prefix(d.keys.networks(d.host)):
            aux.update(a.split("/")[0] for a in json.loads(value).get("aux", []))
        if self.view is not None:
            allocations = calc.allocations(source, d.keys)
        else:
            allocations = []
            for _, value, _ in d.store.get_prefix(d.keys.all_blocks()):
                block = json.loads(value)
                allocations += [(block["pool"], ip, a) for ip, a in block["allocations"].items()]
        deleting = set(d.journal.pending())
        veths, routes = d.datapath.veth_facts()
        return endpoints, allocations, veths, routes, deleting, aux

    def sweep(self, now=None):
        """One round. Returns the actions taken."""
        now = time.time() if now is None else now
        d = self.driver
        endpoints, allocations, veths, routes, deleting, aux = self.facts()
        actions = plan(d.host, d.datapath.owner, endpoints, allocations, veths, routes, deleting,
                       aux, now)
        self.seen = {k: self.seen.get(k, now) for k in actions}
        done = []
        for key, action in actions.items():
            if now - self.seen[key] < self.grace:
                continue
            try:
                self._act(action)
            except Exception as e:  # noqa: BLE001 - one failure must not stop the others
                log.warning("sweep: could not remove %s: %s", " ".join(action), e)
                continue
            log.warning("sweep: removed %s (unexplained for %.0f s)", " ".join(action), now - self.seen[key])
            self.seen.pop(key)
            done.append(action)
        return done

    def _act(self, action):
        d, kind = self.driver, action[0]
        if kind == "stray veth":
            d.datapath.delete_veth(action[1])
        elif kind == "stray route":
            d.datapath.delete_route(action[1], action[2])
        elif kind == "gone container":
            d.delete_endpoint(action[1], action[2])
        elif kind == "leaked address":
            self.ipam.release_held(IPNetwork(action[1]), action[2], action[3])

    def _loop(self):
        while not self._stop.wait(self.every):
            try:
                self.sweep()
            except Exception as e:  # noqa: BLE001 - etcd away: keep everything, try next round
                log.debug("sweep skipped: %s", e)

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="l3net-sweep", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
