"""BIRD 2 as a supervised child: write and check its config, start it, reconfigure, restart.

Files: the config under the state dir (``bird.conf``), the control socket and pid file under
``/run/l3net``. BIRD outlives the plugin process (its own session; the plugin does not stop it
when it stops): the next plugin adopts it through its pid file instead of starting a second
one, so routes survive a plugin restart or upgrade.
Every command is bounded by a timeout; none goes through a shell.
"""

import logging
import os
import signal
import subprocess
import time

from core.errors import L3netError, run_tool

log = logging.getLogger("l3net.bird")

TIMEOUT = 15
HINT = "install bird2 (or run with --no-bgp)"
# The host's /proc: the managed plugin's is its own, the host's is at /host/proc (plugin.json).
HOST_PROC = os.path.dirname(os.environ.get("L3NET_PROC_SYS", "/proc/sys"))


class Bird:
    def __init__(self, state_dir, run_dir="/run/l3net", bird="bird", birdc="birdc"):
        self.conf = os.path.join(state_dir, "bird.conf")
        self.logfile = os.path.join(state_dir, "bird.log")
        self.socket = os.path.join(run_dir, "bird.ctl")
        self.pidfile = os.path.join(run_dir, "bird.pid")
        self.bird, self.birdc = bird, birdc
        self.proc = None
        self.current = None
        os.makedirs(run_dir, exist_ok=True)

    def _run(self, args, what):
        return run_tool(args, HINT, what, TIMEOUT)

    def _on_socket(self):
        """(pid, command line) of the BIRD in our pid file that serves our control socket (one
        a previous plugin left running), or None."""
        try:
            with open(self.pidfile) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        cmd = bird_cmdline(pid, name=os.path.basename(self.bird))
        return (pid, cmd) if cmd and self.socket.encode() in cmd else None

    def pid(self):
        """The pid of our running BIRD (ours: our socket and our config file), or None."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        found = self._on_socket()
        return found[0] if found and self.conf.encode() in found[1] else None

    def apply(self, text):
        """Make BIRD run with config ``text``: check it, then start or reconfigure."""
        running = self.pid() is not None
        if text == self.current and running:
            return False
        if self.current is None:            # this process's first: started or adopted
            for pid in other_birds(self.socket, HOST_PROC):
                log.warning("another BIRD (pid %d) runs in this network namespace: if it has a kernel "
                            "protocol, it deletes l3net's routes (both are proto bird); disable the "
                            "distribution's bird.service", pid)
        tmp = self.conf + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # it may hold BGP passwords
        with os.fdopen(fd, "w") as f:
            f.write(text)
        res = self._run([self.bird, "-p", "-c", tmp], "bird -p")
        if res.returncode != 0:
            raise L3netError(f"rendered BIRD config is invalid: {res.stderr.strip() or res.stdout.strip()}")
        os.replace(tmp, self.conf)
        if running:
            res = self._run([self.birdc, "-s", self.socket, "configure"], "birdc configure")
            if res.returncode != 0 or "Reconfigur" not in res.stdout:
                raise L3netError(f"birdc configure failed: {res.stdout.strip()} {res.stderr.strip()}")
            log.info("BIRD reconfigured")
        else:
            self.start()
        self.current = text
        return True

    def start(self):
        # A BIRD on our socket with another config file (the state directory moved): it would
        # never load ours, and two BIRDs would fight over the routes. It goes first.
        if self._on_socket():
            self.stop()
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass
        # -f: foreground, so it is our child and we see it die. Its log goes to a file (a pipe
        # nobody drains would stall it).
        with open(self.logfile, "a") as logf:
            self.proc = subprocess.Popen([self.bird, "-f", "-R", "-c", self.conf, "-s", self.socket,
                                          "-P", self.pidfile], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.logfile) as f:
                    err = "".join(f.readlines()[-3:]).strip()
                raise L3netError(f"BIRD exited at start: {err}")
            if os.path.exists(self.socket):
                log.info("BIRD started (pid %d)", self.proc.pid)
                return
            time.sleep(0.05)
        raise L3netError("BIRD did not open its control socket within 10s")

    def stop(self):
        """Stop the BIRD on our socket (peers withdraw this node's routes). Returns whether
        one ran."""
        found = self._on_socket()
        pid = self.pid() or (found[0] if found else None)
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self._alive(pid):
            if self.proc is not None:
                self.proc.poll()
            time.sleep(0.05)
        self.current = None
        return True

    def _alive(self, pid):
        if self.proc is not None and self.proc.pid == pid:
            return self.proc.poll() is None
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def show(self, *what):
        return show(self.socket, *what, birdc=self.birdc)


def other_birds(socket, proc="/proc"):
    """Pids of BIRD processes in this process's network namespace that are not ours (ours is
    the one with our control socket on its command line; ``proc``: the host's /proc, which a
    managed plugin sees at /host/proc, its own showing only its own processes)."""
    try:
        here = os.readlink(f"{proc}/self/ns/net")
    except OSError:
        return []
    found = []
    for entry in os.listdir(proc):
        cmd = bird_cmdline(entry, proc) if entry.isdigit() else None
        if cmd and socket.encode() not in cmd:
            try:
                if os.readlink(f"{proc}/{entry}/ns/net") == here:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def bird_cmdline(pid, proc="/proc", name="bird"):
    """The command line (a list of bytes) of process ``pid`` if it is a BIRD, else None."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except OSError:
        return None
    return cmd if os.path.basename(cmd[0].decode(errors="replace")) == name else None


def show(socket, *what, birdc="birdc"):
    """``birdc show ...`` output (for l3netctl and tests)."""
    res = run_tool([birdc, "-s", socket, "show", *what], HINT, "birdc", TIMEOUT)
    if res.returncode != 0:
        raise L3netError(f"birdc show {' '.join(what)} failed: {res.stdout.strip()} {res.stderr.strip()}")
    return res.stdout
