"""Configuration of a node: flags and environment shared by l3net-plugin and l3netctl.

The contract shared by both commands: ``--etcd-endpoints`` (L3NET_ETCD_ENDPOINTS),
``--etcd-prefix`` (L3NET_ETCD_PREFIX), ``--hostname``, ``--host-ip``, ``--socket``,
``--state-dir``, each with its ``L3NET_*`` variable. Flags win over the environment.
"""

import os
import re
import socket
from dataclasses import dataclass, field

import click

from core.errors import L3netError
from core.validate import hostname as check_hostname
from core.validate import ipv4

DEFAULT_SOCKET = "/run/docker/plugins/l3net.sock"
# BIRD's control socket and pid file. The managed plugin keeps them in its state mount
# (plugin.json: /var/lib/l3net/run): a /run/l3net bind mount would be missing after a reboot,
# and dockerd does not create a missing bind-mount source.
RUN_DIR = os.environ.get("L3NET_RUN_DIR", "/run/l3net")
# Where l3netctl on the host looks for BIRD's control socket: the host service's, then the
# managed plugin's (in its default state directory).
BIRD_SOCKETS = ("/run/l3net/bird.ctl", "/var/lib/l3net/run/bird.ctl")


def bird_socket():
    return next((p for p in BIRD_SOCKETS if os.path.exists(p)), BIRD_SOCKETS[0])


def node_name(given=None):
    """This node's name: ``given`` (--hostname, L3NET_HOSTNAME), else the host name up to the
    first dot."""
    return given or socket.gethostname().split(".")[0]


@dataclass
class Config:
    etcd_endpoints: str = "http://127.0.0.1:2379"
    etcd_prefix: str = "/l3net"
    etcd_timeout: float = 5.0
    etcd_ca_cert: str = None
    etcd_cert: str = None
    etcd_key: str = None
    etcd_user: str = None
    etcd_password: str = field(default=None, repr=False)   # never logged
    hostname: str = None
    host_ip: str = None
    socket: str = DEFAULT_SOCKET
    state_dir: str = "/var/lib/l3net"
    default_pool: str = "10.250.0.0/16"
    default_pool_size: int = 24
    block_size: int = 26
    bgp: bool = True
    threads: int = 16
    log_level: str = "info"
    log_format: str = "text"
    metrics_port: int = 0              # 0: no metrics endpoint
    metrics_address: str = "127.0.0.1"
    iptables_backend: str = "auto"
    sweep_every: float = 30.0          # plugin/sweep.py
    sweep_grace: float = 30.0
    bgp_passwords: dict = field(default_factory=dict, repr=False)   # never logged: read_bgp_passwords

    @property
    def driver_name(self):
        """The name Docker knows us by (in messages): the socket's file name (l3net.sock ->
        l3net), or L3NET_DRIVER_NAME (a managed plugin is named l3net:latest)."""
        return os.environ.get("L3NET_DRIVER_NAME") or os.path.basename(self.socket).rsplit(".sock", 1)[0]

    def check(self):
        """Fill defaults that need the host, and refuse what cannot work, with one clear line."""
        if not re.fullmatch(r"/?[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/?", self.etcd_prefix or "") or \
                ".." in self.etcd_prefix:
            raise L3netError(f"invalid --etcd-prefix {self.etcd_prefix!r}")
        self.hostname = check_hostname(node_name(self.hostname))
        if self.host_ip:
            self.host_ip = str(ipv4(self.host_ip, "--host-ip"))
        if self.metrics_port:
            self.metrics_address = str(ipv4(self.metrics_address, "--metrics-address"))
        if not self.socket.endswith(".sock") or not os.path.isabs(self.socket):
            raise L3netError(f"--socket {self.socket!r} must be an absolute path ending in .sock")
        return self


SECRET = re.compile(r"[!#-\[\]-~]{1,80}")     # printable ASCII but blank, '"' and '\\': TCP-MD5 keys are <= 80 bytes


def read_bgp_passwords(path=None, default=None):
    """BGP session passwords (TCP MD5, BIRD ``password``) from a file and/or the environment:
    {"default": secret for the mesh, "<peer ip>": secret for that explicit peer}. The file
    (``--bgp-password-file``) holds a line ``SECRET`` (the mesh's) and/or lines ``IP SECRET``;
    ``default`` (L3NET_BGP_PASSWORD) is the mesh's. Secrets live on the nodes only: never in
    etcd, never in a log line (errors name the line number, not its text)."""
    from core.validate import ipv4
    out = {}
    if path:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise L3netError(f"cannot read --bgp-password-file {path}: {e.strerror}") from None
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 2 or not SECRET.fullmatch(fields[-1]):
                raise L3netError(f"{path}, line {number}: expected SECRET or IP SECRET (1-80 printable "
                                 "characters, no blank, quote or backslash)")
            key = "default"
            if len(fields) == 2:
                try:
                    key = str(ipv4(fields[0], "peer address"))
                except L3netError:
                    raise L3netError(f"{path}, line {number}: not an IPv4 address before the secret") from None
            out[key] = fields[-1]
    if default:
        if not SECRET.fullmatch(default):
            raise L3netError("L3NET_BGP_PASSWORD: 1-80 printable characters, no blank, quote or backslash")
        out["default"] = default
    return out


def default_host_ip():
    """The first IPv4 address of the interface that holds the default route, or None."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for route in ipr.get_default_routes(family=socket.AF_INET):
            oif = route.get_attr("RTA_OIF")
            for addr in ipr.get_addr(family=socket.AF_INET, index=oif):
                return addr.get_attr("IFA_ADDRESS")
    return None


def etcd_options(f):
    """The etcd flags, shared by every command of both programs."""
    opts = [
        click.option("--etcd-endpoints", envvar="L3NET_ETCD_ENDPOINTS", default=Config.etcd_endpoints,
                     show_default=True, help="Comma-separated etcd URLs."),
        click.option("--etcd-prefix", envvar="L3NET_ETCD_PREFIX", default=Config.etcd_prefix,
                     show_default=True, help="Key prefix for all l3net data."),
        click.option("--etcd-timeout", envvar="L3NET_ETCD_TIMEOUT", default=Config.etcd_timeout,
                     type=float, show_default=True, help="Seconds before an etcd call fails."),
        click.option("--etcd-ca-cert", envvar="L3NET_ETCD_CA_CERT", help="CA bundle for https endpoints."),
        click.option("--etcd-cert", envvar="L3NET_ETCD_CERT", help="Client certificate (TLS auth)."),
        click.option("--etcd-key", envvar="L3NET_ETCD_KEY", help="Client key (TLS auth)."),
        click.option("--etcd-user", envvar="L3NET_ETCD_USER", help="etcd user (with password)."),
        click.option("--etcd-password", envvar="L3NET_ETCD_PASSWORD",
                     help="etcd password (prefer the environment variable)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_store(cfg):
    from .store import EtcdStore

    return EtcdStore(cfg.etcd_endpoints, timeout=cfg.etcd_timeout, ca_cert=cfg.etcd_ca_cert,
                     cert_cert=cfg.etcd_cert, cert_key=cfg.etcd_key, user=cfg.etcd_user,
                     password=cfg.etcd_password)
