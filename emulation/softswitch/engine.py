"""The soft switch's two engines, behind one in-process interface.

``python``: the pipeline of ``pipeline.py``, one packet at a time; it is the
specification, and where switch logic is prototyped. ``compiled``: the same
pipeline in C (``_engine.c``, built by ``pip install``), which also serves the
sockets with batched system calls and the GIL released: UDP mode's socket
(``udp.UdpSwitch``) and raw mode's ports (``raw.RawSwitch``).

The compiled engine keeps no state of its own that the control plane cannot
see. :func:`bind` turns the switch's registers and counters into numpy views
of the engine's memory (so every reader, P4Runtime included, reads the
engine) and attaches the engine to its tables and multicast groups, which
then hand it every write: the controller's P4Runtime server and the static
job program the compiled switch through the very objects they program the
Python one with. A JOIN for a static job is the switch CPU's business
(``static.StaticJob``): the engine punts it to Python, as a P4 switch punts
packet-ins to its controller.

Both engines map a datagram and its source (UDP mode), or a frame and its
ingress port (raw mode), to what the switch sends (``process``,
``process_frame``), which is what the differential tests compare
(tests/test_engine.py, tests/test_engine_raw.py), with every register and
counter.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from switchreduce.emulation.softswitch import _engine
from switchreduce.emulation.softswitch.pipeline import (
    MAX_JOBS,
    Replicas,
    SoftSwitch,
    SwitchReduceDeparser,
    int_to_ip,
    ip_to_int,
)
from switchreduce.emulation.softswitch.static import StaticJob, answer
from switchreduce.emulation.softswitch.tables import ActionCall
from switchreduce.p4runtime import names

EngineName = Literal["compiled", "python"]
ENGINES: tuple[EngineName, ...] = ("compiled", "python")

#: An IPv4 address and UDP port.
Address = tuple[str, int]
#: What a datagram makes the switch send: (destination, UDP payload), in order.
Emitted = list[tuple[Address, bytes]]
#: What a frame makes the switch send: (egress port, frame), in order.
Frames = list[tuple[int, bytes]]
#: Raw mode has no address of its own: the frames carry theirs.
NO_ADDRESS: Address = ("0.0.0.0", 0)


class PythonDatapath:
    """The Python pipeline: datagrams on ingress port 0 to and from ``address`` (UDP mode, as
    ``udp.py`` serves it), or frames on the switch's ports (raw mode)."""

    def __init__(self, switch: SoftSwitch, address: Address = NO_ADDRESS) -> None:
        self.switch = switch
        self.address = address
        #: Jobs from the command line: their JOINs go to the CPU.
        self.static_jobs: list[StaticJob] = []

    def process(self, datagram: bytes, source: Address) -> Emitted:
        pkt = self.switch.parser.parse_datagram(datagram, source, self.address)
        return [
            ((int_to_ip(out.ip_dst), out.udp_dport), SwitchReduceDeparser.datagram(out))
            for out in answer(self.switch, self.static_jobs, pkt)
        ]

    def process_frame(self, frame: bytes, port: int) -> Frames:
        pkt = self.switch.parser.parse_frame(frame, port)
        deparse = self.switch.deparser.frame
        return [
            (out.egress_port, deparse(out)) for out in answer(self.switch, self.static_jobs, pkt)
        ]


class CompiledDatapath:
    """The compiled engine, bound to ``switch``'s tables, registers and counters; a static
    job's JOINs go to the Python CPU path."""

    def __init__(self, switch: SoftSwitch, address: Address = NO_ADDRESS) -> None:
        self.switch = switch
        ingress = switch.ingress
        self.engine = _engine.Engine(
            switch.k, ingress.pool_size, MAX_JOBS, ingress.workers.size, ingress.forward.size
        )
        bind(switch, self.engine)
        self._cpu = PythonDatapath(switch, address)

    @property
    def static_jobs(self) -> list[StaticJob]:
        return self._cpu.static_jobs

    @static_jobs.setter
    def static_jobs(self, jobs: list[StaticJob]) -> None:
        self._cpu.static_jobs = list(jobs)
        self.engine.set_punted_jobs([job.job.job_id for job in jobs])

    def process(self, datagram: bytes, source: Address) -> Emitted:
        out = self.engine.process(datagram, ip_to_int(source[0]), source[1])
        if out is None:  # punted: the CPU answers
            return self.punt(datagram, source)
        return [((int_to_ip(ip), port), data) for ip, port, data in out]

    def punt(self, datagram: bytes, source: Address) -> Emitted:
        """A datagram the engine punted, answered by the CPU (a static job's JOIN)."""
        return self._cpu.process(datagram, source)

    def process_frame(self, frame: bytes, port: int) -> Frames:
        out = self.engine.process_frame(frame, port)
        return self.punt_frame(frame, port) if out is None else out

    def punt_frame(self, frame: bytes, port: int) -> Frames:
        """A frame the engine punted, answered by the CPU (a static job's JOIN)."""
        return self._cpu.process_frame(frame, port)


def bind(switch: SoftSwitch, engine: _engine.Engine) -> None:
    """Make ``engine`` hold ``switch``'s state: registers and counters in its memory, tables
    and multicast groups written through to it; what is there already is copied in."""
    memory = memoryview(engine)  # numpy views hold it, and through it the engine
    layout = engine.layout()

    def cells(name: str) -> np.ndarray:
        offset, count, dtype = layout[name]
        return np.frombuffer(memory, dtype=dtype, count=count, offset=offset)

    for register in switch.registers().values():
        found = cells(_short(register.name))
        register.bind(found.reshape(-1, register.columns) if register.columns > 1 else found)
    for counter in switch.counters().values():
        name = _short(counter.name)
        sink = _CounterSink(engine, _engine.COUNTERS.index(name))
        counter.bind(sink, cells(f"{name}.packets"), cells(f"{name}.bytes"))
    ingress = switch.ingress
    ingress.jobs.attach(_TableSink(engine, _engine.JOBS, names.SET_JOB))
    ingress.workers.attach(_TableSink(engine, _engine.WORKERS, names.ADMIT_WORKER))
    ingress.forward.attach(_TableSink(engine, _engine.FORWARD, names.SET_EGRESS_PORT))
    switch.egress.result_rewrite.attach(
        _TableSink(engine, _engine.RESULT_REWRITE, names.REWRITE_DESTINATION)
    )
    switch.pre.groups.attach(_GroupSink(engine))


def _short(p4_name: str) -> str:
    """``SwitchReduceIngress.round`` -> ``round``: the engine's name for it."""
    return p4_name.rsplit(".", 1)[1]


class _TableSink:
    """One of the engine's tables. An entry of ``action`` carries its arguments; one of
    NoAction is a hit that sets nothing."""

    def __init__(self, engine: _engine.Engine, table: int, action: names.ActionSpec) -> None:
        self.engine, self.table, self.action = engine, table, action.name

    def write(self, key: tuple[int, ...], call: ActionCall) -> None:
        self.engine.write_entry(self.table, key, call.args if call.name == self.action else None)

    def delete(self, key: tuple[int, ...]) -> None:
        self.engine.delete_entry(self.table, key)

    def clear(self) -> None:
        self.engine.clear_table(self.table)


class _CounterSink:
    def __init__(self, engine: _engine.Engine, counter: int) -> None:
        self.engine, self.counter = engine, counter

    def count(self, index: int, nbytes: int) -> None:
        self.engine.count(self.counter, index, nbytes)

    def set(self, index: int, packets: int, nbytes: int) -> None:
        self.engine.set_counter(self.counter, index, packets, nbytes)


class _GroupSink:
    def __init__(self, engine: _engine.Engine) -> None:
        self.engine = engine

    def set(self, group: int, replicas: Replicas) -> None:
        self.engine.set_group(group, replicas)

    def delete(self, group: int) -> None:
        self.engine.delete_group(group)
