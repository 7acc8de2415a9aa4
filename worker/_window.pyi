"""The worker's compiled window (``_window.c``); ``engine.py`` is how the worker uses it."""

from collections.abc import Sequence

import numpy as np

HEADER_BYTES: int
ELEMENT_BYTES: int
EXPONENT_BIAS: int
#: Message types, as wire.MsgType.
DATA: int
RESULT: int
STALE: int
REFUSED: int
WAITING: int
RELEASE: int
RESEND: int

class Stale(Exception):
    """The switch answered STALE for the transfer's session."""

class Refused(Exception):
    """The switch refused the round; ``args[0]`` is the REFUSED header."""

class Transfer:
    """window.Transfer in C: one allreduce call, without I/O."""

    def __init__(
        self,
        job_id: int,
        rank: int,
        world_size: int,
        slot_count: int,
        k: int,
        session: int,
        precision_bits: int,
        lane_bits: int,
        noise_key: int | None,
        format: int,
        flat: np.ndarray,
        out: np.ndarray,
        rounds: Sequence[int],
        min_rto: float,
        max_rto: float,
        srtt: float | None,
        rttvar: float,
        min_rtt: float | None,
        contributors: int,
        early: bytearray,
        first_slot: int,
    ) -> None: ...
    def start(self, now: float, /) -> list[bytes]: ...
    def receive(self, datagram: bytes | bytearray | memoryview, now: float, /) -> list[bytes]: ...
    def expire(self, now: float, /) -> list[bytes]: ...
    def next_deadline(self) -> float | None: ...
    def missing(self) -> list[int]: ...
    def late(self) -> list[int]: ...
    def take_stats(self) -> dict[str, int]:
        """The counts since the last call, by WorkerStats field; they start again from zero."""
    @property
    def rounds(self) -> list[int]: ...
    @property
    def srtt(self) -> float | None: ...
    @property
    def rttvar(self) -> float: ...
    @property
    def min_rtt(self) -> float | None: ...
    @property
    def done(self) -> bool: ...
    @property
    def results(self) -> int: ...
    @property
    def progress_at(self) -> float: ...
    @property
    def chunks(self) -> int: ...
    @property
    def exponents(self) -> bytes: ...

class Driver:
    """Runs transfers on a connected non-blocking UDP socket (shim.py's _run)."""

    def __init__(self, fd: int) -> None: ...
    def run(self, transfer: Transfer, timeout: float, /) -> bool:
        """Drive it on the socket, GIL released: True when done, False when no result came for
        ``timeout`` seconds; raises Stale or Refused."""
    @property
    def last_error(self) -> int:
        """errno of the latest send that failed for another reason than a full buffer (0: none)."""
