"""Loopback addresses and sockets for tests."""

from __future__ import annotations

import socket


def free_tcp_port() -> int:
    """A TCP port free on loopback now (for a gRPC or HTTP server the test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bound_udp_sockets(count: int) -> list[socket.socket]:
    """UDP sockets bound to loopback, one per worker: their addresses go into the switch."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    return socks
