"""``l3netctl``: look at (and later change) what l3net keeps in etcd.

Readable tables by default, ``--json`` for scripts; errors are one line and exit status 1.
"""

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from .config import Config, etcd_options, make_store
from .errors import L3netError
from .keys import Keys


class Ctx:
    def __init__(self, cfg):
        self.cfg = cfg
        self.store = make_store(cfg)
        self.keys = Keys(cfg.etcd_prefix)

    def ipam(self):
        from ipam.allocator import Ipam
        return Ipam(self.store, self.keys, host="l3netctl")


def emit(rows, columns, as_json, title=None):
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[str(row.get(c.lower().replace(" ", "_"), "")) for c in columns])
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


@cli.group()
def pool():
    """Address pools."""


@pool.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def pool_list(obj, as_json):
    ipam = obj.ipam()
    rows = []
    for p in ipam.pools():
        blocks = ipam.blocks(p["cidr"])
        used = sum(len(b["allocations"]) for b in blocks)
        rows.append({"cidr": p["cidr"], "block_size": p["block_prefix"],
                     "nat_outgoing": p["nat_outgoing"], "auto": p["auto"],
                     "hosts": ",".join(sorted(p["refs"])), "blocks": len(blocks), "used": used})
    emit(rows, ["CIDR", "Block size", "NAT outgoing", "Auto", "Hosts", "Blocks", "Used"], as_json)


@cli.group()
def ipam():
    """Address allocation."""


@ipam.command("show")
@click.option("--pool", "pool_cidr", help="Only this pool (CIDR).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ipam_show(obj, pool_cidr, as_json):
    """Every allocated address and who holds it."""
    rows = []
    for b in obj.ipam().blocks(pool_cidr):
        for ip, a in sorted(b["allocations"].items()):
            rows.append({"address": ip, "block": b["cidr"], "owner": b["host"], "host": a["host"],
                         "handle": a["handle"], "pool": b["pool"]})
    emit(rows, ["Address", "Pool", "Block", "Owner", "Host", "Handle"], as_json)


@cli.group()
def endpoint():
    """Container endpoints."""


@endpoint.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def endpoint_list(obj, as_json):
    rows = []
    for key, value, _ in obj.store.get_prefix(obj.keys.prefix + "/hosts/"):
        if "/endpoints/" in key:
            e = json.loads(value)
            rows.append({"endpoint": e["id"][:12], "network": e["network"][:12],
                         "host": key.split("/hosts/")[1].split("/")[0], "address": e["address"],
                         "interface": e["host_ifname"]})
    emit(rows, ["Endpoint", "Network", "Host", "Address", "Interface"], as_json)


def main():
    try:
        cli(standalone_mode=False)
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
