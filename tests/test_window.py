"""The sans-IO window against the pure switch pipeline, through a seeded network in virtual time.

No sockets, threads or wall clock: loss, duplication and reordering are
drawn from a seed, so every case is deterministic and a failure replays
exactly. The window (worker/window.py) is the specification a faster
engine must match; these tests pin what it does, and run the compiled
window (worker/engine.py) through the same networks: it must send the same
datagrams in the same order and end with the same sums, counts, rounds and
round-trip state.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchreduce import wire
from switchreduce.emulation.softswitch.pipeline import SoftSwitch
from switchreduce.emulation.softswitch.static import install_static_job
from switchreduce.p4runtime.jobs import Job as JobEntry
from switchreduce.p4runtime.jobs import Member
from switchreduce.p4runtime.names import JobStat
from switchreduce.worker import _window
from switchreduce.worker import quantize as q
from switchreduce.worker.engine import CompiledTransfer
from switchreduce.worker.errors import MismatchError
from switchreduce.worker.reference import reference_sum, synthetic_tensor
from switchreduce.worker.window import (
    Job,
    RoundTrip,
    StaleSession,
    Transfer,
    WindowStats,
    early_results,
    refusal_message,
)

#: The two windows: the specification and the compiled one.
WINDOWS = (Transfer, CompiledTransfer)

pytestmark = pytest.mark.fast

K = 64
SESSION = 0x5E55_0000_0000_0042
SWITCH = ("127.0.0.1", wire.DEFAULT_SWITCH_PORT)


def address(rank: int) -> tuple[str, int]:
    return ("127.0.0.1", 50000 + rank)


@dataclass
class Network:
    """Ranks and the switch pipeline joined by a lossy, duplicating, reordering network."""

    world_size: int
    slots: int
    seed: int
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    #: (rank, chunk) of data packets to lose the first time they are sent, besides ``loss``.
    lose_once: set[tuple[int, int]] = field(default_factory=set)
    #: Serialization time per byte of each link (one per rank and direction, FIFO): 0 for none.
    seconds_per_byte: float = 0.0
    #: Mean seconds a rank takes to handle each datagram, per rank (FIFO, exponential).
    service: dict[int, float] = field(default_factory=dict)
    #: Probability that a datagram reaching a rank comes with a forged variant (forge()).
    hostile: float = 0.0
    #: Seconds after the others that a rank starts each call (a straggler's longer compute);
    #: what reaches it before then waits for it, as in its socket's buffer.
    late: dict[int, float] = field(default_factory=dict)
    #: The job's quorum: contributions that complete a round (None: every rank's).
    quorum: int | None = None
    #: The window every rank runs.
    window: type[Transfer] | type[CompiledTransfer] = Transfer
    #: The switch's slot of the next call's chunk 0 (the ranks turn it on by each call).
    first_slot: int = 0
    now: float = 0.0
    calls: int = 0
    switch: SoftSwitch = field(init=False)
    rounds: list[list[int]] = field(init=False)
    early: list[bytearray] = field(init=False)  # each rank's early results, kept across calls
    rtts: list[RoundTrip] = field(init=False)
    stats: list[WindowStats] = field(init=False)
    #: Every datagram each rank's window returned, in order (before the network's losses).
    sent: list[list[bytes]] = field(init=False)
    transfers: list[Any] = field(default_factory=list)  # the last call's, one per rank
    _events: list[tuple[float, int, int, bytes]] = field(default_factory=list)
    _seq: int = 0
    _free_at: dict[int, float] = field(default_factory=dict)  # link or rank CPU -> busy until
    _buffered: dict[int, list[bytes]] = field(default_factory=dict)  # for ranks not started

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.restart_switch(SESSION)
        self.sent = [[] for _ in range(self.world_size)]
        self.rounds = [[0] * self.slots for _ in range(self.world_size)]
        self.early = [early_results(self.slots, K) for _ in range(self.world_size)]
        self.rtts = [RoundTrip(0.01, 1.0) for _ in range(self.world_size)]
        self.stats = [WindowStats() for _ in range(self.world_size)]

    def restart_switch(self, session: int) -> None:
        """A fresh switch holding the job with ``session`` (the ranks keep their rounds)."""
        self.switch = SoftSwitch(k=K)
        members = tuple(Member(r, *address(r)) for r in range(self.world_size))
        install_static_job(
            self.switch,
            JobEntry(1, self.world_size, 0, self.slots, session, members, self.quorum),
        )

    def transmit(self, target: int, packets: list[bytes]) -> None:
        """Put packets on the wire towards ``target`` (-1: the switch, else a rank)."""
        for packet in packets:
            if self.rng.random() < self.loss or self._lost_once(target, packet):
                continue
            copies = 2 if self.rng.random() < self.duplicate else 1
            for _ in range(copies):
                sent = self._queue(self._link(target, packet), len(packet) * self.seconds_per_byte)
                delay = 50e-6
                if self.rng.random() < self.reorder:
                    delay += float(self.rng.exponential(2e-3))  # a heavy tail: some by rounds
                self._push(sent + delay, target, packet)

    def _link(self, target: int, packet: bytes) -> int:
        """The link a packet crosses: rank r's uplink is ~r, its downlink r."""
        return target if target >= 0 else ~(wire.unpack_header(packet).rank % self.world_size)

    def _queue(self, server: int, seconds: float) -> float:
        """When a FIFO server (a link, or a rank's CPU) is done with work arriving now."""
        done = self._free_at[server] = max(self.now, self._free_at.get(server, 0.0)) + seconds
        return done

    def _push(self, at: float, target: int, packet: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, target, packet))

    def allreduce(
        self,
        inputs: list[np.ndarray],
        session: int = SESSION,
        bits: int = 32,
        lanes: int | list[int] = 32,
        noise_seed: int | None = None,
    ) -> list[np.ndarray]:
        """Every rank sums its input through the switch; each rank's result. ``lanes``: every
        rank's lane width, or each one's (int32 tensors travel in 32-bit lanes);
        ``noise_seed``: round stochastically, with the keys :meth:`noise_keys` gives."""
        self.calls += 1
        self.transfers = transfers = []
        keys = self.noise_keys(noise_seed)
        for r, x in enumerate(inputs):
            rank_lanes = lanes if isinstance(lanes, int) else lanes[r]
            lane_bits = rank_lanes if x.dtype == np.float32 else 32
            bits_used = bits if x.dtype == np.float32 else 32
            job = Job(
                1,
                r,
                self.world_size,
                self.slots,
                K,
                session,
                bits,
                lane_bits,
                keys[r] if x.dtype == np.float32 else None,
                self.quorum,
                self.first_slot,
            )
            transfers.append(
                self.window(
                    job,
                    x.reshape(-1),
                    wire.encode_format(x.dtype.name, bits_used, lane_bits),
                    self.rounds[r],
                    self.rtts[r],
                    self.stats[r],
                    self.early[r],
                )
            )
        starts = sorted((self.now + self.late.get(rank, 0.0), rank) for rank in range(len(inputs)))
        self._buffered = {rank: [] for _, rank in starts}
        while starts or not all(t.done for t in transfers):
            deadlines = [d for t in transfers if (d := t.next_deadline()) is not None]
            next_event = self._events[0][0] if self._events else float("inf")
            self.now = min([next_event, *deadlines, *(at for at, _ in starts[:1])])
            assert self.now < 600, "no progress in 600 virtual seconds"
            while starts and starts[0][0] <= self.now:
                rank = starts.pop(0)[1]
                for packet in self._buffered.pop(rank):  # what its socket kept, read first
                    self._send(rank, transfers[rank].receive(packet, self.now))
                self._send(rank, transfers[rank].start(self.now))
            if self._events and self._events[0][0] <= self.now:
                _, _, target, packet = heapq.heappop(self._events)
                self._deliver(target, packet, transfers)
            for rank, transfer in enumerate(transfers):
                self._send(rank, transfer.expire(self.now))
        self.first_slot = job.next_first_slot(transfers[0].chunks)
        return [t.out.reshape(x.shape) for t, x in zip(transfers, inputs, strict=True)]

    @overload
    def noise_keys(self, noise_seed: int) -> list[int]: ...
    @overload
    def noise_keys(self, noise_seed: None) -> list[None]: ...
    def noise_keys(self, noise_seed: int | None) -> list[int] | list[None]:
        """Each rank's stochastic rounding key for the current call (None: to nearest)."""
        if noise_seed is None:
            return [None] * self.world_size
        return [q.call_key(noise_seed, r, self.calls) for r in range(self.world_size)]

    def _send(self, rank: int, packets: list[bytes]) -> None:
        self.sent[rank].extend(packets)
        self.transmit(-1, packets)

    def _lost_once(self, target: int, packet: bytes) -> bool:
        if target >= 0:
            return False
        hdr = wire.unpack_header(packet)
        if hdr.msg_type != wire.MsgType.DATA or (hdr.rank, hdr.chunk) not in self.lose_once:
            return False
        self.lose_once.discard((hdr.rank, hdr.chunk))
        return True

    def _deliver(self, target: int, packet: bytes, transfers: list[Any]) -> None:
        if target >= self.world_size:  # handled by the rank's CPU, in arrival order
            rank = target - self.world_size
            if rank in self._buffered:  # not started: the socket keeps it
                self._buffered[rank].append(packet)
                return
            if self.hostile and self.rng.random() < self.hostile:
                self._send(rank, transfers[rank].receive(self.forge(packet), self.now))
            self._send(rank, transfers[rank].receive(packet, self.now))
            return
        if target >= 0:
            mean = self.service.get(target, 0.0)
            busy = float(self.rng.exponential(mean)) if mean else 0.0
            cpu = self.world_size + target
            self._push(self._queue(cpu, busy), cpu, packet)
            return
        rank = wire.unpack_header(packet).rank % self.world_size
        pkt = self.switch.parser.parse_datagram(packet, address(rank), SWITCH)
        for out in self.switch.process(pkt):
            self.transmit(out.udp_dport - 50000, [self.switch.deparser.datagram(out)])

    def forge(self, packet: bytes) -> bytes:
        """A variant of an answer a rank must not take: a wrong length, job, session, slot,
        round, chunk, count or type (rarely STALE or REFUSED, which end the call)."""
        hdr = wire.unpack_header(packet)
        body = packet[wire.HEADER_BYTES :]
        variants = [
            lambda: packet[:-1],
            lambda: packet + bytes(4),
            lambda: b"",
            lambda: packet[: wire.HEADER_BYTES],
            lambda: hdr._replace(job_id=hdr.job_id ^ 1).pack() + body,
            lambda: hdr._replace(session=hdr.session ^ 1 << 63).pack() + body,
            lambda: hdr._replace(slot=(hdr.slot + 1) % self.slots).pack() + body,
            lambda: hdr._replace(round=(hdr.round + 1) & 0xFFFF).pack() + body,
            lambda: hdr._replace(round=(hdr.round - 1) & 0xFFFF).pack() + body,
            lambda: hdr._replace(version=hdr.version ^ 1).pack() + body,
            lambda: hdr._replace(chunk=hdr.chunk + self.slots).pack() + body,
            lambda: hdr._replace(count=hdr.count ^ 1).pack() + body,
            lambda: hdr._replace(exponent=hdr.exponent ^ 1).pack() + body,
            lambda: hdr._replace(msg_type=wire.MsgType.DATA).pack() + body,
            lambda: hdr._replace(msg_type=wire.MsgType.JOINED).pack() + body,
            lambda: hdr._replace(msg_type=0xFF).pack() + body,
        ]
        rare = [
            lambda: hdr._replace(msg_type=wire.MsgType.STALE).pack() + body,
            lambda: hdr._replace(msg_type=wire.MsgType.REFUSED, rank=hdr.rank ^ 1).pack() + body,
        ]
        pick = int(self.rng.integers(len(variants) * 10 + len(rare)))
        return (
            variants[pick // 10] if pick < len(variants) * 10 else rare[pick - len(variants) * 10]
        )()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    world_size=st.integers(1, 5),
    slots=st.integers(1, 8),
    elements=st.integers(1, 40 * K),
    loss=st.sampled_from([0.0, 0.05, 0.3]),
    duplicate=st.sampled_from([0.0, 0.1]),
    reorder=st.sampled_from([0.0, 0.3]),
    dtype=st.sampled_from(["float32", "int32"]),
    lanes=st.sampled_from(wire.LANE_BITS),
    stochastic=st.booleans(),
)
def test_every_rank_gets_the_exact_sum_through_loss_duplication_and_reordering(
    seed, world_size, slots, elements, loss, duplicate, reorder, dtype, lanes, stochastic
) -> None:
    net = Network(world_size, slots, seed, loss, duplicate, reorder)
    lanes = lanes if dtype == "float32" else 32
    noise_seed = seed if stochastic and dtype == "float32" else None
    for call in range(2):  # rounds continue across calls
        inputs = [synthetic_tensor(seed + call, r, elements, dtype) for r in range(world_size)]
        results = net.allreduce(inputs, lanes=lanes, noise_seed=noise_seed)
        keys = None if noise_seed is None else net.noise_keys(noise_seed)
        expected = reference_sum(inputs, K * 32 // lanes, lane_bits=lanes, noise_keys=keys)
        for result in results:
            assert np.array_equal(result, expected)
    if loss == 0 and duplicate == 0 and reorder == 0:
        assert sum(s.retransmissions for s in net.stats) == 0


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    world_size=st.integers(2, 5),
    fewer=st.integers(1, 4),
    slots=st.integers(1, 8),
    chunks=st.lists(st.integers(1, 20), min_size=3, max_size=3),
    loss=st.sampled_from([0.0, 0.05, 0.3]),
    duplicate=st.sampled_from([0.0, 0.1]),
    reorder=st.sampled_from([0.0, 0.3]),
    late=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_a_quorum_gives_every_rank_the_same_sums_of_quorum_contributions(
    seed, world_size, fewer, slots, chunks, loss, duplicate, reorder, late
) -> None:
    """Through loss, duplicates, reordering and a late rank, call after call: every call ends,
    every rank gets the same sums, and each chunk's hold exactly the quorum's contributions,
    the world's total less those of the ranks whose late() names the chunk."""
    quorum = max(1, world_size - fewer)
    net = Network(world_size, slots, seed, loss, duplicate, reorder, quorum=quorum)
    net.late = {world_size - 1: late}
    for call, n in enumerate(chunks):
        inputs = [np.arange(n * K, dtype=np.int32) * (r + 1) + 7 * call for r in range(world_size)]
        results = net.allreduce(inputs)
        total = np.stack(inputs).astype(np.int64).sum(axis=0)
        for chunk in range(n):
            part = slice(chunk * K, (chunk + 1) * K)
            out = [r for r, t in enumerate(net.transfers) if chunk in t.late()]
            assert len(out) == world_size - quorum, (chunk, out)
            expected = (total[part] - sum(inputs[r][part] for r in out)).astype(np.int32)
            for result in results:
                assert np.array_equal(result[part], expected)


def test_a_lost_result_is_recovered_from_the_switchs_stored_copy() -> None:
    """With every answer lost once, the window resends and the switch replies from its row."""
    net = Network(2, 2, seed=3, loss=0.5)
    inputs = [np.arange(10 * K, dtype=np.int32) * (r + 1) for r in range(2)]
    results = net.allreduce(inputs)
    assert all(np.array_equal(r, inputs[0] * 3) for r in results)
    assert sum(s.retransmissions for s in net.stats) > 0
    assert net.switch.ingress.job_stats[JobStat.RETRANSMIT_REPLIES].packets[1] > 0


def test_an_answer_for_another_session_raises_stale_session() -> None:
    net = Network(1, 2, seed=1)
    with pytest.raises(StaleSession):
        net.allreduce([np.ones(K, np.int32)], session=SESSION + 1)


def test_ranks_that_disagree_raise_mismatch_naming_the_other_rank() -> None:
    net = Network(2, 2, seed=1)
    with pytest.raises(MismatchError, match="rank 1 sums int32 at 32 bits\\[65\\]"):
        net.allreduce([np.ones(K, np.int32), np.ones(K + 1, np.int32)])


def test_the_timeout_doubles_per_retry_and_is_capped() -> None:
    rtt = RoundTrip(min_rto=0.01, max_rto=1.0)
    assert rtt.rto() == pytest.approx(0.1)  # no sample yet: ten times the floor
    rtt.sample(0.002)
    assert rtt.rto() == pytest.approx(0.01)  # the floor
    assert rtt.rto(retries=3) == pytest.approx(0.08)
    assert rtt.rto(retries=10) == 1.0


def test_a_loss_mid_window_is_repaired_in_about_a_round_trip_not_a_timeout() -> None:
    """Later results overtake the lost use, which is resent at once: the call ends within a few
    round trips (100 us each here) of a lossless one, far inside the 10 ms timeout floor."""
    lossless = Network(2, 8, seed=1)
    inputs = [np.arange(64 * K, dtype=np.int32) + r for r in range(2)]
    lossless.allreduce(inputs)
    net = Network(2, 8, seed=1, lose_once={(0, 20), (1, 41)})
    results = net.allreduce(inputs)
    assert all(np.array_equal(r, inputs[0] + inputs[1]) for r in results)
    assert sum(s.timeouts for s in net.stats) == 0
    assert sum(s.fast_retransmissions for s in net.stats) >= 2
    assert net.now - lossless.now < 5 * 100e-6, (net.now, lossless.now)


def test_the_timeout_floor_follows_the_measured_round_trip() -> None:
    rtt = RoundTrip(min_rto=0.001, max_rto=1.0)
    rtt.sample(0.004)
    for _ in range(50):  # a steady path: the variance decays, the floor holds at 2 x srtt
        rtt.sample(0.004)
    assert rtt.rto() == pytest.approx(0.008, rel=0.01)
    fast = RoundTrip(min_rto=0.001, max_rto=1.0)
    for _ in range(50):
        fast.sample(0.0001)
    assert fast.rto() == pytest.approx(0.001)  # never below min_rto


#: 100 Mbit/s links.
FAST_ETHERNET = 8 / 100e6


@pytest.mark.parametrize("seed", range(4))
def test_queues_and_a_slow_rank_make_no_retransmission_without_loss(seed) -> None:
    """On FIFO links every rank sends its uses in the order results come back, which is the
    order rounds complete in, so a later use is never answered before an earlier one: the gap
    rule cannot fire without a loss, however long the queues or slow a rank (here 4x). Probes
    stay rare: the round trip grows as the slow rank's queue fills behind the priming uses
    (headers alone, sent at once), now and then past the timeout."""
    service = {0: 400e-6, 1: 100e-6, 2: 100e-6, 3: 100e-6}
    net = Network(4, 16, seed, seconds_per_byte=FAST_ETHERNET, service=service)
    inputs = [synthetic_tensor(seed, r, 300 * K, "float32") for r in range(4)]
    expected = reference_sum(inputs, K)
    for result in net.allreduce(inputs):
        assert np.array_equal(result, expected)
    assert [s.fast_retransmissions for s in net.stats] == [0] * 4
    assert all(s.retransmissions <= 316 * 3 // 100 for s in net.stats)  # 3% of the uses


def test_losses_behind_queues_are_repaired_in_about_a_round_trip_by_one_resend_per_rank() -> None:
    """Each loss stalls its round for all four ranks; each resends once, when the first use
    sent after the lost one comes back, and no timeout fires."""
    service = dict.fromkeys(range(4), 100e-6)
    inputs = [np.arange(200 * K, dtype=np.int32) * (r + 1) for r in range(4)]
    lossless = Network(4, 16, 5, seconds_per_byte=FAST_ETHERNET, service=service)
    lossless.allreduce(inputs)
    lost = {(0, 30), (3, 31), (2, 100), (1, 150)}
    net = Network(4, 16, 5, lose_once=set(lost), seconds_per_byte=FAST_ETHERNET, service=service)
    for result in net.allreduce(inputs):
        assert np.array_equal(result, inputs[0] * 10)
    assert [s.timeouts for s in net.stats] == [0] * 4
    assert [s.fast_retransmissions for s in net.stats] == [len(lost)] * 4
    srtt = max(rtt.srtt or 0.0 for rtt in net.rtts)
    assert net.now - lossless.now < srtt * len(lost), (net.now, lossless.now, srtt)


def test_a_late_rank_costs_each_other_rank_a_probe_per_doubling_not_its_window() -> None:
    """Rank 3 starts 0.3 s after the others (their timeout floor is 10 ms). Each of the others
    resends one use each time the doubling timeout runs out, at 10, 30, 70 and 150 ms, and the
    switch answers every one WAITING; the 15 other uses of its window wait, unsent. Before
    probes, all 16 went out each time: 64 resends per rank."""
    net = Network(4, 16, seed=2)
    inputs = [np.arange(64 * K, dtype=np.int32) * (r + 1) for r in range(4)]
    net.allreduce(inputs)  # the round trip is measured: the timeout floor, 10 ms, applies
    net.late = {3: 0.3}
    for result in net.allreduce(inputs):
        assert np.array_equal(result, inputs[0] * 10)
    assert [s.retransmissions for s in net.stats] == [4, 4, 4, 0]
    assert [s.waits for s in net.stats] == [4, 4, 4, 0]  # every resend was one it did not need
    assert [s.timeouts for s in net.stats] == [4, 4, 4, 0]


def test_a_probe_answered_with_its_result_sends_the_next_held_use_at_once() -> None:
    """Rank 0's last three uses are lost: the others' rounds wait for it, so their resends are
    answered WAITING; rank 0's probe completes its round, and its answer, a RESULT, says the
    next held use may be lost too: it is the next probe, a round trip later, not a timeout."""
    net = Network(4, 8, seed=3)
    inputs = [np.arange(24 * K, dtype=np.int32) - r for r in range(4)]
    net.allreduce(inputs)
    net.lose_once = {(0, 21), (0, 22), (0, 23)}
    start = net.now
    for result in net.allreduce(inputs):
        assert np.array_equal(result, sum(inputs))
    assert (net.stats[0].timeouts, net.stats[0].retransmissions) == (1, 3)
    assert net.now - start < 2 * net.rtts[0].rto(1), "a timeout per lost use"


def assert_quorum_sums(net: Network, inputs: list[np.ndarray], results: list[np.ndarray]) -> None:
    """Every rank got the same sums, and each chunk's are the world's total but for the one
    rank whose late() names the chunk (a quorum of n - 1)."""
    total, chunks = np.sum(inputs, axis=0), net.transfers[0].chunks
    for chunk in range(chunks):
        part = slice(chunk * K, (chunk + 1) * K)
        left_out = [r for r, t in enumerate(net.transfers) if chunk in t.late()]
        assert len(left_out) == 1, (chunk, left_out)
        for result in results:
            assert np.array_equal(result[part], total[part] - inputs[left_out[0]][part])


def test_a_quorum_sums_what_three_of_four_ranks_sent_and_each_knows_if_it_was_left_out() -> None:
    """Quorum 3 of 4, all ranks at once, packets reordered: each round holds the first three
    contributions, and every rank gets the same sums."""
    net = Network(4, 8, seed=4, quorum=3, reorder=0.3)
    inputs = [np.arange(40 * K, dtype=np.int32) + 1000 * (r + 1) for r in range(4)]
    assert_quorum_sums(net, inputs, net.allreduce(inputs))
    assert sum(s.late for s in net.stats) == 40


def test_a_quorum_does_not_wait_for_a_late_rank_which_still_gets_every_sum() -> None:
    """Rank 3 starts 0.3 s late; 32 slots hold the whole call. The other three complete every
    round without it and without a timeout; rank 3 then takes the results its socket kept,
    sending no contribution the switch would drop as late: a RELEASE (a header) per use."""
    net = Network(4, 32, seed=5, quorum=3)
    inputs = [synthetic_tensor(5, r, 30 * K, "float32") for r in range(4)]
    net.late = {3: 0.3}
    results = net.allreduce(inputs)
    expected = reference_sum(inputs[:3], K)
    for result in results:
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)
    assert [t.late().size for t in net.transfers] == [0, 0, 0, 30]
    assert [s.timeouts for s in net.stats[:3]] == [0, 0, 0]
    releases = [wire.unpack_header(p).msg_type == wire.MsgType.RELEASE for p in net.sent[3]]
    assert len(releases) == 60 and all(releases)  # 30 priming uses and 30 chunks
    assert {len(p) for p in net.sent[3]} == {wire.HEADER_BYTES}
    assert net.switch.ingress.drops.packets[wire.DropReason.LATE] == 0


@pytest.mark.parametrize("window", WINDOWS)
def test_a_result_without_this_ranks_contribution_is_no_answer_to_its_packets(window) -> None:
    """A rank late for a quorum finds results waiting as it sends its uses. Taken at the
    instant its uses went out, such a result is no round trip (it would be zero, and so the
    reordering window) and no sign that the use sent with it was lost: nothing is resent."""
    job = Job(1, 3, 4, 2, K, SESSION, quorum=3)
    flat = np.arange(2 * K, dtype=np.int32)
    rtt, stats = RoundTrip(0.01, 1.0), WindowStats()
    xfer = window(
        job, flat, wire.encode_format("int32", 32, 32), [0, 0], rtt, stats, early_results(2, K)
    )
    sent = xfer.start(1.0)
    assert [wire.unpack_header(p).slot for p in sent] == [0, 1]

    def result_without_rank_3(packet: bytes) -> bytes:
        hdr = wire.unpack_header(packet)._replace(msg_type=wire.MsgType.RESULT, length=0b0111)
        return hdr.pack() + packet[wire.HEADER_BYTES :]

    answers = xfer.receive(result_without_rank_3(sent[1]), 1.0)
    answers += xfer.receive(result_without_rank_3(sent[0]), 1.0)
    # each slot's last result of the call says the row may go, and that is all
    assert [(wire.unpack_header(p).msg_type, len(p)) for p in answers] == [
        (wire.MsgType.RELEASE, wire.HEADER_BYTES)
    ] * 2
    assert xfer.done and xfer.late().tolist() == [0, 1]
    assert (stats.retransmissions, rtt.min_rtt, rtt.srtt) == (0, None, None)


def test_a_quorum_answers_each_use_once_however_close_the_ranks() -> None:
    """Quorum 3 of 4, all ranks at once on 100 Mbit/s links: each round has a rank that is
    late by a hair, whose DATA crosses the multicast. The switch drops it unanswered, so every
    rank takes one answer per use (no doubled downlink), and no round is resent."""
    net = Network(4, 32, seed=8, quorum=3, seconds_per_byte=FAST_ETHERNET)
    inputs = [np.arange(30 * K, dtype=np.int32) * (r + 1) for r in range(4)]
    for _ in range(3):
        assert_quorum_sums(net, inputs, net.allreduce(inputs))
    assert [(s.duplicates, s.retransmissions) for s in net.stats] == [(0, 0)] * 4
    assert net.switch.ingress.drops.packets[wire.DropReason.LATE] > 0  # DATA did cross it


def test_a_quorum_runs_one_round_a_slot_ahead_of_a_late_rank_then_waits_for_it() -> None:
    """With 8 slots for 40 chunks, the three may overwrite no row whose round rank 3 has not
    sent (it could still need those sums): they complete 8 chunks, wait for it, and from then
    on whichever three come first make each round."""
    net = Network(4, 8, seed=6, quorum=3, reorder=0.1)
    inputs = [np.arange(40 * K, dtype=np.int32) * (r + 1) for r in range(4)]
    net.allreduce(inputs)
    net.late = {3: 0.3}
    results = net.allreduce(inputs)
    assert_quorum_sums(net, inputs, results)
    assert set(range(8)) <= set(net.transfers[3].late().tolist())
    ahead = net.switch.ingress.drops.packets[wire.DropReason.AHEAD]
    assert ahead > 0


def test_the_windows_agree_on_a_late_rank_and_losses() -> None:
    """Probes, WAITING and held uses, alike in both windows, with losses on top of a late rank."""
    calls = calls_of(7, 4, [100 * K, 40 * K, 70 * K], ["float32", "int32", "float32"])
    seen = assert_windows_agree(
        calls, world_size=4, slots=8, seed=11, loss=0.03, reorder=0.05, late={2: 0.25}
    )
    stats = seen[-1]["stats"]
    assert sum(s["waits"] for s in stats) > 0 and sum(s["timeouts"] for s in stats) > 0


# -- the compiled window against the specification ------------------------------------------------


def state(net: Network) -> dict[str, Any]:
    """Everything the windows leave behind: what they sent, their counts, rounds, round trips,
    and the last call's progress."""
    return {
        "sent": [list(packets) for packets in net.sent],
        "stats": [dataclasses.asdict(s) for s in net.stats],
        "rounds": [list(r) for r in net.rounds],
        "early": [bytes(e) for e in net.early],
        "rtts": [dataclasses.asdict(r) for r in net.rtts],
        "now": net.now,
        "transfers": [
            (
                t.done,
                t.results,
                t.progress_at,
                t.chunks,
                t.next_deadline(),
                t.missing().tolist(),
                t.exponents.tolist(),
            )
            for t in net.transfers
        ],
    }


@dataclass(frozen=True)
class Call:
    """One allreduce of a scenario: every rank's input, and what happens before it."""

    inputs: tuple[np.ndarray, ...]
    session: int = SESSION
    bits: int = 32
    lanes: int = 32
    noise_seed: int | None = None
    #: Before the call: a new switch holding the job with ``session`` (the ranks keep their
    #: rounds), or that and the ranks' rounds back to 0 as after a JOIN.
    restart: str | None = None


def observe(net: Network, calls: list[Call]) -> list[Any]:
    """Run the calls one after the other: each one's results (or error) and the state after."""
    seen: list[Any] = []
    for call in calls:
        if call.restart is not None:
            net.restart_switch(call.session)
            if call.restart == "join":
                net.first_slot = 0
                for rounds, early in zip(net.rounds, net.early, strict=True):
                    rounds[:] = [0] * len(rounds)
                    early[:] = bytes(len(early))
        try:
            results = net.allreduce(
                list(call.inputs), call.session, call.bits, call.lanes, call.noise_seed
            )
            seen.append([(r.dtype.str, r.shape, r.tobytes()) for r in results])
        except (StaleSession, MismatchError) as exc:
            seen.append((type(exc).__name__, str(exc)))
        seen.append(state(net))
    return seen


def assert_windows_agree(calls: list[Call], **network: Any) -> list[Any]:
    """Both windows through alike-seeded networks: the same observations, call by call."""
    python, compiled = (
        observe(Network(**copy.deepcopy(network), window=w), calls) for w in WINDOWS
    )
    assert len(python) == len(compiled)
    for step, (expected, got) in enumerate(zip(python, compiled, strict=True)):
        if isinstance(expected, dict):
            for key in expected:
                assert got[key] == expected[key], f"step {step}: {key} differs"
        else:
            assert got == expected, f"step {step}: results differ"
    return python


def calls_of(
    seed: int,
    world_size: int,
    elements: list[int],
    dtypes: list[str],
    lanes: int = 32,
    noise_seed: int | None = None,
) -> list[Call]:
    return [
        Call(
            tuple(synthetic_tensor(seed + i, r, n, dtype) for r in range(world_size)),
            lanes=lanes,
            noise_seed=noise_seed,
        )
        for i, (n, dtype) in enumerate(zip(elements, dtypes, strict=True))
    ]


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    world_size=st.integers(1, 5),
    slots=st.integers(1, 8),
    elements=st.lists(st.integers(1, 30 * K), min_size=1, max_size=3),
    dtypes=st.lists(st.sampled_from(["float32", "int32"]), min_size=3, max_size=3),
    loss=st.sampled_from([0.0, 0.05, 0.3]),
    duplicate=st.sampled_from([0.0, 0.1]),
    reorder=st.sampled_from([0.0, 0.3]),
    hostile=st.sampled_from([0.0, 0.05]),
    restart=st.sampled_from([None, "switch", "join"]),
    lanes=st.sampled_from(wire.LANE_BITS),
    noise_seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    fewer=st.sampled_from([0, 0, 1, 2]),
    late=st.sampled_from([0.0, 0.0, 0.05]),
    first_slot=st.integers(0, 7),
)
def test_the_compiled_window_sends_and_sums_what_the_python_window_does(
    seed,
    world_size,
    slots,
    elements,
    dtypes,
    loss,
    duplicate,
    reorder,
    hostile,
    restart,
    lanes,
    noise_seed,
    fewer,
    late,
    first_slot,
) -> None:
    """Any network, restart, lane width and rounding; a quorum of fewer ranks than the world,
    a rank late to every call, and calls starting at any slot, alike in both windows."""
    calls = calls_of(seed, world_size, elements, dtypes[: len(elements)], lanes, noise_seed)
    if len(calls) > 1:  # the switch restarts before the last call, with or without a new run
        session = SESSION + 1 if restart == "join" else SESSION
        calls[-1] = dataclasses.replace(calls[-1], restart=restart, session=session)
    assert_windows_agree(
        calls,
        world_size=world_size,
        slots=slots,
        seed=seed,
        loss=loss,
        duplicate=duplicate,
        reorder=reorder,
        hostile=hostile,
        quorum=max(1, world_size - fewer),
        late={world_size - 1: late},
        first_slot=first_slot % slots,
    )


def test_the_windows_agree_on_gap_repair_behind_queues_and_a_slow_rank() -> None:
    """The loss-repair rule where it matters: FIFO queues, a rank 4x slower, losses once."""
    service = {0: 400e-6, 1: 100e-6, 2: 100e-6, 3: 100e-6}
    calls = calls_of(3, 4, [200 * K, 50 * K], ["float32", "int32"])
    seen = assert_windows_agree(
        calls,
        world_size=4,
        slots=16,
        seed=5,
        lose_once={(0, 30), (3, 31), (2, 100), (1, 150), (0, 151)},
        seconds_per_byte=FAST_ETHERNET,
        service=service,
        reorder=0.05,
    )
    stats = seen[-1]["stats"]
    assert sum(s["fast_retransmissions"] for s in stats) > 0


def test_the_windows_agree_on_forged_answers_stale_and_refused() -> None:
    """Forged variants of half the answers: wrong lengths, fields and types; both windows ignore
    the same ones and end the call alike on a matching STALE or REFUSED."""
    calls = calls_of(7, 3, [40 * K] * 3, ["float32", "int32", "float32"])
    endings = set()
    for seed in range(12):
        seen = assert_windows_agree(calls, world_size=3, slots=4, seed=seed, hostile=0.5)
        endings |= {r[0] for r in seen[::2] if isinstance(r, tuple)}
        assert sum(s["duplicates"] for s in seen[-1]["stats"]) > 0
    assert endings == {"StaleSession", "MismatchError"}


def test_the_windows_agree_on_another_sessions_stale_and_on_disagreeing_ranks() -> None:
    ones = np.ones(K, np.int32)
    stale = [Call((ones,), session=SESSION + 1)]
    assert assert_windows_agree(stale, world_size=1, slots=2, seed=1)[0][0] == "StaleSession"
    mismatch = [Call((ones, np.ones(K + 1, np.int32)))]
    seen = assert_windows_agree(mismatch, world_size=2, slots=2, seed=1)
    assert seen[0][0] == "MismatchError" and "rank 1 sums int32 at 32 bits[65]" in seen[0][1]


def edge_values(seed: int, n: int) -> np.ndarray:
    """float32 values at quantization's edges: zeros of both signs, subnormals, powers of two
    (max|x| = 2**e exactly), halves of the grid, the largest finite, all-zero blocks; with an odd
    seed, blocks spread from 2**-141 to 2**100 instead."""
    rng = np.random.default_rng(seed)
    specials = np.array(
        [0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 2.0**-126, 0.5, 1.0, -2.0, 2.0**20, 3.4e38,
         -3.4e38, 1.5, 2.5, -0.5, 7.0],
        dtype=np.float32,
    )  # fmt: skip
    values = rng.choice(specials, n) * (rng.random(n) < 0.7)
    if seed % 2:
        mantissas = rng.choice([0.5, 0.75, 1.0, 1.5, -1.0, -1.25, 0.0], n)
        values = mantissas * np.exp2(np.repeat(rng.integers(-140, 100, n // K + 1), K)[:n])
    values[: 2 * K] = 0.0  # two all-zero blocks: exponent "none"
    return values.astype(np.float32)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 32])
@pytest.mark.parametrize(
    ("bits", "lanes", "noise_seed"),
    [(32, 32, None), (24, 32, None), (9, 32, None), (32, 16, None), (32, 8, None), (32, 32, 7),
     (9, 32, 8), (32, 16, 9), (32, 8, 2**64 - 1)],
)  # fmt: skip
def test_the_windows_quantize_alike_at_the_edges(world_size, bits, lanes, noise_seed) -> None:
    elements = (9 * K + 3) * 32 // lanes
    calls = [
        Call(
            tuple(edge_values(seed * 7 + r, elements) for r in range(world_size)),
            bits=bits,
            lanes=lanes,
            noise_seed=noise_seed,
        )
        for seed in range(2)
    ]
    with np.errstate(over="ignore"):  # sums past float32's range are inf alike
        assert_windows_agree(calls, world_size=world_size, slots=3, seed=bits)


def test_the_compiled_window_lays_out_packets_as_wire_does() -> None:
    """The C header offsets against wire.Header.pack, field by field, byte for byte."""
    assert (_window.HEADER_BYTES, _window.ELEMENT_BYTES) == (wire.HEADER_BYTES, wire.ELEMENT_BYTES)
    assert _window.EXPONENT_BIAS == wire.EXPONENT_BIAS
    names = ("DATA", "RESULT", "STALE", "REFUSED", "WAITING", "RELEASE", "RESEND")
    assert [getattr(_window, n) for n in names] == [wire.MsgType[n] for n in names]
    flat = np.arange(3 * K + 5, dtype=np.int32) - 7
    job = Job(0xBEEF, 0xA5, 32, 5, K, 0x0123_4567_89AB_CDEF)
    rounds = [0x7FFF, 0xFFFF, 0, 3, 9]
    early = early_results(job.slot_count, K)
    transfer = CompiledTransfer(job, flat, 0x5A, rounds, RoundTrip(0.01, 1.0), WindowStats(), early)
    packets = transfer.start(0.0)
    for chunk, packet in enumerate(packets):
        count = min(K, flat.size - chunk * K)
        header = wire.Header(
            wire.MsgType.DATA, job.job_id, job.rank, chunk, rounds[chunk] & 1, 0,
            rounds[chunk], chunk, count, 0x5A, flat.size, job.session,
        )  # fmt: skip
        elements = np.zeros(K, np.int32)
        elements[:count] = flat[chunk * K : chunk * K + count]
        assert packet == wire.encode(header, elements)
    assert rounds == [0x8000, 0, 1, 4, 9]  # wrapped at 16 bits; slot 4 unused (4 chunks)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("lanes", [16, 8])
def test_narrow_lanes_sum_exactly_at_their_extremes_for_up_to_32_ranks(window, lanes) -> None:
    """Every rank at +m, at -m, or half and half: lanes hold 2nm, 0 or nm, and no lane carries
    into its neighbour in the switch's 32-bit add (the result is exactly +-n, or 0)."""
    below_one = np.nextafter(np.float32(1.0), np.float32(0.0))  # levels m, as 2**0 bounds it
    elements = 2 * K * 32 // lanes + 5
    for n in range(1, 33):
        m = q.peak_level(n, lane_bits=lanes)
        for signs in ([1] * n, [-1] * n, [(-1) ** r for r in range(n)]):
            net = Network(n, 2, seed=n, window=window)
            inputs = [np.full(elements, below_one * s, np.float32) for s in signs]
            for result in net.allreduce(inputs, lanes=lanes):
                assert np.array_equal(result, np.full(elements, float(sum(signs)), np.float32))
            data = [p for p in net.sent[0] if wire.unpack_header(p).count]
            lane_values = wire.decode_lanes(data[0], lanes, K)
            assert set(lane_values.tolist()) == {m + signs[0] * m}


@pytest.mark.parametrize("window", WINDOWS)
def test_ranks_on_other_lane_widths_raise_mismatch_naming_them(window) -> None:
    net = Network(2, 2, seed=1, window=window)
    ones = [np.ones(4 * K, np.float32)] * 2
    lanes = r"float32 in (16|8)-bit lanes\[256\]"
    with pytest.raises(MismatchError, match=f"rank [01] sums {lanes}, this rank {lanes}"):
        net.allreduce(ones, lanes=[16, 8])


def test_a_refusal_with_the_same_format_and_length_is_named_a_chunk_disagreement() -> None:
    job = Job(1, 0, 2, 2, K, SESSION)
    fmt = wire.encode_format("float32", 32)
    hdr = wire.Header(wire.MsgType.REFUSED, 1, 1, 0, 0, 0, 3, 7, 0, fmt, 100, SESSION)
    assert "another chunk than 7 in this round" in refusal_message(job, fmt, 100, hdr)
    other = hdr._replace(length=101)
    assert "rank 1 sums float32 at 32 bits[101]" in refusal_message(job, fmt, 100, other)
