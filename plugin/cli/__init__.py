"""``l3netctl``: look at and change what l3net keeps in etcd (pools, BGP, policy, nodes).

Readable tables by default, ``--json`` for scripts; errors are one line and exit status 1. One
module per group of verbs: status (status, diagnose), pools (pool, ipam), nodes (endpoint,
node), bgp, policy (policy, tag, host); base holds the group, its etcd options and helpers.
"""

from . import bgp, nodes, policy, pools, status  # noqa: F401 (each registers its commands)
from .base import cli, hoist_etcd_flags, main  # noqa: F401
