"""The worker's two engines: the window in Python (the specification) or in C.

``python``: :class:`window.Transfer`, driven one datagram at a time by the
socket loop in :mod:`worker.shim`; where the protocol is written and changed
first. ``compiled``: the same window in C (``_window.c``, built by ``pip
install``), whose socket loop runs a whole transfer with batched system
calls and the GIL released, writing each result into the output array.

:class:`CompiledTransfer` gives the C window ``window.Transfer``'s interface
and errors, so the differential test (tests/test_window.py) drives both
through the same network and compares every datagram, sum and counter. The
state a caller keeps across calls (rounds, round trip, statistics) is copied
into the C window when a transfer starts and written back after each step;
the early results are the caller's buffer, which the C window reads and writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import numpy as np

from switchreduce import wire
from switchreduce.worker import _window
from switchreduce.worker.errors import MismatchError
from switchreduce.worker.window import Job, RoundTrip, StaleSession, WindowStats, refusal_message

EngineName = Literal["compiled", "python"]
ENGINES: tuple[EngineName, ...] = ("compiled", "python")

#: Runs compiled transfers on one connected, non-blocking UDP socket (the descriptor's).
SocketLoop = _window.Driver

T = TypeVar("T")


def check_engine(name: str) -> EngineName:
    """``name`` if it names an engine, else ValueError saying which there are."""
    for engine in ENGINES:
        if name == engine:
            return engine
    raise ValueError(f"worker engine must be one of {', '.join(ENGINES)}, got {name!r}")


class CompiledTransfer:
    """One allreduce call through the C window; what ``window.Transfer`` does, alike."""

    def __init__(
        self,
        job: Job,
        flat: np.ndarray,
        format: int,
        rounds: list[int],
        rtt: RoundTrip,
        stats: WindowStats,
        early: bytearray,
    ) -> None:
        self.job, self.flat, self.format = job, flat, format
        self.rounds, self.rtt, self.stats, self.early = rounds, rtt, stats, early
        self.out = np.empty_like(flat)
        self._core = _window.Transfer(
            job.job_id,
            job.rank,
            job.world_size,
            job.slot_count,
            job.k,
            job.session,
            job.precision_bits,
            job.lane_bits,
            job.noise_key,
            format,
            flat,
            self.out,
            rounds,
            rtt.min_rto,
            rtt.max_rto,
            rtt.srtt,
            rtt.rttvar,
            rtt.min_rtt,
            job.contributors,
            early,
            job.first_slot,
        )

    @property
    def chunks(self) -> int:
        return self._core.chunks

    @property
    def exponents(self) -> np.ndarray:
        return np.frombuffer(self._core.exponents, dtype=np.uint8)

    @property
    def done(self) -> bool:
        return self._core.done

    @property
    def results(self) -> int:
        return self._core.results

    @property
    def progress_at(self) -> float:
        return self._core.progress_at

    def start(self, now: float) -> list[bytes]:
        return self._step(self._core.start, now)

    def receive(self, datagram: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        return self._step(self._core.receive, datagram, now)

    def expire(self, now: float) -> list[bytes]:
        return self._step(self._core.expire, now)

    def next_deadline(self) -> float | None:
        return self._core.next_deadline()

    def missing(self) -> np.ndarray:
        return np.array(self._core.missing(), dtype=np.intp)

    def late(self) -> np.ndarray:
        return np.array(self._core.late(), dtype=np.intp)

    def run(self, loop: _window.Driver, timeout: float) -> bool:
        """The whole transfer on ``loop``'s socket: True when done, False when no result came
        for ``timeout`` seconds."""
        return self._step(loop.run, self._core, timeout)

    def _step(self, method: Callable[..., T], *args: object) -> T:
        """Call the C window; its verdicts become window.Transfer's errors, and the caller's
        state is written back whatever happened."""
        try:
            return method(*args)
        except _window.Stale:
            raise StaleSession from None
        except _window.Refused as refused:
            hdr = wire.unpack_header(refused.args[0])
            message = refusal_message(self.job, self.format, self.flat.size, hdr)
            raise MismatchError(message) from None
        finally:
            self._write_back()

    def _write_back(self) -> None:
        core, rtt = self._core, self.rtt
        self.rounds[:] = core.rounds
        rtt.srtt, rtt.rttvar, rtt.min_rtt = core.srtt, core.rttvar, core.min_rtt
        for name, count in core.take_stats().items():
            if count:
                setattr(self.stats, name, getattr(self.stats, name) + count)
