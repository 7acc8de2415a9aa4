"""UDP mode: the soft switch behind one loopback (or any) UDP socket, no root needed.

Each datagram is one packet on ingress port 0; the socket address it came
from stands for its IPv4 source and UDP source port, and each emitted packet
goes to the IPv4/UDP destination the pipeline gave it.
"""

from __future__ import annotations

import socket
import threading
import time

from emulation.softswitch.faults import FaultInjector, FaultSpec
from emulation.softswitch.pipeline import DropReason, SoftSwitch, SwitchReduceDeparser, int_to_ip
from switchreduce import wire

#: Sleep when no packet is waiting, so that one wake-up drains a batch (as NIC interrupt
#: coalescing does) instead of costing a context switch per packet.
_COALESCE = 0.0002
#: Empty polls in a row after which held (reordered) packets are released.
_IDLE_ROUNDS = 10


def _force_buffer(sock: socket.socket, size: int) -> None:
    """Raise the socket buffers past net.core.*mem_max when allowed (root), else ask normally."""
    for forced, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


class UdpSwitch:
    """Serves a SoftSwitch on a UDP socket until ``stop``."""

    def __init__(
        self,
        switch: SoftSwitch,
        address: tuple[str, int] = ("127.0.0.1", wire.DEFAULT_SWITCH_PORT),
        faults: FaultSpec | None = None,
        buffer_bytes: int = 8 << 20,
    ) -> None:
        self.switch = switch
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _force_buffer(self.sock, buffer_bytes)
        self.sock.bind(address)
        # Non-blocking: a socket timeout would poll before every call.
        self.sock.setblocking(False)
        spec = faults or FaultSpec()
        self.ingress_faults: FaultInjector[tuple[bytes, tuple[str, int]]] = FaultInjector(spec, 1)
        self.egress_faults: FaultInjector[tuple[bytes, tuple[str, int]]] = FaultInjector(spec, 2)
        self.tx_overruns = 0
        self._max_datagram = wire.datagram_bytes(switch.k) + 1  # one spare byte exposes oversize
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def serve_forever(self) -> None:
        sock = self.sock
        local = self.address
        idle = 0
        while not self._stop.is_set():
            try:
                received = sock.recvfrom(self._max_datagram)
            except BlockingIOError:
                time.sleep(_COALESCE)
                idle += 1
                if idle == _IDLE_ROUNDS:  # link idle: release held (reordered) packets
                    for item in self.ingress_faults.flush():
                        self._process(*item, local)
                    self._send(self.egress_faults.flush())
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            idle = 0
            for data, source in self.ingress_faults.admit(received):
                self._process(data, source, local)

    def _process(self, data: bytes, source: tuple[str, int], local: tuple[str, int]) -> None:
        switch = self.switch
        pkt = switch.parser.parse_datagram(data, source, local)
        for out in switch.process(pkt):
            item = (SwitchReduceDeparser.datagram(out), (int_to_ip(out.ip_dst), out.udp_dport))
            self._send(self.egress_faults.admit(item))

    def _send(self, items: list[tuple[bytes, tuple[str, int]]]) -> None:
        for datagram, destination in items:
            try:
                self.sock.sendto(datagram, destination)
            except BlockingIOError:
                self.tx_overruns += 1  # socket buffer full: lost, as on a congested port

    def report(self) -> dict:
        """Drop counters by reason, per-job counters, and what the injectors did."""
        ingress = self.switch.ingress
        jobs = {
            stat.name.lower(): {
                job: packets for job, packets in enumerate(counter.packets) if packets
            }
            for stat, counter in ingress.job_stats.items()
        }
        return {
            "cpu_seconds": round(time.process_time(), 3),
            "tx_overruns": self.tx_overruns,
            "drops": {r.name.lower(): ingress.drops.packets[r] for r in DropReason},
            "jobs": jobs,
            "faults": {
                "ingress": vars(self.ingress_faults.stats),
                "egress": vars(self.egress_faults.stats),
            },
        }

    def start(self) -> UdpSwitch:
        self._thread = threading.Thread(target=self.serve_forever, name="udp-switch", daemon=True)
        self._thread.start()
        return self

    def stop_soon(self) -> None:
        """Ask the serving loop to return (safe from a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sock.close()

    def __enter__(self) -> UdpSwitch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
