"""Serving a SoftSwitch on real sockets: the loop shared by UDP mode and raw mode.

A runtime owns one socket per switch port, reads packets into the pipeline
and writes out what it emits, with a seeded fault injector on each direction
(``ingress``: towards the pipeline, ``egress``: out of it). It sleeps briefly
whenever all ports are empty so that one wake-up drains a batch, as NIC
interrupt coalescing does, instead of a context switch per packet.
"""

from __future__ import annotations

import errno
import select
import socket
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

from switchreduce.emulation.softswitch.faults import FaultInjector, FaultSpec
from switchreduce.emulation.softswitch.pipeline import DropReason, Packet, SoftSwitch
from switchreduce.emulation.softswitch.static import StaticJob

_COALESCE = 0.0002  # seconds to sleep when every port is empty
_LINK_GONE = (errno.ENETDOWN, errno.ENXIO, errno.ENODEV)
_IDLE_MS = 5  # then wait this long for traffic; silence releases held (reordered) packets

#: What a runtime reads: (ingress port, bytes, where it came from).
Received = tuple[int, bytes, Any]
#: What it writes: (egress port, bytes, where it goes).
Emitted = tuple[int, bytes, Any]


class SwitchRuntime(ABC):
    """Serves ``switch`` on ``sockets`` (port number -> non-blocking socket) until stopped."""

    def __init__(
        self, switch: SoftSwitch, sockets: dict[int, socket.socket], faults: FaultSpec | None
    ) -> None:
        self.switch = switch
        self.sockets = sockets
        spec = faults or FaultSpec()
        self.ingress_faults: FaultInjector[Received] = FaultInjector(spec, 1)
        self.egress_faults: FaultInjector[Emitted] = FaultInjector(spec, 2)
        self.tx_overruns = 0
        self.ports_down: list[int] = []
        self._poller = select.poll()
        for sock in sockets.values():
            sock.setblocking(False)  # a socket timeout would poll before every call
            self._poller.register(sock, select.POLLIN)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Jobs from the command line: their JOINs go to the CPU, as packet-ins would.
        self.static_jobs: list[StaticJob] = []

    @abstractmethod
    def receive(self, port: int, sock: socket.socket) -> Received | None:
        """One packet from ``sock``, None if it should be ignored; BlockingIOError when empty."""

    @abstractmethod
    def parse(self, item: Received) -> Packet:
        """The pipeline's view of a received packet."""

    @abstractmethod
    def emit(self, pkt: Packet) -> Emitted:
        """The bytes the pipeline's output packet leaves as, and where."""

    def transmit(self, item: Emitted) -> None:
        port, data, destination = item
        try:
            if destination is None:
                self.sockets[port].send(data)
            else:
                self.sockets[port].sendto(data, destination)
        except BlockingIOError:
            self.tx_overruns += 1  # socket buffer full: lost, as on a congested port
        except OSError as exc:
            if exc.errno not in _LINK_GONE:
                raise
            self.tx_overruns += 1  # the port's link is down: lost

    def serve_forever(self) -> None:
        sockets = list(self.sockets.items())
        while not self._stop.is_set():
            busy = False
            for port, sock in list(sockets):
                while True:
                    try:
                        item = self.receive(port, sock)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if self._stop.is_set():
                            return
                        if exc.errno not in _LINK_GONE:
                            raise
                        # The link went down (its peer was deleted): stop serving the port.
                        self.ports_down.append(port)
                        self._poller.unregister(sock)
                        sockets.remove((port, sock))
                        break
                    busy = True
                    if item is not None:
                        for admitted in self.ingress_faults.admit(item):
                            self._process(admitted)
            if not busy:
                time.sleep(_COALESCE)
                if not self._poller.poll(_IDLE_MS):
                    for held in self.ingress_faults.flush():
                        self._process(held)
                    for held in self.egress_faults.flush():
                        self.transmit(held)

    def _process(self, item: Received) -> None:
        pkt = self.parse(item)
        cpu = next((job for job in self.static_jobs if job.handles(pkt)), None)
        for out in cpu.join(pkt) if cpu else self.switch.process(pkt):
            for emitted in self.egress_faults.admit(self.emit(out)):
                self.transmit(emitted)

    def report(self) -> dict:
        """Drop counters by reason, per-job counters, what the injectors did, CPU time."""
        ingress = self.switch.ingress
        jobs = {
            stat.alias: {job: n for job, n in enumerate(counter.packets) if n}
            for stat, counter in ingress.job_stats.items()
        }
        return {
            "cpu_seconds": round(time.process_time(), 3),
            "tx_overruns": self.tx_overruns,
            "ports_down": self.ports_down,
            "drops": {r.name.lower(): ingress.drops.packets[r] for r in DropReason},
            "jobs": jobs,
            "faults": {
                "ingress": vars(self.ingress_faults.stats),
                "egress": vars(self.egress_faults.stats),
            },
        }

    def start(self) -> SwitchRuntime:
        self._thread = threading.Thread(target=self.serve_forever, name="switch", daemon=True)
        self._thread.start()
        return self

    def stop_soon(self) -> None:
        """Ask the serving loop to return (safe from a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for sock in self.sockets.values():
            sock.close()

    def __enter__(self) -> SwitchRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
