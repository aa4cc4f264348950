"""l3net as a Docker managed plugin (`make plugin`), on two hosts of the test bed, each with
its own dockerd and no legacy plugin: BGP and policy work as with the legacy plugin, a
`--restart always` container comes back with its network (and its --ip) after dockerd
restarts, and the plugin survives disable / enable.

The plugin's rootfs is built once (scripts/build-plugin.sh, L3NET_PLUGIN_ROOTFS_ONLY=1: base
image by debootstrap when needed, wheels from this checkout) and created on each host's dockerd
with `docker plugin create`.
"""

import json
import os
import subprocess
import uuid

import pytest

from tests.conftest import REQUIRE, ROOT, bed_up, wait_for
from tests.testbed import TEST_IMAGE, Testbed

NAME = "l3net:latest"
WEB, DB = "10.70.0.0/24", "10.71.0.0/24"


@pytest.fixture(scope="module")
def plugin_dir(docker_ready):
    res = subprocess.run([os.path.join(ROOT, "scripts", "build-plugin.sh")], cwd=ROOT,
                         env={**os.environ, "L3NET_PLUGIN_ROOTFS_ONLY": "1"},
                         capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        if REQUIRE:
            pytest.fail(f"make plugin failed:\n{res.stdout}\n{res.stderr}")
        pytest.skip(f"the plugin could not be built: {res.stderr.strip()[-300:]}")
    return os.path.join(ROOT, "build", "plugin")


def install(host, bed, plugin_dir):
    # as after a reboot: no /run/l3net (a tmpfs); the plugin must not need it
    host.sh("rm", "-rf", "/run/l3net")
    host.docker("plugin", "create", NAME, plugin_dir, timeout=300)
    os.makedirs(os.path.join(host.dir, "state"), exist_ok=True)
    # the short names of plugin.json (the L3NET_* ones work too)
    host.docker("plugin", "set", NAME, f"ETCD_ENDPOINTS={bed.etcd_url}", f"ETCD_PREFIX={bed.prefix}",
                f"NODE_NAME={host.name}", f"HOST_IP={host.ip}", "LOG_LEVEL=info",
                f"state.source={os.path.join(host.dir, 'state')}")
    host.docker("plugin", "enable", "--timeout", "60", NAME)


@pytest.fixture(scope="module")
def bed(plugin_dir):
    bed = bed_up(Testbed(2, prefix=f"/l3mp-{uuid.uuid4().hex[:6]}", tag="l3mp", net="198.18.4",
                         etcd_port=24020, legacy_plugin=False))
    try:
        for host in bed.hosts:
            install(host, bed, plugin_dir)
            host.docker("network", "create", "-d", NAME, "--ipam-driver", NAME, "--subnet", WEB, "web")
        bed.hosts[1].docker("network", "create", "-d", NAME, "--ipam-driver", NAME, "--subnet", DB, "db")
        yield bed
    finally:
        bed.cleanup()


def start(host, net, *args, name=None):
    name = name or f"{net}-{uuid.uuid4().hex[:6]}"
    host.docker("run", "-d", "--name", name, "--net", net, *args, TEST_IMAGE, "sleep", "3600")
    return name


def ip_of(host, name, net):
    nets = json.loads(host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout)
    return nets[net]["IPAddress"]


def pings(host, name, ip):
    return host.docker("exec", name, "ping", "-c1", "-W1", ip, check=False).returncode == 0


def test_managed_plugin_routes_across_hosts_and_enforces_policy(bed):
    h1, h2 = bed.hosts
    w1, w2, d2 = start(h1, "web"), start(h2, "web"), start(h2, "db")
    wait_for(lambda: pings(h1, w1, ip_of(h2, w2, "web")), 30, "web on host 1 -> web on host 2")
    assert not pings(h1, w1, ip_of(h2, d2, "db")), "another network must be isolated"
    # BIRD's control socket, for l3netctl on the host: in the state directory
    protocols = h1.sh("birdc", "-s", os.path.join(h1.dir, "state", "run", "bird.ctl"), "show",
                      "protocols").stdout
    assert "Established" in protocols, protocols
    assert "via " + h2.ip in h1.sh("ip", "route").stdout
    plugins = json.loads(h1.docker("plugin", "inspect", NAME).stdout)
    assert plugins[0]["Enabled"] is True


def test_dockerd_restart_brings_restart_always_containers_back(bed):
    h1, h2 = bed.hosts
    peer = start(h2, "web")
    peer_ip = ip_of(h2, peer, "web")
    keep = start(h1, "web", "--restart", "always", "--ip", "10.70.0.200")
    wait_for(lambda: pings(h1, keep, peer_ip), 30, "the container before the restart")
    h1.stop_dockerd()
    h1.start_dockerd()
    wait_for(lambda: h1.docker("inspect", "-f", "{{.State.Running}}", keep, check=False).stdout.strip()
             == "true", 60, "the --restart always container running again")
    assert ip_of(h1, keep, "web") == "10.70.0.200"
    wait_for(lambda: pings(h1, keep, peer_ip), 30, "its network back after the dockerd restart")


def test_plugin_disable_and_enable(bed):
    """Disabled, the plugin takes its BIRD with it, but containers keep talking, on the host
    (the data path is the kernel's) and across hosts (BGP graceful restart: the peers keep the
    node's routes, its kernel keeps theirs). Enabled again, new containers start."""
    h1, h2 = bed.hosts
    running, neighbour = start(h2, "web"), start(h2, "web")
    neighbour_ip = ip_of(h2, neighbour, "web")
    remote_name = start(h1, "web")
    remote = ip_of(h1, remote_name, "web")
    running_ip = ip_of(h2, running, "web")
    wait_for(lambda: pings(h2, running, remote), 30, "across hosts before disable")
    h2.docker("plugin", "disable", "-f", NAME)
    assert pings(h2, running, neighbour_ip), "same-host traffic needs no plugin"
    wait_for(lambda: pings(h2, running, remote) and pings(h1, remote_name, running_ip), 15,
             "across hosts, both ways, while the plugin is disabled")
    h2.docker("plugin", "enable", "--timeout", "60", NAME)
    wait_for(lambda: pings(h2, running, remote), 30, "across hosts again after enable")
    fresh = start(h2, "web")
    wait_for(lambda: pings(h2, fresh, remote), 30, "a container started after enable")


def plugin_env(host):
    info = json.loads(host.docker("plugin", "inspect", NAME).stdout)[0]
    return info["Id"], dict(e.split("=", 1) for e in info["Settings"]["Env"])


def test_upgrade_in_place_keeps_settings_containers_and_networks(bed, plugin_dir):
    """`make plugin` over a running plugin whose networks are in use (here: the install step of
    scripts/build-plugin.sh with the directory built once, no settings in the environment):
    the new plugin keeps the old one's settings, running containers keep their network, and
    the networks take new containers."""
    h1, h2 = bed.hosts
    running = start(h2, "web")
    remote_name = start(h1, "web")
    remote = ip_of(h1, remote_name, "web")
    wait_for(lambda: pings(h2, running, remote), 30, "across hosts before the upgrade")
    old_id, old_env = plugin_env(h2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("L3NET_")}
    res = subprocess.run([os.path.join(ROOT, "scripts", "build-plugin.sh")], cwd=ROOT,
                         env={**env, "DOCKER_HOST": h2.docker_host, "L3NET_PLUGIN_DIR": plugin_dir},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "keeping its settings" in res.stdout
    new_id, new_env = plugin_env(h2)
    assert new_id != old_id, "the plugin was not replaced"
    for var in ("ETCD_ENDPOINTS", "ETCD_PREFIX", "NODE_NAME", "HOST_IP"):
        assert new_env[var] == old_env[var] != "", var
    wait_for(lambda: pings(h2, running, remote), 30, "the running container across hosts after the upgrade")
    fresh = start(h2, "web")
    fresh_ip = ip_of(h2, fresh, "web")
    wait_for(lambda: pings(h1, remote_name, fresh_ip), 30, "a container started after the upgrade")
    assert ip_of(h2, running, "web") != fresh_ip
