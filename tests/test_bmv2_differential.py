"""BMv2 running p4src/ against the soft switch: the same frames in, bit-identical frames out.

BMv2 (``simple_switch``) runs in a network namespace of the test's own with
one veth port per worker; the test sends each frame on its sender's port and
collects what comes out of every port. The soft switch gets the same frames,
through its Python pipeline and through its compiled engine. All three are
configured from one source: the soft switch's tables, turned into
simple_switch_CLI commands for BMv2; all three must end with the same
registers and counters.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from typing import cast

import numpy as np
import pytest

from switchreduce import wire
from switchreduce.emulation.bmv2 import compile_program
from switchreduce.emulation.softswitch.engine import CompiledDatapath, PythonDatapath
from switchreduce.emulation.softswitch.pipeline import DropReason, SoftSwitch
from switchreduce.emulation.softswitch.static import (
    install_forwarding,
    install_static_job,
)
from switchreduce.p4runtime.jobs import Job, Member
from switchreduce.p4runtime.names import ROW_CHUNK, JobStat


def _cli_runs() -> bool:
    """simple_switch_CLI is a Python script: it needs a python3 on PATH with Thrift."""
    if shutil.which("simple_switch") is None or shutil.which("simple_switch_CLI") is None:
        return False
    probe = subprocess.run(["simple_switch_CLI", "--help"], capture_output=True, timeout=30)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.requires_root,
    pytest.mark.requires_p4c,
    pytest.mark.skipif(
        not _cli_runs(),
        reason="simple_switch and a simple_switch_CLI that runs (its python3 needs thrift) "
        "not on PATH",
    ),
]

K = 64
SWITCH_MAC, SWITCH_IP = 0x0200000000FE, "10.0.0.254"
PORTS = (1, 2, 3)
THRIFT_PORT = 9090
SESSION = 0xC0FFEE_0000_5E55


def host_mac(port: int) -> int:
    return 0x020000000000 + port


def host_ip(port: int) -> str:
    return f"10.0.0.{port}"


def _configured_switch() -> SoftSwitch:
    """Job 1: ranks 0..2 on ports 1..3, 8 slots; job 2: the same ranks, 4 slots, a quorum of 2;
    and forwarding to each host."""
    switch = SoftSwitch(k=K)
    workers = tuple(
        Member(port - 1, host_ip(port), 40000, mac=host_mac(port), port=port) for port in PORTS
    )
    install_static_job(switch, Job(1, len(PORTS), 0, 8, SESSION, workers))
    install_static_job(switch, Job(2, len(PORTS), 8, 4, SESSION + 2, workers, quorum=2))
    install_forwarding(switch, {host_mac(port): port for port in PORTS})
    return switch


def _cli_commands(switch: SoftSwitch) -> list[str]:
    """simple_switch_CLI commands that give BMv2 the soft switch's tables and groups."""
    commands = []
    for table in switch.tables().values():
        for key, call in table.entries.items():
            keys = " ".join(hex(v) for v in key)
            args = " ".join(hex(v) for v in call.args)
            commands.append(f"table_add {table.name} {call.name} {keys} => {args}".rstrip())
    handle = 0
    for group, replicas in switch.pre.groups.items():
        commands.append(f"mc_mgrp_create {group}")
        for port, rid in replicas:
            commands.append(f"mc_node_create {rid} {port}")
            commands.append(f"mc_node_associate {group} {handle}")
            handle += 1
    return commands


def _frame(
    port: int,
    header: wire.Header | None = None,
    payload: bytes | None = None,
    dst_mac: int = SWITCH_MAC,
    dst_ip: str = SWITCH_IP,
    udp_sport: int = 40000,
    udp_dport: int = wire.DEFAULT_SWITCH_PORT,
    values: int = 1,
) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    if payload is None:
        assert header is not None
        payload = wire.encode(header, np.arange(K, dtype=np.int32) * values)
    mac = ":".join(f"{b:02x}" for b in dst_mac.to_bytes(6, "big"))
    src = ":".join(f"{b:02x}" for b in host_mac(port).to_bytes(6, "big"))
    return bytes(
        Ether(src=src, dst=mac)
        / IP(src=host_ip(port), dst=dst_ip)
        / UDP(sport=udp_sport, dport=udp_dport)
        / payload
    )


def _traffic() -> list[tuple[int, bytes]]:
    """(ingress port, frame): a round, a retransmission, a duplicate, a stale packet, another
    session's packet, rounds refused for a disagreement (format, length, chunk), a quorum's
    rounds with a late rank and a round held back for it, one packet for every drop reason,
    plus forwarded traffic."""

    def data(rank: int, round_: int = 1, slot: int = 0, **changes) -> wire.Header:
        header = wire.Header(
            wire.MsgType.DATA,
            job_id=1,
            rank=rank,
            slot=slot,
            version=round_ & 1,
            exponent=120 + rank,
            round=round_,
            chunk=slot,
            count=K,
            format=wire.encode_format("float32", 32),
            length=10 * K,
            session=SESSION,
        )
        return header._replace(**changes)

    out = []
    for rank in range(3):  # round 1 in slot 0: the third completes it
        out.append((rank + 1, _frame(rank + 1, data(rank), values=rank + 1)))
    out.append((2, _frame(2, data(1), values=2)))  # retransmission into a complete round
    out.append((1, _frame(1, data(0, round_=2))))  # round 2 begins
    out.append((1, _frame(1, data(0, round_=2))))  # duplicate into an incomplete round
    out.append((2, _frame(2, data(1, round_=2))))
    out.append((3, _frame(3, data(2, round_=2), values=7)))  # round 2 completes
    out.append((1, _frame(1, data(0, round_=3))))  # round 3 takes round 1's copy
    out.append((2, _frame(2, data(1, round_=1))))  # ... so round 1 is now stale
    out.append((1, _frame(1, data(0, slot=1, session=SESSION ^ 1))))  # another session: STALE
    out.append((1, _frame(1, data(0, slot=2))))  # slot 2: rank 1 disagrees on the dtype ...
    out.append((2, _frame(2, data(1, slot=2, format=wire.encode_format("int32", 32)))))
    out.append((3, _frame(3, data(2, slot=2))))  # ... so the round is refused to every rank
    out.append((1, _frame(1, data(0, slot=2))))  # ... even to a retransmission
    out.append((1, _frame(1, data(0, slot=3))))  # slot 3: rank 2 disagrees on the length
    out.append((3, _frame(3, data(2, slot=3, length=10 * K + 1))))
    out.append((1, _frame(1, data(0, slot=6))))  # slot 6: rank 1 sends another chunk into the
    out.append((2, _frame(2, data(1, slot=6, chunk=6 + 8))))  # round (its counters are off)
    quorum = {"job_id": 2, "session": SESSION + 2}
    for rank in (0, 1):  # job 2, a quorum of 2: two ranks complete round 1 of slot 0
        out.append((rank + 1, _frame(rank + 1, data(rank, **quorum), values=rank + 3)))
    out.append((3, _frame(3, data(2, **quorum), values=9)))  # late: dropped (the multicast)
    resend = {"msg_type": wire.MsgType.RESEND, **quorum}
    out.append((3, _frame(3, data(2, **resend), values=9)))  # late again: the sums, to it
    for round_ in (1, 2):  # slot 1: rounds 1 and 2 without rank 2
        for rank in (0, 1):
            out.append((rank + 1, _frame(rank + 1, data(rank, round_, slot=1, **quorum))))
    out.append((1, _frame(1, data(0, 3, slot=1, **quorum))))  # held: rank 2 never sent round 1
    out.append((3, _frame(3, data(2, 2, slot=1, **quorum))))  # rank 2 sends round 2: late
    out.append((1, _frame(1, data(0, 3, slot=1, **quorum))))  # now round 3 may take the row
    release = data(1, 2, slot=1, msg_type=wire.MsgType.RELEASE, **quorum).pack()
    out.append((2, _frame(2, payload=release)))  # rank 1 has round 2's sums (a header alone)
    out.append((2, _frame(2, payload=release + bytes(4 * K))))  # a RELEASE with elements: bad
    stale = data(1, 2, slot=1, msg_type=wire.MsgType.RELEASE, job_id=2, session=SESSION)
    out.append((2, _frame(2, payload=stale.pack())))  # another session's: dropped, unanswered
    for rank in range(3):  # slot 7: priming uses, headers alone; the third completes the round
        out.append((rank + 1, _frame(rank + 1, payload=data(rank, slot=7, count=0).pack())))
    primed_again = data(0, slot=7, count=0, msg_type=wire.MsgType.RESEND).pack()
    out.append((1, _frame(1, payload=primed_again)))  # its result again: a header alone
    out.append((1, _frame(1, payload=data(0, 2, slot=7, count=1).pack())))  # no elements: bad
    out.append((1, _frame(1, data(0, job_id=9))))  # unknown job
    out.append((1, _frame(1, data(5))))  # rank out of range
    out.append((1, _frame(1, data(0, slot=8))))  # slot out of range
    out.append((1, _frame(1, data(0, slot=5), udp_sport=5555)))  # unbound source port
    out.append((1, _frame(1, data(0), payload=data(0).pack()[:10])))  # truncated header
    out.append((1, _frame(1, payload=wire.encode(data(0, count=K + 1), np.zeros(K)))))
    out.append((1, _frame(1, payload=wire.encode(data(0, slot=4), np.zeros(K)) + b"xx")))
    other = b"not aggregation traffic"
    out.append((1, _frame(1, payload=other, dst_mac=host_mac(3), dst_ip=host_ip(3), udp_dport=7)))
    out.append((1, _frame(1, payload=other, dst_mac=0x02AAAAAAAAAA, udp_dport=7)))  # no route
    return out


def _soft_outputs(
    frames: list[tuple[int, bytes]], engine: type[PythonDatapath | CompiledDatapath]
) -> tuple[list, SoftSwitch]:
    """What the soft switch on ``engine`` sends for each frame (sorted, as BMv2's ports are
    read), and the switch with its registers and counters."""
    switch = _configured_switch()
    datapath = engine(switch)
    return [sorted(datapath.process_frame(frame, port)) for port, frame in frames], switch


def _run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)


@pytest.fixture
def bmv2(tmp_path):
    """simple_switch in a namespace of its own; yields (sockets by port, cli function)."""
    program = compile_program(tmp_path, K)
    ns = f"srdiff{os.getpid()}"
    _run("ip", "netns", "add", ns)
    _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")  # the Thrift server's
    for scope in ("all", "default"):  # no IPv6 chatter on the switch's ports
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
    links, proc, socks = [], None, {}
    try:
        for port in PORTS:
            outside, inside = f"srd{os.getpid() % 10000}p{port}", f"sw{port}"
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", ns)
            links.append(outside)
            _run("sysctl", "-qw", f"net.ipv6.conf.{outside}.disable_ipv6=1")  # before it is up
            for where in ([], ["ip", "netns", "exec", ns]):
                name = outside if not where else inside
                _run(*where, "ip", "link", "set", name, "up")
                subprocess.run(
                    [*where, "ethtool", "-K", name, "tx", "off", "rx", "off"], capture_output=True
                )
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
            sock.bind((outside, 0))
            sock.setblocking(False)
            socks[port] = sock
        log = tmp_path / "bmv2.log"
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "simple_switch",
                "--device-id",
                "0",
                "--thrift-port",
                str(THRIFT_PORT),
                "--log-file",
                str(log),
                *(arg for p in PORTS for arg in ("-i", f"{p}@sw{p}")),
                str(program.bmv2_json),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

        def cli(commands: list[str]) -> str:
            return _run(
                "ip",
                "netns",
                "exec",
                ns,
                "simple_switch_CLI",
                "--thrift-port",
                str(THRIFT_PORT),
                input="\n".join(commands) + "\n",
            ).stdout

        deadline = time.monotonic() + 20
        while (
            subprocess.run(
                ["ip", "netns", "exec", ns, "simple_switch_CLI", "--thrift-port", str(THRIFT_PORT)],
                input="",
                capture_output=True,
            ).returncode
            != 0
        ):
            assert proc.poll() is None, f"simple_switch exited:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "simple_switch did not start"
            time.sleep(0.2)
        yield socks, cli
    finally:
        for sock in socks.values():
            sock.close()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        for link in links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _drain(socks: dict[int, socket.socket]) -> list[tuple[int, bytes]]:
    got = []
    for port, sock in socks.items():
        while True:
            try:
                frame, address = sock.recvfrom(65536)
            except BlockingIOError:
                break
            if address[2] != 4:  # not our own transmissions
                got.append((port, frame))
    return got


def _bmv2_registers(cli, names: list[str]) -> dict[str, list[int]]:
    """Every cell of each register array, as BMv2 holds it."""
    out = cli([f"register_read {name}" for name in names])
    found = dict(re.findall(r"^RuntimeCmd: ([\w.]+)= ?([-\d, ]*)$", out, re.M))
    return {name: [int(v) for v in found[name].split(",")] for name in names}


def test_bmv2_and_the_soft_switch_agree_bit_for_bit(bmv2) -> None:
    socks, cli = bmv2
    frames = _traffic()
    expected, soft = _soft_outputs(frames, PythonDatapath)
    compiled_outputs, compiled = _soft_outputs(frames, CompiledDatapath)
    assert compiled_outputs == expected
    for name, register in compiled.registers().items():
        python_cells = np.asarray(soft.registers()[name].cells).reshape(-1)
        bound = cast(np.ndarray, register.cells)  # the compiled engine's memory, not a list
        assert np.array_equal(bound.reshape(-1), python_cells.astype(bound.dtype)), name
    for name, counter in compiled.counters().items():
        python_counter = soft.counters()[name]
        assert list(counter.packets) == list(python_counter.packets), name
        assert list(counter.bytes) == list(python_counter.bytes), name
    cli(_cli_commands(_configured_switch()))
    _drain(socks)
    observed = []
    for port, frame in frames:
        socks[port].send(frame)
        time.sleep(0.15)
        observed.append(sorted(_drain(socks)))
    for i, (want, got) in enumerate(zip(expected, observed, strict=True)):
        assert got == want, f"frame {i}: BMv2 {got!r} != soft switch {want!r}"
    counted = [(soft.ingress.drops, int(reason)) for reason in DropReason]
    counted += [(counter, 1) for counter in soft.ingress.job_stats.values()]
    for counter, index in counted:
        out = cli([f"counter_read {counter.name} {index}"])
        read = re.search(r"\((\d+) bytes, (\d+) packets\)", out)
        assert read is not None
        nbytes, packets = map(int, read.groups())
        assert (packets, nbytes) == (counter.packets[index], counter.bytes[index]), counter.name
    assert soft.ingress.job_stats[JobStat.RESULTS].packets[1] == 3  # slots 0 (twice) and 7
    assert soft.ingress.drops.packets[DropReason.MISMATCH] == 5  # 3 in slot 2, slots 3 and 6
    registers = soft.registers()
    held = _bmv2_registers(cli, list(registers))
    for name, cells in held.items():
        mine = np.asarray(registers[name].cells).reshape(-1)
        assert cells == [int(v) & (1 << registers[name].spec.bitwidth) - 1 for v in mine], name
    assert held[ROW_CHUNK.name][2 * 6 + 1] == 6  # slot 6's round holds its first packet's chunk
