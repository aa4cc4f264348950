"""l3netctl bgp: AS numbers, the mesh, route reflectors, peers, session status."""

import json
import os

import click

from core.errors import L3netError

from ..config import bird_socket
from .base import asn_type, cli, emit, ip_type, node_type


@cli.group()
def bgp():
    """BGP settings: AS numbers, the node-to-node mesh, route reflectors and other peers.

    \b
    The default full mesh opens a session between every two nodes: n*(n-1)/2 sessions, fine
    up to some tens of nodes. Beyond that, run route reflectors (or peer with top-of-rack
    routers): `l3netctl bgp peer add RR_IP --as AS`, then `l3netctl bgp config --no-mesh`.
    """


def _update_json(obj, key, change):
    from ..store import get_json
    record = get_json(obj.store, key, {})
    change(record)
    obj.store.put(key, json.dumps(record, sort_keys=True))
    return record


@bgp.command("config")
@click.option("--as", "asn", type=asn_type, help="Default AS number of the nodes.")
@click.option("--mesh/--no-mesh", default=None, help="Node-to-node full mesh on or off.")
@click.option("--hold-time", type=click.IntRange(3, 65535), help="BGP hold time in seconds.")
@click.option("--ttl-security/--no-ttl-security", default=None,
              help="GTSM on the mesh's direct sessions (once every node runs an l3net that knows it).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def bgp_config(obj, asn, mesh, hold_time, ttl_security, as_json):
    """Show, or change, the cluster's BGP settings."""
    from ..calc import bgp_settings

    settings = (("as", asn), ("mesh", mesh), ("hold_time", hold_time), ("ttl_security", ttl_security))

    def change(record):
        for key, value in settings:
            if value is not None:
                record[key] = value
    if any(v is not None for _, v in settings):
        _update_json(obj, obj.keys.bgp_config(), change)
    cluster, _ = bgp_settings(obj.store, obj.keys, "-")
    row = {k: cluster[k] for k in ("as", "mesh", "hold_time")}
    if cluster["ttl_security"]:
        row["ttl_security"] = True
    emit([row], ["AS", "Mesh", "Hold time", "TTL security"], as_json)


@bgp.command("node")
@click.argument("name", type=node_type)
@click.option("--as", "asn", type=asn_type, help="This node's own AS number.")
@click.option("--cluster-as", is_flag=True, help="Take the cluster's AS number again (drop --as).")
@click.option("--route-reflector/--no-route-reflector", "reflector", default=None,
              help="Make this node a route reflector (with the mesh off, every other node peers "
                   "with the reflectors only), or an ordinary node again.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def bgp_node(obj, name, asn, cluster_as, reflector, as_json):
    """Show, or change, a node's BGP settings: its AS number (default: the cluster's) and
    whether it is a route reflector.

    \b
    Route reflection replaces the full mesh (n*(n-1)/2 sessions) by two or three reflectors:
    mark them first, then turn the mesh off (`l3netctl bgp config --no-mesh`). Every node then
    peers with the reflectors only (their AS's nodes are their clients), the reflectors with
    every node and with each other; routes keep their next hop (traffic never goes through a
    reflector). With two reflectors, losing one loses no route.
    """
    from ..calc import bgp_settings
    if asn is not None and cluster_as:
        raise click.UsageError("--as and --cluster-as exclude each other")

    def change(record):
        if asn is not None or cluster_as:
            record["as"] = asn
        if reflector is not None:
            record["route_reflector"] = reflector
    if asn is not None or cluster_as or reflector is not None:
        _update_json(obj, obj.keys.bgp_node(name), change)
    cluster, node = bgp_settings(obj.store, obj.keys, name)
    row = {"node": name, "as": node["as"] or cluster["as"], "as_from": "node" if node["as"] else "cluster",
           "route_reflector": node["route_reflector"] if as_json else ("yes" if node["route_reflector"] else "no"),
           "peers": len(node["peers"])}
    emit([row], ["Node", "AS", "AS from", "Route reflector", "Peers"], as_json)
    if reflector and cluster["mesh"] and not as_json:
        click.echo("note: the mesh is on; reflection takes over once it is off (l3netctl bgp config --no-mesh)")


@bgp.group()
def peer():
    """BGP peers outside the mesh: route reflectors, top-of-rack routers."""


@peer.command("add")
@click.argument("ip", type=ip_type)
@click.option("--as", "asn", type=asn_type, required=True, help="The peer's AS number.")
@click.option("--node", type=node_type, help="Only this node peers with it (default: every node).")
@click.option("--name", default=None, help="A label for the peer (letters, digits, '.', '_', '-').")
@click.pass_obj
def peer_add(obj, ip, asn, node, name):
    from core.infra import NODE_NAME, unicast_ip
    if name is not None and not NODE_NAME.fullmatch(name):
        raise click.BadParameter(f"{name!r}: a label of letters, digits, '.', '_' and '-' (up to 63)",
                                 param_hint="--name")
    if not unicast_ip(ip):
        raise click.BadParameter(f"{ip}: not a unicast address a BGP peer can have", param_hint="IP")
    record = {"ip": ip, "as": asn, "name": name or ip}
    if node:
        def change(r):
            r.setdefault("peers", [])
            r["peers"] = [p for p in r["peers"] if p["ip"] != ip] + [record]
        _update_json(obj, obj.keys.bgp_node(node), change)
    else:
        obj.store.put(obj.keys.bgp_peer(ip), json.dumps(record, sort_keys=True))
    click.echo(f"peer {ip} AS {asn} added for {'node ' + node if node else 'every node'}")


@peer.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def peer_list(obj, as_json):
    rows = [dict(p, scope="global") for p in obj.records(obj.keys.bgp_peers())]
    for key, value, _ in obj.store.get_prefix(obj.keys.bgp_nodes()):
        for p in json.loads(value).get("peers", []):
            rows.append(dict(p, scope="node " + obj.keys.host_of(key)))
    emit(rows, ["IP", "AS", "Name", "Scope"], as_json)


@peer.command("remove")
@click.argument("ip", type=ip_type)
@click.option("--node", type=node_type, help="Remove the peer of this node (default: the global one).")
@click.pass_obj
def peer_remove(obj, ip, node):
    if node:
        _update_json(obj, obj.keys.bgp_node(node),
                     lambda r: r.update({"peers": [p for p in r.get("peers", []) if p["ip"] != ip]}))
    else:
        if obj.store.get(obj.keys.bgp_peer(ip))[0] is None:
            raise L3netError(f"no global peer {ip}")
        obj.store.delete(obj.keys.bgp_peer(ip))
    click.echo(f"peer {ip} removed")


@bgp.command("status")
@click.option("--socket", "sock", default=None,
              help="BIRD's control socket [default: /run/l3net/bird.ctl, or the managed plugin's "
                   "/var/lib/l3net/run/bird.ctl].")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def bgp_status(obj, sock, as_json):
    """This node's BGP sessions, as BIRD reports them, with the peer's node name from etcd."""
    sock = sock or bird_socket()
    from ..bird import show
    from ..birdconf import parse_protocols
    from ..calc import nodes

    if not os.path.exists(sock):
        raise L3netError(f"no BIRD control socket at {sock}: is l3net-plugin running on this host, "
                         "with BGP (not --no-bgp)?")
    sessions = parse_protocols(show(sock, "protocols"))
    try:
        names = {n["ip"]: n["name"] for n in nodes(obj.store, obj.keys)}
        names.update({p["ip"]: p.get("name") or "" for p in obj.records(obj.keys.bgp_peers())})
    except (L3netError, ValueError, KeyError):
        names = {}                  # etcd down: BIRD's view is still worth showing
    rows = [{"peer": s["peer"] or s["name"], "node": names.get(s["peer"], ""), "state": s["state"],
             "since": s["since"], "info": s["info"], "established": s["established"]} for s in sessions]
    emit(rows, ["Peer", "Node", "State", "Since", "Info"], as_json)


# -- policy (stored in etcd here; every node's agent enforces it: agent.py, firewall.py) ----
