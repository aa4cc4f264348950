"""``l3netctl``: look at and change what l3net keeps in etcd (pools, BGP, policy, nodes).

Readable tables by default, ``--json`` for scripts; errors are one line and exit status 1.
"""

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter

import click
from netaddr import IPNetwork
from rich.console import Console
from rich.table import Table

from core import validate as V
from core.errors import L3netError
from core.keys import Keys

from .config import Config, bird_socket, etcd_options, make_store, node_name

PROTOS = ("tcp", "udp", "icmp")


class Ctx:
    def __init__(self, cfg):
        self.cfg = cfg
        self.store = make_store(cfg)
        self.keys = Keys(cfg.etcd_prefix)

    def records(self, prefix):
        """The JSON records under ``prefix``."""
        return [json.loads(v) for _, v, _ in self.store.get_prefix(prefix)]

    def ipam(self):
        from ipam.allocator import Ipam

        from .calc import read_infrastructure
        return Ipam(self.store, self.keys, host="l3netctl",
                    infrastructure=lambda: read_infrastructure(self.store, self.keys))


def emit(rows, columns, as_json, title=None):
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[str(row.get(c.lower().replace(" ", "_"), "")) for c in columns])
    if not rows:
        Console().print(f"{title}: (none)" if title else "(none)")
        return
    Console().print(table)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@etcd_options
@click.pass_context
def cli(ctx, etcd_endpoints, etcd_prefix, etcd_timeout, etcd_ca_cert, etcd_cert, etcd_key,
        etcd_user, etcd_password):
    """Inspect and operate an l3net cluster."""
    cfg = Config(etcd_endpoints=etcd_endpoints, etcd_prefix=etcd_prefix, etcd_timeout=etcd_timeout,
                 etcd_ca_cert=etcd_ca_cert, etcd_cert=etcd_cert, etcd_key=etcd_key,
                 etcd_user=etcd_user, etcd_password=etcd_password)
    ctx.obj = Ctx(cfg)


STALE = 10.0      # seconds: an agent that has not synced for longer is not in sync


@cli.command()
@click.option("--state-dir", envvar="L3NET_STATE_DIR", default=Config.state_dir, show_default=True,
              help="The plugin's state directory (where its agent writes status.json).")
@click.option("--socket", "sock", default=None,
              help="BIRD's control socket [default: /run/l3net/bird.ctl, or the managed plugin's "
                   "/var/lib/l3net/run/bird.ctl].")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status(obj, state_dir, sock, as_json):
    """This node's health: etcd, agent, BGP, policy, counts. Exit status 1 if unhealthy."""
    sock = sock or bird_socket()

    from .bird import show
    from .metrics import bgp_states

    problems, out = [], {}
    try:
        out["etcd"] = {"endpoints": obj.store.describe(), "pools": len(obj.store.get_prefix(obj.keys.pools())),
                       "nodes": len(obj.store.get_prefix(obj.keys.nodes()))}
    except L3netError as e:
        out["etcd"] = {"endpoints": obj.store.describe(), "error": str(e)}
        problems.append(f"etcd: {e}")
    path = os.path.join(state_dir, "status.json")
    try:
        with open(path) as f:
            agent = json.load(f)
    except (OSError, ValueError):
        agent = None
        problems.append(f"no agent status in {path}: is l3net-plugin running here (--state-dir)?")
    if agent:
        age = time.time() - agent["last_sync"] if agent.get("last_sync") else None
        agent["sync_age"] = round(age, 1) if age is not None else None
        if age is None or age > STALE:
            problems.append(f"agent not in sync (last sync: {'never' if age is None else f'{age:.0f}s ago'})")
        if agent.get("etcd_down_since"):
            problems.append(f"this node cannot read etcd since {time.time() - agent['etcd_down_since']:.0f}s: "
                            "it keeps its rules, sets, routes and BIRD as they were")
        if agent.get("last_error"):
            problems.append(f"agent: {agent['last_error']}")
        out["agent"] = agent
    if os.path.exists(sock):
        try:
            states = bgp_states(show(sock, "protocols"))
            out["bgp"] = states
            if states["down"]:
                problems.append(f"BGP: {states['down']} of {sum(states.values())} sessions not established")
        except L3netError as e:
            out["bgp"] = {"error": str(e)}
            problems.append(f"BGP: {e}")
    else:
        out["bgp"] = None           # --no-bgp, or BIRD not started (yet)
    out["healthy"] = not problems
    out["problems"] = problems
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
    else:
        e = out["etcd"]
        lines = [f"etcd       {e['endpoints']}: " + (f"unreachable ({e['error']})" if "error" in e else
                                                      f"reachable, {e['pools']} pools, {e['nodes']} nodes")]
        if agent:
            lines.append(f"node       {agent['node']} ({agent['ip']}), plugin pid {agent['pid']}")
            lines.append(f"agent      last sync {agent['sync_age']}s ago, etcd watch "
                         f"{'on' if agent.get('watch') else 'off (polling)'}")
            p = agent.get("policy")
            lines.append("policy     " + ("not applied yet" if not p else
                                         f"{p['networks']} networks, {p['policies']} policies, "
                                         f"{p['host_rules']} host rules, {p['members']} members"))
            lines.append(f"endpoints  {agent.get('endpoints', 0)} on this node")
            for cidr, (used, cap) in sorted(agent.get("pools", {}).items()):
                lines.append(f"pool       {cidr}: {used}/{cap} addresses allocated")
        b = out["bgp"]
        lines.append("bgp        " + ("no BIRD here (--no-bgp?)" if b is None else
                                     b.get("error") or f"{b['established']} established, {b['down']} down"))
        lines += [f"PROBLEM    {p}" for p in problems]
        lines.append("healthy" if not problems else "UNHEALTHY")
        click.echo("\n".join(lines))
    if problems:
        sys.exit(1)


def docker(name, kind, *args):
    """Ask the local dockerd (DOCKER_HOST respected) about the network or container ``name``
    (validated first: it is a Docker name, never an option). Returns the CompletedProcess."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name):
        raise L3netError(f"invalid {kind} name {name!r}")
    try:
        return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        raise L3netError(f"cannot ask dockerd about {kind} {name!r}: {e}") from None


def container_addresses(name):
    """IPv4 addresses of a container on the local dockerd."""
    res = docker(name, "container", "inspect", "--format", "{{json .NetworkSettings.Networks}}", name)
    if res.returncode != 0:
        raise L3netError(f"no container {name!r} here: {res.stderr.strip()}")
    return [n["IPAddress"] for n in json.loads(res.stdout or "{}").values() if n.get("IPAddress")]


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option("--proto", type=click.Choice(PROTOS), help="The traffic to ask about (default: any).")
@click.option("--port", type=click.IntRange(1, 65535), help="Its destination port (tcp/udp).")
@click.option("--hostname", envvar="L3NET_HOSTNAME", help="This host's node name [default: hostname].")
@click.pass_obj
def diagnose(obj, src, dst, proto, port, hostname):
    """Can SRC reach DST, and why not? (containers by name or address, DST also a host or any IP)"""
    from netaddr import AddrFormatError, IPAddress

    from .diagnose import diagnose as run_diagnosis
    from .diagnose import gather, pool_of
    from .metrics import bgp_states

    if port is not None and proto not in ("tcp", "udp"):
        raise click.BadParameter("--port needs --proto tcp or udp")
    here = node_name(hostname)
    facts = gather(obj.store, obj.keys, here)        # what the agents enforce, as they compute it
    pools = sorted(set(facts.state.pools) | set(facts.refused))

    def resolve(text):
        try:
            return [str(IPAddress(text, 4))]
        except (AddrFormatError, ValueError):
            return container_addresses(text)
    srcs, dsts = resolve(src), resolve(dst)
    # a container on several networks: prefer the pair that shares a network, then any l3net one
    pairs = [(s, d) for s in srcs for d in dsts]
    pairs.sort(key=lambda p: (pool_of(p[0], pools) is None,
                              pool_of(p[0], pools) != pool_of(p[1], pools)))
    if not pairs:
        raise L3netError("no IPv4 address to diagnose")
    s_ip, d_ip = pairs[0]
    if facts.allocations.get(s_ip, {}).get("host") == here:
        res = subprocess.run(["ip", "route", "get", d_ip], capture_output=True, text=True, timeout=10)
        facts.route_to_dst = res.stdout if res.returncode == 0 else res.stderr
    try:
        from .bird import show
        facts.bgp = bgp_states(show(bird_socket(), "protocols"))
    except L3netError:
        pass
    verdict, steps = run_diagnosis(s_ip, d_ip, facts, proto, port)
    click.echo(f"{src} ({s_ip}) -> {dst} ({d_ip}) {proto or ''}{'/' + str(port) if port else ''}".rstrip())
    for step in steps:
        click.echo(f"  {'ok ' if step.ok else 'NO '} {step.what}")
    click.echo(verdict)
    if verdict == "NOT REACHABLE":
        sys.exit(1)


@cli.group()
def pool():
    """Address pools."""


@pool.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def pool_list(obj, as_json):
    from ipam.pools import encap_of

    from .calc import pool_tags
    ipam = obj.ipam()
    rows = []
    for p in ipam.pools():
        blocks = ipam.blocks(p["cidr"])
        used = sum(len(b["allocations"]) for b in blocks)
        rows.append({"cidr": p["cidr"], "block_size": p["block_prefix"],
                     "nat_outgoing": p["nat_outgoing"], "internal": bool(p.get("internal")),
                     "tags": pool_tags(p), "encap": encap_of(p),
                     "auto": p["auto"], "hosts": ",".join(sorted(p["refs"])), "blocks": len(blocks),
                     "used": used})
    if not as_json:
        rows = [dict(r, tags=",".join(r["tags"])) for r in rows]
    emit(rows, ["CIDR", "Block size", "NAT outgoing", "Internal", "Encap", "Tags", "Auto", "Hosts", "Blocks", "Used"],
         as_json)


@pool.command("add")
@click.argument("cidr")
@click.option("--block-size", type=int, help="Prefix length of the blocks hosts claim [default: the plugin's].")
@click.option("--no-nat-outgoing", is_flag=True, help="Do not masquerade traffic leaving the pools.")
@click.option("--internal", is_flag=True,
              help="Nothing leaves the cluster's pools (for networks created with --internal).")
@click.option("--encap", type=click.Choice(("never", "cross-subnet", "always")), default="never", show_default=True,
              help="VXLAN between hosts: never (pure routing), cross-subnet (only towards hosts outside "
                   "a host's own subnet), always.")
@click.pass_obj
def pool_add(obj, cidr, block_size, no_nat_outgoing, internal, encap):
    """Define a pool ahead of its networks (it stays when they are gone)."""
    record = obj.ipam().add_pool(cidr, block_size, nat_outgoing=not no_nat_outgoing, internal=internal,
                                 encap=encap)
    click.echo(f"pool {record['cidr']} added (block size /{record['block_prefix']}, "
               f"nat-outgoing {str(record['nat_outgoing']).lower()}"
               f"{', internal' if record.get('internal') else ''}, encap {record.get('encap', 'never')})")


@pool.group("ranges", invoke_without_command=True)
@click.pass_context
def pool_ranges(ctx):
    """Where pools may be: with no ranges set, anywhere but the infrastructure."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(pool_ranges_show)


@pool_ranges.command("show")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def pool_ranges_show(obj, as_json=False):
    """The ranges every pool must lie in."""
    from .calc import pool_ranges as read
    ranges = read(obj.store, obj.keys)
    if as_json:
        click.echo(json.dumps(ranges))
    else:
        click.echo("\n".join(ranges) if ranges else "(any: no ranges set)")


@pool_ranges.command("set")
@click.argument("cidrs", nargs=-1, required=True)
@click.pass_obj
def pool_ranges_set(obj, cidrs):
    """Allow new pools only inside CIDRS (refused while an existing pool lies outside them)."""
    from ipam.pools import parse_cidr
    ranges = sorted({str(parse_cidr(c, "range")) for c in cidrs})
    outside = [p["cidr"] for p in obj.ipam().pools()
               if not any(IPNetwork(p["cidr"]) in IPNetwork(r) for r in ranges)]
    if outside:
        raise L3netError(f"pool {', '.join(outside)} lies outside {', '.join(ranges)}: include it, "
                         "or remove that pool first")
    obj.store.put(obj.keys.pool_ranges(), json.dumps({"ranges": ranges}))
    click.echo(f"pools allowed only in {', '.join(ranges)}")


@pool_ranges.command("clear")
@click.pass_obj
def pool_ranges_clear(obj):
    """Allow pools anywhere again (but over the infrastructure)."""
    obj.store.delete(obj.keys.pool_ranges())
    click.echo("pools allowed anywhere but the infrastructure")


@pool.command("remove")
@click.argument("cidr")
@click.pass_obj
def pool_remove(obj, cidr):
    """Forget a pool no network uses."""
    obj.ipam().remove_pool(cidr)
    click.echo(f"pool {cidr} removed")


@cli.group()
def ipam():
    """Address allocation."""


@ipam.command("show")
@click.option("--pool", "pool_cidr", help="Only this pool (CIDR).")
@click.option("--blocks", "per_block", is_flag=True, help="One line per block: owner, allocated, free.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ipam_show(obj, pool_cidr, per_block, as_json):
    """Every allocated address and who holds it (or, with --blocks, usage per block)."""
    from netaddr import IPNetwork
    rows = []
    if per_block:
        for b in obj.ipam().blocks(pool_cidr):
            block, pool = IPNetwork(b["cidr"]), IPNetwork(b["pool"])
            usable = block.size - sum(1 for edge in (pool.network, pool.broadcast) if edge in block)
            rows.append({"block": b["cidr"], "pool": b["pool"], "owner": b["host"] or "(released)",
                         "allocated": len(b["allocations"]), "free": usable - len(b["allocations"])})
        emit(rows, ["Block", "Pool", "Owner", "Allocated", "Free"], as_json)
        return
    for b in obj.ipam().blocks(pool_cidr):
        for ip, a in sorted(b["allocations"].items()):
            rows.append({"address": ip, "block": b["cidr"], "owner": b["host"], "host": a["host"],
                         "handle": a["handle"], "pool": b["pool"]})
    emit(rows, ["Address", "Pool", "Block", "Owner", "Host", "Handle"], as_json)


@ipam.command("check")
@click.option("--fix", "do_fix", is_flag=True, help="Release leaked addresses, delete orphaned records.")
@click.option("--min-age", type=click.FloatRange(0), default=300, show_default=True,
              help="Only addresses allocated at least this many seconds ago (a docker run in "
                   "progress is not a leak).")
@click.option("--hostname", envvar="L3NET_HOSTNAME", help="This host's node name [default: hostname]: "
              "its endpoints whose veth is gone are containers that died unheard.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ipam_check(obj, do_fix, min_age, hostname, as_json):
    """Leaked addresses, unused pool claims and reservations, orphaned endpoint records, and
    endpoints of this host whose container is gone (--fix repairs them)."""
    from ipam import check

    from .datapath import link_exists
    here = node_name(hostname)
    findings = check.find(obj.store, obj.keys, time.time(), min_age, local=(here, link_exists))
    if do_fix:
        check.fix(obj.store, obj.ipam(), findings)
    # the member records the agents follow, against the blocks (written together; a record
    # written or deleted by hand is the only way they part)
    members = obj.ipam().sync_members(dry_run=not do_fix)
    rows = [f.row() for f in findings]
    if members:
        rows.append({"kind": "member records out of line", "address": "", "pool": "", "host": "", "handle": "",
                     "detail": f"{members} member records differ from their blocks", "key": "", "fixed": do_fix})
    if not rows and not as_json:
        click.echo("no problems found")
        return
    emit(rows, ["Kind", "Address", "Pool", "Host", "Handle", "Detail"] + (["Fixed"] if do_fix else []),
         as_json)


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
    from .ports import describe
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
    from .calc import nodes, route_reflectors
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


def asn_type(value):
    try:
        asn = int(value)
    except (TypeError, ValueError):
        raise click.BadParameter(f"{value!r} is not an AS number") from None
    if not 1 <= asn <= 4294967295:
        raise click.BadParameter("AS numbers are 1..4294967295")
    return asn


def ip_type(value):
    from core.validate import ipv4
    try:
        return str(ipv4(value, "peer address"))
    except L3netError as e:
        raise click.BadParameter(str(e)) from None


def node_type(value):
    from core.validate import hostname
    try:
        return hostname(value)
    except L3netError as e:
        raise click.BadParameter(str(e)) from None


@cli.group()
def bgp():
    """BGP settings: AS numbers, the node-to-node mesh, route reflectors and other peers.

    \b
    The default full mesh opens a session between every two nodes: n*(n-1)/2 sessions, fine
    up to some tens of nodes. Beyond that, run route reflectors (or peer with top-of-rack
    routers): `l3netctl bgp peer add RR_IP --as AS`, then `l3netctl bgp config --no-mesh`.
    """


def _update_json(obj, key, change):
    from .store import get_json
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
    from .calc import bgp_settings

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
    from .calc import bgp_settings
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
    from .bird import show
    from .birdconf import parse_protocols
    from .calc import nodes

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


def port_range(value, proto):
    """"N" or "N-M" (1..65535, N <= M), only for tcp/udp."""
    if value is None:
        return None
    if proto not in ("tcp", "udp"):
        raise click.BadParameter("--port needs --proto tcp or udp")
    parts = str(value).split("-")
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise click.BadParameter(f"{value!r}: expected N or N-M")
    low, high = int(parts[0]), int(parts[-1])
    if not (1 <= low <= high <= 65535):
        raise click.BadParameter(f"{value!r}: ports are 1..65535, low to high")
    return f"{low}-{high}" if low != high else str(low)


def resolve_network(obj, name):
    """A network named by subnet, or by its Docker name (asked of the local dockerd,
    DOCKER_HOST respected); it must be an l3net pool."""
    from ipam.pools import parse_cidr
    if "/" in name:
        cidr = str(parse_cidr(name))
    else:
        res = docker(name, "network", "network", "inspect", "--format",
                     "{{range .IPAM.Config}}{{.Subnet}} {{end}}", name)
        if res.returncode != 0:
            raise L3netError(f"no Docker network {name!r} here: {res.stderr.strip()}")
        subnets = res.stdout.split()
        if len(subnets) != 1:
            raise L3netError(f"network {name!r} has {len(subnets)} subnets; name it by subnet")
        cidr = subnets[0]
    if obj.store.get(obj.keys.pool(cidr))[0] is None:
        raise L3netError(f"{cidr} is not an l3net pool")
    return cidr


def resolve_side(obj, name):
    """A policy side: ``tag:X`` (any network carrying tag X, now or later), or a network."""
    tag = V.tag_side(name)
    return V.TAG_SIDE + tag if tag is not None else resolve_network(obj, name)


def new_id():
    return uuid.uuid4().hex[:8]


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
    from .calc import pool_tags
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

    from .calc import bgp_peer_ips, nodes, protected_by_operator
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


ETCD_FLAGS = ("--etcd-endpoints", "--etcd-prefix", "--etcd-timeout", "--etcd-ca-cert",
              "--etcd-cert", "--etcd-key", "--etcd-user", "--etcd-password")


def hoist_etcd_flags(args):
    """``l3netctl policy list --etcd-prefix /x`` works like ``l3netctl --etcd-prefix /x policy
    list``: the etcd flags belong to the group, but every command takes them, anywhere."""
    front, rest, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg.split("=", 1)[0] in ETCD_FLAGS:
            take = 1 if "=" in arg else 2
            front += args[i:i + take]
            i += take
            continue
        rest.append(arg)
        i += 1
    return front + rest


def main():
    try:
        cli(args=hoist_etcd_flags(sys.argv[1:]), standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except L3netError as e:
        click.echo(f"l3netctl: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
