"""The worker shim: quantize -> packetize -> window, over a kernel UDP socket.

A tensor is cut into chunks of K elements. Chunk ``c`` always travels in
slot ``c % S`` of the job's S slots, so every worker puts the same chunk in
the same slot without talking to the others. Each slot carries one packet at
a time; the slot's result is the clock that releases its next chunk, as in
SwitchML's ``ReusePacket``. Every use of a slot has the next round number
(kept across calls, identical on every rank because all ranks use the slots
alike); its low bit picks one of the slot's two shadow copies, and the round
lets the switch tell a retransmission or a stale packet from new data.

Float tensors need every worker to agree on a block's scale before sending
it. The exponent that decides the scale of chunk ``c + S`` rides in the
packet of chunk ``c`` and the switch reduces it with max; the first chunk of
each slot is preceded by one data-less "priming" use that carries its
exponent. int32 tensors need none of that and are summed exactly.

Loss recovery: a use whose result does not come back within the
retransmission timeout (an adaptive estimate from measured round trips,
doubled per retry) is sent again, unchanged. The switch answers a
retransmission into a completed slot with the stored result, so lost
results and lost contributions heal the same way. Results that match no
outstanding use are duplicates and are ignored.
"""

from __future__ import annotations

import heapq
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from switchreduce import wire
from worker import quantize as q
from worker.errors import MismatchError, SessionEndedError, SwitchTimeoutError, WorkerError

_PRIME = -1  # chunk index of a slot's priming use (carries only an exponent)
_JOIN_RETRY = 0.2  # seconds between JOINs while the other ranks come up


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker drives the switch; every rank of a job must use the same k and slots."""

    k: int = wire.DEFAULT_K
    #: Fixed-point precision of float tensors (worker.quantize); every rank must agree.
    precision_bits: int = q.MAX_BITS
    #: Seconds without any new result (or JOIN answer) after which SwitchTimeoutError is raised.
    timeout: float = 10.0
    #: Bounds of the adaptive retransmission timeout, in seconds.
    min_rto: float = 0.05
    max_rto: float = 1.0
    #: Seconds to sleep when no result is waiting, so that one wake-up drains a batch of
    #: them instead of costing a context switch per packet (the window hides the delay).
    coalesce: float = 0.0005
    #: Kernel socket buffer sizes; a window's worth of packets must fit.
    socket_buffer: int = 4 << 20

    def __post_init__(self) -> None:
        wire.check_k(self.k)
        q.check_bits(self.precision_bits)
        if not 0 < self.min_rto <= self.max_rto:
            raise ValueError(f"need 0 < min_rto <= max_rto, got {self.min_rto}, {self.max_rto}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")


@dataclass(frozen=True)
class JobBinding:
    """What a worker must know of its job: identity, world, and its slice of the pool."""

    job_id: int
    rank: int
    world_size: int
    slot_count: int
    switch: tuple[str, int]
    #: The session the controller admitted the job with; None for a job installed on the
    #: switch's command line, whose ranks ask the switch for one (JOIN) when they start.
    session: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.world_size <= wire.MAX_WORKERS:
            raise ValueError(f"world size must be 1..{wire.MAX_WORKERS}, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world size {self.world_size}")
        if not 1 <= self.slot_count <= wire.MAX_SLOTS:
            raise ValueError(f"slot count must be 1..{wire.MAX_SLOTS}, got {self.slot_count}")
        if not 0 <= self.job_id <= 0xFFFF:
            raise ValueError(f"job id must fit 16 bits, got {self.job_id}")


@dataclass
class WorkerStats:
    """Cumulative counts over the communicator's lifetime."""

    packets_sent: int = 0
    packets_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    retransmissions: int = 0
    timeouts: int = 0
    duplicates: int = 0


@dataclass
class _SlotUse:
    """The one packet a slot has in flight."""

    chunk: int  # index into the tensor's chunks, or _PRIME
    wire_chunk: int  # what the header's chunk field says (the slot, for a priming use)
    round: int
    count: int
    packet: bytes
    sent_at: float = 0.0
    retries: int = 0
    timer: int = 0  # token of the pending timer entry; older entries are stale


@dataclass
class _Transfer:
    """State of one allreduce call.

    The input is read chunk by chunk as packets are built and each result is
    written straight into ``out``, so a call holds no copy of the tensor
    besides its result.
    """

    flat: np.ndarray  # the input, flat: float32 or int32
    out: np.ndarray  # the result, flat, same dtype
    chunks: int
    scaled: bool  # float: quantized per block; int32: sent as is
    format: int  # the header's format byte
    local_exp: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    global_exp: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    uses: dict[int, _SlotUse] = field(default_factory=dict)
    timers: list[tuple[float, int, int]] = field(default_factory=list)
    next_timer: int = 0  # unique across all uses and resends of the transfer


class _Rejoin(Exception):
    """The switch answered STALE before this session produced any result: join again."""


#: Tensor types summed through the float32 path and returned in their own type.
_VIA_FLOAT32 = ("bfloat16", "float16")


class SwitchCommunicator:
    """One rank's endpoint of a job: ``allreduce`` returns the sum over all ranks.

    A job installed on the switch's command line has no controller to hand
    out sessions, so the communicator asks the switch for one (JOIN) when it
    starts; a controller's binding carries its session already.
    """

    def __init__(
        self,
        binding: JobBinding,
        options: WorkerOptions | None = None,
        sock: socket.socket | None = None,
        bind: tuple[str, int] = ("0.0.0.0", 0),
    ) -> None:
        self.binding = binding
        self.options = options or WorkerOptions()
        self.stats = WorkerStats()
        self.sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if sock is None:
                self.sock.bind(bind)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                self.sock.setsockopt(socket.SOL_SOCKET, opt, self.options.socket_buffer)
            self.switch = (socket.gethostbyname(binding.switch[0]), binding.switch[1])
            # Connected: the kernel drops datagrams from anyone but the switch, and send() is
            # cheaper than sendto(). It also lets us ask for the path MTU.
            self.sock.connect(self.switch)
            _check_path_mtu(self.sock, self.options.k)
            # Non-blocking: a socket timeout would poll before every call.
            self.sock.setblocking(False)
            self._datagram_bytes = wire.datagram_bytes(self.options.k)
            self._buf = bytearray(self._datagram_bytes + 1)  # one spare byte exposes oversize
            self._zero_payload = bytes(self.options.k * wire.ELEMENT_BYTES)
            self._nonce = wire.new_session()  # names this communicator in its JOINs
            self._rounds = [0] * binding.slot_count  # last round used, per slot
            self._results_in_session = 0
            self._broken: WorkerError | None = None
            self._srtt: float | None = None
            self._rttvar = 0.0
            self.session = binding.session if binding.session is not None else self._join()
        except BaseException:
            self.sock.close()
            raise

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SwitchCommunicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def allreduce(self, tensor):
        """Sum of ``tensor`` over all ranks, same type, shape and dtype.

        Accepts numpy arrays and torch tensors of float32, int32, float16 and
        (torch) bfloat16, of any length below 2**32. int32 sums are exact
        (wrapping modulo 2**32 like the switch's adders); float sums are
        within the bound in :mod:`worker.quantize` (float16 and bfloat16 are
        summed as float32 and rounded back). Raises SwitchTimeoutError naming
        the missing chunks if the job stalls, SessionEndedError if another run
        of the job took the switch, MismatchError if the ranks disagree on
        what they sum; after any of these the communicator is unusable.
        """
        if _is_torch(tensor):
            import torch

            source = tensor.detach()
            dtype_name = str(source.dtype).removeprefix("torch.")
            if dtype_name in _VIA_FLOAT32:
                source = source.float()
            result = self._allreduce_array(source.cpu().contiguous().numpy(), dtype_name)
            return torch.from_numpy(result).to(device=tensor.device, dtype=tensor.dtype)
        array = np.asarray(tensor)
        if array.dtype == np.float16:
            return self._allreduce_array(array.astype(np.float32), "float16").astype(np.float16)
        return self._allreduce_array(array, array.dtype.name)

    def _allreduce_array(self, array: np.ndarray, dtype_name: str) -> np.ndarray:
        if array.dtype not in (np.float32, np.int32):
            raise TypeError(
                f"allreduce supports float32, int32, float16 and bfloat16 tensors, got {dtype_name}"
            )
        if array.size > wire.MAX_LENGTH:
            raise ValueError(f"allreduce sums at most {wire.MAX_LENGTH} elements, got {array.size}")
        if self._broken is not None:
            raise type(self._broken)(f"this communicator failed before: {self._broken}")
        q.check_finite(array)
        flat = array.reshape(-1)
        if flat.size == 0:
            return array.copy()
        scaled = array.dtype == np.float32
        bits = self.options.precision_bits if scaled else q.MAX_BITS
        while True:
            xfer = self._new_transfer(flat, scaled, wire.encode_format(dtype_name, bits))
            try:
                self._run(xfer)
                break
            except _Rejoin:
                self.session = self._join()
            except WorkerError as exc:
                self._broken = exc
                raise
        return xfer.out.reshape(array.shape)

    def _new_transfer(self, flat: np.ndarray, scaled: bool, format_: int) -> _Transfer:
        k = self.options.k
        chunks = -(-flat.size // k)
        xfer = _Transfer(flat, np.empty_like(flat), chunks, scaled, format_)
        if scaled:
            full = flat.size // k
            xfer.local_exp = np.empty(chunks, dtype=np.uint8)
            xfer.local_exp[:full] = q.block_exponents(flat[: full * k].reshape(full, k))
            if chunks > full:
                xfer.local_exp[full:] = q.block_exponents(flat[full * k :].reshape(1, -1))
            xfer.global_exp = np.zeros(chunks, dtype=np.uint8)
        return xfer

    # -- session ------------------------------------------------------------------

    def _join(self) -> int:
        """Ask the switch for the static job's session; every rank of the job gets the same.

        JOIN carries this communicator's nonce; the switch answers once every
        rank has joined (docs/protocol.md, Sessions).
        """
        b = self.binding
        request = (
            wire.Header(
                wire.MsgType.JOIN, b.job_id, b.rank, 0, 0, 0, 0, 0, 0, session=self._nonce
            ).pack()
            + self._zero_payload
        )
        self._drain()
        deadline = time.monotonic() + self.options.timeout
        next_send = 0.0
        last_error: OSError | None = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                cause = f" (last socket error: {last_error})" if last_error else ""
                raise SwitchTimeoutError(
                    f"job {b.job_id} rank {b.rank}: switch {self.switch[0]}:{self.switch[1]} "
                    f"did not answer JOIN within {self.options.timeout}s{cause} (are all "
                    f"{b.world_size} ranks running, and does the switch hold job {b.job_id}?)"
                )
            if now >= next_send:
                last_error = self._send_bytes(request) or last_error
                next_send = now + _JOIN_RETRY
            hdr = self._receive()
            if hdr is None or hdr.msg_type != wire.MsgType.JOINED or hdr.job_id != b.job_id:
                continue
            if (hdr.chunk, hdr.length) != (b.slot_count, b.world_size):
                raise WorkerError(
                    f"job {b.job_id} rank {b.rank}: switch {self.switch[0]}:{self.switch[1]} "
                    f"holds the job with {hdr.chunk} slots and world size {hdr.length}, this "
                    f"rank was given {b.slot_count} slots and world size {b.world_size}"
                )
            self._rounds = [0] * b.slot_count
            self._results_in_session = 0
            return hdr.session

    def _drain(self) -> None:
        """Discard whatever waits in the socket (answers meant for an earlier communicator)."""
        while True:
            try:
                self.sock.recv_into(self._buf)
            except (BlockingIOError, ConnectionRefusedError):
                return

    def _receive(self) -> wire.Header | None:
        """The header of the next datagram of the right size, or None (after a short wait)."""
        try:
            nbytes = self.sock.recv_into(self._buf)
        except BlockingIOError:
            time.sleep(self.options.coalesce)
            return None
        except ConnectionRefusedError:  # ICMP port unreachable: the switch is not there (yet)
            time.sleep(self.options.coalesce)
            return None
        self.stats.packets_received += 1
        self.stats.bytes_received += nbytes
        if nbytes != self._datagram_bytes:
            self.stats.duplicates += 1
            return None
        return wire.unpack_header(self._buf)

    def _send_bytes(self, packet: bytes) -> OSError | None:
        """Send one datagram; a full buffer or an unreachable switch is a loss (returned)."""
        try:
            self.sock.send(packet)
        except BlockingIOError:
            return None  # buffer full: lost; the timer resends it
        except OSError as exc:  # e.g. ICMP port unreachable while the switch restarts
            return exc
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(packet)
        return None

    # -- window ---------------------------------------------------------------

    def _run(self, xfer: _Transfer) -> None:
        slots = min(self.binding.slot_count, xfer.chunks)
        for slot in range(slots):
            self._send(xfer, slot, _PRIME if xfer.scaled else slot)
        last_progress = time.monotonic()
        while xfer.uses:
            hdr = self._receive()
            now = time.monotonic()
            if hdr is not None and self._on_answer(xfer, hdr, now):
                last_progress = now
            elif now - last_progress > self.options.timeout:
                raise SwitchTimeoutError(self._stall_message(xfer))
            self._retransmit_expired(xfer, now)

    def _send(self, xfer: _Transfer, slot: int, chunk: int) -> None:
        """Start the next use of ``slot``: its packet carries ``chunk`` (or primes it)."""
        b, k, slots = self.binding, self.options.k, self.binding.slot_count
        round_ = self._rounds[slot] = (self._rounds[slot] + 1) & 0xFFFF
        if chunk == _PRIME:
            exponent, count, payload, wire_chunk = xfer.local_exp[slot], 0, self._zero_payload, slot
        else:
            ahead = chunk + slots
            exponent = xfer.local_exp[ahead] if xfer.scaled and ahead < xfer.chunks else 0
            values = xfer.flat[chunk * k : (chunk + 1) * k]
            count = values.size
            if xfer.scaled:
                values = q.quantize_block(
                    values, xfer.global_exp[chunk], b.world_size, self.options.precision_bits
                )
            payload = values.astype(wire.ELEMENT_DTYPE).tobytes()
            if count < k:
                payload += self._zero_payload[count * wire.ELEMENT_BYTES :]
            wire_chunk = chunk
        header = wire.Header(
            wire.MsgType.DATA, b.job_id, b.rank, slot, round_ & 1, int(exponent), round_,
            wire_chunk, count, xfer.format, xfer.flat.size, self.session,
        )  # fmt: skip
        use = _SlotUse(chunk, wire_chunk, round_, count, header.pack() + payload)
        xfer.uses[slot] = use
        self._transmit(xfer, slot, use)

    def _transmit(self, xfer: _Transfer, slot: int, use: _SlotUse) -> None:
        self._send_bytes(use.packet)
        use.sent_at = time.monotonic()
        xfer.next_timer += 1
        use.timer = xfer.next_timer
        rto = min(self._rto() * (1 << use.retries), self.options.max_rto)
        heapq.heappush(xfer.timers, (use.sent_at + rto, slot, use.timer))

    def _on_answer(self, xfer: _Transfer, hdr: wire.Header, now: float) -> bool:
        """Take the switch's answer if it concerns an outstanding use; True on progress."""
        use = xfer.uses.get(hdr.slot)
        if (
            use is None
            or hdr.job_id != self.binding.job_id
            or hdr.session != self.session  # a forger's packet echoed, or an older run's
            or hdr.round != use.round
            or hdr.chunk != use.wire_chunk
        ):
            self.stats.duplicates += 1
            return False
        if hdr.msg_type == wire.MsgType.STALE:
            self._session_ended()
        if hdr.msg_type == wire.MsgType.REFUSED:
            raise MismatchError(self._mismatch_message(xfer, hdr))
        if hdr.msg_type != wire.MsgType.RESULT or hdr.count != use.count:
            self.stats.duplicates += 1
            return False
        self._results_in_session += 1
        if use.retries == 0:
            self._sample_rtt(now - use.sent_at)
        slots = self.binding.slot_count
        if use.chunk == _PRIME:
            xfer.global_exp[hdr.slot] = hdr.exponent
            self._send(xfer, hdr.slot, hdr.slot)
            return True
        self._store(xfer, use.chunk, hdr.count)
        ahead = use.chunk + slots
        if ahead < xfer.chunks:
            if xfer.scaled:
                xfer.global_exp[ahead] = hdr.exponent
            self._send(xfer, hdr.slot, ahead)
        else:
            del xfer.uses[hdr.slot]
        return True

    def _store(self, xfer: _Transfer, chunk: int, count: int) -> None:
        """Write the result waiting in the receive buffer into the output."""
        sums = wire.decode_elements(self._buf, self.options.k)[:count]
        lo = chunk * self.options.k
        if xfer.scaled:
            exponent = xfer.global_exp[chunk : chunk + 1]
            bits = self.options.precision_bits
            xfer.out[lo : lo + count] = q.dequantize(
                sums[None, :], exponent, self.binding.world_size, bits
            )[0]
        else:
            xfer.out[lo : lo + count] = sums

    def _session_ended(self) -> None:
        """STALE echoing our own session: the switch has moved on to another run of the job."""
        b = self.binding
        if b.session is None and self._results_in_session == 0:
            raise _Rejoin  # the session never carried a sum: a join raced another; join again
        raise SessionEndedError(
            f"job {b.job_id} rank {b.rank}: switch {self.switch[0]}:{self.switch[1]} no longer "
            f"takes this run's session {self.session:#018x}: another run of job {b.job_id} has "
            f"started (or the job was re-admitted); this run's allreduce cannot finish"
        )

    def _mismatch_message(self, xfer: _Transfer, hdr: wire.Header) -> str:
        b = self.binding
        mine = f"{wire.describe_format(xfer.format)}[{xfer.flat.size}]"
        if hdr.rank == b.rank:
            other = "another rank sums something else"
        else:
            theirs = f"{wire.describe_format(hdr.format)}[{hdr.length}]"
            other = f"rank {hdr.rank} sums {theirs}"
        return (
            f"job {b.job_id} rank {b.rank}: the switch refused the allreduce: ranks disagree on "
            f"what they sum ({other}, this rank {mine}); every rank must pass the same dtype, "
            f"length and precision"
        )

    def _retransmit_expired(self, xfer: _Transfer, now: float) -> None:
        timers = xfer.timers
        while timers and timers[0][0] <= now:
            _, slot, token = heapq.heappop(timers)
            use = xfer.uses.get(slot)
            if use is None or use.timer != token:
                continue  # answered, or already resent
            use.retries += 1
            self.stats.timeouts += 1
            self.stats.retransmissions += 1
            self._transmit(xfer, slot, use)

    # -- retransmission timeout (RFC 6298, Karn's rule: no samples from resent uses) --

    def _sample_rtt(self, rtt: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt

    def _rto(self) -> float:
        if self._srtt is None:
            return self.options.min_rto * 10
        rto = self._srtt + 4 * self._rttvar
        return min(max(rto, self.options.min_rto), self.options.max_rto)

    def _stall_message(self, xfer: _Transfer) -> str:
        missing = np.flatnonzero(~_received_mask(xfer, self.binding.slot_count))
        b = self.binding
        return (
            f"job {b.job_id} rank {b.rank}: no result from switch {self.switch[0]}:"
            f"{self.switch[1]} for {self.options.timeout}s; {missing.size} of "
            f"{xfer.chunks} chunks missing: {_ranges(missing)} "
            f"(are all {b.world_size} ranks running?)"
        )


def _received_mask(xfer: _Transfer, slot_count: int) -> np.ndarray:
    """Chunks whose result has arrived: in each slot, those before its outstanding use."""
    done = np.ones(xfer.chunks, dtype=bool)
    for slot, use in xfer.uses.items():
        first = slot if use.chunk == _PRIME else use.chunk
        done[first::slot_count] = False
    return done


def _ranges(indices: np.ndarray, limit: int = 8) -> str:
    """'0-3, 7, 9-12 ...' for a sorted index array."""
    if indices.size == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts = np.concatenate(([indices[0]], indices[breaks + 1]))
    ends = np.concatenate((indices[breaks], [indices[-1]]))
    parts = [f"{s}" if s == e else f"{s}-{e}" for s, e in zip(starts, ends, strict=True)]
    more = f" and {len(parts) - limit} more ranges" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _check_path_mtu(sock: socket.socket, k: int) -> None:
    """Refuse a K whose packets the path to the switch would fragment (switches drop those)."""
    mtu = sock.getsockopt(socket.IPPROTO_IP, _IP_MTU)
    if wire.ip_packet_bytes(k) > mtu:
        raise ValueError(
            f"K={k} makes {wire.ip_packet_bytes(k)}-byte IP packets but the path MTU to the "
            f"switch is {mtu}; use K <= {wire.MAX_K_STANDARD_MTU} or enable jumbo frames"
        )


_IP_MTU = getattr(socket, "IP_MTU", 14)  # Linux; Python exposes it from 3.12 on


def _is_torch(obj: object) -> bool:
    return type(obj).__module__.startswith("torch")
