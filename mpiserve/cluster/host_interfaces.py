"""This host's IPv4 interfaces (name, address, prefix length), asked of the kernel with the
SIOCGIFADDR / SIOCGIFNETMASK ioctls on every interface `socket.if_nameindex` lists. Linux only;
an interface that is down or has no IPv4 address is left out. One address per interface (the
primary one), which is the one other hosts reach it by."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

from .rendezvous_choice import HostReport, Interface

SIOCGIFADDR = 0x8915
SIOCGIFNETMASK = 0x891B
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1


def _ioctl(sock: socket.socket, request: int, name: str) -> bytes:
    return fcntl.ioctl(sock.fileno(), request, struct.pack("256s", name.encode()[:15]))


def _interface(sock: socket.socket, name: str) -> Interface | None:
    try:
        flags = struct.unpack("H", _ioctl(sock, SIOCGIFFLAGS, name)[16:18])[0]
        if not flags & IFF_UP:
            return None
        address = socket.inet_ntoa(_ioctl(sock, SIOCGIFADDR, name)[20:24])
        netmask = socket.inet_ntoa(_ioctl(sock, SIOCGIFNETMASK, name)[20:24])
    except OSError:
        return None
    prefix = ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    return Interface(name, address, prefix)


def local_interfaces() -> tuple[Interface, ...]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        found = (_interface(sock, name) for _, name in socket.if_nameindex())
        return tuple(i for i in found if i is not None)


def local_report() -> HostReport:
    return HostReport(socket.gethostname(), local_interfaces())
