"""Loopback addresses and sockets for tests."""

from __future__ import annotations

import socket


def bound_udp_sockets(count: int) -> list[socket.socket]:
    """UDP sockets bound to loopback, one per worker: their addresses go into the switch."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    return socks
