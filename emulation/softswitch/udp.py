"""UDP mode: the soft switch behind one UDP socket (loopback by default), no root needed.

Each datagram is one packet on ingress port 0; the socket address it came
from stands for its IPv4 source and UDP source port, and each emitted packet
goes to the IPv4/UDP destination the pipeline gave it.

``UdpSwitch`` serves it with the compiled engine (the default): batches of
datagrams per ``recvmmsg``/``sendmmsg``, the pipeline and the fault injectors
in C with the GIL released; Python runs only between batches, to notice a
stop and to answer what the engine punts (a static job's JOIN).
``PythonUdpSwitch`` serves it with the Python pipeline, packet by packet.
"""

from __future__ import annotations

import socket

from switchreduce import wire
from switchreduce.emulation.softswitch.engine import (
    CompiledDatapath,
    EngineName,
    PythonDatapath,
)
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.softswitch.pipeline import SoftSwitch, int_to_ip, ip_to_int
from switchreduce.emulation.softswitch.runtime import (
    Emitted,
    EngineLoop,
    PacketLoop,
    Punted,
    Received,
)
from switchreduce.emulation.softswitch.static import StaticJob


def force_buffers(sock: socket.socket, size: int) -> None:
    """Raise socket buffers past net.core.*mem_max when allowed (root), else ask normally."""
    for forced, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _bound(address: tuple[str, int], buffer_bytes: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    force_buffers(sock, buffer_bytes)
    sock.bind(address)
    return sock


class UdpSwitch(EngineLoop):
    """UDP mode on the compiled engine."""

    def __init__(
        self,
        switch: SoftSwitch,
        address: tuple[str, int] = ("127.0.0.1", wire.DEFAULT_SWITCH_PORT),
        faults: FaultSpec | None = None,
        buffer_bytes: int = 8 << 20,
    ) -> None:
        sock = _bound(address, buffer_bytes)
        self.address: tuple[str, int] = sock.getsockname()
        super().__init__(switch, {0: sock}, CompiledDatapath(switch, self.address), faults)
        self._fd = sock.fileno()

    def serve_batches(self, budget: float) -> int:
        return self.datapath.engine.serve(self._fd, budget)

    def answer(self, punted: Punted) -> None:
        data, ip, udp_port, _ = punted
        for (host, to_port), out in self.datapath.punt(data, (int_to_ip(ip), udp_port)):
            self.datapath.engine.transmit(self._fd, ip_to_int(host), to_port, out)


class PythonUdpSwitch(PacketLoop):
    """UDP mode on the Python pipeline (``--engine python``)."""

    def __init__(
        self,
        switch: SoftSwitch,
        address: tuple[str, int] = ("127.0.0.1", wire.DEFAULT_SWITCH_PORT),
        faults: FaultSpec | None = None,
        buffer_bytes: int = 8 << 20,
    ) -> None:
        sock = _bound(address, buffer_bytes)
        super().__init__(switch, {0: sock}, faults)
        self.address: tuple[str, int] = sock.getsockname()
        self.datapath = PythonDatapath(switch, self.address)
        self._max_datagram = wire.datagram_bytes(switch.k) + 1  # a spare byte exposes oversize

    @property
    def static_jobs(self) -> list[StaticJob]:
        return self.datapath.static_jobs

    @static_jobs.setter
    def static_jobs(self, jobs: list[StaticJob]) -> None:
        self.datapath.static_jobs = list(jobs)

    def receive(self, port: int, sock: socket.socket) -> Received:
        data, source = sock.recvfrom(self._max_datagram)
        return port, data, source

    def deliver(self, item: Received) -> list[Emitted]:
        _, data, source = item
        return [(0, out, destination) for destination, out in self.datapath.process(data, source)]


def udp_switch(
    switch: SoftSwitch,
    address: tuple[str, int],
    faults: FaultSpec | None = None,
    engine: EngineName = "compiled",
) -> UdpSwitch | PythonUdpSwitch:
    """UDP mode on the engine named."""
    kind = UdpSwitch if engine == "compiled" else PythonUdpSwitch
    return kind(switch, address, faults)
