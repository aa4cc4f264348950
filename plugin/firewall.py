"""iptables: let routed container traffic through the host's FORWARD chain.

dockerd sets the FORWARD policy to DROP, so a routed container would be cut off. l3net keeps
its rules in its own chain, hooked at the top of FORWARD, written in one ``iptables-restore
--noflush`` (atomic: declaring the chain flushes and refills it in the same commit) and never
touching Docker's chains. Isolation between networks comes in this chain later (policy).
"""

import logging
import subprocess

from .datapath import HOST_PREFIX
from .errors import L3netError

log = logging.getLogger("l3net.firewall")

CHAIN = "L3NET-FORWARD"
TIMEOUT = 15


def render_forward():
    """The filter table text for iptables-restore --noflush (pure; golden-tested)."""
    return "\n".join([
        "*filter",
        f":{CHAIN} - [0:0]",
        f"-A {CHAIN} -i {HOST_PREFIX}+ -m comment --comment \"l3net: from containers\" -j ACCEPT",
        f"-A {CHAIN} -o {HOST_PREFIX}+ -m comment --comment \"l3net: to containers\" -j ACCEPT",
        "COMMIT",
        "",
    ])


def _run(args, stdin=None):
    try:
        return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    except FileNotFoundError:
        raise L3netError(f"{args[0]} not found: install iptables") from None
    except subprocess.TimeoutExpired:
        raise L3netError(f"{args[0]} did not finish within {TIMEOUT}s (xtables lock held?)") from None


def ensure_forward():
    """Write our chain and make sure FORWARD jumps to it first. Idempotent."""
    res = _run(["iptables-restore", "-w", "5", "--noflush"], render_forward())
    if res.returncode != 0:
        raise L3netError(f"iptables-restore failed: {res.stderr.strip()}")
    hook = ["FORWARD", "-j", CHAIN]
    if _run(["iptables", "-w", "5", "-C", *hook]).returncode != 0:
        res = _run(["iptables", "-w", "5", "-I", *hook])
        if res.returncode != 0:
            raise L3netError(f"could not hook {CHAIN} into FORWARD: {res.stderr.strip()}")
        log.info("hooked %s into FORWARD", CHAIN)
