"""Serving a SoftSwitch on real sockets: what every runtime shares, and the Python loop.

A runtime serves its sockets until stopped, in a thread of its own (``start``)
or the caller's (``serve_forever``), and ends with a report. Two engines serve:
``PacketLoop``, the Python pipeline one packet at a time (``--engine python``),
and ``EngineLoop``, the compiled engine's batched loop in C; each mode
(``udp.py``, ``raw.py``) has one of each.

``PacketLoop`` owns one socket per switch port, reads packets into the
pipeline and writes out what it emits, with a seeded fault injector on each
direction (``ingress``: towards the pipeline, ``egress``: out of it). It sleeps
briefly whenever all ports are empty so that one wake-up drains a batch, as
NIC interrupt coalescing does, instead of a context switch per packet.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

from switchreduce.emulation.softswitch.engine import CompiledDatapath
from switchreduce.emulation.softswitch.faults import FaultInjector, FaultSpec
from switchreduce.emulation.softswitch.pipeline import DropReason, SoftSwitch
from switchreduce.emulation.softswitch.static import StaticJob

#: Longest stretch the compiled engine serves before Python checks for a stop (seconds); it
#: returns sooner when its sockets have been idle a few milliseconds or a signal arrives.
_BUDGET = 0.05
_COALESCE = 0.0002  # seconds to sleep when every port is empty
_LINK_GONE = (errno.ENETDOWN, errno.ENXIO, errno.ENODEV)
_IDLE_MS = 5  # then wait this long for traffic; silence releases held (reordered) packets

#: What a runtime reads: (ingress port, bytes, where it came from).
Received = tuple[int, bytes, Any]
#: What it writes: (egress port, bytes, where it goes).
Emitted = tuple[int, bytes, Any]


class SwitchRuntime(ABC):
    """Serves ``switch`` on ``sockets`` (port number -> socket, made non-blocking) until
    stopped."""

    #: Which engine runs the pipeline ("python" or "compiled"), as reports name it.
    engine = "python"

    def __init__(self, switch: SoftSwitch, sockets: dict[int, socket.socket]) -> None:
        self.switch = switch
        self.sockets = sockets
        for sock in sockets.values():
            sock.setblocking(False)  # a socket timeout would poll before every call
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._static_jobs: list[StaticJob] = []
        self._serving_since: os.times_result | None = None

    @property
    def static_jobs(self) -> list[StaticJob]:
        """Jobs from the command line: their JOINs go to the CPU, as packet-ins would."""
        return self._static_jobs

    @static_jobs.setter
    def static_jobs(self, jobs: list[StaticJob]) -> None:
        self._static_jobs = list(jobs)

    def serve_forever(self) -> None:
        """Serve until ``stop_soon`` (or ``stop``)."""
        self._serving_since = os.times()
        self._serve()

    @abstractmethod
    def _serve(self) -> None:
        """The serving loop: returns once ``self._stop`` is set."""

    @abstractmethod
    def traffic(self) -> dict[str, Any]:
        """Packets received and sent, sends lost to full buffers (or absent links), what the
        injectors did, the ports whose links went away."""

    def report(self) -> dict:
        """The engine, CPU time, drop counters by reason, per-job counters, the traffic."""
        ingress = self.switch.ingress
        jobs = {
            stat.alias: {job: int(n) for job, n in enumerate(counter.packets) if n}
            for stat, counter in ingress.job_stats.items()
        }
        traffic = self.traffic()
        handled = traffic["packets"]["received"] + traffic["packets"]["sent"]
        # The process's CPU (threads included) since serving began, without the interpreter's
        # start-up: what the switch costs per packet, in the engine (user) and in the kernel's
        # UDP stack (system; on loopback a send also runs the receiver's side).
        now = os.times()
        since = self._serving_since or now
        user, system = now.user - since.user, now.system - since.system
        return {
            "engine": self.engine,
            "cpu_seconds": round(time.process_time(), 3),
            "serving_cpu_seconds": {"user": round(user, 3), "system": round(system, 3)},
            "cpu_seconds_per_million_packets": round((user + system) / handled * 1e6, 3)
            if handled
            else None,
            "drops": {r.name.lower(): int(ingress.drops.packets[r]) for r in DropReason},
            "jobs": jobs,
            **traffic,
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


class PacketLoop(SwitchRuntime):
    """The Python engine's loop: one packet at a time, faults injected in Python."""

    def __init__(
        self, switch: SoftSwitch, sockets: dict[int, socket.socket], faults: FaultSpec | None
    ) -> None:
        super().__init__(switch, sockets)
        spec = faults or FaultSpec()
        self.ingress_faults: FaultInjector[Received] = FaultInjector(spec, 1)
        self.egress_faults: FaultInjector[Emitted] = FaultInjector(spec, 2)
        self.received = self.sent = self.tx_overruns = 0
        self.ports_down: list[int] = []
        self._poller = select.poll()
        for sock in sockets.values():
            self._poller.register(sock, select.POLLIN)

    @abstractmethod
    def receive(self, port: int, sock: socket.socket) -> Received | None:
        """One packet from ``sock``, None if it should be ignored; BlockingIOError when empty."""

    @abstractmethod
    def deliver(self, item: Received) -> list[Emitted]:
        """What the switch sends for a received packet, in order."""

    def transmit(self, item: Emitted) -> None:
        port, data, destination = item
        if port not in self.sockets:
            self.tx_overruns += 1  # a port the switch does not serve: lost
            return
        try:
            if destination is None:
                self.sockets[port].send(data)
            else:
                self.sockets[port].sendto(data, destination)
            self.sent += 1
        except BlockingIOError:
            self.tx_overruns += 1  # socket buffer full: lost, as on a congested port
        except OSError as exc:
            if exc.errno not in _LINK_GONE:
                raise
            self.tx_overruns += 1  # the port's link is down: lost

    def _serve(self) -> None:
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
                        self.received += 1
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
        for out in self.deliver(item):
            for emitted in self.egress_faults.admit(out):
                self.transmit(emitted)

    def traffic(self) -> dict[str, Any]:
        return {
            "packets": {"received": self.received, "sent": self.sent},
            "tx_overruns": self.tx_overruns,
            "faults": {
                "ingress": vars(self.ingress_faults.stats),
                "egress": vars(self.egress_faults.stats),
            },
            "ports_down": self.ports_down,
        }


#: What the compiled engine punts to the CPU: (bytes, source IPv4, UDP source port, port).
Punted = tuple[bytes, int, int, int]


class EngineLoop(SwitchRuntime):
    """The compiled engine's loop: it serves in C with the GIL released, up to ``_BUDGET``
    seconds a call; between calls Python notices a stop and answers what the engine punted
    (a static job's JOIN), as a P4 switch's CPU answers packet-ins."""

    engine = "compiled"

    def __init__(
        self,
        switch: SoftSwitch,
        sockets: dict[int, socket.socket],
        datapath: CompiledDatapath,
        faults: FaultSpec | None,
    ) -> None:
        super().__init__(switch, sockets)
        self.datapath = datapath
        spec = faults or FaultSpec()
        datapath.engine.set_faults(spec.loss, spec.duplicate, spec.reorder, spec.seed)

    @property
    def static_jobs(self) -> list[StaticJob]:
        return self.datapath.static_jobs

    @static_jobs.setter
    def static_jobs(self, jobs: list[StaticJob]) -> None:
        self.datapath.static_jobs = jobs

    @abstractmethod
    def serve_batches(self, budget: float) -> int:
        """Let the engine serve for at most ``budget`` seconds; the punted packets waiting."""

    @abstractmethod
    def answer(self, punted: Punted) -> None:
        """Answer one punted packet (through the engine's egress)."""

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self.serve_batches(_BUDGET):
                for punted in self.datapath.engine.take_punted():
                    self.answer(punted)

    def traffic(self) -> dict[str, Any]:
        stats = self.datapath.engine.stats()
        return {
            "packets": {"received": stats["received"], "sent": stats["sent"]},
            "tx_overruns": stats["tx_overruns"],
            "faults": {"ingress": stats["ingress"], "egress": stats["egress"]},
            "ports_down": stats["ports_down"],
        }
