"""Refuse a listening address that cannot be bound, before any engine loads."""

from __future__ import annotations

import socket

from ..errors import MpiserveError


def check_listen(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        raise MpiserveError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
