"""Published ports (``docker run -p HOSTPORT:PORT``): what dockerd asks for, checked (pure),
and this host's claims on host ports, kept in etcd (PortClaims).

dockerd sends the bindings in ProgramExternalConnectivity's options; l3net answers them with
one DNAT rule per binding on the container's host (policy.render_iptables), so the port is
reachable at the host's addresses from anywhere that reaches the host. l3net publishes fixed
host ports only: dockerd does not read back the port a driver picks (a remote driver's
EndpointOperInfo is not parsed), so ``-P`` / ``-p PORT`` would leave the user guessing.
"""

import json
import logging
import threading

from netaddr import AddrFormatError, IPAddress

from core.errors import L3netError

log = logging.getLogger("l3net.ports")

PORTMAP = "com.docker.network.portmap"
PROTOS = {6: "tcp", 17: "udp", "tcp": "tcp", "udp": "udp"}


def _int(binding, name, low, high):
    value = binding.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise L3netError(f"invalid port binding: {name} {value!r}")
    return value


def parse_portmap(value):
    """The portmap option -> [{"proto", "host_ip" (None: every address), "host_port", "port"}].

    Refused with a clear error: random or ranged host ports, IPv6 host addresses, protocols
    other than TCP and UDP, the same host port twice."""
    if value in (None, []):
        return []
    if not isinstance(value, list) or len(value) > 1024:
        raise L3netError("invalid port bindings: expected a list")
    out, seen = [], set()
    for binding in value:
        if not isinstance(binding, dict):
            raise L3netError("invalid port binding: expected an object")
        proto = PROTOS.get(binding.get("Proto"))
        if proto is None:
            raise L3netError(f"l3net publishes TCP and UDP ports only, not protocol {binding.get('Proto')!r}")
        port = _int(binding, "Port", 1, 65535)
        host_port = _int(binding, "HostPort", 0, 65535)
        host_end = _int(binding, "HostPortEnd", 0, 65535)
        if host_port == 0 or host_end not in (0, host_port):
            raise L3netError(f"l3net publishes fixed host ports only (-p HOSTPORT:{port}), not a random "
                             "or ranged one (-P, -p PORT, -p START-END:PORT)")
        host_ip = binding.get("HostIP") or None
        if host_ip is not None:
            try:
                address = IPAddress(str(host_ip))
            except (AddrFormatError, ValueError, TypeError):
                raise L3netError(f"invalid port binding: HostIP {host_ip!r}") from None
            if address.version != 4:
                raise L3netError(f"l3net publishes on IPv4 addresses only, not {host_ip}")
            host_ip = None if address == IPAddress("0.0.0.0") else str(address)
        if (proto, host_port) in seen:
            raise L3netError(f"host port {proto}/{host_port} published twice")
        seen.add((proto, host_port))
        out.append({"proto": proto, "host_ip": host_ip, "host_port": host_port, "port": port})
    return out


def describe(mapping):
    """``0.0.0.0:8080->80/tcp``, as docker ps prints a binding."""
    return f"{mapping.get('host_ip') or '0.0.0.0'}:{mapping['host_port']}->{mapping['port']}/{mapping['proto']}"


class PortClaims:
    """This host's published ports in etcd: one key per protocol and host port (keys.port),
    its value the binding with its endpoint and address. Read once, then kept here as
    {endpoint: {key: mod revision}}: only this process writes them, so a container stop
    without -p costs no etcd read. Every write is a compare-and-swap on those revisions, and
    one lock orders the calls dockerd makes in parallel."""

    def __init__(self, store, keys, host):
        self.store, self.keys, self.host = store, keys, host
        self._lock = threading.Lock()
        self._claims = None

    def _load(self):
        if self._claims is None:
            claims = {}
            for key, value, rev in self.store.get_prefix(self.keys.ports(self.host)):
                try:
                    holder = json.loads(value)["endpoint"]
                except (ValueError, TypeError, KeyError):
                    holder = None
                if not isinstance(holder, str):
                    log.warning("ignoring %s: not a port claim", key)
                    continue
                claims.setdefault(holder, {})[key] = rev
            self._claims = claims
        return self._claims

    def claim(self, endpoint_id, network_id, address, mappings, alive, port_free):
        """Claim every binding's host port for the endpoint, all or none. A port held by an
        endpoint that is gone (``alive(holder)`` false: its container died and nobody revoked)
        is taken over; one held by a live endpoint, or by a host process (``port_free``
        false), is refused. A re-sent call finds its own claims."""
        with self._lock:
            claims = self._load()
            holders = {key: holder for holder, keys in claims.items() for key in keys}
            expect, put = {}, {}
            for m in mappings:
                key = self.keys.port(self.host, m["proto"], m["host_port"])
                holder = holders.get(key)
                if holder == endpoint_id:
                    continue
                if holder is not None and alive(holder):
                    raise L3netError(f"host port {m['proto']}/{m['host_port']} is already published by "
                                     f"another container (endpoint {str(holder)[:12]})")
                if not port_free(m["proto"], m["host_ip"], m["host_port"]):
                    raise L3netError(f"host port {m['proto']}/{m['host_port']} is in use on this host")
                if holder is not None:
                    log.info("host port %s/%s: taking it over from endpoint %s, which is gone",
                             m["proto"], m["host_port"], str(holder)[:12])
                expect[key] = claims[holder][key] if holder is not None else 0
                put[key] = json.dumps(dict(m, endpoint=endpoint_id, network=network_id, ip=address),
                                      sort_keys=True)
            if not put:
                return
            try:
                rev = self.store.txn(expect, put=put)
            except Exception:
                self._claims = None             # written or not: read etcd again next time
                raise
            if not rev:
                self._claims = None             # not what we knew: read etcd again next time
                raise L3netError("a host port changed hands meanwhile; try again")
            for key in put:
                for keys in claims.values():
                    keys.pop(key, None)
                claims.setdefault(endpoint_id, {})[key] = rev

    def release(self, endpoint_id):
        """Drop the endpoint's claims (each only if still its own). Returns whether it had any."""
        with self._lock:
            mine = self._load().get(endpoint_id)
            if not mine:
                return False
            try:
                if not self.store.txn(dict(mine), delete=sorted(mine)):
                    for key, rev in mine.items():
                        self.store.txn({key: rev}, delete=[key])
            except Exception:
                self._claims = None             # some deleted or not: read etcd again next time
                raise
            self._claims.pop(endpoint_id, None)
            return True
