"""UDP mode: the soft switch behind one UDP socket (loopback by default), no root needed.

Each datagram is one packet on ingress port 0; the socket address it came
from stands for its IPv4 source and UDP source port, and each emitted packet
goes to the IPv4/UDP destination the pipeline gave it.
"""

from __future__ import annotations

import socket

from switchreduce import wire
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.softswitch.pipeline import (
    Packet,
    SoftSwitch,
    SwitchReduceDeparser,
    int_to_ip,
)
from switchreduce.emulation.softswitch.runtime import Emitted, Received, SwitchRuntime


def force_buffers(sock: socket.socket, size: int) -> None:
    """Raise socket buffers past net.core.*mem_max when allowed (root), else ask normally."""
    for forced, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


class UdpSwitch(SwitchRuntime):
    def __init__(
        self,
        switch: SoftSwitch,
        address: tuple[str, int] = ("127.0.0.1", wire.DEFAULT_SWITCH_PORT),
        faults: FaultSpec | None = None,
        buffer_bytes: int = 8 << 20,
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        force_buffers(sock, buffer_bytes)
        sock.bind(address)
        super().__init__(switch, {0: sock}, faults)
        self.address: tuple[str, int] = sock.getsockname()
        self._max_datagram = wire.datagram_bytes(switch.k) + 1  # a spare byte exposes oversize

    def receive(self, port: int, sock: socket.socket) -> Received:
        data, source = sock.recvfrom(self._max_datagram)
        return port, data, source

    def parse(self, item: Received) -> Packet:
        _, data, source = item
        return self.switch.parser.parse_datagram(data, source, self.address)

    def emit(self, pkt: Packet) -> Emitted:
        destination = (int_to_ip(pkt.ip_dst), pkt.udp_dport)
        return 0, SwitchReduceDeparser.datagram(pkt), destination
