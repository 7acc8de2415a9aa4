"""``switchreduce bench switch``: a switch's own packet rate, with the workers taken out.

The allreduce bench times workers and switch together, and the workers are
most of it. Here a load generator stands in for N ranks: it sends
precomputed aggregation packets of the P4 program's own format (N ranks'
contributions to every one of S slots, round after round) and checks every
result the switch sends back, byte for byte, against the result it computed
beforehand. A slot has two rows (the round's version), so two rounds of
every slot are in flight: a batch of slots gets its next round as soon as
its round before last has every result in. Every contribution is summed
exactly once or the run fails (a wrong, missing or repeated result).

Measured per run: contributions the switch consumed per second and results
it emitted per second, the switch process's CPU time (``/proc/PID/stat``,
all its threads) per million packets in and out, contributions per second
of that CPU, and how busy the switch and the generator were (CPU seconds per
second). A switch near a core's worth (BMv2: its threads) with the generator
below it is the bottleneck, and the rate is its own. The compiled soft switch
on a two-core machine is not: the kernel charges the sender for delivering
each datagram or frame to the switch's socket, which costs the generator
about what the switch's whole work on a packet costs it, so the generator is
the limit, its rate is a lower bound of the switch's, and contributions per
CPU second are the switch's rate with a core of its own.

- The soft switch in UDP mode on loopback, as the allreduce bench serves it
  (``LoopbackSwitch``: a static job whose ranks JOIN for the session), with
  either engine. The generator sends each rank's batch as UDP GSO messages
  and reads results with UDP GRO, as the compiled worker does (the kernel
  cuts a GSO message into datagrams before the switch's socket).
- The soft switch in raw mode, as Mininet's switch node runs it: in a
  network namespace of this process's own, one veth pair per rank, frames in
  and out through AF_PACKET sockets on the veths' other ends.
- BMv2 (``simple_switch_grpc``) with the P4 program compiled for K, on veth
  pairs in the same way; the job is admitted over P4Runtime by the
  controller's own code (``JobTable.admit``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from switchreduce import wire
from switchreduce.controller.connection import SwitchConnection
from switchreduce.controller.jobs import JobTable
from switchreduce.emulation.bmv2 import (
    P4C,
    SIMPLE_SWITCH_GRPC,
    CompiledProgram,
    bmv2_available,
    compile_program,
    wait_for_p4runtime,
)
from switchreduce.emulation.softswitch.engine import ENGINES, EngineName
from switchreduce.emulation.softswitch.process import LoopbackSwitch
from switchreduce.emulation.softswitch.udp import force_buffers
from switchreduce.emulation.topo import SWITCH_IP, SWITCH_MAC, WORKER_UDP_PORT, host_ip, host_mac
from switchreduce.experiments.errors import ExperimentError
from switchreduce.launch import SERVING, Child, cli_command
from switchreduce.p4program import P4_SOURCE, SOURCE_DIR
from switchreduce.p4runtime.forwarding import parse_mac
from switchreduce.p4runtime.jobs import Member
from switchreduce.p4runtime.schema import load_p4info
from switchreduce.worker.window import Join

SWITCHES = ("soft", "bmv2")
#: The soft switch's modes: a UDP socket on loopback, or frames on veth pairs (root).
MODES = ("udp", "raw")
#: Contributions per run when none are asked for: a few seconds of each switch here.
DEFAULT_PACKETS = {"compiled": 2_000_000, "python": 200_000, "bmv2": 20_000}
#: BMv2 loses frames beyond 32 waiting at a port (no drop counter moves: they never reach
#: its pipeline), and two rounds of every slot are in flight.
BMV2_MAX_SLOTS = 16
#: Slots of the job when none are asked for: enough that the switch is never left waiting.
DEFAULT_SLOTS = {"soft": 64, "bmv2": BMV2_MAX_SLOTS}
#: Rounds of every slot in flight: a slot has two rows (versions), so two.
DEPTH = 2
#: Payload variants: consecutive rounds carry different numbers, so a result summed from
#: the wrong round's contributions is a wrong result. A power of two (it divides the 16-bit
#: round's cycle, so the round alone names its variant) above DEPTH.
VARIANTS = 4
JOB_ID = 1
#: Contributions are int32 at full precision, so the switch's sums are exact.
FORMAT = wire.encode_format("int32", 32)
#: Element magnitudes stay below this, so 32 ranks' sums fit int32.
_ELEMENT_BOUND = 1 << 20
#: The kernel's UDP_MAX_SEGMENTS, and the largest UDP payload of one IPv4 datagram.
_GSO_SEGMENTS = 64
_GSO_BYTES = 65535 - wire.IPV4_BYTES - wire.UDP_BYTES
_SOL_UDP = 17
_UDP_SEGMENT = 103  # linux/udp.h: the segment size of UDP GSO sends
_UDP_GRO = 104  # linux/udp.h: receive coalesced datagrams, with their size in a cmsg
_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_IGNORE_OUTGOING = 23  # linux/if_packet.h: not what this host sends on the link
_PACKET_VNET_HDR = 15  # linux/if_packet.h: frames sent start with a virtio_net_hdr
_VNET_NEEDS_CSUM = 1  # linux/virtio_net.h: VIRTIO_NET_HDR_F_NEEDS_CSUM
_VNET_GSO_UDP_L4 = 5  # linux/virtio_net.h: VIRTIO_NET_HDR_GSO_UDP_L4
_VNET_PLAIN = bytes(10)  # a virtio_net_hdr that asks nothing: one frame as it is
_MSG_TRUNC = int(socket.MSG_TRUNC)  # an int: the flag enum's operators cost microseconds
_READ = 65536  # room a read needs: a whole GRO datagram, or a frame


class SwitchBenchError(ExperimentError):
    """The switch did not answer every contribution in time."""


@dataclass(frozen=True)
class SwitchBenchOptions:
    """Which switches, how many ranks and slots, how many packets, how often."""

    #: Switches measured in turn, in the same run; empty: the soft switch, and BMv2 where
    #: it runs (root, simple_switch_grpc and p4c on PATH).
    switches: tuple[str, ...] = ()
    #: The soft switch's engines, each measured.
    engines: tuple[EngineName, ...] = ENGINES
    #: The soft switch's modes, each measured; empty: udp, and raw where root.
    modes: tuple[str, ...] = ()
    workers: int = 4
    #: 256: the largest K a 1500-byte MTU carries, and BMv2's README figure's.
    k: int = wire.MAX_K_STANDARD_MTU
    #: Slots of the job; None: DEFAULT_SLOTS of each switch.
    slots: int | None = None
    #: Contributions per run (rounded up to whole rounds); None: DEFAULT_PACKETS.
    packets: int | None = None
    #: Runs per switch, interleaved; the summary takes their medians.
    repeat: int = 1
    #: Seconds without a new result before a run fails.
    timeout: float = 10.0
    as_json: bool = False

    def __post_init__(self) -> None:
        wire.check_k(self.k)
        if unknown := set(self.switches) - set(SWITCHES):
            raise ValueError(f"switches are {SWITCHES}, got {sorted(unknown)}")
        if not_engines := set(self.engines) - set(ENGINES):
            raise ValueError(f"engines are {ENGINES}, got {sorted(not_engines)}")
        if not_modes := set(self.modes) - set(MODES):
            raise ValueError(f"modes are {MODES}, got {sorted(not_modes)}")
        if not 1 <= self.workers <= wire.MAX_WORKERS:
            raise ValueError(f"workers must be 1..{wire.MAX_WORKERS}, got {self.workers}")
        if self.slots is not None and not 1 <= self.slots <= wire.MAX_SLOTS:
            raise ValueError(f"slots must be 1..{wire.MAX_SLOTS}, got {self.slots}")
        if self.slots is not None and self.slots > BMV2_MAX_SLOTS and self.measures_bmv2:
            raise ValueError(
                f"BMv2 takes at most {BMV2_MAX_SLOTS} slots here: two rounds of each are "
                f"{2 * BMV2_MAX_SLOTS} frames per port at once, and it loses what comes beyond "
                "that before its pipeline sees it"
            )
        if self.packets is not None and self.packets < 1:
            raise ValueError(f"packets must be positive, got {self.packets}")
        if self.repeat < 1 or not self.timeout > 0:
            raise ValueError("repeat must be at least 1 and timeout positive")
        if ("bmv2" in self.switches or "raw" in self.modes) and os.geteuid() != 0:
            raise ValueError("BMv2 and raw mode run on veth pairs in a namespace: that needs root")
        if "bmv2" in self.switches and not bmv2_available():
            raise ValueError(f"BMv2 needs {SIMPLE_SWITCH_GRPC} and {P4C} on PATH")

    @property
    def measures_bmv2(self) -> bool:
        return any(target.switch == "bmv2" for target in self.targets())

    def targets(self) -> list[Target]:
        """Every measurement of a run, in order."""
        root = os.geteuid() == 0
        switches = self.switches or (("soft", "bmv2") if root and bmv2_available() else ("soft",))
        modes = self.modes or (MODES if root else ("udp",))
        return [
            Target(switch, engine, mode) if switch == "soft" else Target(switch)
            for switch in switches
            for engine in (self.engines if switch == "soft" else (None,))
            for mode in (modes if switch == "soft" else (None,))
        ]

    def slot_count(self, switch: str) -> int:
        return self.slots or DEFAULT_SLOTS[switch]

    def rounds(self, engine: EngineName | None) -> int:
        """Rounds of every slot in a run of the soft switch's ``engine``, or of BMv2."""
        switch = "soft" if engine else "bmv2"
        packets = self.packets or DEFAULT_PACKETS[engine or switch]
        return max(DEPTH, -(-packets // (self.workers * self.slot_count(switch))))


# -- the traffic ----------------------------------------------------------------------------


def record_dtype(k: int, prefix: int = 0) -> np.dtype:
    """One packet as numpy sees it: ``prefix`` bytes (Ethernet, IPv4, UDP), then the
    aggregation header in wire.HEADER_FIELDS' order (version and slot share 16 bits), then K
    big-endian int32. A test checks it against wire's own encoding."""
    fields: list[tuple[Any, ...]] = [("prefix", "V", prefix)] if prefix else []
    fields += [
        ("msg_type", "u1"), ("rank", "u1"), ("job_id", ">u2"), ("vslot", ">u2"),
        ("exponent", "u1"), ("format", "u1"), ("round", ">u2"), ("count", ">u2"),
        ("chunk", ">u4"), ("length", ">u4"), ("session", ">u8"), ("elements", ">i4", (k,)),
    ]  # fmt: skip
    dtype = np.dtype(fields)
    assert dtype.itemsize == prefix + wire.datagram_bytes(k)
    return dtype


#: What Traffic.batch writes a batch's round into: its packets, the round and chunk fields of
#: its packets and expected results, and its slots.
_BatchViews = tuple[np.ndarray, list[np.ndarray], list[np.ndarray], np.ndarray]


class Traffic:
    """Every rank's contributions to every slot, for VARIANTS kinds of round, and the results
    the switch must send for them.

    The slots are cut into groups of ``group`` slots, and the traffic into
    batches: batch ``b`` is round b // groups + 1 of group b % groups (chunk
    round_index * slots + slot), with variant round_index % VARIANTS's
    numbers. A group's next round goes out as soon as its round before last
    is in, not the whole window's; 32 slots (a GSO message of 32 datagrams a
    rank) ran fastest here, against 16 and 64. ``batch`` patches the round's
    fields into the precomputed packets and expected results in place.
    ``prefixes`` (one per rank) put each packet in a frame.
    """

    def __init__(
        self,
        workers: int,
        k: int,
        slots: int,
        rounds: int,
        session: int,
        prefixes: Sequence[bytes] = (),
        group: int = 32,
        seed: int = 0,
    ) -> None:
        self.workers, self.k, self.slots, self.rounds = workers, k, slots, rounds
        self.group = min(group, slots)
        self.groups = -(-slots // self.group)
        self.batches = rounds * self.groups
        self.prefix = len(prefixes[0]) if prefixes else 0
        self.dtype = record_dtype(k, self.prefix)
        length = min(rounds * slots * k, wire.MAX_LENGTH)
        rng = np.random.default_rng(seed)
        elements = rng.integers(
            -_ELEMENT_BOUND, _ELEMENT_BOUND, (VARIANTS, workers, slots, k), dtype=np.int32
        )
        self.packets = np.zeros((VARIANTS, workers, slots), self.dtype)
        #: What every rank must receive for each slot: the rank field is the completing
        #: rank's, whichever it is, so it is left 0 here and zeroed in what arrives.
        self.results = np.zeros((VARIANTS, slots), self.dtype)
        for records in (self.packets, self.results):
            records["job_id"] = JOB_ID
            records["format"] = FORMAT
            records["count"] = k
            records["length"] = length
            records["session"] = session
        p = self.packets
        if self.prefix:
            p["prefix"] = np.array(prefixes, dtype=f"V{self.prefix}")[None, :, None]
        p["msg_type"] = wire.MsgType.DATA
        p["rank"] = np.arange(workers)[None, :, None]
        p["exponent"] = wire.EXPONENT_BIAS + p["rank"]
        p["elements"] = elements
        self.results["msg_type"] = wire.MsgType.RESULT
        self.results["exponent"] = wire.EXPONENT_BIAS + workers - 1  # the max of the ranks'
        self.results["length"] = (1 << workers) - 1  # every rank is in the sums
        self.results["elements"] = elements.sum(axis=1, dtype=np.int64)  # fits: |sum| < 2**25
        self._views = self._batch_views()

    def slots_of(self, batch: int) -> slice:
        first = batch % self.groups * self.group
        return slice(first, min(first + self.group, self.slots))

    def batch(self, b: int) -> np.ndarray:
        """Batch ``b``'s packets, ranks x its slots, each rank's contiguous; its expected
        results are in ``results`` (both valid until round b // groups + VARIANTS)."""
        round_index = b // self.groups
        packets, rounds, chunks, slots = self._views[round_index % VARIANTS][b % self.groups]
        for field in rounds:
            field[...] = (round_index + 1) & 0xFFFF
        chunk = slots + round_index * self.slots  # the 32-bit field keeps it mod 2**32
        for field in chunks:
            field[...] = chunk
        return packets

    def _batch_views(self) -> list[list[_BatchViews]]:
        """Per variant and group of slots: the packets, the round and chunk fields of packets
        and results, and the slots (what ``batch`` writes, made once: numpy's cost is per
        call). The version, and so the vslot field, is the variant's."""
        views: list[list[_BatchViews]] = []
        for variant in range(VARIANTS):
            self.packets[variant]["vslot"] = (variant + 1) % 2 << 15 | np.arange(self.slots)
            self.results[variant]["vslot"] = self.packets[variant][0]["vslot"]
            views.append([])
            for group in range(self.groups):
                where = self.slots_of(group)
                mine = [self.packets[variant][:, where], self.results[variant][where]]
                views[variant].append((
                    mine[0],
                    [records["round"] for records in mine],
                    [records["chunk"] for records in mine],
                    np.arange(where.start, where.stop, dtype=np.uint64),
                ))  # fmt: skip
        return views


class Window:
    """Which batches are out, which results have come back, and whether each was right.

    A batch is sent once the batch of its slots two rounds before has every
    result in (a slot has two rows, by the round's version), and batches
    complete in order. A result's round names its variant ((round - 1) mod
    VARIANTS), and its variant and slot the row of ``Traffic.results`` it
    must equal byte for byte, round and chunk included: one of a round long
    gone or not yet sent differs there, and one of a round still listed as
    received came twice.
    """

    def __init__(self, traffic: Traffic) -> None:
        t = self.traffic = traffic
        self.sent = 0  # batches sent
        self.completed = 0  # batches with every result in, oldest first
        self.results = 0
        #: rank x (variant, slot): received, since the row was last sent
        self._seen = np.zeros((t.workers, VARIANTS * t.slots), dtype=bool)
        self._expected = t.results.reshape(-1).view(np.uint8).reshape(VARIANTS * t.slots, -1)
        fields = t.dtype.fields
        assert fields is not None
        self._rank_byte = fields["rank"][1]
        # compared a word at a time: the widest that both the prefix and a packet are whole of
        size = next(n for n in (8, 4, 2, 1) if t.prefix % n == 0 and t.dtype.itemsize % n == 0)
        self._word, self._skip = np.dtype(f"u{size}"), t.prefix // size
        self._expected_words = self._expected.view(self._word)[:, self._skip :]

    def _columns(self, batch: int) -> slice:
        """Batch ``batch``'s columns of ``_seen``."""
        t = self.traffic
        where, offset = t.slots_of(batch), batch // t.groups % VARIANTS * t.slots
        return slice(offset + where.start, offset + where.stop)

    def due(self) -> list[int]:
        """Batches that may be sent now; they count as sent."""
        t = self.traffic
        out = []
        while self.sent < t.batches and self.sent - self.completed < DEPTH * t.groups:
            self._seen[:, self._columns(self.sent)] = False
            out.append(self.sent)
            self.sent += 1
        return out

    @property
    def missing(self) -> int:
        return sum(
            int((~self._seen[:, self._columns(b)]).sum()) for b in range(self.completed, self.sent)
        )

    def take(self, ranks: np.ndarray, records: np.ndarray) -> None:
        """Check and count results, ``records[i]`` received by rank ``ranks[i]`` (JOINED
        answers to a repeated JOIN are skipped); SwitchBenchError at the first that is not
        the exact result of a round in flight, or came before. ``records`` is overwritten
        (the rank field: whichever rank completed the slot)."""
        if (joined := records["msg_type"] == wire.MsgType.JOINED).any():
            ranks, records = ranks[~joined], records[~joined]
        t, seen = self.traffic, self._seen
        rows = ((records["round"] - 1) & (VARIANTS - 1)).astype(np.intp) * t.slots
        rows += records["vslot"] & 0x7FFF
        np.minimum(rows, seen.shape[1] - 1, out=rows)  # a slot out of range: a wrong result
        data = records.view(np.uint8).reshape(len(records), -1)
        data[:, self._rank_byte] = 0
        words = data.view(self._word)[:, self._skip :]
        exact = (words == self._expected_words[rows]).all(axis=1)
        cells = ranks * seen.shape[1] + rows
        first = (np.bincount(cells, minlength=seen.size) > 0) & ~seen.reshape(-1)
        if not exact.all() or int(first.sum()) != len(records):
            raise SwitchBenchError(self._describe(ranks, data, exact, rows))
        seen.reshape(-1)[first] = True
        self.results += len(records)
        while self.completed < self.sent and seen[:, self._columns(self.completed)].all():
            self.completed += 1

    def _describe(
        self, ranks: np.ndarray, data: np.ndarray, exact: np.ndarray, rows: np.ndarray
    ) -> str:
        """What is wrong with the first result of ``data`` that is wrong."""
        t, seen = self.traffic, self._seen.copy()
        for i, record in enumerate(data[:, t.prefix :]):
            got = record.tobytes()
            header = wire.unpack_header(got)
            what = f"rank {ranks[i]}'s result for slot {header.slot} round {header.round}"
            if not exact[i]:
                expected = self._expected[rows[i], t.prefix :].tobytes()
                fields = [
                    f"{name} {value} (expected {want})"
                    for (name, value), want in zip(
                        header._asdict().items(), wire.unpack_header(expected), strict=True
                    )
                    if value != want and name != "rank"
                ]
                sums = wire.decode_elements(got, t.k) != wire.decode_elements(expected, t.k)
                if sums.any():
                    fields.append(f"{int(sums.sum())} of its {t.k} sums wrong")
                return f"{what}: {', '.join(fields)}"
            if seen[ranks[i], rows[i]]:
                return f"{what} came twice"
            seen[ranks[i], rows[i]] = True
        raise AssertionError("no result is wrong")


# -- moving packets ---------------------------------------------------------------------------


class Ports(Protocol):
    """The generator's end of each rank's link to the switch."""

    def send(self, rank: int, packets: np.ndarray) -> None:
        """Send a rank's contiguous packets, in order."""

    def expect(self, in_flight: int) -> None:
        """Make room for ``in_flight`` packets of every rank."""

    def receive(self, timeout: float) -> tuple[np.ndarray, np.ndarray]:
        """(ranks, packets): whatever has arrived, each with the rank that received it,
        waiting up to ``timeout`` for the first."""


class _Ports(ABC):
    """One socket per rank, polled together; what arrives lands in one buffer, handed over
    as one array per wake-up (numpy's cost is per call, not per packet). ``prefixes`` are
    what comes before each rank's datagrams: nothing, or its frames' headers."""

    def __init__(self, sockets: list[socket.socket], k: int, prefixes: list[bytes]) -> None:
        self.sockets = sockets
        self.k = k
        self.prefixes = prefixes
        self.dtype = record_dtype(k, len(prefixes[0]))
        self._rank_of = {sock.fileno(): rank for rank, sock in enumerate(sockets)}
        self._poller = select.poll()
        for sock in sockets:
            sock.setblocking(False)
            self._poller.register(sock, select.POLLIN)
        self._buffer = bytearray()

    def expect(self, in_flight: int) -> None:
        """Make room for ``in_flight`` packets of every rank, and one more read."""
        self._buffer = bytearray(len(self.sockets) * in_flight * self.dtype.itemsize + _READ)

    def receive(self, timeout: float) -> tuple[np.ndarray, np.ndarray]:
        view, end = memoryview(self._buffer), 0
        ranks, counts = [], []
        for fd, _ in self._poller.poll(timeout * 1000):
            start = end
            while end + _READ <= len(view):
                try:
                    end += self._read(self.sockets[self._rank_of[fd]], view[end:])
                except BlockingIOError:
                    break
            ranks.append(self._rank_of[fd])
            counts.append((end - start) // self.dtype.itemsize)
        records = np.frombuffer(self._buffer, self.dtype, end // self.dtype.itemsize)
        return np.repeat(np.array(ranks, dtype=np.intp), counts), records

    def join(self, timeout: float) -> int:
        """Every rank JOINs the switch's static job; the session it hands out."""
        joins = [
            Join(JOB_ID, rank, self.k, wire.new_session()) for rank in range(len(self.sockets))
        ]
        sessions: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        self.expect(1)
        while len(sessions) < len(joins):
            if time.monotonic() > deadline:
                raise SwitchBenchError(f"the switch did not answer JOIN within {timeout:g} s")
            for rank, joining in enumerate(joins):
                if rank not in sessions:
                    for datagram in joining.expire(time.monotonic()):
                        self.transmit(rank, datagram)
            ranks, records = self.receive(0.05)
            skip = len(self.prefixes[0])
            for rank, record in zip(ranks, records, strict=True):
                if (answer := joins[rank].receive(record.tobytes()[skip:])) is not None:
                    sessions[rank] = answer.session
        if len(set(sessions.values())) != 1:
            raise SwitchBenchError(f"ranks were given different sessions: {sessions}")
        return sessions[0]

    @abstractmethod
    def transmit(self, rank: int, datagram: bytes) -> None:
        """Send one datagram from rank ``rank``."""

    @abstractmethod
    def _read(self, sock: socket.socket, into: memoryview) -> int:
        """Bytes of whole packets read into ``into`` (0 for something to ignore)."""

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class UdpPorts(_Ports):
    """Loopback UDP sockets, one per rank: GSO to send, GRO to receive."""

    def __init__(self, workers: int, k: int) -> None:
        sockets = []
        for _ in range(workers):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            force_buffers(sock, 8 << 20)
            sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        super().__init__(sockets, k, [b""] * workers)
        self.ports = [sock.getsockname()[1] for sock in sockets]
        self._per_send = min(_GSO_SEGMENTS, _GSO_BYTES // self.dtype.itemsize)

    def connect(self, address: tuple[str, int]) -> None:
        """Send to the switch; only the switch's datagrams are received from now on."""
        for sock in self.sockets:
            sock.connect(address)
            sock.setsockopt(_SOL_UDP, _UDP_SEGMENT, self.dtype.itemsize)

    def transmit(self, rank: int, datagram: bytes) -> None:
        self.sockets[rank].send(datagram)

    def send(self, rank: int, packets: np.ndarray) -> None:
        data = packets.view(np.uint8)
        step = self._per_send * self.dtype.itemsize
        for start in range(0, len(data), step):
            self.sockets[rank].send(data[start : start + step].data)

    def _read(self, sock: socket.socket, into: memoryview) -> int:
        n, _, flags, _ = sock.recvmsg_into([into], socket.CMSG_SPACE(4))
        if flags & _MSG_TRUNC or n % self.dtype.itemsize:
            raise SwitchBenchError(f"a datagram of {n} bytes is not whole results")
        return n


class FramePorts(_Ports):
    """AF_PACKET sockets on the hosts' ends of the switch's links: rank r is host r + 1 on
    switch port r + 1, addressed as in the Mininet star.

    Each rank sends through a socket of its own that hands the kernel a whole batch as one
    UDP GSO frame (PACKET_VNET_HDR): the kernel cuts it into one frame a datagram, each with
    its own IPv4 and UDP lengths and checksums, before the link (its segmentation offload is
    off), so the switch receives ordinary frames, and Python pays one call a batch.
    """

    def __init__(self, interfaces: list[str], k: int) -> None:
        sockets, self._senders = [], []
        for name in interfaces:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
            force_buffers(sock, 8 << 20)
            sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
            sock.bind((name, 0))
            sockets.append(sock)
            sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: deaf
            sender.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
            sender.bind((name, 0))
            self._senders.append(sender)
        self._datagram = wire.datagram_bytes(k)
        prefixes = [_frame_prefix(host, self._datagram) for host in range(1, len(sockets) + 1)]
        super().__init__(sockets, k, prefixes)
        self._per_send = min(_GSO_SEGMENTS, _GSO_BYTES // self._datagram)
        self._gso = struct.pack(
            "<BBHHHH", _VNET_NEEDS_CSUM, _VNET_GSO_UDP_L4, wire.L2_L4_BYTES, self._datagram,
            wire.ETH_BYTES + wire.IPV4_BYTES, 6,  # the UDP checksum's offset in its header
        )  # fmt: skip
        self._headers: dict[tuple[int, int], bytes] = {}  # (rank, datagrams) -> their headers
        #: Frames that were not a result's size (the rest are checked as results).
        self.other = 0

    def members(self) -> list[Member]:
        """Each rank as the switch's job must bind it."""
        return [
            Member(host - 1, host_ip(host), WORKER_UDP_PORT, parse_mac(host_mac(host)), host)
            for host in range(1, len(self.sockets) + 1)
        ]

    def transmit(self, rank: int, datagram: bytes) -> None:
        self._senders[rank].send(_VNET_PLAIN + self.prefixes[rank] + datagram)

    def send(self, rank: int, packets: np.ndarray) -> None:
        frames = packets.view(np.uint8).reshape(len(packets), -1)[:, wire.L2_L4_BYTES :]
        for start in range(0, len(frames), self._per_send):
            datagrams = [frame.data for frame in frames[start : start + self._per_send]]
            headers = self._headers.get((rank, len(datagrams)))
            if headers is None:
                headers = self._headers[rank, len(datagrams)] = _gso_headers(
                    rank + 1, len(datagrams) * self._datagram
                )
            self._senders[rank].sendmsg([self._gso, headers, *datagrams])

    def _read(self, sock: socket.socket, into: memoryview) -> int:
        n = sock.recv_into(into)
        if n != self.dtype.itemsize:
            self.other += 1
            return 0
        return n

    def close(self) -> None:
        super().close()
        for sender in self._senders:
            sender.close()


def _frame_prefix(host: int, payload_bytes: int, udp_checksum: int = 0) -> bytes:
    """Ethernet, IPv4 and UDP headers of host ``host``'s packets to the switch, for a UDP
    payload of ``payload_bytes`` (a zero UDP checksum, as the switch's own results carry)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    frame = (
        Ether(src=host_mac(host), dst=SWITCH_MAC)
        / IP(src=host_ip(host), dst=SWITCH_IP)
        / UDP(sport=WORKER_UDP_PORT, dport=wire.DEFAULT_SWITCH_PORT, chksum=udp_checksum)
        / bytes(payload_bytes)
    )
    return bytes(frame)[: wire.L2_L4_BYTES]


def _gso_headers(host: int, payload_bytes: int) -> bytes:
    """The headers of a GSO frame: as ``_frame_prefix``'s, with the UDP checksum holding the
    sum of the pseudo-header, which the kernel completes for each datagram it cuts."""
    length = wire.UDP_BYTES + payload_bytes
    pseudo = socket.inet_aton(host_ip(host)) + socket.inet_aton(SWITCH_IP)
    total = sum(struct.unpack("!4H", pseudo)) + wire.IP_PROTO_UDP + length
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return _frame_prefix(host, payload_bytes, total)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(traffic: Traffic, ports: Ports, switch_pid: int, timeout: float) -> dict[str, Any]:
    """Send every batch through the switch and check every result; what it took."""
    window = Window(traffic)
    ports.expect(DEPTH * traffic.slots)
    start_cpu, start_own = _cpu_seconds(switch_pid), time.process_time()
    start = last_progress = time.perf_counter()
    while window.completed < traffic.batches:
        for batch in window.due():
            packets = traffic.batch(batch)
            for rank in range(traffic.workers):
                ports.send(rank, packets[rank])
        ranks, records = ports.receive(min(timeout, 0.05))
        now = time.perf_counter()
        if len(records):
            window.take(ranks, records)
            last_progress = now
        elif now - last_progress > timeout:
            raise SwitchBenchError(
                f"no result for {timeout:g} s: {window.missing} results of the "
                f"{window.sent - window.completed} batches in flight missing"
            )
    seconds = time.perf_counter() - start
    switch_cpu = _cpu_seconds(switch_pid) - start_cpu
    own_cpu = time.process_time() - start_own
    contributions = traffic.rounds * traffic.workers * traffic.slots
    handled = contributions + window.results
    return {
        "slots": traffic.slots,
        "rounds": traffic.rounds,
        "contributions": contributions,
        "results": window.results,
        "seconds": round(seconds, 4),
        "contributions_per_s": round(contributions / seconds),
        "results_per_s": round(window.results / seconds),
        "switch_cpu_seconds": round(switch_cpu, 3),
        # per million packets in (contributions) and out (results), and contributions per
        # second of the switch's CPU: its rate with a core of its own. None when the switch
        # used less than a clock tick (a run too short to tell)
        "switch_cpu_seconds_per_million_packets": round(switch_cpu / handled * 1e6, 3)
        if switch_cpu
        else None,
        "contributions_per_cpu_second": round(contributions / switch_cpu) if switch_cpu else None,
        # CPU seconds per second: about 1 for a one-thread switch that is the bottleneck
        "switch_busy": round(switch_cpu / seconds, 3),
        "generator_busy": round(own_cpu / seconds, 3),
    }


# -- the switches ------------------------------------------------------------------------------


def soft_udp(options: SwitchBenchOptions, engine: EngineName) -> dict[str, Any]:
    """The soft switch in UDP mode on loopback, as the allreduce bench runs it."""
    n, k, slots = options.workers, options.k, options.slot_count("soft")
    ports = UdpPorts(n, k)
    try:
        with LoopbackSwitch(ports.ports, k, slots, engine=engine) as switch:
            host, _, port = switch.address.rpartition(":")
            ports.connect((host, int(port)))
            traffic = Traffic(n, k, slots, options.rounds(engine), ports.join(options.timeout))
            measured = drive(traffic, ports, switch.child.pid, options.timeout)
    finally:
        ports.close()
    return {**measured, "switch_report": _counters(switch.report or {})}


def soft_raw(options: SwitchBenchOptions, engine: EngineName) -> dict[str, Any]:
    """The soft switch in raw mode on veth pairs, as Mininet's switch node runs it."""
    n, k, slots = options.workers, options.k, options.slot_count("soft")
    with ExitStack() as stack:
        ns, inside, ports = stack.enter_context(_links(n, k))
        job = [f"--worker={m.rank}={m.ip}:{m.udp_port}@{m.port}/{host_mac(m.port)}"
               for m in ports.members()]  # fmt: skip
        switch = stack.enter_context(
            Child(
                ["ip", "netns", "exec", ns, *cli_command(
                    "switch", *(f"--raw={port}={name}" for port, name in enumerate(inside, 1)),
                    "--world-size", str(n), "--k", str(k), "--slots", str(slots),
                    "--engine", engine, *job,
                )],
                "the soft switch",
            )
        )  # fmt: skip
        switch.wait_for(SERVING)
        traffic = Traffic(
            n, k, slots, options.rounds(engine), ports.join(options.timeout), ports.prefixes
        )
        measured = drive(traffic, ports, switch.pid, options.timeout)
    return {**measured, "switch_report": _counters(switch.report(timeout=0))}


def _counters(report: dict[str, Any]) -> dict[str, Any]:
    """What the soft switch's own report says of the run: its engine, packets and drops."""
    return {key: report.get(key) for key in ("engine", "packets", "drops")}


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SwitchBenchError(f"{' '.join(command)}: {result.stderr.strip()}")


@contextmanager
def namespace(links: int) -> Iterator[tuple[str, list[str], list[str]]]:
    """A network namespace of this process's own with ``links`` veth pairs: yields its name,
    the switch's ends in it (ports 1..links) and the hosts' ends outside. Exactly these are
    deleted again, whatever happens."""
    tag = f"sb{os.getpid()}"
    ns, made = f"{tag}ns", []
    outside = [f"{tag}h{i}" for i in range(1, links + 1)]
    inside = [f"{tag}s{i}" for i in range(1, links + 1)]
    _run("ip", "netns", "add", ns)
    try:
        in_ns = ("ip", "netns", "exec", ns)
        for scope in ("all", "default"):  # no IPv6 chatter on the switch's ports
            _run(*in_ns, "sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
        for host_end, switch_end in zip(outside, inside, strict=True):
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", switch_end,
                 "netns", ns)  # fmt: skip
            made.append(host_end)
            _run("sysctl", "-qw", f"net.ipv6.conf.{host_end}.disable_ipv6=1")
            for where, name in (((), host_end), (in_ns, switch_end)):
                _run(*where, "ip", "link", "set", name, "up")
                # no checksum, so no UDP segmentation, left to the link: its frames are whole
                subprocess.run([*where, "ethtool", "-K", name, "tx", "off", "rx", "off"],
                               capture_output=True)  # fmt: skip
        yield ns, inside, outside
    finally:
        for link in made:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextmanager
def _links(workers: int, k: int) -> Iterator[tuple[str, list[str], FramePorts]]:
    """``namespace``, with the generator's sockets on the hosts' ends."""
    with namespace(workers) as (ns, inside, outside):
        ports = FramePorts(outside, k)
        try:
            yield ns, inside, ports
        finally:
            ports.close()


def p4_program(k: int, scratch: Path) -> CompiledProgram:
    """The P4 program for K: p4src/build's (``make p4``) if newer than every source, else
    compiled into ``scratch``."""
    build = P4_SOURCE.parent / "build"
    built = CompiledProgram(
        build / f"switchreduce_k{k}.json", build / f"switchreduce_k{k}.p4info.txtpb"
    )
    sources = [P4_SOURCE, *SOURCE_DIR.glob("include/*.p4")]
    newest = max(path.stat().st_mtime for path in sources)
    if all(p.exists() and p.stat().st_mtime > newest for p in (built.bmv2_json, built.p4info)):
        return built
    return compile_program(scratch, k)


def bmv2(options: SwitchBenchOptions, program: CompiledProgram) -> dict[str, Any]:
    """BMv2 running ``program`` on veth pairs, as Mininet's switch node runs it, the job
    admitted over P4Runtime by the controller's own code."""
    n, k, slots = options.workers, options.k, options.slot_count("bmv2")
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="switchbench-")))
        ns, inside, ports = stack.enter_context(_links(n, k))
        address, log = f"unix:{scratch / 'p4runtime.sock'}", scratch / "bmv2.log"
        switch = stack.enter_context(
            Child(
                ["ip", "netns", "exec", ns, SIMPLE_SWITCH_GRPC, "--device-id", "0", "--no-p4",
                 *(arg for port, name in enumerate(inside, 1) for arg in ("-i", f"{port}@{name}")),
                 "--", "--grpc-server-addr", address],
                "simple_switch_grpc", log=log, speaks=False,
            )
        )  # fmt: skip
        wait_for_p4runtime(switch.proc, address, log)
        conn = stack.enter_context(SwitchConnection(address, p4info=load_p4info(program.p4info)))
        conn.push_pipeline(program.bmv2_json.read_bytes())
        job = JobTable(conn).admit(JOB_ID, ports.members(), slots)
        traffic = Traffic(n, k, slots, options.rounds(None), job.session, ports.prefixes)
        measured = drive(traffic, ports, switch.pid, options.timeout)
    return {**measured, "other_frames": ports.other}


# -- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One measurement: a switch and, for the soft switch, its engine and mode."""

    switch: str
    engine: EngineName | None = None
    #: The soft switch's: udp (a socket on loopback) or raw (frames on veth pairs).
    mode: str | None = None

    @property
    def label(self) -> str:
        return " ".join(part for part in (self.switch, self.engine, self.mode) if part)

    def measure(
        self, options: SwitchBenchOptions, program: CompiledProgram | None
    ) -> dict[str, Any]:
        """One run: what drive measured, and where. BMv2 runs ``program``."""
        if self.engine is None:
            assert program is not None
            measured = bmv2(options, program)
        elif self.mode == "raw":
            measured = soft_raw(options, self.engine)
        else:
            measured = soft_udp(options, self.engine)
        return {"label": self.label, **dataclasses.asdict(self), **measured}


def run_switch_bench(options: SwitchBenchOptions) -> int:
    """Measure every switch ``repeat`` times, interleaved; print the summary (or one JSON
    object). A run that does not get every result once and exact raises SwitchBenchError."""
    targets = options.targets()
    load_before = os.getloadavg()
    # a SIGTERM unwinds like Ctrl-C: the switches stop, the namespaces and links go
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="switchbench-") as scratch:
            program = p4_program(options.k, Path(scratch)) if options.measures_bmv2 else None
            runs = [
                target.measure(options, program)
                for _ in range(options.repeat)
                for target in targets
            ]
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = summarize(options, runs)
    # the machine's 1-, 5- and 15-minute load: other work on it slows the runs down
    summary["load_average"] = {"before": load_before, "after": os.getloadavg()}
    if options.as_json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _median(values: list[float | None]) -> float | None:
    """The median of the values measured (None: none was)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 1) if a is not None and b else None


def summarize(options: SwitchBenchOptions, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per switch over its runs, and each soft engine's ratios to BMv2."""
    medians: dict[str, dict[str, float | None]] = {}
    for label in dict.fromkeys(run["label"] for run in runs):
        mine = [run for run in runs if run["label"] == label]
        medians[label] = {
            key: _median([run[key] for run in mine])
            for key in ("slots", "contributions_per_s", "results_per_s", "switch_busy",
                        "switch_cpu_seconds_per_million_packets", "contributions_per_cpu_second",
                        "generator_busy")
        }  # fmt: skip
    ratios = {}
    if (base := medians.get("bmv2")) is not None:
        for label, m in medians.items():
            if label != "bmv2":
                ratios[f"{label} / bmv2"] = {
                    "packet_rate": _ratio(m["contributions_per_s"], base["contributions_per_s"]),
                    # how many times less CPU per packet than BMv2
                    "cpu_per_packet": _ratio(
                        base["switch_cpu_seconds_per_million_packets"],
                        m["switch_cpu_seconds_per_million_packets"],
                    ),
                }
    return {
        "workers": options.workers,
        "k": options.k,
        "repeat": options.repeat,
        "medians": medians,
        "ratios": ratios,
        "runs": runs,
    }


def _print_summary(s: dict[str, Any]) -> None:
    print(
        f"{s['workers']} ranks, K={s['k']}, two rounds of every slot in flight; "
        f"medians of {s['repeat']} run(s) each; load average "
        f"{s['load_average']['before'][0]:.2f} before, {s['load_average']['after'][0]:.2f} after"
    )
    print(
        f"  {'switch':18} {'slots':>5} {'contributions/s':>15} {'results/s':>10} "
        f"{'CPU s/M pkts':>12} {'contrib./CPU s':>14} {'switch busy':>11} {'generator busy':>14}"
    )
    for label, m in s["medians"].items():
        cpu, per_cpu = (
            m["switch_cpu_seconds_per_million_packets"],
            m["contributions_per_cpu_second"],
        )
        print(
            f"  {label:18} {m['slots']:5.0f} {m['contributions_per_s']:15,.0f} "
            f"{m['results_per_s']:10,.0f} {'-' if cpu is None else f'{cpu:.3f}':>12} "
            f"{'-' if per_cpu is None else f'{per_cpu:,.0f}':>14} "
            f"{m['switch_busy']:11.2f} {m['generator_busy']:14.2f}"
        )
    for label, ratio in s["ratios"].items():
        print(
            f"  {label}: {ratio['packet_rate']}x the packet rate, "
            f"{ratio['cpu_per_packet'] or '-'}x less CPU per packet"
        )
    results = sum(run["results"] for run in s["runs"])
    print(f"  every one of the {results:,} results came once, and exact")
