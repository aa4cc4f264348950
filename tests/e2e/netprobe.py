"""Probe servers and clients for the policy tests, run inside a container's network namespace
from the host (``nsenter -t <container pid> -n python netprobe.py ...``): the packets are the
container's own (its address, its veth), and the busybox test image needs no UDP tools.

    netprobe.py serve TCP_PORTS UDP_PORTS      answer "ok <peer address>" on each port
                                               (TCP: then close; UDP: echo), print "ready"
    netprobe.py probe JSON [SECONDS]           JSON = [[ip, "icmp"|"tcp"|"udp", port], ...];
                                               prints a JSON list of answers (text or null),
                                               all probes at once, each given SECONDS (1 s)
"""

import json
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

TIMEOUT = 1.0


def serve(tcp_ports, udp_ports):
    def tcp(port):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(64)
        while True:
            conn, peer = s.accept()
            try:
                conn.sendall(f"ok {peer[0]}\n".encode())
            finally:
                conn.close()

    def udp(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        while True:
            _, peer = s.recvfrom(2048)
            s.sendto(f"ok {peer[0]}\n".encode(), peer)

    for port in tcp_ports:
        threading.Thread(target=tcp, args=(port,), daemon=True).start()
    for port in udp_ports:
        threading.Thread(target=udp, args=(port,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def probe_one(ip, proto, port, timeout=TIMEOUT):
    try:
        if proto == "icmp":
            res = subprocess.run(["ping", "-n", "-c1", f"-W{max(1, round(timeout))}", ip],
                                 capture_output=True, text=True, timeout=timeout + 2)
            return "ok" if res.returncode == 0 else None
        if proto == "tcp":
            with socket.create_connection((ip, port), timeout=timeout) as s:
                s.settimeout(timeout)
                return s.recv(100).decode().strip() or None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(b"probe", (ip, port))
            return s.recvfrom(100)[0].decode().strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def probe(targets, timeout=TIMEOUT):
    with ThreadPoolExecutor(max(1, len(targets))) as pool:
        return list(pool.map(lambda t: probe_one(*t, timeout=timeout), targets))


def ports(text):
    return [int(p) for p in text.split(",") if p]


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(ports(sys.argv[2]), ports(sys.argv[3]))
    else:
        print(json.dumps(probe(json.loads(sys.argv[2]), *map(float, sys.argv[3:4]))))
