"""Shared fixtures and the gating of tests that need root, p4c or BMv2."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import pytest

from switchreduce import wire
from switchreduce.emulation.softswitch.engine import EngineName
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.softswitch.p4runtime_server import serve
from switchreduce.emulation.softswitch.pipeline import SoftSwitch
from switchreduce.emulation.softswitch.runtime import SwitchRuntime
from switchreduce.emulation.softswitch.static import install_static_job
from switchreduce.emulation.softswitch.udp import UdpSwitch, udp_switch
from switchreduce.emulation.topo import netem_available
from switchreduce.p4runtime.jobs import Job, Member
from switchreduce.ports import free_tcp_port
from switchreduce.worker.shim import JobBinding, SwitchCommunicator, WorkerOptions
from tests.helpers.net import bound_udp_sockets
from tests.helpers.threads import each_rank

_NEEDS: dict[str, tuple[Callable[[], bool], str]] = {
    "requires_root": (lambda: os.geteuid() == 0, "needs root"),
    "requires_p4c": (lambda: shutil.which("p4c-bm2-ss") is not None, "p4c-bm2-ss not on PATH"),
    "requires_netem": (netem_available, "the kernel has no sch_netem (tc link loss and delay)"),
    "requires_bmv2": (
        lambda: shutil.which("simple_switch_grpc") is not None,
        "simple_switch_grpc not on PATH",
    ),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, (available, reason) in _NEEDS.items():
        if available():
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@dataclass
class RunningJob:
    """A running soft switch and one communicator per rank."""

    server: SwitchRuntime
    comms: list[SwitchCommunicator]
    finished: list[float] = field(default_factory=list)
    finished_calls: list[list[float]] = field(default_factory=list)

    @property
    def switch(self) -> SoftSwitch:
        return self.server.switch

    def drops(self) -> dict[str, int]:
        return self.server.report()["drops"]

    def allreduce(self, inputs: list, late: dict[int, float] | None = None) -> list:
        """Every rank's result, each rank in its own thread; re-raises a rank's exception.
        ``late``: seconds a rank waits before it calls (a straggler); ``finished`` then holds
        when each rank's call returned, from the start."""
        results = self.allreduce_calls([inputs], late)
        self.finished = [times[0] for times in self.finished_calls]
        return results[0]

    def allreduce_calls(self, calls: list[list], late: dict[int, float] | None = None) -> list:
        """Each call's results: every rank makes the calls one after the other, in its own
        thread, ``late[rank]`` seconds after the others start; ``finished_calls[rank]`` then
        holds when each of its calls returned, from the start."""
        self.finished_calls = [[0.0] * len(calls) for _ in self.comms]
        start = time.monotonic()

        def run(rank: int) -> list:
            time.sleep((late or {}).get(rank, 0.0))
            results = []
            for i, inputs in enumerate(calls):
                results.append(self.comms[rank].allreduce(inputs[rank]))
                self.finished_calls[rank][i] = time.monotonic() - start
            return results

        by_rank = each_rank(len(self.comms), run)
        return [list(call) for call in zip(*by_rank, strict=True)]


@contextmanager
def running_job(
    world_size: int,
    k: int = wire.DEFAULT_K,
    slots: int = 16,
    faults: FaultSpec | None = None,
    options: WorkerOptions | None = None,
    job_id: int = 1,
    engine: EngineName = "compiled",
    quorum: int | None = None,
) -> Iterator[RunningJob]:
    """A soft switch on loopback with one job and ``world_size`` bound workers.

    The job is installed as a controller admits one, session included, so the
    communicators start without joining.
    """
    socks = bound_udp_sockets(world_size)
    switch = SoftSwitch(k=k)
    endpoints = tuple(
        Member(rank, "127.0.0.1", sock.getsockname()[1]) for rank, sock in enumerate(socks)
    )
    session = wire.new_session()
    install_static_job(switch, Job(job_id, world_size, 0, slots, session, endpoints, quorum))
    server = udp_switch(switch, ("127.0.0.1", 0), faults, engine)
    server.start()
    options = options or WorkerOptions(k=k, timeout=20.0)
    comms = [
        SwitchCommunicator(
            JobBinding(job_id, r, world_size, slots, server.address, session, quorum=quorum),
            options,
            s,
        )
        for r, s in enumerate(socks)
    ]
    try:
        yield RunningJob(server, comms)
    finally:
        for comm in comms:
            comm.close()
        server.stop()


@pytest.fixture
def job_factory() -> Callable[..., AbstractContextManager[RunningJob]]:
    return running_job


@dataclass
class ProgrammableSwitch:
    """A soft switch a controller programs over P4Runtime, with a UDP data plane."""

    switch: SoftSwitch
    p4runtime: str  # HOST:PORT of its P4Runtime server
    data_plane: tuple[str, int]  # where workers send


@pytest.fixture
def programmable_switch() -> Iterator[ProgrammableSwitch]:
    switch = SoftSwitch(k=256)
    address = f"127.0.0.1:{free_tcp_port()}"
    grpc_server = serve(switch, address)
    data_plane = UdpSwitch(switch, ("127.0.0.1", 0))
    data_plane.start()
    yield ProgrammableSwitch(switch, address, data_plane.address)
    data_plane.stop()
    grpc_server.stop(grace=None)
