"""Never a wrong sum: sessions across reruns and restarts, ranks that disagree, a dead switch.

Every case here once returned a silently wrong sum or a bare socket error
(issue 8). Real sockets and, where a restart is the point, real processes.
"""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from switchreduce import wire
from switchreduce.emulation.softswitch.pipeline import SoftSwitch
from switchreduce.emulation.softswitch.static import StaticJob
from switchreduce.emulation.softswitch.udp import UdpSwitch
from switchreduce.launch import LISTENING, START_TIMEOUT, Child, cli_command, release
from switchreduce.p4runtime.jobs import Job, Member
from switchreduce.ports import free_udp_ports
from switchreduce.worker.errors import (
    MismatchError,
    SessionEndedError,
    SwitchTimeoutError,
    WorkerError,
)
from switchreduce.worker.reference import check, synthetic_tensor
from switchreduce.worker.shim import JobBinding, SwitchCommunicator, WorkerOptions
from tests.helpers.net import bound_udp_sockets
from tests.helpers.threads import in_threads
from tests.helpers.workers import assert_exact, loopback_workers

K = 64
SLOTS = 4


@contextmanager
def static_switch(world_size: int, slots: int = SLOTS) -> Iterator[tuple[UdpSwitch, list[int]]]:
    """A soft switch on loopback whose job came from its command line (ranks JOIN it)."""
    ports = free_udp_ports(world_size)
    switch = SoftSwitch(k=K)
    members = tuple(Member(r, "127.0.0.1", port) for r, port in enumerate(ports))
    server = UdpSwitch(switch, ("127.0.0.1", 0))
    server.static_jobs = [StaticJob(switch, Job(1, world_size, 0, slots, 0, members))]
    server.start()
    try:
        yield server, ports
    finally:
        server.stop()


def communicator(
    server: UdpSwitch, port: int, rank: int, world_size: int, slots: int = SLOTS, **options
) -> SwitchCommunicator:
    """A rank's communicator for the static job (its constructor JOINs the switch)."""
    binding = JobBinding(1, rank, world_size, slots, server.address)
    opts = WorkerOptions(k=K, timeout=options.pop("timeout", 5.0), **options)
    return SwitchCommunicator(binding, opts, bind=("127.0.0.1", port))


def run_once(server: UdpSwitch, ports: list[int], inputs: list) -> list[Any]:
    """New communicators (a new run of the job) sum ``inputs``; each rank's result or error."""

    def work(rank: int) -> object:
        with communicator(server, ports[rank], rank, len(ports)) as comm:
            return comm.allreduce(inputs[rank])

    return in_threads(len(ports), work)


def test_new_communicators_on_a_long_running_static_switch_sum_their_own_data() -> None:
    """Rerun against one switch: rounds restart at 1 but the switch must not replay old sums."""
    with static_switch(2) as (server, ports):
        first = run_once(server, ports, [np.array([1], np.int32), np.array([2], np.int32)])
        assert [r.tolist() for r in first] == [[3], [3]]
        second = run_once(server, ports, [np.array([10], np.int32), np.array([20], np.int32)])
        assert [r.tolist() for r in second] == [[30], [30]]


def test_a_rerun_after_a_run_that_used_every_slot_many_times_is_exact() -> None:
    with static_switch(3) as (server, ports):
        for seed in (1, 2, 3):
            inputs = [synthetic_tensor(seed, r, 40 * K + 5, "float32") for r in range(3)]
            for result in run_once(server, ports, inputs):
                assert check(result, inputs, K).exact


def test_a_new_run_ends_the_old_one_with_a_clear_error_on_its_ranks() -> None:
    """Rank 0 restarts while rank 1 of the old run still sums: rank 1 hears why it must stop."""
    with static_switch(2) as (server, ports):
        old = in_threads(2, lambda r: communicator(server, ports[r], r, 2))
        sums = in_threads(2, lambda r: old[r].allreduce(np.ones(10, np.int32)))
        assert all((s == 2).all() for s in sums)
        old[0].close()
        restarted: list[object] = []
        thread = threading.Thread(  # its JOIN starts a new run, which waits for a new rank 1
            target=lambda: restarted.extend(
                in_threads(1, lambda _: communicator(server, ports[0], 0, 2, timeout=1.0))
            )
        )
        thread.start()
        time.sleep(0.3)
        with pytest.raises(SessionEndedError, match="another run of job 1"):
            old[1].allreduce(np.ones(10, np.int32))
        thread.join()
        old[1].close()
        assert isinstance(restarted[0], SwitchTimeoutError)  # no new rank 1 ever came
        assert server.report()["drops"]["bad_session"] >= 1


def test_ranks_that_disagree_on_the_dtype_all_get_a_clear_error() -> None:
    with static_switch(4) as (server, ports):
        inputs = [np.ones(1000, np.int32) for _ in range(3)] + [np.ones(1000, np.float32)]
        results = run_once(server, ports, inputs)
        for result in results:
            assert isinstance(result, MismatchError), result
        assert any("float32 at 32 bits[1000]" in str(r) for r in results)
        assert server.report()["drops"]["mismatch"] >= 1


def test_ranks_that_disagree_on_the_length_all_get_a_clear_error() -> None:
    with static_switch(2) as (server, ports):
        results = run_once(server, ports, [np.ones(1000, np.int32), np.ones(999, np.int32)])
        for result in results:
            assert isinstance(result, MismatchError), result
            assert "int32 at 32 bits[999]" in str(result) or "[1000]" in str(result)


def test_a_static_job_rank_with_the_wrong_slot_count_is_told() -> None:
    with (
        static_switch(1, slots=8) as (server, ports),
        pytest.raises(WorkerError, match="holds the job with 8 slots"),
    ):
        communicator(server, ports[0], 0, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_are_summed_as_float32_and_come_back_in_their_dtype(dtype) -> None:
    with static_switch(2) as (server, ports):
        inputs = [torch.linspace(-3, 3, 500, dtype=dtype) * (r + 1) for r in range(2)]
        results = run_once(server, ports, inputs)
        expected = (inputs[0].float() + inputs[1].float()).to(dtype)
        for result in results:
            assert result.dtype == dtype
            assert torch.allclose(result.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_numpy_float16_comes_back_as_float16() -> None:
    with static_switch(1) as (server, ports):
        (result,) = run_once(server, ports, [np.arange(300, dtype=np.float16)])
        assert result.dtype == np.float16 and np.array_equal(result, np.arange(300))


def test_an_allreduce_allocates_at_most_three_times_its_input() -> None:
    """Memory: an allreduce of N float32 holds at most 3 x 4N bytes beyond its input."""
    elements = 2_000_000
    with static_switch(1, slots=64) as (server, ports):
        with communicator(server, ports[0], 0, 1, slots=64) as comm:
            data = synthetic_tensor(1, 0, elements, "float32")
            comm.allreduce(data[:1000])  # warm the code path
            tracemalloc.start()
            try:
                result = comm.allreduce(data)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert check(result, [data], 1024).within_bound
        print(f"allreduce of {elements:,} float32: peak {peak / 4 / elements:.2f} x 4N bytes")
        assert peak <= 3 * 4 * elements, f"peak {peak / 4 / elements:.2f} x 4N bytes"


# -- real processes ---------------------------------------------------------------


#: The static job's shape, on the switch's command line and on each worker's.
JOB_SHAPE = ("--k", "256", "--slots", "16")


@contextmanager
def switch_process(ports: list[int], listen: str = "127.0.0.1:0") -> Iterator[tuple[Child, str]]:
    """``switchreduce switch`` with a static job for ``ports``; it and where it listens."""
    command = cli_command(
        "switch", "--listen", listen, "--world-size", str(len(ports)), *JOB_SHAPE,
        *(f"--worker={r}=127.0.0.1:{p}" for r, p in enumerate(ports)),
    )  # fmt: skip
    with Child(command, "switch") as switch:
        yield switch, switch.wait_for(LISTENING)


def test_worker_commands_rerun_against_one_switch_process_are_exact() -> None:
    """The issue's reproduction: the same two worker commands, twice, seeds 1 and 2."""
    ports = free_udp_ports(2)
    with switch_process(ports) as (_, address):
        for seed in ("1", "2"):
            options = (*JOB_SHAPE, "--elements", "1000", "--seed", seed)
            with loopback_workers(address, ports, *options) as workers:
                assert_exact(workers, timeout=60)


def test_a_killed_switch_is_one_clear_timeout_naming_job_rank_switch_and_chunks() -> None:
    ports = free_udp_ports(2)
    options = (*JOB_SHAPE, "--elements", "20000000", "--timeout", "2")
    with (
        switch_process(ports) as (switch, address),
        loopback_workers(address, ports, *options, wait_for_go=True) as workers,
    ):
        release(workers, START_TIMEOUT)  # joined, tensor built: all start together
        time.sleep(0.3)  # into the transfer (20 M elements take seconds)
        killed = time.monotonic()
        switch.kill()
        for rank, worker in enumerate(workers):
            assert worker.finish(timeout=60) != 0, worker.errors[-1500:]
            err = worker.errors
            assert "SwitchTimeoutError" in err and "ConnectionRefused" not in err, err[-1500:]
            assert f"job 1 rank {rank}: no result from switch {address}" in err
            assert "chunks missing" in err
        assert time.monotonic() - killed < 2 + 10


def test_a_switch_that_comes_up_within_the_timeout_does_not_fail_the_job() -> None:
    """Workers start first (their packets meet ICMP port unreachable), the switch a bit later."""
    ports = free_udp_ports(2)
    (listen_port,) = free_udp_ports(1)
    address = f"127.0.0.1:{listen_port}"
    options = (*JOB_SHAPE, "--elements", "100000", "--timeout", "10")
    with loopback_workers(address, ports, *options) as workers:
        time.sleep(1.5)
        with switch_process(ports, listen=address):
            assert_exact(workers, timeout=60)


@pytest.mark.requires_root
def test_a_forged_source_without_the_session_cannot_inject() -> None:
    """A host forging rank 0's exact source address (raw socket) is refused and counted."""
    world_size = 2
    with static_switch(world_size, slots=8) as (server, ports):
        comms = in_threads(world_size, lambda r: communicator(server, ports[r], r, world_size, 8))
        forger = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        switch_host, switch_port = server.address
        sent = 0
        stop = threading.Event()

        def forge() -> None:
            nonlocal sent
            rng = np.random.default_rng(0)
            while not stop.is_set() and sent < 20_000:
                header = wire.Header(
                    wire.MsgType.DATA,
                    job_id=1,
                    rank=0,
                    slot=int(rng.integers(8)),
                    version=1,
                    exponent=0,
                    round=1,
                    chunk=0,
                    count=K,
                    session=int(rng.integers(1 << 62)),
                )
                payload = wire.encode(header, np.full(K, 1_000_000, np.int32))
                udp = (
                    ports[0].to_bytes(2, "big")
                    + switch_port.to_bytes(2, "big")
                    + (8 + len(payload)).to_bytes(2, "big")
                    + b"\0\0"
                )
                forger.sendto(udp + payload, (switch_host, 0))
                sent += 1
                if sent % 100 == 0:
                    time.sleep(0.005)  # at a pace the switch keeps up with: each one counted

        thread = threading.Thread(target=forge)
        thread.start()
        try:
            inputs = [synthetic_tensor(5, r, 50 * K, "float32") for r in range(world_size)]
            results = in_threads(world_size, lambda r: comms[r].allreduce(inputs[r]))
        finally:
            stop.set()
            thread.join()
            forger.close()
            for comm in comms:
                comm.close()
        for result in results:
            assert check(result, inputs, K).exact
        deadline = time.monotonic() + 5
        while server.report()["drops"]["bad_session"] < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.report()["drops"]["bad_session"] == sent > 0


def test_an_unreachable_switch_at_join_is_the_same_timeout() -> None:
    (port,) = free_udp_ports(1)
    (sock,) = bound_udp_sockets(1)
    binding = JobBinding(1, 0, 1, SLOTS, ("127.0.0.1", port))
    with pytest.raises(SwitchTimeoutError, match=f"job 1 rank 0: switch 127.0.0.1:{port}"):
        SwitchCommunicator(binding, WorkerOptions(k=K, timeout=0.5), sock)
    assert sock.fileno() == -1  # closed on failure
