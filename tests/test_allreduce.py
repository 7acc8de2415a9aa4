"""Allreduce through a running soft switch over real UDP sockets on loopback.

Every test runs each worker engine: the window in C with its batched socket
loop (the default) and the Python window, the reference.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import numpy as np
import pytest
import torch

from switchreduce import wire
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.worker import quantize as q
from switchreduce.worker.engine import ENGINES, EngineName
from switchreduce.worker.errors import NonFiniteError
from switchreduce.worker.reference import check, reference_sum, synthetic_tensor
from switchreduce.worker.shim import WorkerOptions

K = 256


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> EngineName:
    """The worker engine a test runs (each test runs both)."""
    return request.param


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 8])
def test_int32_sums_are_exact(job_factory, world_size: int, engine: EngineName) -> None:
    inputs = [synthetic_tensor(1, r, 20_000, "int32") for r in range(world_size)]
    options = WorkerOptions(k=K, timeout=20.0, engine=engine)
    with job_factory(world_size, k=K, options=options) as job:
        results = job.allreduce(inputs)
    expected = np.sum(inputs, axis=0, dtype=np.int64).astype(np.int32)
    for result in results:
        assert result.dtype == np.int32
        assert np.array_equal(result, expected)


@pytest.mark.parametrize("length", [0, 1, K - 1, K, K + 1, 1_000_000])
def test_float32_sums_are_within_the_bound_for_any_length(
    job_factory, length: int, engine: EngineName
) -> None:
    world_size = 3
    inputs = [synthetic_tensor(2, r, length, "float32") for r in range(world_size)]
    options = WorkerOptions(k=K, timeout=20.0, engine=engine)
    with job_factory(world_size, k=K, slots=64, options=options) as job:
        results = job.allreduce(inputs)
    for result in results:
        assert result.shape == (length,) and result.dtype == np.float32
        verdict = check(result, inputs, K)
        assert verdict.exact and verdict.within_bound, verdict


@pytest.mark.parametrize("bits", [8, 16, 24])
def test_fewer_precision_bits_coarsen_the_sum_within_their_bound(
    job_factory, bits: int, engine: EngineName
) -> None:
    world_size = 4
    inputs = [synthetic_tensor(3, r, 10_000, "float32") for r in range(world_size)]
    options = WorkerOptions(k=K, timeout=20.0, precision_bits=bits, engine=engine)
    with job_factory(world_size, k=K, options=options) as job:
        results = job.allreduce(inputs)
    full = check(results[0], inputs, K)
    for result in results:
        verdict = check(result, inputs, K, bits)
        assert verdict.exact and verdict.within_bound, verdict
    assert not full.exact  # it really is another grid than the 32-bit one


@pytest.mark.parametrize("lanes", [16, 8])
@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_narrow_lanes_sum_exactly_on_their_grid_in_fewer_bytes(
    job_factory, lanes: int, world_size: int, engine: EngineName
) -> None:
    """The switch adds packed lanes without a carry between them: each rank gets the lanes'
    fixed-point sum bit for bit, within their bound, in 1/2 or 1/4 of the packets."""
    length = 200_000
    inputs = [synthetic_tensor(4, r, length, "float32") for r in range(world_size)]
    per_packet = K * 32 // lanes
    sent = {}
    for lane_bits in (32, lanes):
        options = WorkerOptions(k=K, timeout=20.0, lane_bits=lane_bits, engine=engine)
        with job_factory(world_size, k=K, slots=8, options=options) as job:
            results = job.allreduce(inputs)
            stats = job.comms[0].stats
            sent[lane_bits] = stats.bytes_sent - stats.retransmissions * (wire.HEADER_BYTES + K * 4)
    for result in results:
        verdict = check(result, inputs, per_packet, lane_bits=lanes)
        assert verdict.exact and verdict.within_bound, verdict
    packets_of = -(-length // per_packet)  # plus a priming use per slot (a header alone)
    assert sent[lanes] == packets_of * (wire.HEADER_BYTES + K * 4) + 8 * wire.HEADER_BYTES
    assert sent[lanes] <= {16: 0.55, 8: 0.3}[lanes] * sent[32]


@pytest.mark.parametrize("lanes", [32, 8])
def test_stochastic_rounding_sums_exactly_what_each_ranks_noise_gives(
    job_factory, lanes: int, engine: EngineName
) -> None:
    """Each rank rounds with its own noise (quantize.call_key of the seed, its rank and the
    call), so the result is known bit for bit, differs from rounding to nearest, and stays
    within the stochastic bound; a second call draws other noise."""
    world_size, seed = 3, 99
    options = WorkerOptions(
        k=K, timeout=20.0, lane_bits=lanes, rounding="stochastic", rounding_seed=seed,
        engine=engine,
    )  # fmt: skip
    per_packet = K * 32 // lanes
    with job_factory(world_size, k=K, options=options) as job:
        for call in (1, 2):
            inputs = [synthetic_tensor(call, r, 30_000, "float32") for r in range(world_size)]
            results = job.allreduce(inputs)
            keys = [q.call_key(seed, r, call) for r in range(world_size)]
            nearest = reference_sum(inputs, per_packet, lane_bits=lanes)
            for result in results:
                verdict = check(result, inputs, per_packet, lane_bits=lanes, noise_keys=keys)
                assert verdict.exact and verdict.within_bound, verdict
                assert not np.array_equal(result, nearest)


def test_int32_tensors_are_refused_with_narrow_lanes(job_factory) -> None:
    options = WorkerOptions(k=K, lane_bits=8)
    with job_factory(1, k=K, options=options) as job, pytest.raises(TypeError, match="32-bit"):
        job.comms[0].allreduce(np.zeros(10, dtype=np.int32))
    with pytest.raises(ValueError, match="precision_bits must stay 32"):
        WorkerOptions(lane_bits=16, precision_bits=12)


def test_successive_calls_of_mixed_dtypes_and_shapes(job_factory, engine: EngineName) -> None:
    """Slot versions carry over between calls; each call still gets its own exact sum."""
    rng = np.random.default_rng(3)
    calls = [
        ("float32", (5, 300)),
        ("int32", (17,)),
        ("float32", (2, 2, 2)),
        ("int32", (4096,)),
        ("float32", (1,)),
    ]
    with job_factory(2, k=K, slots=4, options=WorkerOptions(k=K, engine=engine)) as job:
        for dtype, shape in calls:
            inputs = [rng.standard_normal(shape).astype(dtype) * 100 for _ in range(2)]
            results = job.allreduce(inputs)
            expected = reference_sum([x.reshape(-1) for x in inputs], K).reshape(shape)
            for result in results:
                assert result.shape == shape
                assert np.array_equal(result, expected)


def test_torch_tensors_come_back_as_torch_tensors(job_factory, engine: EngineName) -> None:
    inputs = [torch.arange(1000, dtype=torch.float32).reshape(10, 100) * (r + 1) for r in range(3)]
    with job_factory(3, k=K, options=WorkerOptions(k=K, engine=engine)) as job:
        results = job.allreduce(inputs)
    for result in results:
        assert isinstance(result, torch.Tensor) and result.dtype == torch.float32
        assert result.shape == (10, 100)
        assert torch.allclose(result, inputs[0] * 6, rtol=0, atol=1e-3)


def test_unsupported_dtype_is_rejected(job_factory) -> None:
    with job_factory(1, k=K) as job, pytest.raises(TypeError, match="float16 and bfloat16"):
        job.comms[0].allreduce(np.zeros(10, dtype=np.float64))


def test_nan_is_rejected_before_anything_is_sent(job_factory) -> None:
    values = np.ones(5000, dtype=np.float32)
    values[4321] = np.nan
    with job_factory(1, k=K) as job:
        with pytest.raises(NonFiniteError, match="index 4321"):
            job.comms[0].allreduce(values)
        assert job.comms[0].stats.packets_sent == 0


@pytest.mark.parametrize("loss", [0.01, 0.10, 0.30])
def test_exact_under_loss_in_both_directions(job_factory, loss: float, engine: EngineName) -> None:
    world_size = 4
    inputs = [synthetic_tensor(4, r, 50_000, "float32") for r in range(world_size)]
    faults = FaultSpec(loss=loss, seed=7)
    # keep backoff short at 30%
    options = WorkerOptions(k=K, timeout=20.0, max_rto=0.25, engine=engine)
    with job_factory(world_size, k=K, slots=32, faults=faults, options=options) as job:
        results = job.allreduce(inputs)
        faults = job.server.report()["faults"]
    assert faults["ingress"]["dropped"] > 0 and faults["egress"]["dropped"] > 0
    assert sum(c.stats.retransmissions for c in job.comms) > 0
    for result in results:
        verdict = check(result, inputs, K)
        assert verdict.exact and verdict.within_bound, verdict


def test_exact_under_duplication_and_reordering(job_factory, engine: EngineName) -> None:
    world_size = 4
    inputs = [synthetic_tensor(5, r, 50_000, "int32") for r in range(world_size)]
    faults = FaultSpec(loss=0.02, duplicate=0.1, reorder=0.1, seed=11)
    options = WorkerOptions(k=K, timeout=20.0, engine=engine)
    with job_factory(world_size, k=K, slots=32, faults=faults, options=options) as job:
        results = job.allreduce(inputs)
        report = job.server.report()
    assert report["faults"]["ingress"]["duplicated"] > 0
    assert report["faults"]["egress"]["reordered"] > 0
    assert report["drops"]["duplicate"] > 0  # duplicates reached the switch and were refused
    assert sum(c.stats.duplicates for c in job.comms) > 0  # and reached the workers
    expected = np.sum(inputs, axis=0, dtype=np.int64).astype(np.int32)
    for result in results:
        assert np.array_equal(result, expected)


def test_the_engines_count_the_same_datagrams_and_bytes(job_factory) -> None:
    """Without faults each rank sends and receives one datagram per chunk and a header alone
    per priming use, whichever engine runs it, however the compiled loop batches them (GSO out,
    GRO in)."""
    world_size, length, slots = 3, 300 * K + 7, 16
    inputs = [synthetic_tensor(6, r, length, "float32") for r in range(world_size)]
    datagram = 28 + 4 * K
    counted = {}
    for engine in ENGINES:
        options = WorkerOptions(k=K, timeout=20.0, engine=engine)
        with job_factory(world_size, k=K, slots=slots, options=options) as job:
            job.allreduce(inputs)
            stats = [c.stats for c in job.comms]
        for s in stats:
            resent = s.retransmissions  # a loaded machine may resend what was only late
            assert s.packets_sent == 301 + slots + resent
            assert s.packets_received >= 301 + slots
            expected_bytes = 301 * datagram + slots * wire.HEADER_BYTES
            if resent == 0:
                assert s.bytes_sent == expected_bytes
            if s.packets_received == 301 + slots:  # no answer twice
                assert s.bytes_received == expected_bytes
        counted[engine] = [s.packets_sent - s.retransmissions for s in stats]
    assert counted["compiled"] == counted["python"]


def test_a_signal_interrupts_a_compiled_transfer_that_waits(job_factory) -> None:
    """The C loop runs without the GIL but lets Python handle signals: a handler's exception
    ends a transfer stalled on a missing rank at once, not at its timeout."""

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, interrupt)
    options = WorkerOptions(k=K, timeout=30.0, engine="compiled")
    main = threading.main_thread().ident
    assert main is not None
    try:
        with job_factory(2, k=K, options=options) as job:  # rank 1 never sends
            timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGUSR1))
            timer.start()
            started = time.monotonic()
            with pytest.raises(Interrupted):
                job.comms[0].allreduce(np.ones(10 * K, np.float32))
            assert time.monotonic() - started < 5
            timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_an_unknown_engine_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="worker engine must be one of compiled, python, got 'c'"):
        WorkerOptions(engine="c")  # type: ignore[arg-type]


#: SO_NO_CHECK: no UDP checksums on send, with which the kernel refuses GSO (EINVAL).
_SO_NO_CHECK = 11


def test_a_socket_that_refuses_gso_sends_datagram_by_datagram(job_factory) -> None:
    """Where the kernel or the route refuses UDP GSO (here: a socket without checksums), the
    compiled loop sends one datagram per message from then on; nothing is lost for it."""
    world_size, length = 2, 100 * K
    inputs = [synthetic_tensor(7, r, length, "int32") for r in range(world_size)]
    options = WorkerOptions(k=K, timeout=20.0, engine="compiled")
    with job_factory(world_size, k=K, slots=16, options=options) as job:
        for comm in job.comms:
            comm.sock.setsockopt(socket.SOL_SOCKET, _SO_NO_CHECK, 1)
        results = job.allreduce(inputs)
        stats = [c.stats for c in job.comms]
    expected = np.sum(inputs, axis=0, dtype=np.int64).astype(np.int32)
    assert all(np.array_equal(r, expected) for r in results)
    for s in stats:
        assert s.packets_sent == 100 + s.retransmissions


@pytest.mark.parametrize("calls_held", [1, 4])
def test_a_quorum_runs_as_many_calls_ahead_of_a_late_rank_as_its_slots_hold(
    job_factory, engine: EngineName, calls_held: int
) -> None:
    """Each call of 10 chunks takes the next 10 slots. With 4 calls' worth, ranks 0 and 1 make
    four calls while rank 2 is 0.5 s late, reusing no row whose sums it may still need; with
    one call's worth, their second call waits for rank 2's first. Either way every rank gets
    the same sums: rank 2 takes those of the rounds it was late for from its socket."""
    options = WorkerOptions(k=K, timeout=20.0, engine=engine)
    with job_factory(3, k=K, slots=10 * calls_held, quorum=2, options=options) as job:
        calls = [[synthetic_tensor(i, r, 10 * K, "int32") for r in range(3)] for i in range(4)]
        results = job.allreduce_calls(calls, late={2: 0.5})
        fast_done = max(job.finished_calls[0][-1], job.finished_calls[1][-1])
        if calls_held == 4:
            assert fast_done < 0.3, job.finished_calls
        else:
            assert fast_done > 0.5, job.finished_calls
        for result in results:
            assert all(np.array_equal(r, result[0]) for r in result)
        # ranks 0 and 1 made every round rank 2 was late for: all four calls, or the first
        summed_without_2 = results if calls_held == 4 else results[:1]
        for inputs, result in zip(calls, summed_without_2, strict=False):
            np.testing.assert_array_equal(result[0], inputs[0] + inputs[1])
        assert job.comms[2].stats.late >= 10 * len(summed_without_2)


def test_a_quorum_does_not_wait_for_a_late_rank_whose_contribution_waits_for_the_next_step(
    job_factory, engine: EngineName
) -> None:
    """Three ranks, a quorum of two, error feedback. Rank 2 calls 0.4 s late: ranks 0 and 1 are
    done long before, and rank 2 takes the sums its socket kept, theirs, every chunk late for
    it, sending no contribution, only a RELEASE (a header) per use. Its contribution waits for
    the next step: when rank 0 is the late one, the sums are rank 1's and rank 2's, its last one
    included."""
    options = WorkerOptions(k=K, timeout=20.0, engine=engine, error_feedback=True)
    with job_factory(3, k=K, slots=64, quorum=2, options=options) as job:
        first = [synthetic_tensor(1, r, 30 * K, "float32") for r in range(3)]
        results = job.allreduce(first, late={2: 0.4})
        assert max(job.finished[:2]) < 0.3 < job.finished[2], job.finished
        np.testing.assert_array_equal(results[2], results[0])
        check(results[0], first[:2], K)
        assert [c.stats.late for c in job.comms] == [0, 0, 30]
        assert [c.contributors for c in job.comms] == [2, 2, 2]
        # every rank's gradient enters one step's sum (kept while late): an average is over 3
        assert [c.averaged_over for c in job.comms] == [3, 3, 3]
        late = job.comms[2].stats  # 30 slots, each a priming use and a chunk: 60 RELEASEs
        assert (late.packets_sent, late.bytes_sent) == (60, 60 * wire.HEADER_BYTES)
        assert (late.retransmissions, late.duplicates) == (0, 0)
        for comm in job.comms:
            comm.step()
        second = [synthetic_tensor(2, r, 30 * K, "float32") for r in range(3)]
        results = job.allreduce(second, late={0: 0.4})
        np.testing.assert_array_equal(results[0], results[1])
        expected = second[1] + second[2] + first[2]
        np.testing.assert_allclose(results[1], expected, rtol=0, atol=1e-5)
        assert job.comms[0].stats.late == 30
