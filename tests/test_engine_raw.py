"""The compiled engine in raw mode against the Python pipeline: frame for frame.

As tests/test_engine.py does for datagrams: two soft switches programmed
alike, one run by the Python pipeline and one bound to the compiled engine,
get the same Ethernet frames on the same ports and must send the same frames,
byte for byte and in the same order, out of the same ports, and keep the same
registers and counters. The frames are aggregation traffic (every drop reason,
STALE, REFUSED, results multicast and rewritten per rank), hostile and
malformed frames, and other traffic forwarded by MAC. Then the engine serves
real ports (veth pairs, root): the same frames in a burst, and its fault
injector.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import TypedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchreduce import wire
from switchreduce.emulation.softswitch.engine import Frames, PythonDatapath
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.softswitch.pipeline import SoftSwitch, ipv4_checksum
from switchreduce.emulation.softswitch.raw import RawSwitch, port_socket
from switchreduce.emulation.softswitch.static import install_forwarding, install_static_job
from switchreduce.emulation.softswitch.tables import ActionCall
from switchreduce.p4runtime import names
from switchreduce.p4runtime.jobs import Job, Member
from tests.test_engine import OTHER_SESSION, POOL, SESSION, K, Pair, datagram

SWITCH_MAC, SWITCH_IP = 0x0200000000FE, "10.0.0.254"
WORKER_PORT = 40000


def host_mac(port: int) -> int:
    return 0x020000000000 + port


def host_ip(port: int) -> str:
    return f"10.0.0.{port}"


class _Destination(TypedDict):
    """Where a frame goes: :func:`frame`'s ``dst_mac`` and ``dst_ip``."""

    dst_mac: int
    dst_ip: str


def frame(
    port: int,
    payload: bytes,
    *,
    dst_mac: int = SWITCH_MAC,
    dst_ip: str = SWITCH_IP,
    sport: int = WORKER_PORT,
    dport: int = wire.DEFAULT_SWITCH_PORT,
    ethertype: int = wire.ETHERTYPE_IPV4,
    ver_ihl: int = 0x45,
    protocol: int = wire.IP_PROTO_UDP,
    udp_length: int | None = None,
    ip_checksum: int | None = None,
    identification: int = 7,
) -> bytes:
    """An Ethernet/IPv4/UDP frame from the host on ``port`` (fields as asked, even wrong)."""
    udp = struct.pack("!HHHH", sport, dport, udp_length or wire.UDP_BYTES + len(payload), 0xABCD)
    total = wire.IPV4_BYTES + len(udp) + len(payload)
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", ver_ihl, 0, total, identification, 0, 64, protocol, 0,
            socket.inet_aton(host_ip(port)), socket.inet_aton(dst_ip),
        )
    )  # fmt: skip
    struct.pack_into("!H", ip, 10, ipv4_checksum(ip) if ip_checksum is None else ip_checksum)
    return ethernet(dst_mac, host_mac(port), ethertype) + bytes(ip) + udp + payload


def ethernet(dst: int, src: int, ethertype: int) -> bytes:
    return struct.pack("!6s6sH", dst.to_bytes(6, "big"), src.to_bytes(6, "big"), ethertype)


def data(port: int, **fields) -> bytes:
    """Rank ``port - 1``'s aggregation frame (``datagram``'s fields)."""
    return frame(port, datagram(port - 1, **fields))


class FramePair(Pair):
    """Two soft switches in raw mode: rank r on port r + 1, forwarding to every host."""

    def raw_job(self, world_size: int = 3, slots: int = 4, job_id: int = 1) -> None:
        members = tuple(
            Member(r, host_ip(r + 1), WORKER_PORT, mac=host_mac(r + 1), port=r + 1)
            for r in range(world_size)
        )
        self.install(Job(job_id, world_size, 0, slots, SESSION, members))
        for switch in self.switches:
            install_forwarding(switch, {host_mac(p): p for p in range(1, 9)})

    def feed_frame(self, data: bytes, port: int) -> Frames:
        """Both switches' answer to a frame on ``port``, required equal."""
        expected = self.python.process_frame(data, port)
        got = self.compiled.process_frame(data, port)
        assert got == expected, (data[:70].hex(), port)
        return got


@pytest.fixture
def pair() -> FramePair:
    pair = FramePair()
    pair.raw_job()
    return pair


def drops(pair: Pair) -> dict[str, int]:
    counter = pair.compiled_switch.ingress.drops
    return {r.name.lower(): int(counter.packets[r]) for r in wire.DropReason if counter.packets[r]}


def header_is_valid(out: bytes) -> bool:
    """The IPv4 header's checksum adds up (its ones' complement sum is zero)."""
    return ipv4_checksum(out[wire.ETH_BYTES : wire.ETH_BYTES + wire.IPV4_BYTES]) == 0


@pytest.mark.fast
def test_a_result_leaves_by_every_ranks_port_addressed_to_it(pair: FramePair) -> None:
    assert pair.feed_frame(data(1, value=1, exponent=130), 1) == []
    assert pair.feed_frame(data(2, value=-5, exponent=140), 2) == []
    out = pair.feed_frame(data(3, value=2**31 - 1, exponent=135), 3)
    assert [port for port, _ in out] == [1, 2, 3]
    for port, result in out:
        assert result[: wire.ETH_BYTES] == ethernet(host_mac(port), SWITCH_MAC, 0x0800)
        ip_src, ip_dst = struct.unpack_from("!4s4s", result, wire.ETH_BYTES + 12)
        assert (socket.inet_ntoa(ip_src), socket.inet_ntoa(ip_dst)) == (SWITCH_IP, host_ip(port))
        sport, dport, _, checksum = struct.unpack_from("!HHHH", result, 34)
        assert (sport, dport, checksum) == (wire.DEFAULT_SWITCH_PORT, WORKER_PORT, 0)
        assert header_is_valid(result)
        payload = result[wire.L2_L4_BYTES :]
        header = wire.unpack_header(payload)
        assert header.msg_type == wire.MsgType.RESULT and header.exponent == 140
        assert (wire.decode_elements(payload, K) == np.int32(2**31 - 5)).all()  # wrapped
    pair.check_state()


@pytest.mark.fast
def test_every_drop_reason_and_reply_of_raw_mode(pair: FramePair) -> None:
    good = data(1)
    payload = datagram(0)
    hostile = [
        frame(1, payload[:27]), frame(1, payload[:-1]), good[:-1],  # short payloads
        frame(1, payload, udp_length=wire.UDP_BYTES + len(payload) - 4),  # lying UDP length
        frame(1, datagram(0, msg_type=wire.MsgType.RESULT)), frame(1, datagram(0, msg_type=99)),
        frame(1, datagram(0, count=K + 1)), frame(1, bytes(len(payload))),
        frame(1, b"", dport=wire.UDP_PORT_MAX),  # the range's last port: aggregation traffic
    ]  # fmt: skip
    for hostile_frame in hostile:
        assert pair.feed_frame(hostile_frame, 1) == []
    assert pair.feed_frame(data(1, job_id=7), 1) == []  # unknown job
    assert pair.feed_frame(data(4), 4) == []  # rank out of range
    assert pair.feed_frame(data(1, slot=4), 1) == []  # slot out of range
    assert pair.feed_frame(data(1), 2) == []  # unbound: rank 0 on port 2
    assert pair.feed_frame(frame(1, payload, sport=5555), 1) == []  # unbound: another port
    stale = pair.feed_frame(data(1, session=OTHER_SESSION, chunk=3), 1)
    assert [port for port, _ in stale] == [1] and header_is_valid(stale[0][1])
    assert wire.unpack_header(stale[0][1][wire.L2_L4_BYTES :]).msg_type == wire.MsgType.STALE
    assert pair.feed_frame(data(1, round_=3), 1) == []
    waiting = pair.feed_frame(data(1, round_=3), 1)  # a duplicate: the round waits for others
    assert [port for port, _ in waiting] == [1] and header_is_valid(waiting[0][1])
    assert wire.unpack_header(waiting[0][1][wire.L2_L4_BYTES :]).msg_type == wire.MsgType.WAITING
    assert pair.feed_frame(data(1, round_=1), 1) == []  # stale: an older round
    for slot, disagreement in enumerate(({"format_": 0x3F}, {"length": 5}, {"chunk": 8}), 1):
        assert pair.feed_frame(data(1, slot=slot), 1) == []
        refused = pair.feed_frame(data(2, slot=slot, **disagreement), 2)
        assert [port for port, _ in refused] == [1, 2, 3]
        again = pair.feed_frame(data(3, slot=slot), 3)  # the refused round, said again
        assert [port for port, _ in again] == [3]
    pair.feed_frame(data(2, round_=3), 2)
    pair.feed_frame(data(3, round_=3), 3)  # round 3 complete
    lost = pair.feed_frame(data(2, round_=3), 2)  # the result again, to rank 1 alone
    assert [port for port, _ in lost] == [2]
    pair.feed_frame(frame(1, b"other", dst_mac=0x02AAAAAAAAAA, dport=7), 1)  # no route
    assert drops(pair) == {
        "bad_header": len(hostile), "unknown_job": 1, "rank_out_of_range": 1,
        "slot_out_of_range": 1, "unbound_worker": 2, "duplicate": 1, "stale": 1,
        "bad_session": 1, "mismatch": 6, "no_route": 1,
    }  # fmt: skip
    pair.check_state()


@pytest.mark.fast
def test_other_traffic_is_forwarded_by_mac_as_it_came(pair: FramePair) -> None:
    """ARP, ICMP, TCP, UDP to other ports, IPv4 with options, IPv6, runts; a NoAction
    forward entry (port 0), a deleted one, broadcast (no entry)."""
    to_3: _Destination = {"dst_mac": host_mac(3), "dst_ip": host_ip(3)}
    arp = ethernet(host_mac(3), host_mac(1), 0x0806)
    forwarded = [
        arp + bytes(28), frame(1, b"icmp", protocol=1, **to_3),
        frame(1, b"tcp" * 500, protocol=6, **to_3), frame(1, b"x", dport=7, **to_3),
        frame(1, datagram(0), ver_ihl=0x46, **to_3), arp, arp[:13] + b"\x00" * 20,
        frame(1, datagram(0), ethertype=0x86DD, **to_3),
        frame(1, datagram(0), ip_checksum=0x1234, **to_3)[: wire.L2_L4_BYTES - 1],
    ]  # fmt: skip
    for forwarded_frame in forwarded:
        assert pair.feed_frame(forwarded_frame, 1) == [(3, forwarded_frame)]
    for switch in pair.switches:
        switch.ingress.forward.modify((host_mac(3),), ActionCall(names.NO_ACTION.name))
    assert pair.feed_frame(forwarded[1], 1) == [(0, forwarded[1])]
    for switch in pair.switches:
        switch.ingress.forward.delete((host_mac(3),))
        switch.ingress.forward.insert((0,), ActionCall(names.SET_EGRESS_PORT.name, (2,)))
    assert pair.feed_frame(forwarded[1], 1) == []
    assert pair.feed_frame(b"\x00" * 13, 1) == [(2, b"\x00" * 13)]  # too short: as if to MAC 0
    assert pair.feed_frame(b"", 1) == [(2, b"")]
    broadcast = frame(1, b"x", dst_mac=0xFFFFFFFFFFFF, dport=7)
    assert pair.feed_frame(broadcast, 1) == []
    assert drops(pair) == {"no_route": 2}
    pair.check_state()


@pytest.mark.fast
def test_answers_with_a_wrong_input_checksum_or_padding(pair: FramePair) -> None:
    """Answers carry a recomputed IPv4 checksum; bytes past the datagram stay as they came."""
    stale = pair.feed_frame(frame(1, datagram(0, session=OTHER_SESSION), ip_checksum=0xBEEF), 1)
    assert header_is_valid(stale[0][1])
    length = wire.UDP_BYTES + len(datagram(0))  # the UDP length says where the datagram ends
    pair.feed_frame(frame(1, datagram(0) + b"\x00\x01pad", udp_length=length), 1)
    pair.feed_frame(data(2), 2)
    out = pair.feed_frame(frame(3, datagram(2) + b"tail", udp_length=length), 3)
    assert [p for p, _ in out] == [1, 2, 3] and all(f.endswith(b"tail") for _, f in out)
    pair.check_state()


@pytest.mark.fast
def test_odd_groups_and_rewrites(pair: FramePair) -> None:
    """A NoAction rewrite (the copy keeps the sender's addresses), rid 0, a port the switch
    has not got, a deleted group."""
    rid = pair.python_switch.pre.groups[1][0][1]
    pair.entry(names.RESULT_REWRITE.name, (rid,), ActionCall(names.NO_ACTION.name))
    for switch in pair.switches:
        switch.pre.groups[1] = (*switch.pre.groups[1], (2, 0), (77, 0))
    for port in (1, 2):
        pair.feed_frame(data(port), port)
    out = pair.feed_frame(data(3), 3)
    assert [p for p, _ in out] == [1, 2, 3, 2, 77]
    assert out[0][1][:6] == host_mac(3).to_bytes(6, "big")  # NoAction: back to the sender's MAC
    for switch in pair.switches:
        del switch.pre.groups[1]
    for port in (1, 2, 3):
        assert pair.feed_frame(data(port, round_=2), port) == []
    pair.check_state()


@pytest.mark.fast
def test_a_static_jobs_joins_are_answered_by_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = FramePair()
    members = tuple(
        Member(r, host_ip(r + 1), WORKER_PORT, mac=host_mac(r + 1), port=r + 1) for r in range(2)
    )
    pair.static(Job(1, 2, 0, 4, 0, members))
    monkeypatch.setattr(wire, "new_session", lambda: 0x5E550001)
    assert pair.feed_frame(data(1, msg_type=wire.MsgType.JOIN, session=11), 1) == []
    joined = pair.feed_frame(data(2, msg_type=wire.MsgType.JOIN, session=11), 2)
    assert [port for port, _ in joined] == [1, 2]
    session = wire.unpack_header(joined[0][1][wire.L2_L4_BYTES :]).session
    assert pair.feed_frame(data(1, session=session), 1) == []
    assert len(pair.feed_frame(data(2, session=session), 2)) == 2
    pair.feed_frame(data(1, msg_type=wire.MsgType.JOIN, count=K + 1), 1)  # a bad JOIN, counted
    pair.check_state()


def _stream(world_size: int, slots: int, rounds: int, seed: int) -> list[tuple[bytes, int]]:
    rng = np.random.default_rng(seed)
    return [
        (data(r + 1, slot=s, round_=n, value=rng.integers(-(2**31), 2**31, K),
              exponent=int(rng.integers(0, 256)), chunk=n * slots + s), r + 1)
        for n in range(1, rounds + 1) for s in range(slots) for r in range(world_size)
    ]  # fmt: skip


@pytest.mark.fast
@pytest.mark.parametrize("seed", range(4))
def test_loss_duplication_and_reordering(seed: int) -> None:
    pair = FramePair()
    pair.raw_job(world_size=4, slots=3)
    rng = random.Random(seed)
    stream = _stream(4, 3, 10, seed)
    delivered: list[tuple[bytes, int]] = []
    for item in stream:
        if rng.random() < 0.05:
            continue
        delivered += [item] * (2 if rng.random() < 0.05 else 1)
        if rng.random() < 0.1 and len(delivered) > 1:
            late = rng.randrange(max(0, len(delivered) - 20), len(delivered))
            delivered.append(delivered.pop(late))
    for item in delivered + stream[-len(stream) // 4 :]:
        pair.feed_frame(*item)
    pair.check_state()


_FIELDS = st.fixed_dictionaries(
    {
        "slot": st.integers(0, 5),
        "round_": st.integers(0, 4) | st.sampled_from([0x8000, 0xFFFF]),
        "value": st.integers(-(2**31), 2**31 - 1),
        "job_id": st.sampled_from([1, 1, 1, 2]),
        "msg_type": st.sampled_from([1, 1, 1, 2, 3]),
        "chunk": st.sampled_from([0, 0, 0, 7]),
        "format_": st.sampled_from([0, 0, 0, 0x3F]),
        "session": st.sampled_from([SESSION, SESSION, SESSION, OTHER_SESSION]),
    }
)
_FRAME = st.tuples(
    _FIELDS,
    st.integers(1, 5),  # the port it arrives on (rank port - 1, if bound)
    st.sampled_from(["whole", "whole", "whole", "cut", "padded", "forwarded", "options"]),
)


@pytest.mark.fast
@settings(max_examples=100, deadline=None)
@given(st.lists(_FRAME, max_size=50))
def test_any_sequence_of_frames(frames: list) -> None:
    pair = FramePair()
    pair.raw_job(world_size=3, slots=4)
    for fields, port, shape in frames:
        whole = data(port, **fields)
        shaped = {
            "whole": whole,
            "cut": whole[: len(whole) // 2],
            "padded": whole + b"\x00" * 7,
            "forwarded": frame(port, datagram(**fields), dst_mac=host_mac(port % 3 + 1), dport=9),
            "options": frame(port, datagram(**fields), ver_ihl=0x46),
        }[shape]
        pair.feed_frame(shaped, port)
    pair.check_state()


# -- served on real ports ----------------------------------------------------------------------


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def veth_ports() -> Iterator[tuple[dict[int, str], dict[int, socket.socket]]]:
    """Three veth pairs: the switch's ends by port, and a socket on each host end."""
    tag = os.getpid() % 100000
    interfaces, hosts, socks = {}, [], {}
    try:
        for port in (1, 2, 3):
            inside, outside = f"sre{tag}s{port}", f"sre{tag}h{port}"
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            hosts.append(outside)
            for name in (inside, outside):  # no IPv6 chatter, no offloads: frames as sent
                _run("sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1")
                _run("ethtool", "-K", name, "tx", "off", "rx", "off", "gro", "off")
                _run("ip", "link", "set", name, "up")
            interfaces[port] = inside
            socks[port] = port_socket(outside, 16 << 20)  # room for a whole burst
            socks[port].setblocking(False)
        yield interfaces, socks
    finally:
        for sock in socks.values():
            sock.close()
        for name in hosts:
            subprocess.run(["ip", "link", "del", name], capture_output=True)


def _drain(sock: socket.socket) -> list[bytes]:
    """The frames waiting at a host."""
    got = []
    try:
        while True:
            got.append(sock.recv(65536))
    except BlockingIOError:
        return got


def _collect(socks: dict[int, socket.socket], wanted: int) -> dict[int, list[bytes]]:
    """Frames arriving at the hosts, per port, until ``wanted`` have come (or 10 s pass)."""
    got: dict[int, list[bytes]] = {port: [] for port in socks}
    deadline = time.monotonic() + 10
    while sum(map(len, got.values())) < wanted and time.monotonic() < deadline:
        for port, sock in socks.items():
            got[port] += _drain(sock)
        time.sleep(0.005)
    return got


@pytest.mark.requires_root
def test_served_on_ports_a_burst_leaves_as_the_pipeline_says(veth_ports) -> None:
    """Thousands of frames on one port, back to back (a world-size-1 job's rounds, hostile
    frames, traffic to the other hosts): batches of them through recvmmsg, the pipeline and a
    sendmmsg per port; every port gets what the Python pipeline sends, in its order."""
    interfaces, socks = veth_ports
    member = Member(0, host_ip(1), WORKER_PORT, mac=host_mac(1), port=1)
    reference, served = SoftSwitch(k=K, pool_size=POOL), SoftSwitch(k=K, pool_size=POOL)
    for switch in (reference, served):
        install_static_job(switch, Job(1, 1, 0, 8, SESSION, (member,)))
        install_forwarding(switch, {host_mac(p): p for p in (1, 2, 3)})
    rng = np.random.default_rng(0)
    burst = []
    for n in range(3000):
        if n % 10 == 7:
            burst.append(frame(1, b"to a host" * 50, dst_mac=host_mac(2 + n // 10 % 2), dport=9))
        elif n % 10 == 3:
            burst.append(frame(1, datagram(0, count=K + 1)))
        else:
            burst.append(
                data(1, slot=n % 8, round_=n // 8 + 1, value=rng.integers(-(2**31), 2**31, K))
            )
    expected: dict[int, list[bytes]] = {port: [] for port in socks}
    python = PythonDatapath(reference)
    for item in burst:
        for port, out in python.process_frame(item, 1):
            expected[port].append(out)
    with RawSwitch(served, interfaces) as server:
        for start in range(0, len(burst), 100):
            for item in burst[start : start + 100]:
                socks[1].send(item)
            time.sleep(0.002)
        got = _collect(socks, sum(map(len, expected.values())))
        report = server.report()
    assert {port: len(frames) for port, frames in got.items()} == {
        port: len(frames) for port, frames in expected.items()
    }, report
    assert got == expected
    assert report["engine"] == "compiled" and report["packets"]["received"] == len(burst)
    assert report["drops"]["bad_header"] == 300 and report["tx_overruns"] == 0
    assert np.array_equal(reference.ingress.value.cells, served.ingress.value.cells)


@pytest.mark.requires_root
def test_served_on_ports_the_fault_injector_has_the_probabilities_asked(veth_ports) -> None:
    interfaces, socks = veth_ports
    switch = SoftSwitch(k=K)
    install_forwarding(switch, {host_mac(2): 2})
    faults = FaultSpec(loss=0.2, duplicate=0.1, reorder=0.1, seed=3)
    sent = 3000
    with RawSwitch(switch, interfaces, faults) as server:
        for n in range(sent):
            socks[1].send(frame(1, n.to_bytes(4, "big"), dst_mac=host_mac(2), dport=9))
            if n % 50 == 0:
                time.sleep(0.001)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got += _drain(socks[2])
            report = server.report()
            ingress, egress = report["faults"]["ingress"], report["faults"]["egress"]
            passed = sent - ingress["dropped"] + ingress["duplicated"]
            out = passed - egress["dropped"] + egress["duplicated"]
            if report["packets"]["received"] == sent and len(got) == out:
                break
            time.sleep(0.05)
    assert report["packets"]["received"] == sent
    assert len(got) == report["packets"]["sent"] == out  # none lost inside, held ones released
    for side in (ingress, egress):
        assert abs(side["dropped"] / sent - 0.2) < 0.04, side
    kept = sent - ingress["dropped"]
    assert abs(ingress["duplicated"] / kept - 0.1) < 0.03, ingress
    assert abs(ingress["reordered"] / kept - 0.1) < 0.03, ingress
    order = [int.from_bytes(f[wire.L2_L4_BYTES : wire.L2_L4_BYTES + 4], "big") for f in got]
    assert order != sorted(order)  # some arrive late
