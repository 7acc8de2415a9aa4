"""The worker shim: quantize -> packetize -> window, over a kernel UDP socket.

The protocol itself (which packets, when to resend, what an answer means)
is :mod:`worker.window`, a state machine without I/O; this module is its
socket driver: it sends what the window returns, feeds it what arrives and
the time, and turns a stall, a superseded session or a refusal into one of
the errors in :mod:`worker.errors`. With the compiled engine (the default,
:mod:`worker.engine`) the window and that loop run in C, a whole transfer
per call. A job installed on the switch's command line has no controller to
hand out sessions, so the communicator asks the switch for one (JOIN) when
it starts; a controller's binding carries it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import socket
import time
from dataclasses import dataclass

import numpy as np

from switchreduce import wire
from switchreduce.worker import quantize as q
from switchreduce.worker.engine import CompiledTransfer, EngineName, SocketLoop, check_engine
from switchreduce.worker.errors import (
    MismatchError,
    SessionEndedError,
    SwitchTimeoutError,
    WorkerError,
)
from switchreduce.worker.ordered import OrderedExecutor
from switchreduce.worker.window import (
    DEFAULT_MIN_RTO,
    Job,
    Join,
    RoundTrip,
    StaleSession,
    Transfer,
    WindowStats,
    early_results,
)


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker drives the switch; every rank of a job must use the same k and slots."""

    k: int = wire.DEFAULT_K
    #: Fixed-point precision of float tensors (worker.quantize); every rank must agree.
    precision_bits: int = q.MAX_BITS
    #: Bits per float element on the wire (32, 16 or 8: worker.quantize); every rank must agree.
    #: Narrow lanes set the grid themselves, so they leave precision_bits at 32.
    lane_bits: int = q.MAX_BITS
    #: Rounding of float elements to the grid: to nearest, or stochastically (unbiased; the
    #: noise of a rank's n-th call is quantize.call_key(rounding_seed, rank, n)'s).
    rounding: q.Rounding = "nearest"
    rounding_seed: int = 0
    #: EF-SGD's error feedback: a float tensor's quantization error (what this rank meant to
    #: add minus what it added) is added to the same call position's tensor of the next step
    #: (SwitchCommunicator.step).
    error_feedback: bool = False
    #: Seconds without any new result (or JOIN answer) after which SwitchTimeoutError is raised.
    timeout: float = 10.0
    #: Bounds of the adaptive retransmission timeout, in seconds.
    min_rto: float = DEFAULT_MIN_RTO
    max_rto: float = 1.0
    #: Seconds to sleep when no result is waiting, so that one wake-up drains a batch of
    #: them instead of costing a context switch per packet (the window hides the delay).
    #: The Python engine's; the compiled one wakes when the switch's next batch arrives.
    coalesce: float = 0.0005
    #: Kernel socket buffer sizes; a window's worth of packets must fit.
    socket_buffer: int = 4 << 20
    #: The window and socket loop in C (batched system calls, the GIL released), or in Python
    #: (window.Transfer, the specification; worker/engine.py).
    engine: EngineName = "compiled"

    def __post_init__(self) -> None:
        check_engine(self.engine)
        wire.check_k(self.k)
        q.check_bits(self.precision_bits)
        wire.check_lanes(self.lane_bits)
        if self.rounding not in q.ROUNDINGS:
            raise ValueError(
                f"rounding must be one of {', '.join(q.ROUNDINGS)}, got {self.rounding!r}"
            )
        if self.lane_bits != q.MAX_BITS and self.precision_bits != q.MAX_BITS:
            raise ValueError(
                f"{self.lane_bits}-bit lanes set the grid themselves; precision_bits must stay "
                f"{q.MAX_BITS}, got {self.precision_bits}"
            )
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
    #: The lane width the controller admitted the job with (its ranks' options must match);
    #: None for a static job, whose ranks only the switch's check of each round compares.
    lane_bits: int | None = None
    #: How many ranks' contributions complete a round (the job's quorum); None: every rank's.
    quorum: int | None = None

    @property
    def contributors(self) -> int:
        """How many ranks' contributions each sum holds (the quorum, or the world size)."""
        return self.world_size if self.quorum is None else self.quorum

    def __post_init__(self) -> None:
        if not 1 <= self.world_size <= wire.MAX_WORKERS:
            raise ValueError(f"world size must be 1..{wire.MAX_WORKERS}, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world size {self.world_size}")
        if not 1 <= self.slot_count <= wire.MAX_SLOTS:
            raise ValueError(f"slot count must be 1..{wire.MAX_SLOTS}, got {self.slot_count}")
        if not 0 <= self.job_id <= 0xFFFF:
            raise ValueError(f"job id must fit 16 bits, got {self.job_id}")
        if self.quorum is not None and not 1 <= self.quorum <= self.world_size:
            raise ValueError(f"quorum must be 1..{self.world_size}, got {self.quorum}")


@dataclass
class WorkerStats(WindowStats):
    """Cumulative counts over the communicator's lifetime: the window's and the socket's."""

    packets_sent: int = 0
    packets_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class _Rejoin(Exception):
    """STALE before this session produced any result: a join raced another; join again."""


#: Error feedback's residuals per step at most: more calls without step() is a usage error.
MAX_STEP_CALLS = 1024

#: Tensor types summed through the float32 path and returned in their own type.
_VIA_FLOAT32 = ("bfloat16", "float16")


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
        if binding.lane_bits not in (None, self.options.lane_bits):
            raise MismatchError(
                f"job {binding.job_id} rank {binding.rank}: the job was admitted with "
                f"{binding.lane_bits}-bit lanes, this rank was started with "
                f"{self.options.lane_bits}-bit lanes; every rank must use the job's lane width"
            )
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
            # The compiled engine runs each whole transfer on the socket's descriptor.
            compiled = self.options.engine == "compiled"
            self._loop = SocketLoop(self.sock.fileno()) if compiled else None
            self._transfer = CompiledTransfer if compiled else Transfer
            self._buf = bytearray(wire.datagram_bytes(self.options.k) + 1)  # +1 shows oversize
            self._rounds = [0] * binding.slot_count  # last round used, per slot
            self._first_slot = 0  # the switch's slot of the next call's chunk 0 (window.py)
            # results a quorum completed before this rank sent its round (window.py)
            self._early = early_results(binding.slot_count, self.options.k)
            self._calls = 0  # allreduce calls begun: stochastic rounding's stream per call
            self._residuals: list[np.ndarray] = []  # error feedback's, by call position
            self._position = 0  # the next call's position in the step
            self._rtt = RoundTrip(self.options.min_rto, self.options.max_rto)
            self._results_in_session = 0
            self._broken: WorkerError | None = None
            self._last_error: OSError | None = None  # named when a stall is reported
            self._nonce = wire.new_session()  # names this communicator in its JOINs
            self.session = binding.session if binding.session is not None else self._join()
        except BaseException:
            self.sock.close()
            raise
        self._ordered = OrderedExecutor(f"allreduce job {binding.job_id} rank {binding.rank}")

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def close(self) -> None:
        """Fail the asynchronous allreduces not yet started (ClosedError), let the one in
        flight end (within the timeout), stop their thread, then close the socket."""
        self._ordered.close()
        self.sock.close()

    def __enter__(self) -> SwitchCommunicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self) -> None:
        """End a training step for error feedback: the next call is the step's first again.

        The k-th float call of a step gets the residual the k-th call of the previous step
        left, if it has the same length (as DDP's buckets do, step after step), else none.
        Runs after the allreduces already asked for, as they do.
        """
        self._ordered.run(self._restart_positions)

    def _restart_positions(self) -> None:
        self._position = 0

    def _residual(self, size: int) -> np.ndarray:
        """The residual of this call's position (zeros for a new position or length)."""
        position = self._position
        self._position += 1
        if position < len(self._residuals) and self._residuals[position].size == size:
            return self._residuals[position]
        if position >= MAX_STEP_CALLS:
            raise WorkerError(
                f"error feedback keeps a residual per call of a training step, and "
                f"{MAX_STEP_CALLS} calls came without step(): call SwitchCommunicator.step() "
                f"once per step (DDP's switch hooks do)"
            )
        residual = np.zeros(size, dtype=np.float32)
        if position < len(self._residuals):
            self._residuals[position] = residual
        else:
            self._residuals.append(residual)
        return residual

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
        Called while asynchronous allreduces are pending, it runs after them.

        In a job with a quorum, each chunk (a packet's worth) sums the first
        ``quorum`` ranks' contributions to reach the switch (the rank gets the
        sums either way). A chunk this rank was late for is counted in
        ``stats.late``; with error feedback its contribution is kept and added
        to the next step's, else it is dropped. Divide by :attr:`averaged_over`
        for an average.
        """
        return self._ordered.run(functools.partial(self._allreduce_now, tensor))

    @property
    def contributors(self) -> int:
        """How many ranks' contributions each sum holds (the quorum, or the world size)."""
        return self.binding.contributors

    @property
    def averaged_over(self) -> int:
        """What a float sum is divided by for the average gradient: the ranks in it, unless
        error feedback keeps a late rank's contribution for its next step. Then every rank's
        gradient enters some step's sum once, so the sums carry the world's gradients and
        the world size keeps the average's scale (dividing by the quorum would raise the
        learning rate by world size / quorum)."""
        return self.binding.world_size if self.options.error_feedback else self.contributors

    def allreduce_async(self, tensor):
        """Start :meth:`allreduce` of ``tensor`` behind those already started; a future at once.

        A ``torch.futures.Future`` for a torch tensor, a ``concurrent.futures.Future``
        (which cannot be cancelled: every rank must send it) for a numpy array. One
        thread runs the calls one at a time in the order they are made, and every rank
        must make them in the same order, as DDP hands over its buckets. The tensor is
        read while in flight: leave it unchanged until the future is done. An error
        completes its future, and every later one (the communicator is unusable after
        it, as after a failed allreduce); :meth:`close` fails those not yet started.
        """
        if _is_torch(tensor):
            import torch

            future = torch.futures.Future()
        else:
            future = concurrent.futures.Future()
            future.set_running_or_notify_cancel()
        self._ordered.submit(functools.partial(self._allreduce_now, tensor), future)
        return future

    def _allreduce_now(self, tensor):
        """:meth:`allreduce`, in the calling thread."""
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
        if array.dtype == np.int32 and self.options.lane_bits != q.MAX_BITS:
            raise TypeError(
                f"int32 tensors are summed exactly, in 32-bit lanes only; this communicator "
                f"sends {self.options.lane_bits}-bit lanes"
            )
        bits = self.options.precision_bits if array.dtype == np.float32 else q.MAX_BITS
        self._calls += 1
        noise_key = None
        if self.options.rounding == "stochastic" and array.dtype == np.float32:
            noise_key = q.call_key(self.options.rounding_seed, self.binding.rank, self._calls)
        residual = None
        if self.options.error_feedback and array.dtype == np.float32:
            residual = self._residual(flat.size)
            flat = flat + residual
            q.check_finite(flat)
        while True:
            b = self.binding
            job = Job(
                b.job_id,
                b.rank,
                b.world_size,
                b.slot_count,
                self.options.k,
                self.session,
                self.options.precision_bits,
                self.options.lane_bits,
                noise_key,
                b.quorum,
                self._first_slot,
            )
            format = wire.encode_format(dtype_name, bits, self.options.lane_bits)
            xfer = self._transfer(
                job, flat, format, self._rounds, self._rtt, self.stats, self._early
            )
            try:
                self._run(xfer)
                self._first_slot = job.next_first_slot(xfer.chunks)
                break
            except _Rejoin:
                self.session = self._join()
            except WorkerError as exc:
                self._broken = exc
                raise
        if residual is not None:
            own = q.own_contribution(
                flat,
                xfer.exponents,
                job.world_size,
                job.chunk_elements,
                job.precision_bits,
                job.lane_bits,
                noise_key,
            )
            for chunk in xfer.late():  # a quorum summed it without this rank: keep all of it
                own[chunk * job.chunk_elements : (chunk + 1) * job.chunk_elements] = 0
            np.subtract(flat, own, out=residual, casting="same_kind")
        return xfer.out.reshape(array.shape)

    def _run(self, xfer: Transfer | CompiledTransfer) -> None:
        """Drive the window until every chunk's result is in."""
        try:
            if isinstance(xfer, CompiledTransfer):
                self._run_compiled(xfer)
            else:
                self._run_python(xfer)
        except StaleSession:
            self._results_in_session += xfer.results
            self._session_ended()
        self._results_in_session += xfer.results

    def _run_python(self, xfer: Transfer) -> None:
        # What came since the last call first: a quorum's results may be there already.
        while (datagram := self._receive(wait=False)) is not None:
            self._send(xfer.receive(datagram, time.monotonic()))
        self._send(xfer.start(time.monotonic()))
        while not xfer.done:
            datagram = self._receive()
            now = time.monotonic()
            if datagram is not None:
                self._send(xfer.receive(datagram, now))
            if now - xfer.progress_at > self.options.timeout:
                raise SwitchTimeoutError(self._stall_message(xfer))
            self._send(xfer.expire(now))

    def _run_compiled(self, xfer: CompiledTransfer) -> None:
        """The same loop in C, on the socket's descriptor, with batched system calls."""
        assert self._loop is not None
        done = xfer.run(self._loop, self.options.timeout)
        if self._loop.last_error:
            self._last_error = OSError(self._loop.last_error, os.strerror(self._loop.last_error))
        if not done:
            raise SwitchTimeoutError(self._stall_message(xfer))

    def _join(self) -> int:
        """Ask the switch for the static job's session; every rank of the job gets the same."""
        b = self.binding
        join = Join(b.job_id, b.rank, self.options.k, self._nonce)
        self._drain()
        deadline = time.monotonic() + self.options.timeout
        while (now := time.monotonic()) < deadline:
            self._send(join.expire(now))
            datagram = self._receive()
            hdr = join.receive(datagram) if datagram is not None else None
            if hdr is None:
                continue
            if (hdr.chunk, hdr.length, hdr.count) != (b.slot_count, b.world_size, b.contributors):
                raise WorkerError(
                    f"job {b.job_id} rank {b.rank}: switch {self._where()} holds the job with "
                    f"{hdr.chunk} slots, world size {hdr.length} and quorum {hdr.count}, this "
                    f"rank was given {b.slot_count} slots, world size {b.world_size} and "
                    f"quorum {b.contributors}"
                )
            self._rounds[:] = [0] * b.slot_count
            self._first_slot = 0
            self._early[:] = bytes(len(self._early))
            self._results_in_session = 0
            return hdr.session
        cause = f" (last socket error: {self._last_error})" if self._last_error else ""
        raise SwitchTimeoutError(
            f"job {b.job_id} rank {b.rank}: switch {self._where()} did not answer JOIN within "
            f"{self.options.timeout}s{cause} (are all {b.world_size} ranks running, and does "
            f"the switch hold job {b.job_id}?)"
        )

    def _session_ended(self) -> None:
        """STALE echoing our own session: the switch has moved on to another run of the job."""
        b = self.binding
        if b.session is None and self._results_in_session == 0:
            raise _Rejoin  # the session never carried a sum: a join raced another; join again
        raise SessionEndedError(
            f"job {b.job_id} rank {b.rank}: switch {self._where()} no longer takes this run's "
            f"session {self.session:#018x}: another run of job {b.job_id} has started (or the "
            f"job was re-admitted); this run's allreduce cannot finish"
        )

    # -- socket --------------------------------------------------------------------

    def _send(self, packets: list[bytes]) -> None:
        """Send datagrams; a full buffer or an unreachable switch is a loss, as on a wire."""
        for packet in packets:
            try:
                self.sock.send(packet)
            except BlockingIOError:
                continue  # buffer full: lost; the window's timer resends it
            except OSError as exc:  # e.g. ICMP port unreachable while the switch restarts
                self._last_error = exc
                continue
            self.stats.packets_sent += 1
            self.stats.bytes_sent += len(packet)

    def _receive(self, wait: bool = True) -> memoryview | None:
        """The next datagram, or None (after a short wait, so that one wake-up drains a
        batch, unless ``wait`` is False)."""
        try:
            nbytes = self.sock.recv_into(self._buf)
        except (BlockingIOError, ConnectionRefusedError):  # refused: the switch is not up
            if wait:
                time.sleep(self.options.coalesce)
            return None
        self.stats.packets_received += 1
        self.stats.bytes_received += nbytes
        return memoryview(self._buf)[:nbytes]

    def _drain(self) -> None:
        """Discard whatever waits in the socket (answers meant for an earlier communicator)."""
        while True:
            try:
                self.sock.recv_into(self._buf)
            except (BlockingIOError, ConnectionRefusedError):
                return

    def _where(self) -> str:
        return f"{self.switch[0]}:{self.switch[1]}"

    def _stall_message(self, xfer: Transfer | CompiledTransfer) -> str:
        missing = xfer.missing()
        b = self.binding
        cause = f"; last socket error: {self._last_error}" if self._last_error else ""
        return (
            f"job {b.job_id} rank {b.rank}: no result from switch {self._where()} for "
            f"{self.options.timeout}s; {missing.size} of {xfer.chunks} chunks missing: "
            f"{_ranges(missing)} (are all {b.world_size} ranks running?){cause}"
        )


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
