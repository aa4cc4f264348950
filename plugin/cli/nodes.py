"""l3netctl endpoint and node: the containers' endpoints, and the cluster's nodes."""

import json
import time
from collections import Counter

import click

from core.errors import L3netError

from ..config import node_name
from .base import cli, docker, emit, node_type


@cli.group()
def endpoint():
    """Container endpoints."""


def local_containers(network_ids):
    """{endpoint ID: (container name, network name)} from the local dockerd (best effort:
    empty when dockerd cannot be asked). Only this host's dockerd knows its containers."""
    out = {}
    for network_id in sorted(network_ids):
        try:
            res = docker(network_id, "network", "network", "inspect", "--format",
                         "{{.Name}} {{json .Containers}}", network_id)
        except L3netError:
            return out
        if res.returncode != 0:
            continue
        name, _, containers = res.stdout.strip().partition(" ")
        for c in (json.loads(containers or "{}") or {}).values():
            out[c.get("EndpointID", "")] = (c.get("Name", ""), name)
    return out


@endpoint.command("list")
@click.option("--hostname", envvar="L3NET_HOSTNAME", help="This host's node name [default: hostname].")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def endpoint_list(obj, hostname, as_json):
    """Every endpoint on every host; container names for this host's (from its dockerd)."""
    here = node_name(hostname)
    from ..ports import describe
    records, ports = [], {}
    for key, value, _ in obj.store.get_prefix(obj.keys.all_hosts()):
        if "/endpoints/" in key:
            records.append((obj.keys.host_of(key), json.loads(value)))
        elif "/ports/" in key:
            port = json.loads(value)
            ports.setdefault(port.get("endpoint"), []).append(describe(port))
    names = local_containers({e["network"] for h, e in records if h == here})
    rows = [{"endpoint": e["id"][:12], "container": names.get(e["id"], ("", ""))[0],
             "network": names.get(e["id"], ("", ""))[1] or e["network"][:12], "host": h,
             "address": e["address"], "interface": e["host_ifname"],
             "published": ", ".join(sorted(ports.get(e["id"], [])))} for h, e in records]
    emit(rows, ["Endpoint", "Container", "Network", "Host", "Address", "Interface", "Published"], as_json)


@cli.group()
def node():
    """Nodes of the cluster (the registry each l3net-plugin keeps alive)."""


@node.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def node_list(obj, as_json):
    from ..calc import nodes, route_reflectors
    now = time.time()
    reflectors = route_reflectors(obj.store, obj.keys)
    blocks = Counter(obj.keys.host_of(k) for k, _, _ in obj.store.get_prefix(obj.keys.all_affinities()))
    endpoints = Counter(obj.keys.host_of(k) for k, _, _ in obj.store.get_prefix(obj.keys.all_hosts())
                        if "/endpoints/" in k)
    registered = {n["name"]: n for n in nodes(obj.store, obj.keys)}
    rows = [{"name": n["name"], "address": n["ip"], "as": n.get("as"), "state": "up",
             "up_for": f"{now - n.get('since', n.get('last_seen', now)):.0f}s", "blocks": blocks.get(n["name"], 0),
             "endpoints": endpoints.get(n["name"], 0), "vtep_mac": n.get("vtep_mac", "")} for n in registered.values()]
    # hosts that still hold blocks or endpoints but no longer register: dead, or gone for good
    rows += [{"name": h, "address": "", "as": "", "state": "gone (l3netctl node remove)",
              "up_for": "", "blocks": blocks.get(h, 0), "endpoints": endpoints.get(h, 0), "vtep_mac": ""}
             for h in sorted((set(blocks) | set(endpoints)) - set(registered))]
    for r in rows:
        r["role"] = "route reflector" if r["name"] in reflectors else "node"
    rows.sort(key=lambda r: r["name"])
    emit(rows, ["Name", "Address", "AS", "Role", "State", "Up for", "Blocks", "Endpoints", "VTEP MAC"], as_json)


@node.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="Even if the node is still registered (alive).")
@click.pass_obj
def node_remove(obj, name, force):
    """Release a node that is gone for good: its addresses, blocks, records and BGP settings,
    and the protection of its host addresses (kept while it is merely away).

    Only for a node that will not come back: a live container there could otherwise see its
    address handed to another container."""
    name = node_type(name)
    if obj.store.get(obj.keys.node(name))[0] is not None and not force:
        raise L3netError(f"node {name} is still registered (alive?): stop it first, or pass --force")
    released, freed = obj.ipam().release_host(name)
    for key, _, _ in obj.store.get_prefix(obj.keys.host(name)):
        obj.store.delete(key)
    obj.store.delete(obj.keys.bgp_node(name))
    obj.store.delete(obj.keys.node_addresses(name))
    obj.store.delete(obj.keys.node(name))
    click.echo(f"node {name} removed: {released} addresses released, {freed} blocks freed")
