"""l3netctl pool and ipam: address pools, the ranges they may lie in, allocations and their check."""

import json
import time

import click
from netaddr import IPNetwork

from core.errors import L3netError

from ..config import node_name
from .base import cli, emit


@cli.group()
def pool():
    """Address pools."""


@pool.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def pool_list(obj, as_json):
    from ipam.pools import encap_of

    from ..calc import pool_tags
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
    from ..calc import pool_ranges as read
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

    from ..datapath import link_exists
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
