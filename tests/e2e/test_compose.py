"""Compose on l3net, with the real Compose client and the example in examples/compose/: up,
service names, a fixed address, an internal network, the MTU driver option, isolation
between the project's networks, and down leaving nothing. (A second project on another host
joining the same network: test_multihost.py.)"""

import os
import re
import subprocess
import uuid

import pytest

from tests.conftest import ROOT, TEST_IMAGE, docker, unavailable, wait_for
from tests.e2e.test_networks import interfaces, kernel_routes, nothing_left, probe, snapshot

EXAMPLE = os.path.join(ROOT, "examples", "compose", "docker-compose.yml")
FRONT, BACK, DB = "10.93.0.0/24", "10.93.1.0/24", "10.93.1.10"
HTTP_GET = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {} 80"


CLIENTS = {"docker-compose": ["docker-compose"], "docker compose": ["docker", "compose"]}


def compose_version(command):
    """The Compose version that ``command`` runs (1.x: v1, 2.x: v2), or None if it is not here."""
    try:
        res = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    m = re.search(r"(\d+)\.\d+", res.stdout)
    return m.group(0) if res.returncode == 0 and m else None


def compose_command():
    """docker-compose (Debian's package: v1 on Debian 12, v2 on 13) or the `docker compose`
    plugin, whichever is here."""
    for command in CLIENTS.values():
        if compose_version(command):
            return command
    unavailable("neither docker-compose nor the docker compose plugin is installed")


def compose(project, *args, env=None, check=True, command=None):
    res = subprocess.run([*(command or compose_command()), "-p", project, "-f", EXAMPLE, *args],
                         capture_output=True, text=True, timeout=180, env={**os.environ, **(env or {})})
    if check and res.returncode != 0:
        raise AssertionError(f"compose {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(params=list(CLIENTS))
def client(request):
    """Each Compose client this machine has (both spellings where both are here); at least one
    must be (make setup installs Debian's docker-compose)."""
    command = CLIENTS[request.param]
    if compose_version(command) is None:
        if not any(compose_version(c) for c in CLIENTS.values()):
            unavailable("neither docker-compose nor the docker compose plugin is installed")
        pytest.skip(f"{request.param} is not installed here (the other client is tested)")
    return command


def container_of(project, service):
    ids = docker("ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                 "--filter", f"label=com.docker.compose.service={service}").stdout.split()
    assert len(ids) == 1, (service, ids)
    return ids[0]


def test_compose_project_up_reach_by_name_and_down_leaves_nothing(plugin, client):
    """With Compose v1 and v2, under each name it has here."""
    print(f"{' '.join(client)} {compose_version(client)}")
    project = f"l3c{uuid.uuid4().hex[:6]}"
    env = {"L3NET_DRIVER": plugin.name, "IMAGE": TEST_IMAGE, "FRONT_SUBNET": FRONT,
           "BACK_SUBNET": BACK, "DB_ADDRESS": DB}
    before = snapshot(plugin)
    try:
        compose(project, "up", "-d", env=env, command=client)
        web, db, api = (container_of(project, s) for s in ("web", "db", "api"))

        def ex(c, script):
            return docker("exec", c, "sh", "-c", script, check=False).stdout
        # api is on both networks: reaches web and db by service name (nc, not wget: the
        # wget of Debian's static busybox, the test image, crashes)
        assert "web-ok" in wait_for(lambda: ex(api, HTTP_GET.format("web")), 20, "api -> web by name")
        assert "db-ok" in wait_for(lambda: ex(api, "nc -w 2 db 5432 </dev/null"), 20, "api -> db by name")
        assert DB in interfaces(db), "db has its fixed ipv4_address"
        # the networks: l3net's, internal back, front's MTU on the containers' interfaces
        nets = {n: docker("network", "inspect", "-f", "{{.Driver}} {{.Internal}}", f"{project}_{n}").stdout.split()
                for n in ("front", "back")}
        assert nets == {"front": [plugin.name, "false"], "back": [plugin.name, "true"]}
        assert re.search(r"mtu 1400\b", docker("exec", web, "ip", "link", "show", "eth0").stdout)
        # web (front only) cannot reach db (back only): the networks are apart
        assert probe(web, DB, "tcp", 5432) is None
    finally:
        compose(project, "down", "--timeout", "0", env=env, check=False, command=client)
    assert docker("network", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}").stdout.split() == []
    nothing_left(plugin, before, 15, "nothing left by the project")
    assert kernel_routes(FRONT, BACK) == []
