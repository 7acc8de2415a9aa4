"""The worker's protocol as a state machine without I/O: the specification of the window.

A :class:`Transfer` is one allreduce call. It is given datagrams and the
time, and it returns the datagrams to send; it never touches a socket or a
clock. The socket driver (:mod:`worker.shim`) is a thin loop around it, the
deterministic tests (tests/test_window.py) connect several transfers to the
pure switch pipeline through a seeded lossy network in virtual time, and a
faster engine must do exactly what it does.

The rules (docs/protocol.md):

- Chunk ``c`` travels in window slot ``c % S``; a slot carries one packet
  at a time, and its result releases the slot's next chunk (SwitchML's
  self-clocking window). Window slot ``i`` is the switch's slot
  ``(first_slot + i) % S``: the caller turns ``first_slot`` on by each
  call's chunks, so a call whose tensor needs fewer slots than the job has
  uses those the last calls left longest ago (a quorum's late rank then
  holds nobody back for as many calls as the slots hold). Each use of a
  switch slot has its next round, counted across calls (``rounds``, owned
  by the caller), identical on every rank.
- A float tensor's chunk is quantized with the exponent the switch agreed on
  (max over ranks). The exponent of chunk ``c + S`` rides in chunk ``c``'s
  packet; the first chunk of each slot is preceded by a priming use
  (``count = 0``, a header alone) that carries its exponent. int32 needs
  none of that. Round trips are sampled from full packets only.
- A use whose result does not come back within the retransmission timeout
  (:class:`RoundTrip`) has timed out. Only the oldest timed-out use is sent
  again, unchanged, as a probe (TCP's RTO resends only the first
  unacknowledged segment, RFC 6298 5.4); the others are held, without a
  timer, until the probe's answer says what the silence meant. Waiting is
  not loss: a round waits for its slowest rank, and a rank that resent its
  whole window whenever a peer was late would flood the link with packets
  the switch has. The switch answers a resent use whose round is incomplete
  with WAITING (its contribution is in; the first word says which ranks the
  row holds): nothing is resent, the held uses stay held, and the next probe
  waits twice as long, per probe since the last result (capped). A RESULT to
  a probe that had no WAITING says the probe was what its round missed: the
  next held use may be lost too and is the next probe, sent at once (a lost
  tail costs a round trip per use, not a timeout each). Any other result
  ends the stall: the held uses' timers start again from then.
- A gap repairs sooner (ATP's rule; TCP's RACK): a use still out when a use
  sent more than a reordering window after it is answered is resent at
  once, about a round trip after its loss instead of a timeout later. On
  FIFO paths that never happens without a loss: every rank sends its uses in
  the order results come back, which is the order rounds complete in, so
  queues and slow ranks delay rounds but never reorder them. Every rank sees
  the gap, so a rank whose packet arrived resends a duplicate the switch
  answers from its row if the result was lost (WAITING if the round still
  waits for the lost contribution).
- In a quorum job a round may complete without this rank, even before it
  sends its own packet of the round: a RESULT of this job and session for
  one of a slot's next two rounds is kept (``early``, one datagram per slot
  and version, owned by the caller across calls, as ``rounds`` is). The use
  it answers then sends no DATA: it takes the kept sums and says so with a
  RELEASE (a header alone), so the switch may reuse the row. A quorum job's
  rank also sends a RELEASE as it takes each slot's last result of a call,
  so a rank that is late with its next call holds nobody back.
- A result without this rank's contribution (a quorum completed its round
  without it) answers none of this rank's packets: it is no round-trip
  sample, and no sign that an earlier use was lost. A rank that starts a
  call late finds such results waiting in its socket as it sends; taken as
  answers, they gave round trips of zero, hence a reordering window of
  zero, and each one's use seemed to overtake every use sent at the same
  instant, which were all resent.
- Every packet sent again is typed RESEND: in a quorum job the switch
  answers a late RESEND with the sums, a late DATA with nothing (the
  multicast went to its rank too).
- An answer counts only if it echoes an outstanding use: job, session,
  slot, round and chunk (and count, for a RESULT). STALE for our session
  raises :class:`StaleSession` (the caller decides: join again, or stop);
  REFUSED raises MismatchError.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from switchreduce import wire
from switchreduce.worker import quantize as q
from switchreduce.worker.errors import MismatchError

#: The retransmission timeout's floor, SwitchML's: the window repairs most losses without it.
DEFAULT_MIN_RTO = 0.01
PRIME = -1  # chunk index of a slot's priming use (carries only an exponent)
#: Seconds between JOINs while the other ranks of a static job come up.
JOIN_RETRY = 0.2


def early_results(slot_count: int, k: int) -> bytearray:
    """An empty store of early results (``Transfer.early``): a datagram per slot and version."""
    return bytearray(2 * slot_count * wire.datagram_bytes(k))


class StaleSession(Exception):
    """The switch answered STALE for this transfer's session: another run holds the job."""


@dataclass
class WindowStats:
    """What the protocol did, over a communicator's lifetime."""

    retransmissions: int = 0  # every resend: probes, fast retransmissions and held uses resent
    timeouts: int = 0  # probes: resends because uses timed out
    fast_retransmissions: int = 0  # resent because later uses overtook it
    duplicates: int = 0
    waits: int = 0  # WAITING answers: resends the switch did not need (the round waited)
    late: int = 0  # chunks whose sums came without this rank's (a quorum completed them)


@dataclass
class RoundTrip:
    """RFC 6298's retransmission timeout; Karn's rule: no samples from resent uses.

    The floor follows the path: twice the smoothed round trip, and never below
    ``min_rto``, so a fast link repairs a tail loss in milliseconds and a slow or
    loaded one does not resend what is merely late.
    """

    min_rto: float
    max_rto: float
    srtt: float | None = None
    rttvar: float = 0.0
    min_rtt: float | None = None

    def sample(self, rtt: float) -> None:
        self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def reordering_window(self) -> float:
        """How much earlier than an answered use another must have been sent to count as
        lost: RACK's quarter of the smallest round trip (infinite before a sample)."""
        return float("inf") if self.min_rtt is None else self.min_rtt / 4

    def rto(self, retries: int = 0) -> float:
        """The timeout of a use resent ``retries`` times (doubled per retry, capped)."""
        if self.srtt is None:
            base = self.min_rto * 10  # no sample yet: be patient, as TCP's initial RTO is
        else:
            floor = max(self.min_rto, 2 * self.srtt)
            base = min(max(self.srtt + 4 * self.rttvar, floor), self.max_rto)
        return min(base * (1 << retries), self.max_rto)


@dataclass(frozen=True)
class Job:
    """What a transfer must know of its job and of the rank it runs on."""

    job_id: int
    rank: int
    world_size: int
    slot_count: int
    k: int
    session: int
    precision_bits: int = q.MAX_BITS
    #: Bits per element on the wire (wire.LANE_BITS); 16 and 8 carry float tensors only.
    lane_bits: int = q.MAX_BITS
    #: Stochastic rounding's key for this call (quantize.call_key); None: round to nearest.
    noise_key: int | None = None
    #: Contributions that complete a round (the job's quorum); None: every rank's.
    quorum: int | None = None
    #: The switch's slot of window slot 0 (chunk 0): the caller's, turned on by each call.
    first_slot: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.first_slot < self.slot_count:
            raise ValueError(f"first slot must be 0..{self.slot_count - 1}, got {self.first_slot}")

    @property
    def contributors(self) -> int:
        """How many ranks' contributions each result holds."""
        return self.world_size if self.quorum is None else self.quorum

    def next_first_slot(self, chunks: int) -> int:
        """The first slot of the call after this one, of ``chunks`` chunks: the switch's slot
        after the last one it used."""
        return (self.first_slot + chunks) % self.slot_count

    @property
    def chunk_elements(self) -> int:
        """Elements one packet carries: K words of 32 / lane_bits lanes."""
        return self.k * wire.lanes_per_word(self.lane_bits)


@dataclass
class _SlotUse:
    """The one packet a slot has in flight."""

    chunk: int  # index into the tensor's chunks, or PRIME
    wire_chunk: int  # what the header's chunk field says (the switch's slot, for a priming use)
    round: int
    count: int
    packet: bytes
    sent_at: float = 0.0  # when last sent
    first_sent_at: float = 0.0
    retries: int = 0
    timer: int = 0  # token of the pending timer entry; older entries are stale (0: none)
    held: bool = False  # timed out, not resent: waits for the probe's answer
    waiting: bool = False  # the switch answered WAITING: it holds this use's contribution


@dataclass
class Transfer:
    """One allreduce call: feed it answers and the time, send what it returns.

    The input is read chunk by chunk as packets are built and each result is
    written straight into ``out``, so a call holds no copy of the tensor
    besides its result.
    """

    job: Job
    flat: np.ndarray  # the input, flat: float32 or int32
    format: int  # the header's format byte
    rounds: list[int]  # last round used per slot: the caller's, kept across calls
    rtt: RoundTrip
    stats: WindowStats
    #: Results that came before this rank sent their round (early_results): the caller's
    early: bytearray
    out: np.ndarray = field(init=False)
    chunks: int = field(init=False)
    scaled: bool = field(init=False)  # float: quantized per block; int32: sent as is
    results: int = 0  # results taken (a session that carried one is a real run)
    progress_at: float = 0.0  # when the last result came
    _local_exp: np.ndarray = field(init=False)
    _global_exp: np.ndarray = field(init=False)
    _late: np.ndarray = field(init=False)  # per chunk: its sums came without this rank's
    _uses: dict[int, _SlotUse] = field(default_factory=dict)
    _sent_order: OrderedDict[int, None] = field(default_factory=OrderedDict)  # slots, oldest first
    _timers: list[tuple[float, int, int]] = field(default_factory=list)
    _next_timer: int = 0  # unique across all uses and resends of the transfer
    _probe: int | None = None  # the slot whose use was resent for the held ones
    _stalls: int = 0  # probes since the last result: the next one's backoff

    def __post_init__(self) -> None:
        k = self.job.chunk_elements
        self.chunks = -(-self.flat.size // k)
        self.scaled = self.flat.dtype == np.float32
        if not self.scaled and self.job.lane_bits != q.MAX_BITS:
            raise TypeError("int32 tensors are summed exactly, in 32-bit lanes only")
        self.out = np.empty_like(self.flat)
        self._local_exp = np.zeros(self.chunks, dtype=np.uint8)
        self._global_exp = np.zeros(self.chunks, dtype=np.uint8)
        self._late = np.zeros(self.chunks, dtype=bool)
        if self.scaled:
            full = self.flat.size // k
            self._local_exp[:full] = q.block_exponents(self.flat[: full * k].reshape(full, k))
            if self.chunks > full:
                self._local_exp[full:] = q.block_exponents(self.flat[full * k :].reshape(1, -1))
        self._zero_payload = bytes(self.job.k * wire.ELEMENT_BYTES)
        self._datagram_bytes = wire.datagram_bytes(self.job.k)
        if len(self.early) != 2 * self.job.slot_count * self._datagram_bytes:
            raise ValueError("early must hold a datagram per slot and version")

    @property
    def done(self) -> bool:
        return not self._uses

    def start(self, now: float) -> list[bytes]:
        """The first use of every slot the tensor needs (a priming use for floats)."""
        self.progress_at = now
        slots = min(self.job.slot_count, self.chunks)
        sent: list[bytes] = []
        for slot in range(slots):
            sent += self._send(slot, PRIME if self.scaled else slot, now)
        return sent

    def receive(self, datagram: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """Take a datagram from the switch; what to send in answer (the slot's next use)."""
        if len(datagram) not in (wire.HEADER_BYTES, self._datagram_bytes):
            self.stats.duplicates += 1
            return []
        hdr = wire.unpack_header(datagram)
        slot = self._window_slot(hdr.slot)
        use = None if slot is None else self._uses.get(slot)
        ours = hdr.job_id == self.job.job_id and hdr.session == self.job.session
        if (
            not ours
            or slot is None
            or use is None
            or (hdr.round, hdr.chunk, len(datagram)) != (use.round, use.wire_chunk, len(use.packet))
        ):
            if ours and self._keep_early(hdr, datagram):
                return []
            self.stats.duplicates += 1  # a forger's packet echoed, an older run's, or a copy
            return []
        if hdr.msg_type == wire.MsgType.STALE:
            raise StaleSession
        if hdr.msg_type == wire.MsgType.REFUSED:
            raise MismatchError(refusal_message(self.job, self.format, self.flat.size, hdr))
        if hdr.msg_type == wire.MsgType.WAITING:
            self.stats.waits += 1
            use.waiting = True
            return []
        if hdr.msg_type != wire.MsgType.RESULT or hdr.count != use.count:
            self.stats.duplicates += 1
            return []
        self.progress_at = now
        resend: list[bytes] = []
        if self._holds_ours(hdr):  # else no answer to our packet (module docstring)
            if use.retries == 0 and use.chunk != PRIME:  # Karn's rule; a header alone's round
                self.rtt.sample(now - use.sent_at)  # trip is no full packet's
            resend = self._overtake(slot, now)
        resend += self._end_stall(slot, now)
        after = self._take(use.chunk, slot, hdr, datagram)
        if after is None:
            self._finish(slot)
            if self.job.contributors < self.job.world_size:  # a quorum's: say the sums are in,
                resend.append(_release(use.packet))  # so the row may go
            return resend
        return [*resend, *self._send(slot, after, now)]

    def expire(self, now: float) -> list[bytes]:
        """The uses whose timeout has passed are held; the oldest held is resent as a probe,
        unless a probe is still out within its own timeout."""
        timed_out = False
        while self._timers and self._timers[0][0] <= now:
            _, slot, token = heapq.heappop(self._timers)
            use = self._uses.get(slot)
            if use is None or use.timer != token:
                continue  # answered, or already resent
            use.timer, use.held, timed_out = 0, True, True
        if not timed_out or (self._probe is not None and not self._uses[self._probe].held):
            return []
        self._probe = next(slot for slot in self._sent_order if self._uses[slot].held)
        self._stalls += 1
        self.stats.timeouts += 1
        probe = self._uses[self._probe]
        return [self._resend(self._probe, probe, now, backoff=self._stalls)]

    def next_deadline(self) -> float | None:
        """When :meth:`expire` may next have something to resend (None when nothing is out)."""
        while self._timers:
            _, slot, token = self._timers[0]
            use = self._uses.get(slot)
            if use is not None and use.timer == token:
                return self._timers[0][0]
            heapq.heappop(self._timers)
        return None

    @property
    def exponents(self) -> np.ndarray:
        """The exponent byte every rank agreed on, per chunk (0 until its result is in)."""
        return self._global_exp

    def late(self) -> np.ndarray:
        """Indices of the chunks whose sums came without this rank's contribution."""
        return np.flatnonzero(self._late)

    def missing(self) -> np.ndarray:
        """Indices of the chunks whose result has not arrived."""
        done = np.ones(self.chunks, dtype=bool)
        for slot, use in self._uses.items():
            first = slot if use.chunk == PRIME else use.chunk
            done[first :: self.job.slot_count] = False
        return np.flatnonzero(~done)

    def _take(
        self, chunk: int, slot: int, hdr: wire.Header, datagram: bytes | bytearray | memoryview
    ) -> int | None:
        """Take a result for ``chunk`` (or a priming use): the next chunk of its slot, or None
        when the slot is done for this call."""
        self.results += 1
        if chunk == PRIME:
            self._global_exp[slot] = hdr.exponent
            return slot
        self._store(chunk, hdr.count, datagram)
        if not self._holds_ours(hdr):  # a quorum completed the round without us
            self._late[chunk] = True
            self.stats.late += 1
        ahead = chunk + self.job.slot_count
        if ahead >= self.chunks:
            return None
        if self.scaled:
            self._global_exp[ahead] = hdr.exponent
        return ahead

    def _holds_ours(self, hdr: wire.Header) -> bool:
        """Whether a result's sums hold this rank's contribution (its ``length``: the ranks')."""
        return bool(hdr.length >> self.job.rank & 1)

    def _switch_slot(self, slot: int) -> int:
        """The switch's slot that window slot ``slot`` uses in this call."""
        return (self.job.first_slot + slot) % self.job.slot_count

    def _window_slot(self, switch_slot: int) -> int | None:
        """The window slot that uses the switch's ``switch_slot`` in this call, or None."""
        if switch_slot >= self.job.slot_count:
            return None
        return (switch_slot - self.job.first_slot) % self.job.slot_count

    def _finish(self, slot: int) -> None:
        """The slot has nothing more to send in this call."""
        self._uses.pop(slot, None)
        self._sent_order.pop(slot, None)

    def _keep_early(self, hdr: wire.Header, datagram: bytes | bytearray | memoryview) -> bool:
        """Keep a RESULT for one of the slot's next two rounds (a quorum completed it before
        this rank sent its own); False if the datagram is no such result."""
        if (
            self.job.contributors == self.job.world_size  # no round completes without us
            or hdr.msg_type != wire.MsgType.RESULT
            or (len(datagram) == wire.HEADER_BYTES) != (hdr.count == 0)  # a priming use's alone
            or hdr.slot >= self.job.slot_count
            or not 1 <= (hdr.round - self.rounds[hdr.slot]) & 0xFFFF <= 2
        ):
            return False
        at = (2 * hdr.slot + (hdr.round & 1)) * self._datagram_bytes
        self.early[at : at + len(datagram)] = datagram
        return True

    def _early_result(
        self, slot: int, round_: int, wire_chunk: int, count: int
    ) -> tuple[wire.Header, bytes] | None:
        """The kept result of this use of window slot ``slot`` (its header, and it), taken
        from the store, or None."""
        if self.job.contributors == self.job.world_size:  # none is ever kept
            return None
        at = (2 * self._switch_slot(slot) + (round_ & 1)) * self._datagram_bytes
        size = wire.HEADER_BYTES if count == 0 else self._datagram_bytes  # a priming use's alone
        datagram = bytes(self.early[at : at + size])
        hdr = wire.unpack_header(datagram)
        if (
            hdr.msg_type != wire.MsgType.RESULT
            or (hdr.job_id, hdr.session) != (self.job.job_id, self.job.session)
            or (hdr.round, hdr.chunk, hdr.count) != (round_, wire_chunk, count)
        ):
            return None
        self.early[at] = 0  # taken: no message type
        return hdr, datagram

    def _send(self, slot: int, chunk: int, now: float) -> list[bytes]:
        """Start the next use of ``slot``: its packet carries ``chunk`` (or primes it). A use
        whose result came early sends a RELEASE instead, and the slot goes on to its next."""
        sent: list[bytes] = []
        while True:
            hdr, packet = self._packet(slot, chunk)
            early = self._early_result(slot, hdr.round, hdr.chunk, hdr.count)
            if early is None:
                use = _SlotUse(chunk, hdr.chunk, hdr.round, hdr.count, packet, first_sent_at=now)
                self._uses[slot] = use
                self._arm(slot, use, now)
                return [*sent, packet]
            sent.append(_release(packet))
            self.progress_at = now
            after = self._take(chunk, slot, *early)
            if after is None:
                self._finish(slot)
                return sent
            chunk = after

    def _packet(self, slot: int, chunk: int) -> tuple[wire.Header, bytes]:
        """The DATA packet of the next use of window slot ``slot``, ``chunk``'s (or a priming
        use's), and its header."""
        job, k = self.job, self.job.chunk_elements
        switch_slot = self._switch_slot(slot)
        round_ = self.rounds[switch_slot] = (self.rounds[switch_slot] + 1) & 0xFFFF
        if chunk == PRIME:  # a header alone: it carries an exponent, no elements
            exponent, count, payload = self._local_exp[slot], 0, b""
            wire_chunk = switch_slot
        else:
            ahead = chunk + job.slot_count
            exponent = self._local_exp[ahead] if self.scaled and ahead < self.chunks else 0
            values = self.flat[chunk * k : (chunk + 1) * k]
            count = values.size
            if self.scaled:
                noise = None
                if job.noise_key is not None:
                    noise = q.uniforms(job.noise_key, chunk * k, count)
                values = q.quantize_block(
                    values,
                    self._global_exp[chunk],
                    job.world_size,
                    job.precision_bits,
                    job.lane_bits,
                    noise,
                )
            if job.lane_bits != q.MAX_BITS:
                lanes = q.to_lanes(values, job.world_size, job.lane_bits)
                payload = wire.encode_lanes(lanes, job.lane_bits, job.k)
                count = -(-count // wire.lanes_per_word(job.lane_bits))  # words: the switch's K
            else:
                payload = values.astype(wire.ELEMENT_DTYPE).tobytes()
                payload += self._zero_payload[count * wire.ELEMENT_BYTES :]
            wire_chunk = chunk
        header = wire.Header(
            wire.MsgType.DATA,
            job.job_id,
            job.rank,
            switch_slot,
            round_ & 1,
            int(exponent),
            round_,
            wire_chunk,
            count,
            self.format,
            self.flat.size,
            job.session,
        )
        return header, header.pack() + payload

    def _overtake(self, answered: int, now: float) -> list[bytes]:
        """The uses sent a reordering window or more before the answered one, resent.

        Their rounds should have completed first (see the module docstring), so
        a contribution to each, or its result, was lost. Uses sent at about the
        same time are spared: a network that does reorder a little, or a batch
        of sends, does not make them look lost.
        """
        # The answered use's first sending: an answer to a resent use may be the original's,
        # so its resending says nothing of the uses sent between the two (RACK's ambiguity).
        sent_by = self._uses[answered].first_sent_at - self.rtt.reordering_window()
        lost = []
        for slot in self._sent_order:  # oldest first
            if slot == answered or self._uses[slot].sent_at > sent_by:
                break
            lost.append(slot)
        self.stats.fast_retransmissions += len(lost)
        return [self._resend(slot, self._uses[slot], now) for slot in lost]

    def _end_stall(self, answered: int, now: float) -> list[bytes]:
        """A result came. If it answers a probe the switch did not say WAITING to, the probe
        was what its round missed and the next held use may be lost too: it is the next probe,
        sent at once. Any other result ends the stall: the held uses' timers start again."""
        if self._probe is None:  # nothing is held without a probe out
            return []
        held = [s for s in self._sent_order if s != answered and self._uses[s].held]
        self._stalls = 0
        if answered == self._probe and not self._uses[answered].waiting and held:
            self._probe = held[0]
            return [self._resend(held[0], self._uses[held[0]], now)]
        self._probe = None
        for slot in held:
            use = self._uses[slot]
            use.held = False
            self._set_timer(slot, use, now + self.rtt.rto(use.retries))
        return []

    def _resend(self, slot: int, use: _SlotUse, now: float, backoff: int = 0) -> bytes:
        """The use's packet again, unchanged; its timer backs off (at least ``backoff``
        doublings) and it goes to the back."""
        use.retries += 1
        use.held = False
        use.packet = bytes([wire.MsgType.RESEND]) + use.packet[1:]  # says so (the switch
        self.stats.retransmissions += 1  # answers a late RESEND, not a late DATA)
        self._arm(slot, use, now, max(use.retries, backoff))
        return use.packet

    def _arm(self, slot: int, use: _SlotUse, now: float, backoff: int = 0) -> None:
        """(Re)start the use's timer, doubled ``backoff`` times; it is now the most recently
        sent use."""
        self._sent_order[slot] = None
        self._sent_order.move_to_end(slot)
        use.sent_at = now
        self._set_timer(slot, use, now + self.rtt.rto(backoff))

    def _set_timer(self, slot: int, use: _SlotUse, deadline: float) -> None:
        self._next_timer += 1
        use.timer = self._next_timer
        heapq.heappush(self._timers, (deadline, slot, use.timer))

    def _store(self, chunk: int, count: int, datagram: bytes | bytearray | memoryview) -> None:
        """Write a result's sums into the output (``count`` words)."""
        job = self.job
        lo = chunk * job.chunk_elements
        if job.lane_bits != q.MAX_BITS:
            count = min(job.chunk_elements, self.flat.size - lo)
            lanes = wire.decode_lanes(datagram, job.lane_bits, job.k)[:count]
            sums = q.from_lanes(lanes, job.world_size, job.lane_bits, job.contributors)
        else:
            sums = wire.decode_elements(datagram, job.k)[:count]
        if self.scaled:
            exponent = self._global_exp[chunk : chunk + 1]
            self.out[lo : lo + count] = q.dequantize(
                sums[None, :], exponent, job.world_size, job.precision_bits, job.lane_bits
            )[0]
        else:
            self.out[lo : lo + count] = sums


def _release(packet: bytes) -> bytes:
    """The RELEASE of a use: its header alone, typed RELEASE."""
    return bytes([wire.MsgType.RELEASE]) + packet[1 : wire.HEADER_BYTES]


def refusal_message(job: Job, format: int, length: int, hdr: wire.Header) -> str:
    """What a REFUSED answer (``hdr``) to a transfer of ``length`` elements in ``format`` means."""
    mine = f"{wire.describe_format(format)}[{length}]"
    if hdr.rank == job.rank:  # our own packet echoed: the row says no more
        other = "another rank sums something else, or sends another chunk in this round"
    elif (hdr.format, hdr.length) == (format, length):  # then the row's chunk disagreed
        other = f"a rank sends another chunk than {hdr.chunk} in this round: rounds out of step"
    else:
        other = f"rank {hdr.rank} sums {wire.describe_format(hdr.format)}[{hdr.length}]"
    return (
        f"job {job.job_id} rank {job.rank}: the switch refused the allreduce: ranks disagree "
        f"on what they sum ({other}, this rank {mine}); every rank must pass the same "
        f"dtype, length, precision and lane width"
    )


@dataclass
class Join:
    """A static job's JOIN: ask the switch for the session until it answers.

    ``nonce`` names the communicator; the switch answers JOINED when every
    rank has joined, with the session, its slot count and world size.
    """

    job_id: int
    rank: int
    k: int
    nonce: int
    next_send: float = 0.0

    def expire(self, now: float) -> list[bytes]:
        """The JOIN, again if its answer has not come within JOIN_RETRY."""
        if now < self.next_send:
            return []
        self.next_send = now + JOIN_RETRY
        header = wire.Header(
            wire.MsgType.JOIN, self.job_id, self.rank, 0, 0, 0, 0, 0, 0, session=self.nonce
        )
        return [header.pack() + bytes(self.k * wire.ELEMENT_BYTES)]

    def receive(self, datagram: bytes | bytearray | memoryview) -> wire.Header | None:
        """The JOINED header if the datagram is one for this job, else None."""
        if len(datagram) != wire.datagram_bytes(self.k):
            return None
        hdr = wire.unpack_header(datagram)
        if hdr.msg_type != wire.MsgType.JOINED or hdr.job_id != self.job_id:
            return None
        return hdr
