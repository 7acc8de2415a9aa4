"""Loopback ports that are free now, for the processes a bench, a run or a test starts.

The sockets are released before use: fine on one machine, where nothing else
races for ephemeral ports in the moment between.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack


def free_udp_ports(count: int) -> list[int]:
    """``count`` distinct UDP ports free on loopback."""
    with ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            for _ in range(count)
        ]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def free_tcp_port() -> int:
    """A TCP port free on loopback (for a gRPC, HTTP or rendezvous server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
