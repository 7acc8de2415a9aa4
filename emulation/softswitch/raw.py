"""Raw mode: the soft switch on network interfaces, one AF_PACKET socket per port (root).

This is how it runs as a Mininet switch node: whole Ethernet frames in and
out, multicast replication to ports, egress rewrite, and forwarding of all
other traffic by destination MAC (so ping between hosts works). It runs the
Python engine: the compiled one serves UDP mode only, so far.
"""

from __future__ import annotations

import socket

from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.softswitch.pipeline import SoftSwitch
from switchreduce.emulation.softswitch.runtime import Emitted, PacketLoop, Received
from switchreduce.emulation.softswitch.static import answer
from switchreduce.emulation.softswitch.udp import force_buffers

_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4  # what we sent ourselves, looped back to the socket: ignore
_MAX_FRAME = 65536


class RawSwitch(PacketLoop):
    def __init__(
        self,
        switch: SoftSwitch,
        interfaces: dict[int, str],
        faults: FaultSpec | None = None,
        buffer_bytes: int = 8 << 20,
    ) -> None:
        sockets = {}
        for port, name in interfaces.items():
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
            force_buffers(sock, buffer_bytes)
            sock.bind((name, 0))
            sockets[port] = sock
        super().__init__(switch, sockets, faults)
        self.interfaces = dict(interfaces)

    def receive(self, port: int, sock: socket.socket) -> Received | None:
        frame, address = sock.recvfrom(_MAX_FRAME)
        if address[2] == _PACKET_OUTGOING:
            return None
        return port, frame, None

    def deliver(self, item: Received) -> list[Emitted]:
        port, frame, _ = item
        pkt = self.switch.parser.parse_frame(frame, port)
        deparse = self.switch.deparser.frame
        return [
            (out.egress_port, deparse(out), None)
            for out in answer(self.switch, self.static_jobs, pkt)
        ]
