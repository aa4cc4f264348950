"""The l3netctl group, its shared options and helpers (command modules: status, pools, nodes,
bgp, policy), and main()."""

import json
import re
import subprocess
import sys
import uuid

import click
from rich.console import Console
from rich.table import Table

from core import validate as V
from core.errors import L3netError
from core.keys import Keys

from ..config import Config, etcd_options, make_store

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

        from ..calc import read_infrastructure
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

