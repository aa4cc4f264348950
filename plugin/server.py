"""``l3net-plugin``: serve the driver on Docker's plugin socket with gunicorn.

One gunicorn worker with many threads: dockerd calls in parallel (parallel ``docker run``),
and all state is in etcd, so threads are enough and one process keeps netlink simple. The
app (and so the etcd gRPC channel, which is not fork-safe) is built in the worker, after fork.
"""

import logging
import os
import stat
import sys
import threading
import time

import click
from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from core.errors import L3netError

from . import __version__
from .config import RUN_DIR, Config, default_host_ip, etcd_options, make_store
from .store import check_tls, describe_endpoints, parse_endpoints

log = logging.getLogger("l3net")


def build(cfg):
    """Wire the parts of a node together; returns (app, driver, ipam, agent)."""
    from core.keys import Keys
    from ipam.allocator import Ipam

    from .agent import Agent
    from .app import create_app
    from .bird import Bird
    from .calc import read_infrastructure
    from .datapath import Datapath, uplinks
    from .driver import Driver
    from .firewall import Firewall, choose_backend
    from .journal import Journal
    from .tunnel import Tunnel

    store = make_store(cfg)
    keys = Keys(cfg.etcd_prefix)
    refuse_a_taken_name(store, keys, cfg)
    ipam = Ipam(store, keys, cfg.hostname, cfg.default_pool, cfg.default_pool_size, cfg.block_size,
                infrastructure=lambda: read_infrastructure(store, keys))
    bird = Bird(cfg.state_dir, run_dir=RUN_DIR)
    if not cfg.bgp:
        if bird.stop():             # one a previous plugin (with BGP) left running
            log.info("BGP is off: stopped the BIRD a previous plugin left running")
        bird = None
    log.info("%s", choose_backend(cfg.iptables_backend, cfg.state_dir))
    firewall = Firewall()
    agent = Agent(store, keys, cfg.hostname, cfg.host_ip, bird, firewall,
                  status_path=os.path.join(cfg.state_dir, "status.json"),
                  facts=node_facts_of(cfg.etcd_endpoints), uplinks=uplinks,
                  bgp_passwords=cfg.bgp_passwords, tunnel=Tunnel())
    owner = f"l3net {cfg.etcd_prefix} {cfg.hostname}"        # the mark on this node's veths
    driver = Driver(store, keys, ipam, Datapath(owner), Journal(cfg.state_dir), cfg.hostname,
                    cfg.driver_name, firewall=firewall, sync_policy=agent.sync_policy)
    return create_app(driver, ipam), driver, ipam, agent


def refuse_a_taken_name(store, keys, cfg):
    """Stop here, before touching anything of the host's, when a live node holds this node's
    name with another address (Registry.identity_conflict). etcd not answering yet: the
    registry checks again before it registers."""
    from .agent import Registry
    try:
        conflict = Registry(store, keys, cfg.hostname, cfg.host_ip).identity_conflict()
    except L3netError as e:
        log.warning("could not check that node name %s is free: %s", cfg.hostname, e)
        return
    if conflict:
        log.error("refusing to start: %s", conflict)
        sys.exit(3)             # gunicorn's "worker failed to boot": the whole server stops


def node_facts_of(etcd_endpoints, every=600.0):
    """What this node publishes in its registry record for every node to protect: its
    addresses and networks (asked at each heartbeat) and the IPv4 addresses of its etcd
    endpoints (names resolved in the agent's thread, never on a Docker call: again every
    ``every`` seconds, and at each heartbeat until every name resolved; the last good answer
    is kept)."""
    from .datapath import host_facts
    names = [h for h, _, _ in parse_endpoints(etcd_endpoints)]
    etcd = {"ips": [], "at": None, "complete": False}

    def facts():
        now = time.monotonic()
        if not etcd["complete"] or now - etcd["at"] >= every:
            ips, complete = resolve_ipv4(names)
            if ips:
                etcd["ips"] = ips
            etcd.update(at=now, complete=complete)
        return {**host_facts(), "etcd": etcd["ips"]}
    return facts


def resolve_ipv4(names):
    """(IPv4 addresses of host names or address literals, whether every name resolved);
    an unresolvable name is logged."""
    import socket
    out, complete = set(), True
    for name in names:
        try:
            out |= {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
        except OSError as e:
            complete = False
            log.warning("cannot resolve etcd endpoint %s (%s): not protected from containers until it "
                        "resolves", name, e)
    return sorted(out), complete


def resume(driver):
    """Finish what a previous process left half done; etcd may be down, so retry a while."""
    for attempt in range(30):
        try:
            driver.resume()
            return
        except L3netError as e:
            log.warning("resume: %s (retrying)", e)
            time.sleep(min(10, 1 + attempt))


def setup_logging(level, fmt="text"):
    from .logfmt import setup
    setup(level, fmt)


def remove_everything(state_dir):
    """``--remove-rules``: this node's BIRD stopped, l3net's rules taken off every iptables
    backend that has them (nft, legacy: the plugin may have used either), its ipsets
    destroyed. Returns the exit status."""
    from .bird import Bird
    from .firewall import BACKENDS, choose_backend, destroy_sets, remove_all
    status = 0
    try:
        if Bird(state_dir, run_dir=RUN_DIR).stop():
            click.echo("stopped BIRD (peers withdraw this node's routes)")
    except (OSError, L3netError) as e:
        click.echo(f"l3net-plugin: BIRD: {e}", err=True)
        status = 1
    try:
        from .datapath import _ipr
        from .tunnel import Tunnel
        if Tunnel._remove(_ipr()):
            click.echo("removed the VXLAN device")
    except (OSError, L3netError) as e:
        click.echo(f"l3net-plugin: VXLAN device: {e}", err=True)
        status = 1
    for backend in BACKENDS:
        try:
            choose_backend(backend)
            for what in remove_all(sets=False):
                click.echo(f"removed {what} ({backend})")
        except L3netError as e:
            if "not found" not in str(e):      # that iptables variant is not installed
                click.echo(f"l3net-plugin: {backend}: {e}", err=True)
                status = 1
    try:
        for what in destroy_sets():
            click.echo(f"removed {what}")
    except L3netError as e:
        click.echo(f"l3net-plugin: {e}", err=True)
        status = 1
    return status


class GunicornLogger(glogging.Logger):
    """gunicorn's own messages (start, workers, signals) through l3net's root handler, so
    ``--log-format json`` leaves no line of another format on stderr."""

    def setup(self, cfg):
        super().setup(cfg)
        for handler in list(self.error_log.handlers):
            self.error_log.removeHandler(handler)
        self.error_log.propagate = True


class PluginServer(BaseApplication):
    def __init__(self, cfg):
        self.node_cfg = cfg
        super().__init__()

    def load_config(self):
        cfg = self.node_cfg
        sock = cfg.socket

        def when_ready(server):
            # Docker's plugin sockets: root-owned, group may connect, nobody else.
            os.chmod(sock, 0o660)
            log.info("l3net-plugin %s serving %s as driver %r (host %s, etcd %s, prefix %s)",
                     __version__, sock, cfg.driver_name, cfg.hostname,
                     describe_endpoints(cfg.etcd_endpoints), cfg.etcd_prefix)

        def post_fork(server, worker):
            from .datapath import Datapath
            try:
                Datapath().prepare_host()
            except (OSError, L3netError) as e:
                log.warning("could not prepare the host for routing: %s", e)

        def worker_exit(server, worker):
            # The agent stops; BIRD does not (see Agent.stop): containers keep running without
            # the plugin, and so do their routes, on this host and its peers.
            agent = getattr(self, "agent", None)
            if agent is not None:
                agent.stop()

        settings = {
            "bind": [f"unix:{sock}"],
            "workers": 1,
            "worker_class": "gthread",
            "threads": cfg.threads,
            "umask": 0o117,
            "timeout": 120,
            "graceful_timeout": 5,
            "accesslog": None,
            "errorlog": "-",
            "logger_class": GunicornLogger,
            "loglevel": cfg.log_level,
            "when_ready": when_ready,
            "post_fork": post_fork,
            "worker_exit": worker_exit,
            "proc_name": "l3net-plugin",
        }
        if "control_socket_disable" in self.cfg.settings:   # gunicorn >= 24
            settings["control_socket_disable"] = True
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        setup_logging(self.node_cfg.log_level, self.node_cfg.log_format)
        app, driver, _, agent = build(self.node_cfg)
        threading.Thread(target=resume, args=(driver,), name="l3net-resume", daemon=True).start()
        agent.start()
        self.agent = agent
        from .retry import Retrier
        from .sweep import Sweeper

        def sync_members():
            changed = driver.ipam.ensure_members()
            if changed:
                log.info("IPAM member records written for the blocks of an older l3net (%d)", changed)
        # (a cluster written by an l3net without member records: once per cluster)
        Retrier("l3net-members").submit(sync_members, "IPAM member records sync")
        Sweeper(driver, driver.ipam, self.node_cfg.sweep_every, self.node_cfg.sweep_grace,
                view=agent.cache.view).start()
        if self.node_cfg.metrics_port:
            from . import metrics
            metrics.serve(self.node_cfg.metrics_port, self.node_cfg.metrics_address, agent)
        return app


_LOCK = []      # the state dir's lock file, held open for the life of the process


def lock_state_dir(state_dir):
    """One plugin per state dir: a second one (by mistake, or a second unit) must not take
    the first one's socket away. The lock is the kernel's: it goes with the process."""
    import fcntl
    path = os.path.join(state_dir, "plugin.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.read(fd, 32).decode().strip() or "?"
        finally:
            os.close(fd)
        raise L3netError(f"another l3net-plugin (pid {holder}) runs with state dir {state_dir}: "
                         "stop it first (one plugin per host)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCK.append(fd)


def prepare_paths(cfg):
    os.makedirs(os.path.dirname(cfg.socket), mode=0o755, exist_ok=True)
    os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
    lock_state_dir(cfg.state_dir)
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.stat(cfg.socket).st_mode):
            os.remove(cfg.socket)  # stale, from a plugin that did not exit cleanly
    except FileNotFoundError:
        pass


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@etcd_options
@click.option("--hostname", envvar="L3NET_HOSTNAME", help="This node's name [default: hostname].")
@click.option("--host-ip", envvar="L3NET_HOST_IP",
              help="This node's address [default: address of the default-route interface].")
@click.option("--socket", "socket_path", envvar="L3NET_SOCKET", default=Config.socket,
              show_default=True, help="Plugin socket; its file name is the driver name.")
@click.option("--state-dir", envvar="L3NET_STATE_DIR", default=Config.state_dir, show_default=True)
@click.option("--default-pool", envvar="L3NET_DEFAULT_POOL", default=Config.default_pool,
              show_default=True, help="Range for networks created without --subnet.")
@click.option("--default-pool-size", envvar="L3NET_DEFAULT_POOL_SIZE", type=int,
              default=Config.default_pool_size, show_default=True,
              help="Prefix length of a pool chosen without --subnet.")
@click.option("--block-size", envvar="L3NET_BLOCK_SIZE", type=int, default=Config.block_size,
              show_default=True, help="Prefix length of the blocks a host claims.")
@click.option("--no-bgp", "no_bgp", is_flag=True, envvar="L3NET_NO_BGP",
              help="Run without BGP (a single host, or routes managed elsewhere).")
@click.option("--threads", envvar="L3NET_THREADS", type=int, default=Config.threads, show_default=True)
@click.option("--log-level", envvar="L3NET_LOG_LEVEL", default=Config.log_level, show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", envvar="L3NET_LOG_FORMAT", default=Config.log_format, show_default=True,
              type=click.Choice(["text", "json"]), help="json: one JSON object per line.")
@click.option("--metrics-port", envvar="L3NET_METRICS_PORT", type=click.IntRange(0, 65535), default=0,
              show_default=True, help="Serve Prometheus metrics on this port (0: off).")
@click.option("--metrics-address", envvar="L3NET_METRICS_ADDRESS", default=Config.metrics_address,
              show_default=True, help="Address the metrics port listens on.")
@click.option("--iptables-backend", envvar="L3NET_IPTABLES_BACKEND", default=Config.iptables_backend,
              show_default=True, type=click.Choice(["auto", "nft", "legacy"]),
              help="Which iptables to write to: auto = the one holding the host's (dockerd's) rules.")
@click.option("--sweep-every", envvar="L3NET_SWEEP_EVERY", type=click.FloatRange(1, 3600),
              default=Config.sweep_every, show_default=True,
              help="Seconds between sweeps for leftovers (veths, routes, records, addresses).")
@click.option("--sweep-grace", envvar="L3NET_SWEEP_GRACE", type=click.FloatRange(5, 86400),
              default=Config.sweep_grace, show_default=True,
              help="A leftover is removed once seen this many seconds in a row.")
@click.option("--bgp-password-file", envvar="L3NET_BGP_PASSWORD_FILE", type=click.Path(dir_okay=False),
              help="BGP session passwords (TCP MD5): a line SECRET for the mesh, lines IP SECRET for "
                   "explicit peers (also L3NET_BGP_PASSWORD: the mesh's). Every node needs the same.")
@click.option("--remove-rules", is_flag=True,
              help="Remove l3net's iptables chains and ipsets from this host and stop its BIRD, "
                   "then exit (after the plugin is stopped for good).")
def main(etcd_endpoints, etcd_prefix, etcd_timeout, etcd_ca_cert, etcd_cert, etcd_key, etcd_user,
         etcd_password, hostname, host_ip, socket_path, state_dir, default_pool,
         default_pool_size, block_size, no_bgp, threads, log_level, log_format, metrics_port,
         metrics_address, iptables_backend, sweep_every, sweep_grace, bgp_password_file, remove_rules):
    """Run an l3net node: the Docker network + IPAM driver on a unix socket."""
    setup_logging(log_level, log_format)
    if remove_rules:
        sys.exit(remove_everything(state_dir))
    cfg = Config(etcd_endpoints=etcd_endpoints, etcd_prefix=etcd_prefix, etcd_timeout=etcd_timeout,
                 etcd_ca_cert=etcd_ca_cert, etcd_cert=etcd_cert, etcd_key=etcd_key,
                 etcd_user=etcd_user, etcd_password=etcd_password, hostname=hostname,
                 host_ip=host_ip, socket=socket_path, state_dir=state_dir,
                 default_pool=default_pool, default_pool_size=default_pool_size,
                 block_size=block_size, bgp=not no_bgp, threads=threads, log_level=log_level,
                 metrics_port=metrics_port, metrics_address=metrics_address, log_format=log_format,
                 iptables_backend=iptables_backend, sweep_every=sweep_every, sweep_grace=sweep_grace)
    try:
        from .config import read_bgp_passwords
        cfg.bgp_passwords = read_bgp_passwords(bgp_password_file, os.environ.get("L3NET_BGP_PASSWORD"))
        cfg.check()
        parse_endpoints(cfg.etcd_endpoints)
        check_tls(cfg.etcd_endpoints, cfg.etcd_ca_cert, cfg.etcd_cert, cfg.etcd_key)
        from ipam.pools import parse_cidr
        parse_cidr(cfg.default_pool, "--default-pool")
        from ipam.pools import MAX_BLOCK_PREFIX, MIN_BLOCK_PREFIX
        if not MIN_BLOCK_PREFIX <= block_size <= MAX_BLOCK_PREFIX or not 8 <= default_pool_size <= 30:
            raise L3netError(f"--block-size must be {MIN_BLOCK_PREFIX}..{MAX_BLOCK_PREFIX} and "
                             "--default-pool-size 8..30")
        if not cfg.host_ip:
            cfg.host_ip = default_host_ip()
        if not cfg.host_ip and cfg.bgp:
            raise L3netError("cannot tell this host's address (no default route): pass --host-ip")
        prepare_paths(cfg)
    except (L3netError, OSError) as e:
        click.echo(f"l3net-plugin: {e}", err=True)
        sys.exit(2)
    PluginServer(cfg).run()


# The managed plugin's settable short names (docker plugin set l3net:latest ETCD_ENDPOINTS=...),
# beside the L3NET_* ones every l3net program reads. Only the plugin's own entrypoint maps
# them: on a host, ETCD_* variables may belong to someone else.
MANAGED_ENV = {"ETCD_ENDPOINTS": "L3NET_ETCD_ENDPOINTS", "ETCD_PREFIX": "L3NET_ETCD_PREFIX",
               "HOST_IP": "L3NET_HOST_IP", "NODE_NAME": "L3NET_HOSTNAME", "LOG_LEVEL": "L3NET_LOG_LEVEL"}


def managed_main():
    """Entrypoint of the managed plugin (plugin.json): the short names win when set."""
    for short, long in MANAGED_ENV.items():
        if os.environ.get(short):
            os.environ[long] = os.environ[short]
    main()


if __name__ == "__main__":
    main()
