"""l3netctl status and diagnose: this node's health, and why a packet does or does not pass."""

import json
import os
import subprocess
import sys
import time

import click

from core.errors import L3netError

from ..config import Config, bird_socket, node_name
from .base import PROTOS, cli, container_addresses

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

    from ..bird import show
    from ..metrics import bgp_states

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

    from ..diagnose import diagnose as run_diagnosis
    from ..diagnose import gather, pool_of
    from ..metrics import bgp_states

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
        from ..bird import show
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
