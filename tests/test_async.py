"""Asynchronous allreduce (SwitchCommunicator.allreduce_async) through a soft switch on loopback."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from switchreduce.worker.ddp import average
from switchreduce.worker.errors import MismatchError, SwitchTimeoutError
from switchreduce.worker.ordered import ClosedError, OrderedExecutor
from switchreduce.worker.reference import check, synthetic_tensor
from switchreduce.worker.shim import SwitchCommunicator, WorkerOptions

K = 256


def _thread_names() -> set[str]:
    return {thread.name for thread in threading.enumerate()}


def _outcome(future) -> Any:
    """A torch or concurrent.futures future's value, or the exception it failed with."""
    try:
        return future.wait() if isinstance(future, torch.futures.Future) else future.result()
    except Exception as exc:
        return exc


def test_many_calls_in_flight_each_get_their_own_sum_in_call_order(job_factory) -> None:
    """Every rank queues 24 tensors of distinct lengths and dtypes (numpy and torch), with a
    synchronous allreduce in the middle: any call out of order on any rank would sum the
    wrong tensors together, or meet a length mismatch at the switch."""
    world_size, calls = 3, 24
    lengths = [1 + 397 * i for i in range(calls)]  # 1 .. ~9,000 elements: 1 to 36 chunks

    def tensor(call: int, rank: int):
        kind = ("int32", "float32")[call % 2]
        array = synthetic_tensor(call, rank, lengths[call], kind)
        return torch.from_numpy(array) if call % 3 == 0 else array

    inputs = [[tensor(call, rank) for call in range(calls)] for rank in range(world_size)]
    middle = calls // 2
    with job_factory(world_size, k=K, slots=8) as job:
        finished: list[list[int]] = [[] for _ in range(world_size)]

        def start(rank: int, call: int):
            future = job.comms[rank].allreduce_async(inputs[rank][call])
            if isinstance(future, torch.futures.Future):
                future.then(lambda _: finished[rank].append(call))
            else:
                future.add_done_callback(lambda _: finished[rank].append(call))
            return future

        def rank_calls(rank: int) -> list:
            before = [start(rank, call) for call in range(middle)]
            in_turn = job.comms[rank].allreduce(inputs[rank][middle])  # after those before it
            finished[rank].append(middle)
            after = [start(rank, call) for call in range(middle + 1, calls)]
            return [*map(_outcome, before), in_turn, *map(_outcome, after)]

        with concurrent.futures.ThreadPoolExecutor(world_size) as pool:
            results = list(pool.map(rank_calls, range(world_size)))
    assert finished == [list(range(calls))] * world_size
    for call in range(calls):
        arrays = [np.asarray(inputs[rank][call]) for rank in range(world_size)]
        for rank in range(world_size):
            result = results[rank][call]
            assert type(result) is type(inputs[rank][call]), (call, result)
            verdict = check(np.asarray(result), arrays, K)
            assert verdict.exact and verdict.within_bound, (call, rank, verdict)


def test_the_future_is_pending_until_the_peers_send_then_holds_the_average(job_factory) -> None:
    """The DDP hook's future: returned at once, completed from the communicator's thread."""
    with job_factory(2, k=K) as job:
        first = average(job.comms[0], torch.full((1000,), 1.0))
        time.sleep(0.3)
        assert not first.done()  # rank 1 has not sent: the sum cannot be there yet
        second = average(job.comms[1], torch.full((1000,), 3.0))
        assert torch.equal(first.wait(), torch.full((1000,), 2.0))
        assert torch.equal(second.wait(), torch.full((1000,), 2.0))


def test_an_error_fails_its_future_and_every_later_one(job_factory) -> None:
    """The ranks disagree on the second tensor's dtype: the switch refuses it; the third
    never runs, because the communicator is unusable after an error."""
    ones = np.ones(1000, np.int32)
    with job_factory(2, k=K) as job:
        per_rank = [
            [comm.allreduce_async(t) for t in (ones, second, ones)]
            for comm, second in zip(job.comms, (ones, ones.astype(np.float32)), strict=True)
        ]
        for futures in per_rank:
            first, refused, later = map(_outcome, futures)
            assert np.array_equal(first, 2 * ones)
            assert isinstance(refused, MismatchError), refused
            assert isinstance(later, MismatchError), later
            assert "failed before" in str(later)
        with pytest.raises(MismatchError, match="failed before"):
            job.comms[0].allreduce(ones)


def test_a_stalled_call_times_out_and_the_ones_behind_it_fail_too(job_factory) -> None:
    options = WorkerOptions(k=K, timeout=0.5)
    with job_factory(2, k=K, options=options) as job:
        futures = [job.comms[0].allreduce_async(torch.ones(300)) for _ in range(3)]
        outcomes = [_outcome(f) for f in futures]  # rank 1 never sends
    assert all(isinstance(o, SwitchTimeoutError) for o in outcomes), outcomes
    assert "chunks missing" in str(outcomes[0])
    assert all("failed before" in str(o) for o in outcomes[1:])


def test_close_fails_what_has_not_started_lets_the_running_one_finish_and_stops_the_thread(
    job_factory,
) -> None:
    with job_factory(2, k=K) as job:
        comm: SwitchCommunicator = job.comms[0]
        futures = [comm.allreduce_async(np.full(5000, i, np.int32)) for i in range(5)]
        deadline = time.monotonic() + 5
        while comm.stats.packets_sent == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the first transfer is on the wire, waiting for rank 1
        thread_name = "allreduce job 1 rank 0"
        assert thread_name in _thread_names()
        peer = threading.Timer(0.3, job.comms[1].allreduce, [np.full(5000, 10, np.int32)])
        peer.start()
        started = time.monotonic()
        comm.close()
        closed_after = time.monotonic() - started
        peer.join()
        outcomes = [_outcome(f) for f in futures]
        assert np.array_equal(outcomes[0], np.full(5000, 10, np.int32))  # it was in flight
        for outcome in outcomes[1:]:
            assert isinstance(outcome, ClosedError), outcome
            assert "closed before this allreduce started" in str(outcome)
        assert 0.25 < closed_after < 5  # close waited for the running transfer, no longer
        assert thread_name not in _thread_names()
        with pytest.raises(ClosedError):
            comm.allreduce_async(np.ones(3, np.int32))
        with pytest.raises(ClosedError):
            comm.allreduce(np.ones(3, np.int32))


def test_a_numpy_future_cannot_be_cancelled_once_queued(job_factory) -> None:
    """Every rank must send every tensor it queued, or the others would stall."""
    with job_factory(1, k=K) as job:
        future = job.comms[0].allreduce_async(np.arange(10, dtype=np.int32))
        assert not future.cancel()
        assert np.array_equal(future.result(timeout=10), np.arange(10, dtype=np.int32))


def test_a_synchronous_call_from_the_communicators_own_thread_is_refused_not_a_deadlock() -> None:
    """A callback runs on the executor's thread; waiting there for queued calls never ends."""
    executor = OrderedExecutor("test")
    started, release = threading.Event(), threading.Event()
    inner: concurrent.futures.Future[BaseException | None] = concurrent.futures.Future()

    def blocker() -> None:
        started.set()
        release.wait(5)

    def calls_sync() -> None:
        try:
            executor.run(lambda: None)
        except RuntimeError as exc:
            inner.set_result(exc)
        else:
            inner.set_result(None)

    executor.submit(blocker, concurrent.futures.Future())
    executor.submit(calls_sync, concurrent.futures.Future())
    executor.submit(
        lambda: None, concurrent.futures.Future()
    )  # queued behind: the sync call would wait for it
    started.wait(5)
    release.set()
    assert "own thread" in str(inner.result(timeout=5))
    executor.close()
