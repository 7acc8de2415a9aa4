"""The compiled packet engine (``_engine.c``); ``engine.py`` is how the switch uses it."""

from collections.abc import Sequence

HEADER_BYTES: int
ROW_REFUSED: int
NUM_DROP_REASONS: int
MAX_WORKERS: int
BATCH: int
#: Table ids for write_entry, delete_entry and clear_table.
JOBS: int
WORKERS: int
RESULT_REWRITE: int
FORWARD: int
#: Counter arrays by index, as count and set_counter take them.
COUNTERS: tuple[str, ...]

class Engine:
    """The pipeline's state and data path; its memory (registers, counters) is its buffer."""

    def __init__(
        self, k: int, pool_size: int, max_jobs: int, workers_size: int, forward_size: int
    ) -> None: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def layout(self) -> dict[str, tuple[int, int, str]]:
        """Register or counter part ("round", "drops.packets") -> (offset, cells, numpy dtype)."""
    def write_entry(self, table: int, key: tuple[int, ...], args: tuple[int, ...] | None) -> None:
        """Insert or replace an entry; ``args`` None for NoAction (a hit that sets nothing)."""
    def delete_entry(self, table: int, key: tuple[int, ...]) -> None: ...
    def clear_table(self, table: int) -> None: ...
    def set_group(self, group: int, replicas: Sequence[tuple[int, int]]) -> None: ...
    def delete_group(self, group: int) -> None: ...
    def set_counter(self, counter: int, index: int, packets: int, nbytes: int) -> None: ...
    def count(self, counter: int, index: int, nbytes: int) -> None: ...
    def set_punted_jobs(self, job_ids: Sequence[int]) -> None:
        """JOINs of these jobs are punted (process returns None, serve queues them)."""
    def set_faults(self, loss: float, duplicate: float, reorder: float, seed: int) -> None: ...
    def process(self, datagram: bytes, ip: int, port: int) -> list[tuple[int, int, bytes]] | None:
        """(destination IPv4, UDP port, payload) of what the datagram makes the switch send."""
    def process_frame(self, frame: bytes, port: int) -> list[tuple[int, bytes]] | None:
        """(egress port, frame) of what a frame on ``port`` makes the switch send (raw mode)."""
    def serve(self, fd: int, budget: float) -> int:
        """Serve the UDP socket ``fd`` (GIL released) for at most ``budget`` seconds; returns the
        number of punted datagrams waiting."""
    def set_ports(self, ports: Sequence[tuple[int, int]], frame_bytes: int) -> None:
        """Raw mode, once: (switch port, AF_PACKET socket fd) of every port, and the longest
        frame to receive."""
    def serve_frames(self, budget: float) -> int:
        """Serve the ports as ``serve`` serves a UDP socket; returns the punted frames waiting."""
    def take_punted(self) -> list[tuple[bytes, int, int, int]]:
        """(bytes, source IPv4, UDP source port, ingress port) of each punted packet."""
    def transmit(self, fd: int, ip: int, port: int, datagram: bytes) -> None:
        """Send one datagram through the egress fault injector."""
    def transmit_frame(self, port: int, frame: bytes) -> None:
        """Send one frame out of ``port`` through the egress fault injector (raw mode)."""
    def stats(self) -> dict[str, object]: ...
