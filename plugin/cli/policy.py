"""l3netctl policy, tag and host: which networks reach which, tags, what containers may reach of the hosts."""

import json
import re
import time

import click
from netaddr import IPNetwork

from core import validate as V
from core.errors import L3netError

from .base import PROTOS, cli, emit, new_id, node_type, port_range, resolve_network, resolve_side


@cli.group()
def policy():
    """Which networks may reach which (by default a network reaches only itself)."""


@policy.command("allow")
@click.option("--from", "src", required=True,
              help="Network (Docker name or subnet) that may connect, or tag:X (every network tagged X).")
@click.option("--to", "dst", required=True, help="Network it may connect to, or tag:X.")
@click.option("--proto", type=click.Choice(PROTOS), help="Only this protocol (default: all).")
@click.option("--port", "port", help="Only this port or range N-M (tcp/udp).")
@click.pass_obj
def policy_allow(obj, src, dst, proto, port):
    """Let --from reach --to; prints the new rule's id last."""
    rule = {"id": new_id(), "from": resolve_side(obj, src), "to": resolve_side(obj, dst),
            "proto": proto, "ports": port_range(port, proto), "created": round(time.time(), 3)}
    obj.store.put(obj.keys.policy_rule(rule["id"]), json.dumps(rule, sort_keys=True))
    click.echo(f"allowed {rule['from']} -> {rule['to']} {proto or 'all'} {rule['ports'] or ''}".rstrip())
    click.echo(rule["id"])


@policy.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def policy_list(obj, as_json):
    rows = obj.records(obj.keys.policy_rules())
    emit(rows, ["Id", "From", "To", "Proto", "Ports"], as_json)


@policy.command("remove")
@click.argument("rule_id")
@click.pass_obj
def policy_remove(obj, rule_id):
    _remove_rule(obj, obj.keys.policy_rule, rule_id)


def _remove_rule(obj, key_of, rule_id):
    if not re.fullmatch(r"[0-9a-f]{8}", rule_id) or obj.store.get(key_of(rule_id))[0] is None:
        raise L3netError(f"no rule {rule_id!r}")
    obj.store.delete(key_of(rule_id))
    click.echo(f"removed {rule_id}")


@cli.group()
def tag():
    """Tags on networks: a policy side tag:X covers every network carrying X, now and later."""


@tag.command("add")
@click.argument("network")
@click.argument("tags", nargs=-1, required=True)
@click.pass_obj
def tag_add(obj, network, tags):
    """Tag NETWORK (Docker name or subnet) with TAGS: every host puts the policies naming
    them in force for it within seconds."""
    _change_tags(obj, network, add=V.tag_list(list(tags)))


@tag.command("remove")
@click.argument("network")
@click.argument("tags", nargs=-1, required=True)
@click.pass_obj
def tag_remove(obj, network, tags):
    """Take TAGS off NETWORK: what only they opened closes."""
    _change_tags(obj, network, remove=V.tag_list(list(tags)))


def _change_tags(obj, network, add=(), remove=()):
    cidr = resolve_network(obj, network)
    now = obj.ipam().change_tags(cidr, add=add, remove=remove)
    click.echo(f"{cidr}: tags {','.join(now) or '(none)'}")


@tag.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def tag_list(obj, as_json):
    """Each tag, the networks (pools) carrying it and the policies naming it."""
    from ..calc import pool_tags
    carriers, naming = {}, {}
    for p in obj.ipam().pools():
        for t in pool_tags(p):
            carriers.setdefault(t, []).append(p["cidr"])
    for rule in obj.records(obj.keys.policy_rules()):
        for side in (rule.get("from"), rule.get("to")):
            if isinstance(side, str) and side.startswith(V.TAG_SIDE):
                naming.setdefault(side[len(V.TAG_SIDE):], set()).add(rule.get("id"))
    rows = [{"tag": t, "networks": sorted(carriers.get(t, [])), "policies": sorted(naming.get(t, []))}
            for t in sorted(set(carriers) | set(naming))]
    if as_json:
        emit(rows, [], True)
    else:
        emit([dict(r, networks=", ".join(r["networks"]) or "(none yet)", policies=", ".join(r["policies"]))
              for r in rows], ["Tag", "Networks", "Policies"], False)


@cli.group()
def host():
    """What containers may reach of the cluster's hosts and infrastructure (by default: nothing)."""


@host.command("allow")
@click.option("--proto", type=click.Choice(("tcp", "udp")), required=True)
@click.option("--port", "port", required=True, help="Port or range N-M.")
@click.option("--node", type=node_type, help="Only on this node (default: every node).")
@click.option("--to", "to", help="A protected destination instead of the nodes: a CIDR such as "
                                 "169.254.169.254/32 (cloud metadata).")
@click.pass_obj
def host_allow(obj, proto, port, node, to):
    """Open a host service (or, with --to, a protected destination) to containers; prints the
    new rule's id last."""
    from core.infra import overlaps
    from ipam.pools import parse_cidr
    if to is not None:
        if node is not None:
            raise click.BadParameter("--to and --node do not go together")
        net = parse_cidr(to if "/" in to else f"{to}/32", "--to")
        if net.prefixlen == 0:
            raise L3netError("--to 0.0.0.0/0 would open every protected range: name the destination")
        pools = [p["cidr"] for p in obj.records(obj.keys.pools()) if overlaps(net, IPNetwork(p["cidr"]))]
        if pools:
            raise L3netError(f"--to {net} overlaps pool {', '.join(pools)}: containers reach each other "
                             "by network and policy (l3netctl policy allow)")
        to = str(net)
    rule = {"id": new_id(), "proto": proto, "ports": port_range(port, proto), "node": node,
            "created": round(time.time(), 3)}
    if to is not None:
        rule["to"] = to
    obj.store.put(obj.keys.host_rule(rule["id"]), json.dumps(rule, sort_keys=True))
    click.echo(f"containers may reach {proto}/{rule['ports']} on {to or node or 'every node'}")
    click.echo(rule["id"])


@host.command("protect")
@click.argument("cidr")
@click.pass_obj
def host_protect(obj, cidr):
    """Keep containers away from CIDR too (e.g. the management network)."""
    from core.infra import overlaps
    from ipam.pools import parse_cidr
    net = parse_cidr(cidr if "/" in cidr else f"{cidr}/32", "range")
    if net.prefixlen == 0:
        raise L3netError("0.0.0.0/0 would cut containers off everything: name the ranges to protect")
    pools = [p["cidr"] for p in obj.records(obj.keys.pools()) if overlaps(net, IPNetwork(p["cidr"]))]
    if pools:
        raise L3netError(f"{net} overlaps pool {', '.join(pools)}: containers would lose each other")
    obj.store.put(obj.keys.protected_range(net), json.dumps({"cidr": str(net), "created": round(time.time(), 3)}))
    click.echo(f"containers may not reach {net}")


@host.command("unprotect")
@click.argument("cidr")
@click.pass_obj
def host_unprotect(obj, cidr):
    """Forget a range added with ``host protect`` (the automatic ones stay)."""
    from ipam.pools import parse_cidr
    net = parse_cidr(cidr if "/" in cidr else f"{cidr}/32", "range")
    if obj.store.get(obj.keys.protected_range(net))[0] is None:
        raise L3netError(f"{net} is not a protected range of the operator's (l3netctl host list)")
    obj.store.delete(obj.keys.protected_range(net))
    click.echo(f"{net} no longer protected (unless it is a node, etcd or a BGP peer)")


@host.command("list")
@click.option("--all", "show_all", is_flag=True,
              help="Also what is protected without being asked: link-local, every node's addresses, "
                   "the etcd endpoints, the BGP peers.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def host_list(obj, show_all, as_json):
    """Host rules (what is open to containers), then the protected ranges (the operator's; with
    --all also the automatic ones, and why each is there)."""
    from core.infra import LINK_LOCAL

    from ..calc import bgp_peer_ips, nodes, protected_by_operator
    rows = [dict(r, kind="allow") for r in obj.records(obj.keys.host_rules())]
    protected = [(c, "operator (l3netctl host protect)") for c in protected_by_operator(obj.store, obj.keys)]
    if show_all:
        protected.append((LINK_LOCAL, "link-local: cloud metadata, the containers' gateway"))
        for n in nodes(obj.store, obj.keys):
            protected += [(f"{a}/32", f"node {n['name']}") for a in n["addresses"]]
            protected += [(f"{a}/32", f"etcd endpoint (of {n['name']})") for a in n["etcd"]]
        protected += [(f"{ip}/32", "BGP peer") for ip in bgp_peer_ips(obj.store, obj.keys)]
    for cidr, why in dict.fromkeys(protected):
        rows.append({"kind": "protect", "id": cidr, "cidr": cidr, "source": why})
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    emit([dict(r, to=r.get("to") or "") for r in rows if r["kind"] == "allow"],
         ["Id", "Proto", "Ports", "Node", "To"], False, title="Open to containers")
    emit([r for r in rows if r["kind"] == "protect"], ["CIDR", "Source"], False,
         title="Protected from containers" + ("" if show_all else " (by the operator; --all for every range)"))


@host.command("remove")
@click.argument("rule_id")
@click.pass_obj
def host_remove(obj, rule_id):
    _remove_rule(obj, obj.keys.host_rule, rule_id)
