"""The agent: the long-running half of a node, beside the API.

Every ``interval`` seconds it
  1. keeps this node's registry record alive (an etcd lease: a dead node's record vanishes),
  2. computes the BGP desired state from etcd (nodes, BGP settings, pools, this node's blocks),
  3. renders it (bgp.render) and makes BIRD run with it (bird.Bird.apply: only on change;
     a BIRD that died is started again).
Errors are logged and retried at the next tick; nothing here can block a Docker call.
"""

import json
import logging
import threading
import time

from .bgp import DEFAULT_AS, HOLD_TIME, BgpState, Peer, render
from .keys import key_cidr
from .store import get_json

log = logging.getLogger("l3net.agent")

LEASE_TTL = 30
HEARTBEAT = 10


class Registry:
    """This node's record under <prefix>/nodes/<name>, kept alive by a lease."""

    def __init__(self, store, keys, name, ip, ttl=LEASE_TTL):
        self.store, self.keys, self.name, self.ip, self.ttl = store, keys, name, ip, ttl
        self._lease = None
        self._last = 0.0

    def heartbeat(self, asn, force=False):
        now = time.time()
        if not force and self._lease is not None and now - self._last < HEARTBEAT:
            return
        if self._lease is None or not self.store.refresh(self._lease):
            self._lease = self.store.lease(self.ttl)
            log.info("registered node %s (%s) with a %ds lease", self.name, self.ip, self.ttl)
        record = {"name": self.name, "ip": self.ip, "as": asn, "last_seen": round(now, 3)}
        self.store.put(self.keys.node(self.name), json.dumps(record, sort_keys=True),
                       lease=self._lease)
        self._last = now


def nodes(store, keys):
    return [json.loads(v) for _, v, _ in store.get_prefix(keys.nodes())]


def bgp_settings(store, keys, name):
    """(cluster settings, this node's settings) with defaults filled in."""
    cluster = {"as": DEFAULT_AS, "mesh": True, "hold_time": HOLD_TIME}
    cluster.update(get_json(store, keys.bgp_config(), {}))
    node = {"as": None, "peers": []}
    node.update(get_json(store, keys.bgp_node(name), {}))
    return cluster, node


def desired_bgp(store, keys, name, ip):
    """The BGP state this node should run with, from what etcd holds now."""
    cluster, node = bgp_settings(store, keys, name)
    asn = node["as"] or cluster["as"]
    peers = []
    if cluster["mesh"]:
        peers += [Peer(n["name"], n["ip"], n.get("as") or cluster["as"])
                  for n in nodes(store, keys) if n["name"] != name and n["ip"] != ip]
    for _, v, _ in store.get_prefix(keys.bgp_peers()):
        p = json.loads(v)
        if p["ip"] != ip:
            peers.append(Peer(p.get("name") or p["ip"], p["ip"], p["as"], multihop=True))
    peers += [Peer(p.get("name") or p["ip"], p["ip"], p["as"], multihop=True) for p in node["peers"]]
    unique = {p.ip: p for p in peers}       # one session per address: explicit peers win
    pools = [key_cidr(k.rsplit("/", 1)[1]) for k, _, _ in store.get_prefix(keys.pools())]
    blocks = [key_cidr(k.rsplit("/", 1)[1]) for k, _, _ in store.get_prefix(keys.affinities(name))]
    return BgpState(node=name, router_id=ip, asn=asn, pools=pools, blocks=blocks,
                    peers=list(unique.values()), hold_time=cluster["hold_time"]), asn


def desired_policy(store, keys, name):
    """The isolation state this node should enforce, from what etcd holds now (issue 4; not
    applied by the agent yet). Members of a network: every address allocated in its pool on
    any host, except the gateway reservations."""
    from .policy import PolicyState

    pools = [json.loads(v) for _, v, _ in store.get_prefix(keys.pools())]
    members = {p["cidr"]: [] for p in pools}
    for _, value, _ in store.get_prefix(keys.all_blocks()):
        block = json.loads(value)
        members.setdefault(block["pool"], []).extend(
            ip for ip, a in block["allocations"].items() if not a["handle"].startswith("gateway:"))
    rules = [json.loads(v) for _, v, _ in store.get_prefix(keys.policy_rules())]
    host_rules = [r for r in (json.loads(v) for _, v, _ in store.get_prefix(keys.host_rules()))
                  if r.get("node") in (None, name)]
    return PolicyState(pools=sorted(members), nat_pools=sorted(p["cidr"] for p in pools if p["nat_outgoing"]),
                       members={k: sorted(v) for k, v in members.items()}, rules=rules,
                       host_rules=host_rules, host_ips=sorted(n["ip"] for n in nodes(store, keys)))


class Agent:
    def __init__(self, store, keys, name, ip, bird=None, interval=1.0):
        self.store, self.keys, self.name, self.ip = store, keys, name, ip
        self.registry = Registry(store, keys, name, ip)
        self.bird = bird
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        self.last_sync = None
        self.last_error = None

    def sync(self):
        state, asn = desired_bgp(self.store, self.keys, self.name, self.ip)
        self.registry.heartbeat(asn)
        if self.bird is not None:
            self.bird.apply(render(state))
        self.last_sync = time.time()

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.sync()
                if self.last_error:
                    log.info("agent back in sync")
                self.last_error = None
            except Exception as e:  # noqa: BLE001 - log, retry at the next tick
                if str(e) != str(self.last_error):
                    log.warning("agent sync failed: %s", e)
                self.last_error = e
            self._stop.wait(self.interval)

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="l3net-agent", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.bird is not None:
            self.bird.stop()
