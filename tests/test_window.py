"""The sans-IO window against the pure switch pipeline, through a seeded network in virtual time.

No sockets, threads or wall clock: loss, duplication and reordering are
drawn from a seed, so every case is deterministic and a failure replays
exactly. The window (worker/window.py) is the specification a faster
engine must match; these tests pin what it does.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchreduce import wire
from switchreduce.emulation.softswitch.pipeline import SoftSwitch
from switchreduce.emulation.softswitch.static import install_static_job
from switchreduce.p4runtime.jobs import Job as JobEntry
from switchreduce.p4runtime.jobs import Member
from switchreduce.worker.errors import MismatchError
from switchreduce.worker.reference import reference_sum, synthetic_tensor
from switchreduce.worker.window import Job, RoundTrip, StaleSession, Transfer, WindowStats

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
    now: float = 0.0
    switch: SoftSwitch = field(init=False)
    rounds: list[list[int]] = field(init=False)
    rtts: list[RoundTrip] = field(init=False)
    stats: list[WindowStats] = field(init=False)
    _events: list[tuple[float, int, int, bytes]] = field(default_factory=list)
    _seq: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.switch = SoftSwitch(k=K)
        members = tuple(Member(r, *address(r)) for r in range(self.world_size))
        install_static_job(
            self.switch, JobEntry(1, self.world_size, 0, self.slots, SESSION, members)
        )
        self.rounds = [[0] * self.slots for _ in range(self.world_size)]
        self.rtts = [RoundTrip(0.01, 1.0) for _ in range(self.world_size)]
        self.stats = [WindowStats() for _ in range(self.world_size)]

    def transmit(self, target: int, packets: list[bytes]) -> None:
        """Put packets on the wire towards ``target`` (-1: the switch, else a rank)."""
        for packet in packets:
            if self.rng.random() < self.loss:
                continue
            copies = 2 if self.rng.random() < self.duplicate else 1
            for _ in range(copies):
                delay = 50e-6
                if self.rng.random() < self.reorder:
                    delay += float(self.rng.exponential(2e-3))  # a heavy tail: some by rounds
                self._seq += 1
                heapq.heappush(self._events, (self.now + delay, self._seq, target, packet))

    def allreduce(self, inputs: list[np.ndarray], session: int = SESSION) -> list[np.ndarray]:
        """Every rank sums its input through the switch; each rank's result."""
        transfers = [
            Transfer(
                Job(1, r, self.world_size, self.slots, K, session),
                x.reshape(-1),
                wire.encode_format(x.dtype.name, 32),
                self.rounds[r],
                self.rtts[r],
                self.stats[r],
            )
            for r, x in enumerate(inputs)
        ]
        for transfer in transfers:
            self.transmit(-1, transfer.start(self.now))
        while not all(t.done for t in transfers):
            deadlines = [d for t in transfers if (d := t.next_deadline()) is not None]
            next_event = self._events[0][0] if self._events else float("inf")
            self.now = min([next_event, *deadlines])
            assert self.now < 600, "no progress in 600 virtual seconds"
            if self._events and self._events[0][0] <= self.now:
                _, _, target, packet = heapq.heappop(self._events)
                self._deliver(target, packet, transfers)
            for transfer in transfers:
                self.transmit(-1, transfer.expire(self.now))
        return [t.out.reshape(x.shape) for t, x in zip(transfers, inputs, strict=True)]

    def _deliver(self, target: int, packet: bytes, transfers: list[Transfer]) -> None:
        if target >= 0:
            self.transmit(-1, transfers[target].receive(packet, self.now))
            return
        rank = wire.unpack_header(packet).rank % self.world_size
        pkt = self.switch.parser.parse_datagram(packet, address(rank), SWITCH)
        for out in self.switch.process(pkt):
            self.transmit(out.udp_dport - 50000, [self.switch.deparser.datagram(out)])


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
)
def test_every_rank_gets_the_exact_sum_through_loss_duplication_and_reordering(
    seed, world_size, slots, elements, loss, duplicate, reorder, dtype
) -> None:
    net = Network(world_size, slots, seed, loss, duplicate, reorder)
    for call in range(2):  # rounds continue across calls
        inputs = [synthetic_tensor(seed + call, r, elements, dtype) for r in range(world_size)]
        expected = reference_sum(inputs, K)
        for result in net.allreduce(inputs):
            assert np.array_equal(result, expected)
    if loss == 0 and duplicate == 0 and reorder == 0:
        assert sum(s.retransmissions for s in net.stats) == 0


def test_a_lost_result_is_recovered_from_the_switchs_stored_copy() -> None:
    """With every answer lost once, the window resends and the switch replies from its row."""
    net = Network(2, 2, seed=3, loss=0.5)
    inputs = [np.arange(10 * K, dtype=np.int32) * (r + 1) for r in range(2)]
    results = net.allreduce(inputs)
    assert all(np.array_equal(r, inputs[0] * 3) for r in results)
    assert sum(s.retransmissions for s in net.stats) > 0
    assert net.switch.ingress.job_stats[2].packets[1] > 0  # retransmit replies


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
