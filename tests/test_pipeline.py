"""The soft switch's pipeline, packet by packet: SwitchML's slot rules and the drop reasons."""

from __future__ import annotations

import ipaddress
from typing import Protocol, cast

import numpy as np
import pytest

from switchreduce import wire
from switchreduce.emulation.softswitch.pipeline import DropReason, SoftSwitch, ipv4_checksum
from switchreduce.emulation.softswitch.static import install_static_job
from switchreduce.emulation.softswitch.tables import ActionCall
from switchreduce.p4runtime.jobs import Job, Member, replica_id
from switchreduce.p4runtime.names import JobStat

pytestmark = pytest.mark.fast

K = 64
SWITCH = ("127.0.0.1", wire.DEFAULT_SWITCH_PORT)
SESSION = 0x5E55_1011_0000_0001


def worker_address(rank: int) -> tuple[str, int]:
    return ("127.0.0.1", 50000 + rank)


def make_switch(world_size: int = 3, slots: int = 4, job_id: int = 1) -> SoftSwitch:
    switch = SoftSwitch(k=K)
    endpoints = tuple(Member(r, *worker_address(r)) for r in range(world_size))
    install_static_job(switch, Job(job_id, world_size, 0, slots, SESSION, endpoints))
    return switch


class Emitted(Protocol):
    """A packet the pipeline emits: unlike a parsed one, its header and elements are always
    set (the deparser relies on it)."""

    ip_dst: int
    udp_sport: int
    udp_dport: int
    header: wire.Header
    elements: np.ndarray
    egress_port: int
    egress_rid: int


def send(
    switch: SoftSwitch,
    rank: int,
    slot: int = 0,
    round_: int = 1,
    value: int = 1,
    exponent: int = 0,
    job_id: int = 1,
    chunk: int = 0,
    source=None,
    session: int = SESSION,
    format_: int = 0,
    length: int = K,
) -> list[Emitted]:
    header = wire.Header(
        wire.MsgType.DATA,
        job_id,
        rank,
        slot,
        round_ & 1,
        exponent,
        round_,
        chunk,
        K,
        format_,
        length,
        session,
    )
    payload = wire.encode(header, np.full(K, value, dtype=np.int32))
    pkt = switch.parser.parse_datagram(payload, source or worker_address(rank), SWITCH)
    return cast(list[Emitted], switch.process(pkt))


def drops(switch: SoftSwitch, reason: DropReason) -> int:
    return switch.ingress.drops.packets[reason]


def test_last_arrival_multicasts_the_sum_to_every_rank() -> None:
    switch = make_switch(world_size=3)
    assert send(switch, 0, value=1, exponent=130) == []
    assert send(switch, 1, value=10, exponent=140) == []
    out = send(switch, 2, value=100, exponent=135)
    assert sorted((int(ipaddress.IPv4Address(p.ip_dst)), p.udp_dport) for p in out) == sorted(
        (int(ipaddress.IPv4Address("127.0.0.1")), 50000 + r) for r in range(3)
    )
    for pkt in out:
        assert pkt.header.msg_type == wire.MsgType.RESULT
        assert pkt.header.exponent == 140  # max over workers
        assert pkt.udp_sport == wire.DEFAULT_SWITCH_PORT
        assert (pkt.elements == 111).all()
    assert {p.egress_rid for p in out} == {replica_id(1, r) for r in range(3)}


def test_retransmission_into_a_complete_slot_gets_the_result_alone() -> None:
    switch = make_switch(world_size=2)
    send(switch, 0, value=3)
    send(switch, 1, value=4)
    again = send(switch, 1, value=4)
    assert len(again) == 1
    assert again[0].udp_dport == 50001 and (again[0].elements == 7).all()
    assert switch.ingress.job_stats[JobStat.RETRANSMIT_REPLIES].packets[1] == 1


def test_retransmission_into_an_incomplete_slot_is_answered_waiting_and_not_added() -> None:
    switch = make_switch(world_size=3)
    send(switch, 0, value=5)
    send(switch, 1, value=5)
    waiting = send(switch, 0, value=5)
    assert len(waiting) == 1 and waiting[0].udp_dport == 50000  # to the sender alone
    assert waiting[0].header is not None and waiting[0].elements is not None
    assert waiting[0].header.msg_type == wire.MsgType.WAITING
    assert waiting[0].header.length == 0b011  # ranks 0 and 1 are in: the round waits for rank 2
    assert (waiting[0].elements == 5).all()  # the sender's own, echoed
    assert drops(switch, DropReason.DUPLICATE) == 1
    out = send(switch, 2, value=5)
    assert (out[0].elements == 15).all()  # the duplicate was not added twice


def test_rounds_alternate_versions_and_a_new_round_starts_fresh() -> None:
    switch = make_switch(world_size=2)
    send(switch, 0, round_=1, value=1)
    send(switch, 1, round_=1, value=1)
    send(switch, 0, round_=2, value=2)
    assert (send(switch, 1, round_=2, value=2)[0].elements == 4).all()
    send(switch, 0, round_=3, value=10)  # round 3 reuses round 1's copy: the first one writes
    assert (send(switch, 1, round_=3, value=20)[0].elements == 30).all()


def test_a_stale_packet_of_an_older_round_cannot_join_a_new_one() -> None:
    """The case SwitchML's 1-bit version gets wrong: a round-1 duplicate delayed until round 3."""
    switch = make_switch(world_size=2)
    for round_ in (1, 2):
        send(switch, 0, round_=round_, value=round_)
        send(switch, 1, round_=round_, value=round_)
    # While its copy still holds round 1, the duplicate is a retransmission: the result again.
    assert [p.udp_dport for p in send(switch, 1, round_=1, value=1)] == [50001]
    send(switch, 0, round_=3, value=100)  # round 3 takes over the copy
    assert send(switch, 1, round_=1, value=1) == []  # now the duplicate is stale
    assert drops(switch, DropReason.STALE) == 1
    assert (send(switch, 1, round_=3, value=200)[0].elements == 300).all()


def test_rounds_wrap_around_sixteen_bits() -> None:
    switch = make_switch(world_size=1)
    for round_ in (0xFFFE, 0xFFFF, 0, 1):
        assert (send(switch, 0, round_=round_, value=round_ + 1)[0].elements == round_ + 1).all()


def test_int32_adders_wrap_like_bit32() -> None:
    switch = make_switch(world_size=2)
    send(switch, 0, value=2**31 - 1)
    assert (send(switch, 1, value=1)[0].elements == -(2**31)).all()


def test_a_new_job_on_used_slots_starts_clean_without_register_writes() -> None:
    switch = make_switch(world_size=2, job_id=1)
    send(switch, 0, value=1)  # job 1 leaves rank 0's bit set and one arrival counted
    ingress = switch.ingress
    ingress.jobs.delete((1,))
    endpoints = tuple(Member(r, *worker_address(r)) for r in range(2))
    install_static_job(switch, Job(2, 2, 0, 4, SESSION + 1, endpoints))
    send(switch, 0, value=5, job_id=2, session=SESSION + 1)
    assert (send(switch, 1, value=6, job_id=2, session=SESSION + 1)[0].elements == 11).all()


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"job_id": 9}, DropReason.UNKNOWN_JOB),
        ({"rank": 3}, DropReason.RANK_OUT_OF_RANGE),
        ({"slot": 4}, DropReason.SLOT_OUT_OF_RANGE),
        ({"source": ("127.0.0.1", 6666)}, DropReason.UNBOUND_WORKER),
    ],
)
def test_packets_outside_the_job_are_dropped_and_counted(kwargs: dict, reason: DropReason) -> None:
    switch = make_switch(world_size=3, slots=4)
    args = {"rank": 0, **kwargs}
    assert send(switch, **args) == []
    assert drops(switch, reason) == 1
    assert sum(switch.ingress.drops.packets) == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01" * (wire.HEADER_BYTES - 1),  # truncated header
        wire.Header(wire.MsgType.DATA, 1, 0, 0, 0, 0, 0, 0, K).pack() + b"\x00" * 10,  # short
        wire.encode(wire.Header(wire.MsgType.RESULT, 1, 0, 0, 0, 0, 0, 0, K), np.zeros(K)),
        wire.encode(wire.Header(wire.MsgType.DATA, 1, 0, 0, 0, 0, 0, 0, K + 1), np.zeros(K)),
        bytes(range(256)) * 2,  # garbage
    ],
)
def test_malformed_packets_are_bad_headers(payload: bytes) -> None:
    switch = make_switch()
    pkt = switch.parser.parse_datagram(payload, worker_address(0), SWITCH)
    assert switch.process(pkt) == []
    assert drops(switch, DropReason.BAD_HEADER) == 1


def test_raw_frames_parse_and_results_deparse_with_valid_checksums() -> None:
    """Raw mode: a worker's Ethernet frame in, result frames out with a correct IPv4 checksum."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    switch = SoftSwitch(k=K)
    install_static_job(
        switch,
        Job(1, 1, 0, 4, SESSION, (Member(0, "10.0.0.1", 40000, mac=0x020000000001, port=1),)),
    )
    header = wire.Header(wire.MsgType.DATA, 1, 0, 0, 0, 0, 1, 0, K, session=SESSION)
    frame = bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:fe")
        / IP(src="10.0.0.1", dst="10.0.0.254")
        / UDP(sport=40000, dport=wire.DEFAULT_SWITCH_PORT)
        / wire.encode(header, np.arange(K, dtype=np.int32))
    )
    out = switch.process(switch.parser.parse_frame(frame, ingress_port=1))
    assert len(out) == 1 and out[0].egress_port == 1
    result = Ether(switch.deparser.frame(out[0]))
    assert result[IP].dst == "10.0.0.1" and result[IP].src == "10.0.0.254"
    assert result[UDP].dport == 40000 and result.dst == "02:00:00:00:00:01"
    ip_header = bytearray(bytes(result[IP])[:20])
    ip_header[10:12] = b"\x00\x00"
    assert result[IP].chksum == ipv4_checksum(ip_header)
    assert np.array_equal(wire.decode_elements(bytes(result[UDP].payload), K), np.arange(K))


def test_a_packet_of_another_session_is_answered_stale_and_counted() -> None:
    switch = make_switch(world_size=2)
    out = send(switch, 0, value=7, session=SESSION ^ 1)
    assert [p.header.msg_type for p in out] == [wire.MsgType.STALE]
    assert out[0].header.session == SESSION ^ 1  # an echo: only its sender's session is in it
    assert (out[0].udp_dport, out[0].egress_port) == (worker_address(0)[1], 0)
    assert drops(switch, DropReason.BAD_SESSION) == 1
    # the stale packet left nothing behind: the real round sums only the session's packets
    send(switch, 0, value=1)
    assert (send(switch, 1, value=2)[0].elements == 3).all()


@pytest.mark.parametrize(
    "disagreement",
    [{"format_": wire.encode_format("float32", 32)}, {"length": K + 1}, {"chunk": 4}],
)
def test_ranks_that_disagree_on_what_they_sum_get_the_round_refused(disagreement: dict) -> None:
    switch = make_switch(world_size=3)
    assert send(switch, 0, value=1) == []
    refused = send(switch, 1, value=1, **disagreement)
    assert sorted(p.udp_dport for p in refused) == [50000, 50001, 50002]  # every rank hears it
    assert {p.header.msg_type for p in refused} == {wire.MsgType.REFUSED}
    assert refused[0].header.rank == 1  # names the rank that disagreed
    # whatever arrives for the round later is refused too, and no sum ever leaves
    for rank in (2, 0, 1):
        out = send(switch, rank, value=1)
        assert [p.header.msg_type for p in out] == [wire.MsgType.REFUSED]
    assert drops(switch, DropReason.MISMATCH) == 4
    assert switch.ingress.job_stats[JobStat.RESULTS].packets[1] == 0


def test_a_new_session_on_a_completed_slot_starts_clean() -> None:
    """A rerun whose rounds restart at 1 must not be answered with the previous run's sums."""
    switch = make_switch(world_size=2)
    send(switch, 0, value=1)
    assert (send(switch, 1, value=2)[0].elements == 3).all()
    ingress = switch.ingress
    session = SESSION + 7
    ingress.jobs.modify((1,), ActionCall("SwitchReduceIngress.set_job", (2, 2, 0, 4, 1, session)))
    assert send(switch, 0, value=10, session=session) == []  # new data, not a retransmission
    assert (send(switch, 1, value=20, session=session)[0].elements == 30).all()


def test_ranks_whose_round_counters_disagree_would_be_summed_without_the_chunk_check() -> None:
    """Rank 1 sends chunk 5 where rank 0 sends chunk 1 (same slot, round, format and length):
    nothing but the chunk tells the two apart. With the chunk check the round is refused;
    the very same packets, rank 1's header naming chunk 1, pass every other check and return
    a sum of two different chunks that every rank would take."""

    def round_of(rank1_chunk: int) -> tuple[SoftSwitch, list[Emitted]]:
        switch = make_switch(world_size=2)
        assert send(switch, 0, slot=1, chunk=1, value=10) == []
        return switch, send(switch, 1, slot=1, chunk=rank1_chunk, value=500)

    switch, refused = round_of(rank1_chunk=5)
    assert {p.header.msg_type for p in refused} == {wire.MsgType.REFUSED}
    assert len(refused) == 2 and drops(switch, DropReason.MISMATCH) == 1
    assert switch.ingress.row_chunk.cells[3] == 1  # slot 1, version 1: the round's chunk
    _, summed = round_of(rank1_chunk=1)
    assert {p.header.msg_type for p in summed} == {wire.MsgType.RESULT}
    assert len(summed) == 2 and all((p.elements == 510).all() for p in summed)
