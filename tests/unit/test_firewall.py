"""Rendered iptables input against its golden file, and (as root) against iptables-restore."""

import os
import shutil
import subprocess

import pytest

from plugin.firewall import render_forward

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "forward.rules")


def test_forward_rules_match_golden():
    with open(GOLDEN) as f:
        assert render_forward() == f.read()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("iptables-restore"),
                    reason="needs root and iptables")
def test_forward_rules_accepted_by_iptables_restore():
    res = subprocess.run(["iptables-restore", "--test", "--noflush"], input=render_forward(),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
