"""Raw mode: the soft switch on network interfaces, one AF_PACKET socket per port (root).

This is how it runs as a Mininet switch node: whole Ethernet frames in and
out, multicast replication to ports, egress rewrite, and forwarding of all
other traffic by destination MAC (so ping, and gloo's TCP, work between the
hosts).

``RawSwitch`` serves it with the compiled engine (the default): every port's
frames in ``recvmmsg`` batches, the pipeline, the fault injectors and a
``sendmmsg`` per port in C with the GIL released; Python runs only between
batches, to notice a stop and to answer what the engine punts (a static
job's JOIN). ``PythonRawSwitch`` serves it with the Python pipeline, frame by
frame. Neither socket hears back what it sends (PACKET_IGNORE_OUTGOING).
"""

from __future__ import annotations

import fcntl
import socket
import struct
from typing import Any

from switchreduce import wire
from switchreduce.emulation.softswitch.engine import CompiledDatapath, EngineName, PythonDatapath
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.softswitch.pipeline import SoftSwitch
from switchreduce.emulation.softswitch.runtime import (
    Emitted,
    EngineLoop,
    PacketLoop,
    Punted,
    Received,
)
from switchreduce.emulation.softswitch.static import StaticJob
from switchreduce.emulation.softswitch.udp import force_buffers

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_IGNORE_OUTGOING = 23  # linux/if_packet.h, since Linux 4.20
_PACKET_OUTGOING = 4  # what we sent ourselves, looped back to the socket: ignore
_SIOCGIFMTU = 0x8921
_VLAN_TAG = 4
_MAX_FRAME = 65536


def port_socket(name: str, buffer_bytes: int) -> socket.socket:
    """An AF_PACKET socket on interface ``name``: every frame but those it sends itself.

    It takes no protocol until bound: one made for ETH_P_ALL hears every interface until
    bind narrows it to one, and would keep what it heard (loopback's traffic, say)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    force_buffers(sock, buffer_bytes)
    sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
    sock.bind((name, _ETH_P_ALL))
    return sock


def _mtu(sock: socket.socket, name: str) -> int:
    """The interface's MTU, asked through its socket (so in the switch's network namespace)."""
    request = struct.pack("16si", name.encode(), 0)
    return int(struct.unpack_from("16si", fcntl.ioctl(sock, _SIOCGIFMTU, request))[1])


def longest_frame(sockets: dict[int, socket.socket], interfaces: dict[int, str]) -> int:
    """The longest frame the ports carry: their largest MTU, an Ethernet header and room for a
    VLAN tag."""
    mtu = max(_mtu(sock, interfaces[port]) for port, sock in sockets.items())
    return mtu + wire.ETH_BYTES + _VLAN_TAG


def _port_sockets(interfaces: dict[int, str], buffer_bytes: int) -> dict[int, socket.socket]:
    return {port: port_socket(name, buffer_bytes) for port, name in interfaces.items()}


class RawSwitch(EngineLoop):
    """Raw mode on the compiled engine."""

    def __init__(
        self,
        switch: SoftSwitch,
        interfaces: dict[int, str],
        faults: FaultSpec | None = None,
        buffer_bytes: int = 8 << 20,
    ) -> None:
        sockets = _port_sockets(interfaces, buffer_bytes)
        super().__init__(switch, sockets, CompiledDatapath(switch), faults)
        self.interfaces = dict(interfaces)
        self.datapath.engine.set_ports(
            [(port, sock.fileno()) for port, sock in sockets.items()],
            longest_frame(sockets, interfaces),
        )

    def serve_batches(self, budget: float) -> int:
        return self.datapath.engine.serve_frames(budget)

    def answer(self, punted: Punted) -> None:
        frame, _, _, port = punted
        for to_port, out in self.datapath.punt_frame(frame, port):
            self.datapath.engine.transmit_frame(to_port, out)

    def traffic(self) -> dict[str, Any]:
        """Frames longer than any port's MTU are counted, not processed (``truncated``)."""
        truncated = self.datapath.engine.stats()["truncated"]
        return {**super().traffic(), "truncated": truncated}


class PythonRawSwitch(PacketLoop):
    """Raw mode on the Python pipeline (``--engine python``)."""

    def __init__(
        self,
        switch: SoftSwitch,
        interfaces: dict[int, str],
        faults: FaultSpec | None = None,
        buffer_bytes: int = 8 << 20,
    ) -> None:
        super().__init__(switch, _port_sockets(interfaces, buffer_bytes), faults)
        self.interfaces = dict(interfaces)
        self.datapath = PythonDatapath(switch)

    @property
    def static_jobs(self) -> list[StaticJob]:
        return self.datapath.static_jobs

    @static_jobs.setter
    def static_jobs(self, jobs: list[StaticJob]) -> None:
        self.datapath.static_jobs = list(jobs)

    def receive(self, port: int, sock: socket.socket) -> Received | None:
        frame, address = sock.recvfrom(_MAX_FRAME)
        if address[2] == _PACKET_OUTGOING:
            return None
        return port, frame, None

    def deliver(self, item: Received) -> list[Emitted]:
        port, frame, _ = item
        return [(to_port, out, None) for to_port, out in self.datapath.process_frame(frame, port)]


def raw_switch(
    switch: SoftSwitch,
    interfaces: dict[int, str],
    faults: FaultSpec | None = None,
    engine: EngineName = "compiled",
) -> RawSwitch | PythonRawSwitch:
    """Raw mode on the engine named."""
    kind = RawSwitch if engine == "compiled" else PythonRawSwitch
    return kind(switch, interfaces, faults)
