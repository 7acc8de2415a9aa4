"""The soft switch: a Python model of the P4 pipeline in ``p4src/``.

Each class is the counterpart of the P4 control of the same name, and the
tables, registers and counters carry the P4 program's fully qualified names,
so one control plane drives both. The flow is v1model's::

    SwitchReduceParser -> SwitchReduceIngress -> PacketReplicationEngine
                       -> SwitchReduceEgress  -> SwitchReduceDeparser

Aggregation follows SwitchML (NSDI'21, Algorithm 2) with two shadow copies
(versions) of every slot, made robust to arbitrarily delayed packets. Per
slot and version (a "row") the switch keeps the round it holds, a worker
bitmap, an arrival count (mod quorum), the max exponent, what the round
sums (format, length and chunk) and K running sums. A packet of a newer round than
its row holds starts the round (it writes); one of the row's round adds,
unless its worker's bit is already set: then it is a retransmission, answered
with the stored result if the round is complete and with WAITING otherwise
(the contribution is in); one of an older round is stale and dropped. A job's
``quorum`` of arrivals (its world size, or fewer) completes a round, and the
quorum-th arrival multicasts the result to the job: a packet of a complete
round whose rank is not in it is late and not added, answered with the sums
only if it is a RESEND (its rank may have lost the multicast). Results and
WAITING carry the row's bitmap in ``length``. A header alone (a RELEASE, or a
priming use without elements) leaves the sums be and is answered with a
header alone. A packet whose session is not its job's is answered STALE; one
that disagrees with its round's format, length or chunk makes the switch
refuse the round (REFUSED to every rank). ``slot_session`` records which session last
used a slot, so a new run starts from clean state without the control plane
ever writing a register (P4Runtime on BMv2 cannot).
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import numpy as np

from switchreduce import wire
from switchreduce.emulation.softswitch.tables import ActionCall, Counter, ExactTable, Register
from switchreduce.p4runtime import names
from switchreduce.wire import DropReason

#: Slots in the pool shared by all jobs (the P4 program's POOL_SIZE).
POOL_SIZE = 4096
#: Largest job id the per-job counters index.
MAX_JOBS = 256
#: What a worker sends the switch besides DATA (a static job's JOIN goes to its CPU).
_WORKER_MESSAGES = (wire.MsgType.RESEND, wire.MsgType.RELEASE)
#: A rank's contribution to a round, sent once or again.
_CONTRIBUTIONS = (wire.MsgType.DATA, wire.MsgType.RESEND)


@dataclass(slots=True)
class Packet:
    """A parsed packet with its v1model metadata.

    Addresses are integers (MACs 48-bit, IPv4 32-bit); ``elements`` holds the
    K payload elements (a big-endian view of the received bytes, or for a
    result the slot's sums).
    """

    ingress_port: int
    eth_dst: int
    eth_src: int
    ip_src: int
    ip_dst: int
    udp_sport: int = 0
    udp_dport: int = 0
    udp_length: int = 0
    aggregation: bool = False  # UDP to the reserved port range: must be well formed
    header: wire.Header | None = None
    elements: np.ndarray | None = None
    raw: bytes = b""  # the frame (or datagram) as received
    egress_port: int = 0
    egress_rid: int = 0

    def replica(self, egress_port: int, egress_rid: int) -> Packet:
        """A copy for one multicast replica (header and elements are shared, never mutated)."""
        return Packet(
            self.ingress_port,
            self.eth_dst,
            self.eth_src,
            self.ip_src,
            self.ip_dst,
            self.udp_sport,
            self.udp_dport,
            self.udp_length,
            self.aggregation,
            self.header,
            self.elements,
            self.raw,
            egress_port,
            egress_rid,
        )


class Verdict(IntEnum):
    DROP = 0
    MULTICAST = 1
    UNICAST = 2


_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


class SwitchReduceParser:
    """Ethernet / IPv4 / UDP, then the aggregation header for the reserved port range."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.datagram_bytes = wire.datagram_bytes(k)

    def parse_frame(self, frame: bytes, ingress_port: int) -> Packet:
        """Parse an Ethernet frame (raw mode); other traffic keeps ``header=None``."""
        pkt = Packet(ingress_port, 0, 0, 0, 0, raw=frame)
        if len(frame) < wire.ETH_BYTES:
            return pkt
        dst, src, ethertype = _ETH.unpack_from(frame)
        pkt.eth_dst = int.from_bytes(dst, "big")
        pkt.eth_src = int.from_bytes(src, "big")
        if ethertype != wire.ETHERTYPE_IPV4 or len(frame) < wire.L2_L4_BYTES:
            return pkt
        ver_ihl, _, _, _, _, _, proto, _, ip_src, ip_dst = _IPV4.unpack_from(frame, wire.ETH_BYTES)
        pkt.ip_src = int.from_bytes(ip_src, "big")
        pkt.ip_dst = int.from_bytes(ip_dst, "big")
        if ver_ihl != 0x45 or proto != wire.IP_PROTO_UDP:
            return pkt
        sport, dport, length, _ = _UDP.unpack_from(frame, wire.ETH_BYTES + wire.IPV4_BYTES)
        pkt.udp_sport, pkt.udp_dport, pkt.udp_length = sport, dport, length
        if wire.UDP_PORT_MIN <= dport <= wire.UDP_PORT_MAX:
            self._parse_aggregation(pkt, memoryview(frame)[wire.L2_L4_BYTES :])
        return pkt

    def parse_datagram(self, payload: bytes, src: tuple[str, int], dst: tuple[str, int]) -> Packet:
        """Parse a UDP payload received on a socket (UDP mode, ingress port 0)."""
        pkt = Packet(
            0,
            0,
            0,
            ip_to_int(src[0]),
            ip_to_int(dst[0]),
            src[1],
            dst[1],
            wire.UDP_BYTES + len(payload),
            raw=payload,
        )
        self._parse_aggregation(pkt, payload)
        return pkt

    def _parse_aggregation(self, pkt: Packet, payload: bytes | memoryview) -> None:
        """Extract what is there, as a P4 parser does: too short leaves headers invalid."""
        pkt.aggregation = True
        if len(payload) >= wire.HEADER_BYTES:
            pkt.header = wire.unpack_header(payload)
        # The P4 parser looks for no elements after a header alone (UDP length says so).
        alone = pkt.udp_length == wire.UDP_BYTES + wire.HEADER_BYTES
        if len(payload) >= self.datagram_bytes and not alone:
            pkt.elements = wire.decode_elements(payload, self.k)


class SwitchReduceIngress:
    """Admission (``jobs``, ``workers``), slot aggregation, and plain forwarding."""

    def __init__(self, k: int, pool_size: int = POOL_SIZE) -> None:
        self.k = k
        self.udp_length = wire.UDP_BYTES + wire.datagram_bytes(k)
        self.header_length = wire.UDP_BYTES + wire.HEADER_BYTES  # a header alone
        self.pool_size = pool_size
        self.jobs = ExactTable(names.JOBS, MAX_JOBS)
        self.workers = ExactTable(names.WORKERS, MAX_JOBS * wire.MAX_WORKERS)
        self.forward = ExactTable(names.FORWARD)
        rows = 2 * pool_size
        self.slot_session = Register(names.SLOT_SESSION, pool_size)
        self.round = Register(names.ROUND, rows)
        self.bitmap = Register(names.BITMAP, rows)
        self.arrivals = Register(names.ARRIVALS, rows)
        self.exponent = Register(names.EXPONENT, rows)
        self.row_format = Register(names.ROW_FORMAT, rows)
        self.row_length = Register(names.ROW_LENGTH, rows)
        self.row_chunk = Register(names.ROW_CHUNK, rows)
        self.seen = Register(names.SEEN, rows)
        #: The P4 register ``value``: cell row * K + i holds element i of the row's sums.
        self.value = Register(names.VALUE, rows * k, columns=k)
        self.drops = Counter(names.DROPS, len(DropReason))
        self.job_stats = {stat: Counter(stat.counter, MAX_JOBS) for stat in names.JobStat}

    def drop(self, pkt: Packet, reason: DropReason) -> Verdict:
        self.drops.count(reason, len(pkt.raw))
        return Verdict.DROP

    def apply(self, pkt: Packet) -> tuple[Verdict, int]:
        """(verdict, multicast group) for one packet; rewrites ``pkt`` for results."""
        if not pkt.aggregation:
            return self._forward(pkt)
        kind = wire.MsgType.DATA  # or a worker's other message, if it says so
        if pkt.header is not None and pkt.header.msg_type in _WORKER_MESSAGES:
            kind = wire.MsgType(pkt.header.msg_type)
        release = kind == wire.MsgType.RELEASE
        admitted = self.admit(pkt, kind)
        if admitted is None:
            return Verdict.DROP, 0
        hdr, elements, job_args = admitted
        world_size, quorum, slot_base, _, mcast_grp, session = job_args
        if hdr.session != session:  # another run's packet, or a guess: tell the sender
            self.drop(pkt, DropReason.BAD_SESSION)
            if release:  # nothing answers a RELEASE
                return Verdict.DROP, 0
            return self._reply(pkt, hdr, wire.MsgType.STALE), 0
        index = slot_base + hdr.slot
        return self._aggregate(pkt, hdr, elements, world_size, quorum, index, mcast_grp, session)

    def admit(
        self, pkt: Packet, msg_type: wire.MsgType
    ) -> tuple[wire.Header, np.ndarray | None, tuple[int, ...]] | None:
        """The ingress checks every packet of a job passes, in the P4 program's order.

        A well-formed ``msg_type`` packet of a job in the ``jobs`` table, from a
        rank of it bound in ``workers`` to where the packet came from, for a
        slot of the job's. A RELEASE is a header alone, as a DATA (or RESEND)
        with no elements (count 0, a priming use) may be; anything else carries
        K elements. Returns its header, its elements (None for a header alone)
        and the job's ``set_job`` arguments, or None with the drop counted.
        DATA, RESEND and RELEASE come here from ``apply``; a static job's JOIN
        from the switch's CPU (``static.StaticJob``), so all are refused for
        the same reasons.
        """
        hdr, elements = pkt.header, pkt.elements
        if pkt.udp_length == self.header_length:  # a header alone
            well_formed = hdr is not None and (
                msg_type == wire.MsgType.RELEASE or (msg_type in _CONTRIBUTIONS and hdr.count == 0)
            )
        else:  # the parser sets the header whenever it sets the elements
            well_formed = (
                elements is not None
                and pkt.udp_length == self.udp_length
                and msg_type != wire.MsgType.RELEASE
            )
        if not well_formed or hdr is None or hdr.msg_type != msg_type or hdr.count > self.k:
            self.drop(pkt, DropReason.BAD_HEADER)
            return None
        hit, job = self.jobs.lookup((hdr.job_id,))
        if not hit:
            self.drop(pkt, DropReason.UNKNOWN_JOB)
            return None
        if job.name != names.SET_JOB.name:  # NoAction sets no metadata: P4 leaves it zero
            job = ActionCall(job.name, (0,) * len(names.SET_JOB.params))
        world_size, _, slot_base, slot_count, _, _ = job.args
        if hdr.rank >= world_size:
            self.drop(pkt, DropReason.RANK_OUT_OF_RANGE)
            return None
        # A slot past the pool has no registers: its job's range was admitted too large.
        if hdr.slot >= slot_count or slot_base + hdr.slot >= self.pool_size:
            self.drop(pkt, DropReason.SLOT_OUT_OF_RANGE)
            return None
        bound, _ = self.workers.lookup(
            (hdr.job_id, hdr.rank, pkt.ingress_port, pkt.ip_src, pkt.udp_sport)
        )
        if not bound:
            self.drop(pkt, DropReason.UNBOUND_WORKER)
            return None
        return hdr, elements, job.args

    def _aggregate(
        self,
        pkt: Packet,
        hdr: wire.Header,
        elements: np.ndarray | None,
        world_size: int,
        quorum: int,
        index: int,
        mcast_grp: int,
        session: int,
    ) -> tuple[Verdict, int]:
        row = 2 * index + hdr.version
        bitmap, arrivals, exponent = self.bitmap.cells, self.arrivals.cells, self.exponent.cells
        rounds, seen = self.round.cells, self.seen.cells
        if self.slot_session.cells[index] != session:  # the session's first use of the slot
            self.slot_session.cells[index] = session
            rounds[row] = rounds[row ^ 1] = (hdr.round - 1) & 0xFFFF  # so this round is new
            seen[row] = seen[row ^ 1] = 0xFFFFFFFF
        ahead = (hdr.round - rounds[row]) & 0xFFFF  # serial-number order, as TCP's
        bit = (1 << hdr.rank) & 0xFFFFFFFF  # bit<32>: a rank past 31 has no bit
        everyone = ((1 << world_size) - 1) & 0xFFFFFFFF  # bit<32>: 32 ranks or more, all ones
        if ahead >= 0x8000:
            return self.drop(pkt, DropReason.STALE), 0  # an older round, delayed in the network
        # A new round overwrites the row's round before last, whose sums a rank late for a
        # quorum may still need (its copy lost, or not yet asked for): only once every rank has
        # them. A rank sends a round after it has the last one's sums: this packet says so for
        # the round before its own, if the other row holds it, and for this row's, if older. A
        # RELEASE says so for its own round (a quorum job's rank, for a result that came before
        # it sent the round, and for each slot's last of a call).
        if rounds[row ^ 1] == (hdr.round - 1) & 0xFFFF:
            seen[row ^ 1] |= bit
        if hdr.msg_type == wire.MsgType.RELEASE:
            if ahead == 0:
                seen[row] |= bit
            return Verdict.DROP, 0
        if ahead:
            seen[row] |= bit
            # a quorum job's only: a synchronous round completes with everyone, and the
            # switch bench's load runs two rounds a slot at once, which this would hold back
            if quorum != world_size and seen[row] & everyone != everyone:
                return self.drop(pkt, DropReason.AHEAD), 0
        if ahead == 0 and arrivals[row] == wire.ROW_REFUSED:  # the round was refused
            self.drop(pkt, DropReason.MISMATCH)
            return self._reply(pkt, hdr, wire.MsgType.REFUSED), 0
        if ahead == 0 and bitmap[row] & bit:
            if arrivals[row] != 0:  # in, but the round waits for others: not lost, say so
                self.drop(pkt, DropReason.DUPLICATE)
                return self._reply(
                    pkt, hdr._replace(length=int(bitmap[row])), wire.MsgType.WAITING
                ), 0
            self._make_result(pkt, hdr, row)  # complete: the worker lost the result
            self.job_stats[names.JobStat.RETRANSMIT_REPLIES].count(hdr.job_id, len(pkt.raw))
            pkt.egress_port = pkt.ingress_port
            return Verdict.UNICAST, 0
        if ahead == 0 and (
            self.row_format.cells[row] != hdr.format
            or self.row_length.cells[row] != hdr.length
            or self.row_chunk.cells[row] != hdr.chunk
        ):  # ranks disagree on what they sum: no rank may take this round's sums
            arrivals[row] = wire.ROW_REFUSED
            self.drop(pkt, DropReason.MISMATCH)
            self._reply(pkt, hdr, wire.MsgType.REFUSED)
            return Verdict.MULTICAST, mcast_grp
        if ahead == 0 and arrivals[row] == 0:  # late: a quorum completed the round without it
            self.drop(pkt, DropReason.LATE)  # its contribution is not added
            if hdr.msg_type != wire.MsgType.RESEND:
                return Verdict.DROP, 0  # the result's multicast went to it too
            self._make_result(pkt, hdr, row)  # it may have lost that: the sums, to it alone
            pkt.egress_port = pkt.ingress_port
            return Verdict.UNICAST, 0
        if ahead:  # the first packet of a new round writes
            rounds[row] = hdr.round
            bitmap[row], seen[row] = bit, 0
            count = 0
            if elements is not None:  # a header alone (a priming use) leaves the sums be
                self.value.rows[row] = elements
            exponent[row] = hdr.exponent
            self.row_format.cells[row] = hdr.format
            self.row_length.cells[row] = hdr.length
            self.row_chunk.cells[row] = hdr.chunk
        else:  # later ones add
            bitmap[row] |= bit
            count = arrivals[row]
            if elements is not None:
                self.value.rows[row] += elements  # wraps modulo 2**32, as bit<32> does
            exponent[row] = max(exponent[row], hdr.exponent)
        count = (count + 1) & 0xFF  # bit<8>
        count = 0 if count == quorum else count
        arrivals[row] = count
        self.job_stats[names.JobStat.AGGREGATED].count(hdr.job_id, len(pkt.raw))
        if count != 0:
            return Verdict.DROP, 0  # consumed: its contribution is in the registers
        self._make_result(pkt, hdr, row)
        self.job_stats[names.JobStat.RESULTS].count(hdr.job_id, len(pkt.raw))
        return Verdict.MULTICAST, mcast_grp

    def _make_result(self, pkt: Packet, hdr: wire.Header, row: int) -> None:
        """Turn the packet into the slot's result, addressed back to where it came from (a
        header alone, as the packet was, carries no sums)."""
        swap_addresses(pkt)
        pkt.header = hdr._replace(
            msg_type=wire.MsgType.RESULT,
            exponent=self.exponent.cells[row],
            length=int(self.bitmap.cells[row]),  # the ranks in the sums
        )
        if pkt.elements is not None:  # a copy: the next use of the slot overwrites the row
            pkt.elements = self.value.rows[row].copy()

    def _reply(self, pkt: Packet, hdr: wire.Header, kind: wire.MsgType) -> Verdict:
        """Echo the packet back to its sender as ``kind`` (its own header and payload)."""
        swap_addresses(pkt)
        pkt.header = hdr._replace(msg_type=kind)
        pkt.egress_port = pkt.ingress_port
        return Verdict.UNICAST

    def _forward(self, pkt: Packet) -> tuple[Verdict, int]:
        hit, call = self.forward.lookup((pkt.eth_dst,))
        if not hit:
            return self.drop(pkt, DropReason.NO_ROUTE), 0
        # NoAction sets no port: the frame leaves by port 0, egress_spec as P4 leaves it
        pkt.egress_port = call.args[0] if call.name == names.SET_EGRESS_PORT.name else 0
        return Verdict.UNICAST, 0


def swap_addresses(pkt: Packet) -> None:
    """Address a packet back to where it came from (MACs, IPv4 addresses, UDP ports)."""
    pkt.eth_src, pkt.eth_dst = pkt.eth_dst, pkt.eth_src
    pkt.ip_src, pkt.ip_dst = pkt.ip_dst, pkt.ip_src
    pkt.udp_sport, pkt.udp_dport = pkt.udp_dport, pkt.udp_sport


#: (egress port, rid) of each copy a multicast group makes.
Replicas = tuple[tuple[int, int], ...]


class GroupSink(Protocol):
    """Where multicast group writes go besides the dict: the compiled engine's copy."""

    def set(self, group: int, replicas: Replicas) -> None: ...

    def delete(self, group: int) -> None: ...


class MulticastGroups(MutableMapping[int, Replicas]):
    """Group id -> replicas, a dict that hands every write to an attached engine as well."""

    def __init__(self) -> None:
        self._groups: dict[int, Replicas] = {}
        self.sink: GroupSink | None = None

    def __getitem__(self, group: int) -> Replicas:
        return self._groups[group]

    def __setitem__(self, group: int, replicas: Replicas) -> None:
        replicas = tuple(replicas)
        if self.sink is not None:
            self.sink.set(group, replicas)
        self._groups[group] = replicas

    def __delitem__(self, group: int) -> None:
        if group in self._groups and self.sink is not None:
            self.sink.delete(group)
        del self._groups[group]

    def __iter__(self) -> Iterator[int]:
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    def __repr__(self) -> str:
        return f"MulticastGroups({self._groups!r})"

    def attach(self, sink: GroupSink) -> None:
        """From now on every write goes to ``sink`` too, starting with the groups there are."""
        for group, replicas in self._groups.items():
            sink.set(group, replicas)
        self.sink = sink


class PacketReplicationEngine:
    """Multicast groups: group id -> replicas (egress port, rid), as BMv2's PRE."""

    def __init__(self) -> None:
        self.groups = MulticastGroups()

    def replicate(self, pkt: Packet, group: int) -> list[Packet]:
        replicas = self.groups.get(group, ())
        return [pkt.replica(port, rid) for port, rid in replicas]


class SwitchReduceEgress:
    """Rewrites each result copy's destination for the worker behind its replica (rid)."""

    def __init__(self) -> None:
        self.result_rewrite = ExactTable(names.RESULT_REWRITE, MAX_JOBS * wire.MAX_WORKERS)

    def apply(self, pkt: Packet) -> None:
        if pkt.egress_rid == 0:
            return
        hit, call = self.result_rewrite.lookup((pkt.egress_rid,))
        if hit and call.name == names.REWRITE_DESTINATION.name:  # a NoAction entry rewrites nothing
            pkt.eth_dst, pkt.ip_dst, pkt.udp_dport = call.args


class SwitchReduceDeparser:
    """Emits UDP payloads (UDP mode) or frames (raw mode).

    A frame the switch answers with (RESULT, STALE, REFUSED, WAITING) is the received
    frame with the fields the pipeline changed
    written back, as a P4 deparser emits it: addresses, UDP ports, a zero UDP
    checksum, the IPv4 checksum recomputed, the header and the sums.
    """

    @staticmethod
    def datagram(pkt: Packet) -> bytes:
        """The UDP payload of a packet the pipeline answers with: its header, and its sums
        unless it is a header alone."""
        if pkt.header is None:
            raise ValueError("only a parsed aggregation packet can be deparsed")
        if pkt.elements is None:
            return pkt.header.pack()
        return pkt.header.pack() + pkt.elements.astype(wire.ELEMENT_DTYPE).tobytes()

    def frame(self, pkt: Packet) -> bytes:
        if pkt.header is None or pkt.header.msg_type == wire.MsgType.DATA:
            return pkt.raw  # forwarded traffic leaves as it came
        out = bytearray(pkt.raw)
        struct.pack_into(
            "!6s6s", out, 0, pkt.eth_dst.to_bytes(6, "big"), pkt.eth_src.to_bytes(6, "big")
        )
        ip = wire.ETH_BYTES
        struct.pack_into(
            "!H4s4s", out, ip + 10, 0, pkt.ip_src.to_bytes(4, "big"), pkt.ip_dst.to_bytes(4, "big")
        )
        struct.pack_into("!H", out, ip + 10, ipv4_checksum(out[ip : ip + wire.IPV4_BYTES]))
        udp = ip + wire.IPV4_BYTES
        struct.pack_into("!HH", out, udp, pkt.udp_sport, pkt.udp_dport)
        struct.pack_into("!H", out, udp + 6, 0)
        datagram = self.datagram(pkt)
        out[wire.L2_L4_BYTES : wire.L2_L4_BYTES + len(datagram)] = datagram
        return bytes(out)


def ipv4_checksum(header: bytes | bytearray) -> int:
    """The ones'-complement checksum of an IPv4 header whose checksum field is zero."""
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@functools.lru_cache(maxsize=4096)
def ip_to_int(address: str) -> int:
    return int(ipaddress.IPv4Address(address))


@functools.lru_cache(maxsize=4096)
def int_to_ip(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


class SoftSwitch:
    """The whole pipeline; ``process`` maps one received packet to the packets it emits."""

    def __init__(
        self,
        k: int = wire.DEFAULT_K,
        pool_size: int = POOL_SIZE,
    ) -> None:
        self.k = wire.check_k(k)
        self.parser = SwitchReduceParser(k)
        self.ingress = SwitchReduceIngress(k, pool_size)
        self.pre = PacketReplicationEngine()
        self.egress = SwitchReduceEgress()
        self.deparser = SwitchReduceDeparser()

    def process(self, pkt: Packet) -> list[Packet]:
        verdict, group = self.ingress.apply(pkt)
        if verdict == Verdict.DROP:
            return []
        if verdict == Verdict.UNICAST:
            self.egress.apply(pkt)
            return [pkt]
        return self.multicast(pkt, group)

    def multicast(self, pkt: Packet, group: int) -> list[Packet]:
        """One copy of ``pkt`` per replica of ``group``, each through egress."""
        out = self.pre.replicate(pkt, group)
        for copy in out:
            self.egress.apply(copy)
        return out

    def tables(self) -> dict[str, ExactTable]:
        """Every table by its P4 name."""
        ing = self.ingress
        return {t.name: t for t in (ing.jobs, ing.workers, ing.forward, self.egress.result_rewrite)}

    def registers(self) -> dict[str, Register]:
        """Every register array by its P4 name."""
        found = [r for r in vars(self.ingress).values() if isinstance(r, Register)]
        return {r.name: r for r in found}

    def counters(self) -> dict[str, Counter]:
        """Every counter array by its P4 name."""
        found = [self.ingress.drops, *self.ingress.job_stats.values()]
        return {c.name: c for c in found}
