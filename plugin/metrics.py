"""Prometheus metrics: off by default, ``--metrics-port N`` serves them on
``--metrics-address`` (127.0.0.1 by default) at ``/metrics``.

  l3net_api_calls_total{method,code}       calls from dockerd (method: the protocol method)
  l3net_api_call_seconds{method}           how long they took (histogram)
  l3net_pool_addresses{pool,state}         allocated / capacity, per pool (cluster-wide)
  l3net_endpoints                          endpoints on this node
  l3net_bgp_sessions{state}                this node's BGP sessions: established / down
  l3net_agent_sync_age_seconds             since the agent last synced with etcd
  l3net_agent_sync_errors_total            failed syncs (etcd unreachable, BIRD, iptables)
  l3net_etcd_up                            1 while the agent reads etcd, 0 while it cannot (the
                                           node then keeps its rules, sets, routes and BIRD)
  l3net_policy_writes_total{kind}          policy writes: full, update, drift (a repair)

The last six are read on scrape from the agent's latest view (no etcd call per scrape).
"""

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .birdconf import parse_protocols

log = logging.getLogger("l3net.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)
CALLS = Counter("l3net_api_calls", "Calls from dockerd, by protocol method and HTTP status.",
                ["method", "code"], registry=REGISTRY)
LATENCY = Histogram("l3net_api_call_seconds", "Time to answer a call from dockerd.", ["method"],
                    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                    registry=REGISTRY)
SYNC_ERRORS = Counter("l3net_agent_sync_errors", "Agent syncs that failed.", registry=REGISTRY)
COMPUTATIONS = Counter("l3net_agent_computations", "Agent computations: full (everything from the "
                       "copy of etcd) or members (only what changed member records change).", ["kind"],
                       registry=REGISTRY)
POLICY_WRITES = Counter("l3net_policy_writes", "Policy written to the kernel, by kind.", ["kind"],
                        registry=REGISTRY)


def bgp_states(protocols):
    """``birdc show protocols`` -> {"established": n, "down": m} over the BGP sessions."""
    sessions = parse_protocols(protocols)
    up = sum(s["established"] for s in sessions)
    return {"established": up, "down": len(sessions) - up}


class NodeCollector:
    """Gauges read from the agent at scrape time."""

    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        stats = getattr(self.agent, "stats", None) or {}
        pools = GaugeMetricFamily("l3net_pool_addresses", "Addresses per pool, cluster-wide.",
                                  labels=["pool", "state"])
        for cidr, (allocated, capacity) in sorted(stats.get("pools", {}).items()):
            pools.add_metric([cidr, "allocated"], allocated)
            pools.add_metric([cidr, "capacity"], capacity)
        yield pools
        yield GaugeMetricFamily("l3net_endpoints", "Endpoints on this node.",
                                value=stats.get("endpoints", 0))
        last = self.agent.last_sync
        yield GaugeMetricFamily("l3net_agent_sync_age_seconds",
                                "Seconds since the agent last synced with etcd (-1: never).",
                                value=time.time() - last if last else -1)
        yield GaugeMetricFamily("l3net_etcd_up", "1 while the agent reads etcd, 0 while it cannot.",
                                value=0 if getattr(self.agent, "etcd_down_since", None) else 1)
        cache = getattr(self.agent, "cache", None)
        if cache is not None:
            yield CounterMetricFamily("l3net_datastore_reloads", "Full reads of the agent's copy of etcd "
                                      "(the first, then one per lost or compacted watch).", value=cache.reloads)
            yield CounterMetricFamily("l3net_datastore_events", "Changes applied to the agent's copy of etcd "
                                      "from its watch.", value=cache.events)
        sessions = GaugeMetricFamily("l3net_bgp_sessions", "This node's BGP sessions.", labels=["state"])
        if self.agent.bird is not None:
            try:
                for state, n in bgp_states(self.agent.bird.show("protocols")).items():
                    sessions.add_metric([state], n)
            except Exception as e:  # noqa: BLE001 - BIRD down: no figure rather than a failed scrape
                log.debug("no BGP figures: %s", e)
        yield sessions


def serve(port, address, agent):
    """Start the metrics endpoint (a daemon thread). A port in use is logged, not fatal."""
    REGISTRY.register(NodeCollector(agent))
    try:
        start_http_server(port, addr=address, registry=REGISTRY)
        log.info("metrics on http://%s:%d/metrics", address, port)
    except OSError as e:
        log.error("cannot serve metrics on %s:%d: %s", address, port, e)
