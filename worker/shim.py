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

import contextlib
import heapq
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from switchreduce import wire
from worker import quantize as q

_PRIME = -1  # chunk index of a slot's priming use (carries only an exponent)


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker drives the switch; every rank of a job must use the same k and slots."""

    k: int = wire.DEFAULT_K
    #: Fixed-point precision of float tensors (worker.quantize); every rank must agree.
    precision_bits: int = q.MAX_BITS
    #: Seconds without any new result after which allreduce raises TimeoutError.
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
    """State of one allreduce call."""

    blocks: np.ndarray  # (C, K) input, zero-padded
    scaled: bool  # float: quantized per block; int32: sent as is
    prescaled: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    local_exp: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    global_exp: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    sums: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))
    uses: dict[int, _SlotUse] = field(default_factory=dict)
    timers: list[tuple[float, int, int]] = field(default_factory=list)
    next_timer: int = 0  # unique across all uses and resends of the transfer
    length: int = 0


class SwitchCommunicator:
    """One rank's endpoint of a job: ``allreduce`` returns the sum over all ranks."""

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
        self._rounds = [0] * binding.slot_count  # last round used, per slot
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._datagram_bytes = wire.datagram_bytes(self.options.k)
        self._buf = bytearray(self._datagram_bytes + 1)  # one spare byte exposes oversize
        self._zero_payload = bytes(self.options.k * wire.ELEMENT_BYTES)

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

        Accepts numpy arrays and torch tensors of float32 or int32, of any
        length. int32 sums are exact (wrapping modulo 2**32 like the switch's
        adders); float32 sums are within the bound in :mod:`worker.quantize`.
        Raises TimeoutError naming the missing chunks if the job stalls.
        """
        if _is_torch(tensor):
            import torch

            result = self._allreduce_array(tensor.detach().cpu().contiguous().numpy())
            return torch.from_numpy(result).to(tensor.device)
        return self._allreduce_array(np.asarray(tensor))

    def _allreduce_array(self, array: np.ndarray) -> np.ndarray:
        if array.dtype not in (np.float32, np.int32):
            raise TypeError(f"allreduce supports float32 and int32 tensors, got {array.dtype}")
        q.check_finite(array)
        flat = array.reshape(-1)
        if flat.size == 0:
            return array.copy()
        k = self.options.k
        chunks = -(-flat.size // k)
        blocks = np.zeros((chunks, k), dtype=array.dtype)
        blocks.reshape(-1)[: flat.size] = flat
        xfer = _Transfer(blocks, scaled=array.dtype == np.float32, length=flat.size)
        xfer.sums = np.zeros((chunks, k), dtype=np.int32)
        if xfer.scaled:
            xfer.prescaled = q.prescale(
                blocks, self.binding.world_size, self.options.precision_bits
            )
            xfer.local_exp = q.block_exponents(blocks)
            xfer.global_exp = np.zeros(chunks, dtype=np.uint8)
        self._run(xfer)
        if xfer.scaled:
            out = q.dequantize(
                xfer.sums, xfer.global_exp, self.binding.world_size, self.options.precision_bits
            )
        else:
            out = xfer.sums
        return out.reshape(-1)[: flat.size].reshape(array.shape)

    # -- window ---------------------------------------------------------------

    def _run(self, xfer: _Transfer) -> None:
        slots = min(self.binding.slot_count, len(xfer.blocks))
        for slot in range(slots):
            self._send(xfer, slot, _PRIME if xfer.scaled else slot)
        last_progress = time.monotonic()
        sock, buf, coalesce = self.sock, self._buf, self.options.coalesce
        while xfer.uses:
            try:
                nbytes = sock.recv_into(buf)
            except BlockingIOError:
                nbytes = 0
                time.sleep(coalesce)
            now = time.monotonic()
            if nbytes and self._on_result(xfer, buf, nbytes, now):
                last_progress = now
            elif now - last_progress > self.options.timeout:
                raise TimeoutError(self._stall_message(xfer))
            self._retransmit_expired(xfer, now)

    def _send(self, xfer: _Transfer, slot: int, chunk: int) -> None:
        """Start the next use of ``slot``: its packet carries ``chunk`` (or primes it)."""
        b, k, slots = self.binding, self.options.k, self.binding.slot_count
        round_ = self._rounds[slot] = (self._rounds[slot] + 1) & 0xFFFF
        if chunk == _PRIME:
            exponent, count, payload, wire_chunk = xfer.local_exp[slot], 0, self._zero_payload, slot
        else:
            ahead = chunk + slots
            exponent = xfer.local_exp[ahead] if xfer.scaled and ahead < len(xfer.blocks) else 0
            count = min(k, xfer.length - chunk * k)
            if xfer.scaled:
                values = q.quantize_block(xfer.prescaled[chunk], xfer.global_exp[chunk])
            else:
                values = xfer.blocks[chunk]
            payload, wire_chunk = values.astype(wire.ELEMENT_DTYPE).tobytes(), chunk
        header = wire.Header(
            wire.MsgType.DATA,
            b.job_id,
            b.rank,
            slot,
            round_ & 1,
            int(exponent),
            round_,
            wire_chunk,
            count,
        )
        use = _SlotUse(chunk, wire_chunk, round_, count, header.pack() + payload)
        xfer.uses[slot] = use
        self._transmit(xfer, slot, use)

    def _transmit(self, xfer: _Transfer, slot: int, use: _SlotUse) -> None:
        with contextlib.suppress(BlockingIOError):  # buffer full: lost; the timer resends it
            self.sock.send(use.packet)
        use.sent_at = time.monotonic()
        xfer.next_timer += 1
        use.timer = xfer.next_timer
        rto = min(self._rto() * (1 << use.retries), self.options.max_rto)
        heapq.heappush(xfer.timers, (use.sent_at + rto, slot, use.timer))
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(use.packet)

    def _on_result(self, xfer: _Transfer, buf: bytearray, nbytes: int, now: float) -> bool:
        """Take a result if it completes an outstanding use; True if it did."""
        self.stats.packets_received += 1
        self.stats.bytes_received += nbytes
        if nbytes != self._datagram_bytes:
            self.stats.duplicates += 1
            return False
        hdr = wire.unpack_header(buf)
        use = xfer.uses.get(hdr.slot)
        if (
            use is None
            or hdr.msg_type != wire.MsgType.RESULT
            or hdr.job_id != self.binding.job_id
            or hdr.round != use.round
            or hdr.chunk != use.wire_chunk
            or hdr.count != use.count
        ):
            self.stats.duplicates += 1
            return False
        if use.retries == 0:
            self._sample_rtt(now - use.sent_at)
        slots = self.binding.slot_count
        if use.chunk == _PRIME:
            xfer.global_exp[hdr.slot] = hdr.exponent
            self._send(xfer, hdr.slot, hdr.slot)
            return True
        xfer.sums[use.chunk] = wire.decode_elements(buf, self.options.k)
        ahead = use.chunk + slots
        if ahead < len(xfer.blocks):
            if xfer.scaled:
                xfer.global_exp[ahead] = hdr.exponent
            self._send(xfer, hdr.slot, ahead)
        else:
            del xfer.uses[hdr.slot]
        return True

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
            f"{len(xfer.blocks)} chunks missing: {_ranges(missing)} "
            f"(are all {b.world_size} ranks running?)"
        )


def _received_mask(xfer: _Transfer, slot_count: int) -> np.ndarray:
    """Chunks whose result has arrived: in each slot, those before its outstanding use."""
    done = np.ones(len(xfer.blocks), dtype=bool)
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
