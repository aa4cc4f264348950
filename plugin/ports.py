"""Published ports (``docker run -p HOSTPORT:PORT``): what dockerd asks for, checked (pure).

dockerd sends the bindings in ProgramExternalConnectivity's options; l3net answers them with
one DNAT rule per binding on the container's host (policy.render_iptables), so the port is
reachable at the host's addresses from anywhere that reaches the host. l3net publishes fixed
host ports only: dockerd does not read back the port a driver picks (a remote driver's
EndpointOperInfo is not parsed), so ``-P`` / ``-p PORT`` would leave the user guessing.
"""

from netaddr import AddrFormatError, IPAddress

from .errors import L3netError

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
