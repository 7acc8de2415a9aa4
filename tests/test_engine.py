"""The compiled engine against its specification, the Python pipeline: packet for packet.

Every case programs two soft switches alike through the same Python objects
(tables, multicast groups, static jobs), one run by the Python pipeline and
one bound to the compiled engine, feeds both the same datagrams and requires
the same output datagrams, in the same order to the same destinations, and
afterwards the same registers and counters (read back through the engine).
Then the engine serves real sockets: its fault injector, and allreduce
through both engines with loss, duplication and reordering.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterable
from typing import cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchreduce import wire
from switchreduce.emulation.softswitch import _engine
from switchreduce.emulation.softswitch.engine import (
    Address,
    CompiledDatapath,
    Emitted,
    EngineName,
    PythonDatapath,
)
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.softswitch.pipeline import SoftSwitch
from switchreduce.emulation.softswitch.serve import SwitchOptions
from switchreduce.emulation.softswitch.static import StaticJob, apply_entry
from switchreduce.emulation.softswitch.tables import ActionCall
from switchreduce.emulation.softswitch.udp import UdpSwitch
from switchreduce.p4runtime import names
from switchreduce.p4runtime.jobs import Job, Member, job_entries
from switchreduce.worker.reference import check, synthetic_tensor
from tests.conftest import running_job

K = 64
POOL = 64  # a small pool keeps comparing every register cheap
SWITCH: Address = ("127.0.0.1", wire.DEFAULT_SWITCH_PORT)
SESSION = 0x5E55_1011_0000_0001
OTHER_SESSION = 0x0BAD_0000_0000_0002


def worker(rank: int) -> Address:
    return ("127.0.0.1", 50000 + rank)


def datagram(
    rank: int = 0,
    slot: int = 0,
    round_: int = 1,
    value: int | Iterable[int] = 1,
    *,
    job_id: int = 1,
    msg_type: int = wire.MsgType.DATA,
    exponent: int = 130,
    chunk: int = 0,
    count: int = K,
    format_: int = 0,
    length: int = 1000,
    session: int = SESSION,
) -> bytes:
    header = wire.Header(
        msg_type, job_id, rank, slot, round_ & 1, exponent, round_, chunk, count, format_,
        length, session,
    )  # fmt: skip
    values = np.full(K, value, dtype=np.int64) if isinstance(value, int) else np.array(value)
    return wire.encode(header, values.astype(np.int32))


class Pair:
    """A Python and a compiled soft switch, programmed alike, fed alike, compared."""

    def __init__(self) -> None:
        self.python_switch = SoftSwitch(k=K, pool_size=POOL)
        self.compiled_switch = SoftSwitch(k=K, pool_size=POOL)
        self.python = PythonDatapath(self.python_switch, SWITCH)
        self.compiled = CompiledDatapath(self.compiled_switch, SWITCH)
        self.sent: list[Emitted] = []

    @property
    def switches(self) -> tuple[SoftSwitch, SoftSwitch]:
        return self.python_switch, self.compiled_switch

    def job(
        self,
        world_size: int = 3,
        slots: int = 4,
        job_id: int = 1,
        slot_base: int = 0,
        quorum: int | None = None,
    ) -> None:
        """A job as a controller installs one (with no check that its slots fit the pool)."""
        members = tuple(Member(r, *worker(r)) for r in range(world_size))
        self.install(Job(job_id, world_size, slot_base, slots, SESSION, members, quorum))

    def install(self, job: Job) -> None:
        entries, (group, replicas) = job_entries(job)
        for switch in self.switches:
            for entry in entries:
                apply_entry(switch, entry)
            switch.pre.groups[group] = tuple(replicas)

    def entry(self, table: str, key: tuple[int, ...], call: ActionCall) -> None:
        for switch in self.switches:
            found = switch.tables()[table]
            if key in found.entries:
                found.modify(key, call)
            else:
                found.insert(key, call)

    def static(self, job: Job) -> None:
        python, compiled = StaticJob(self.python_switch, job), StaticJob(self.compiled_switch, job)
        self.python.static_jobs = [python]
        self.compiled.static_jobs = [compiled]

    def feed(self, data: bytes, source: Address = ("127.0.0.1", 50000)) -> Emitted:
        """Both switches' answer to ``data``, required equal."""
        expected = self.python.process(data, source)
        got = self.compiled.process(data, source)
        assert got == expected, (data[:28].hex(), source)
        self.sent.append(got)
        return got

    def check_state(self) -> None:
        python, compiled = self.switches
        for name, register in python.registers().items():
            mine = compiled.registers()[name].cells
            assert np.array_equal(
                np.asarray(register.cells, dtype=np.uint64 if register.columns == 1 else np.int32),
                mine,
            ), name
        for name, counter in python.counters().items():
            theirs = compiled.counters()[name]
            assert list(counter.packets) == [int(n) for n in theirs.packets], name
            assert list(counter.bytes) == [int(n) for n in theirs.bytes], name


@pytest.fixture
def pair() -> Pair:
    return Pair()


def drops(pair: Pair) -> dict[str, int]:
    """The compiled switch's drop counters by reason (equal to the Python one's, once checked)."""
    counter = pair.compiled_switch.ingress.drops
    return {r.name.lower(): int(counter.packets[r]) for r in wire.DropReason if counter.packets[r]}


@pytest.mark.fast
def test_the_engine_assumes_the_wire_format_and_names_of_the_model() -> None:
    assert _engine.HEADER_BYTES == wire.HEADER_BYTES
    assert _engine.ROW_REFUSED == wire.ROW_REFUSED
    assert len(wire.DropReason) == _engine.NUM_DROP_REASONS
    assert _engine.MAX_WORKERS == wire.MAX_WORKERS
    assert ("drops", *(stat.alias for stat in names.JobStat)) == _engine.COUNTERS


@pytest.mark.fast
def test_a_round_multicasts_its_sums_to_every_rank(pair: Pair) -> None:
    pair.job(world_size=3)
    assert pair.feed(datagram(0, value=1, exponent=130), worker(0)) == []
    assert pair.feed(datagram(1, value=-5, exponent=140), worker(1)) == []
    out = pair.feed(datagram(2, value=2**31 - 1, exponent=135), worker(2))
    assert [to for to, _ in out] == [worker(r) for r in range(3)]
    header = wire.unpack_header(out[0][1])
    assert header.msg_type == wire.MsgType.RESULT and header.exponent == 140
    assert (wire.decode_elements(out[0][1], K) == np.int32(2**31 - 5)).all()  # wrapped
    pair.check_state()


@pytest.mark.fast
def test_a_quorum_completes_a_round_and_a_late_rank_gets_its_sums_if_it_resends(
    pair: Pair,
) -> None:
    pair.job(world_size=3, quorum=2)
    assert pair.feed(datagram(0, value=1, exponent=130), worker(0)) == []
    out = pair.feed(datagram(1, value=10, exponent=140), worker(1))
    assert [to for to, _ in out] == [worker(r) for r in range(3)]  # every rank, the late one too
    header = wire.unpack_header(out[0][1])
    assert (header.msg_type, header.exponent, header.length) == (wire.MsgType.RESULT, 140, 0b011)
    assert (wire.decode_elements(out[0][1], K) == 11).all()
    # late: never added, and unanswered (the multicast went to it); sent again, it is answered
    assert pair.feed(datagram(2, value=100, exponent=150), worker(2)) == []
    resend = datagram(2, value=100, exponent=150, msg_type=wire.MsgType.RESEND)
    late = pair.feed(resend, worker(2))
    assert [to for to, _ in late] == [worker(2)]
    assert late[0][1][2:] == out[2][1][2:]  # the round's result (but the sender's rank)
    assert drops(pair)["late"] == 2
    again = pair.feed(datagram(0, value=1, exponent=130), worker(0))  # rank 0 lost the result
    assert [(to, d[2:]) for to, d in again] == [(worker(0), out[0][1][2:])]
    pair.check_state()


@pytest.mark.fast
def test_every_drop_reason_and_reply_of_udp_mode(pair: Pair) -> None:
    """No route needs frames (raw mode); every other reason, and STALE, REFUSED and WAITING
    answers."""
    pair.job(world_size=2, slots=4)
    good = datagram(0)
    hostile = [
        b"", b"\x01", good[:27], good[:28], good[:-1], good + b"\x00",
        datagram(msg_type=wire.MsgType.RESULT), datagram(msg_type=99), datagram(count=K + 1),
        bytes(len(good)),
    ]  # fmt: skip
    for data in hostile:
        assert pair.feed(data) == []
    assert pair.feed(datagram(job_id=7)) == []  # unknown job
    assert pair.feed(datagram(rank=2)) == []  # rank out of range
    assert pair.feed(datagram(slot=4)) == []  # slot out of range
    assert pair.feed(datagram(0), ("127.0.0.2", 50000)) == []  # unbound: another address
    assert pair.feed(datagram(0), worker(1)) == []  # unbound: another rank's port
    stale = pair.feed(datagram(session=OTHER_SESSION))
    assert [(to, wire.unpack_header(d).msg_type) for to, d in stale] == [
        (worker(0), wire.MsgType.STALE)
    ]
    assert stale[0][1][1:] == datagram(session=OTHER_SESSION)[1:]  # an echo
    assert pair.feed(datagram(0, round_=3)) == []
    resent = datagram(0, round_=3, value=7)
    waiting = pair.feed(resent)  # a duplicate: it is in, the round waits for rank 1
    assert [(to, wire.unpack_header(d).msg_type) for to, d in waiting] == [
        (worker(0), wire.MsgType.WAITING)
    ]
    assert wire.unpack_header(waiting[0][1]).length == 0b01  # the ranks the row holds
    assert waiting[0][1][wire.HEADER_BYTES :] == resent[wire.HEADER_BYTES :]  # else an echo
    assert pair.feed(datagram(0, round_=1)) == []  # stale: an older round
    refused = pair.feed(datagram(1, round_=3, format_=1 << 5 | 31), worker(1))  # mismatch
    assert [to for to, _ in refused] == [worker(0), worker(1)]
    assert {wire.unpack_header(d).msg_type for _, d in refused} == {wire.MsgType.REFUSED}
    again = pair.feed(datagram(0, round_=3))  # the refused round, said again to its sender
    assert [(to, wire.unpack_header(d).msg_type) for to, d in again] == [
        (worker(0), wire.MsgType.REFUSED)
    ]
    assert pair.feed(datagram(0, slot=1, chunk=5)) == []
    refused = pair.feed(datagram(1, slot=1, chunk=9), worker(1))  # same round, another chunk
    assert [(to, wire.unpack_header(d).msg_type) for to, d in refused] == [
        (worker(0), wire.MsgType.REFUSED), (worker(1), wire.MsgType.REFUSED)
    ]  # fmt: skip
    assert drops(pair) == {
        "bad_header": len(hostile), "unknown_job": 1, "rank_out_of_range": 1,
        "slot_out_of_range": 1, "unbound_worker": 2, "duplicate": 1, "stale": 1,
        "bad_session": 1, "mismatch": 3,
    }  # fmt: skip
    assert pair.compiled_switch.ingress.row_chunk.cells[2 * 1 + 1] == 5  # the first one's
    pair.check_state()


@pytest.mark.fast
def test_a_lost_result_is_answered_to_its_sender_alone(pair: Pair) -> None:
    pair.job(world_size=2)
    pair.feed(datagram(0, value=3), worker(0))
    pair.feed(datagram(1, value=4), worker(1))
    again = pair.feed(datagram(1, value=4), worker(1))
    assert [to for to, _ in again] == [worker(1)]
    assert (wire.decode_elements(again[0][1], K) == 7).all()
    stats = pair.compiled_switch.ingress.job_stats[names.JobStat.RETRANSMIT_REPLIES]
    assert stats.packets[1] == 1
    pair.check_state()


@pytest.mark.fast
@pytest.mark.parametrize("world_size", [1, 2, 5, 32])
def test_multicast_to_n_ranks_and_the_32nd_bit(pair: Pair, world_size: int) -> None:
    pair.job(world_size=world_size, slots=2)
    rng = np.random.default_rng(world_size)
    for round_ in (1, 2, 3):
        for slot in (0, 1):
            for rank in rng.permutation(world_size):
                out = pair.feed(
                    datagram(int(rank), slot, round_, rng.integers(-(2**31), 2**31, K)),
                    worker(int(rank)),
                )
            assert len(out) == world_size
    pair.check_state()


@pytest.mark.fast
def test_odd_entries_behave_as_p4_defines_them(pair: Pair) -> None:
    """NoAction in jobs and result_rewrite, a rank past 31, a quorum of 0 (bit<8> arithmetic: 256
    arrivals), a job whose slots run past the pool."""
    pair.job(world_size=2, slots=4)
    pair.entry(names.JOBS.name, (2,), ActionCall(names.NO_ACTION.name))
    pair.feed(datagram(0, job_id=2))  # world size 0: rank out of range
    pair.entry(names.JOBS.name, (3,), ActionCall(names.SET_JOB.name, (40, 0, 8, 4, 3, SESSION)))
    for rank in (33, 0, 33):  # rank 33 has no bit: its resend is summed again, as in P4
        pair.entry(names.WORKERS.name, (3, rank, 0, *_ip_port(worker(rank))),
                   ActionCall(names.ADMIT_WORKER.name))  # fmt: skip
        pair.feed(datagram(rank, job_id=3), worker(rank))
    pair.entry(
        names.JOBS.name, (4,), ActionCall(names.SET_JOB.name, (1, 1, POOL - 1, 4, 1, SESSION))
    )
    pair.entry(names.WORKERS.name, (4, 0, 0, *_ip_port(worker(0))), ActionCall("NoAction"))
    assert len(pair.feed(datagram(0, slot=0, job_id=4))) == 2  # the pool's last slot
    pair.feed(datagram(0, slot=1, job_id=4))  # past the pool: out of range
    rid = next(iter(pair.python_switch.pre.groups[1]))[1]
    pair.entry(names.RESULT_REWRITE.name, (rid,), ActionCall(names.NO_ACTION.name))
    pair.feed(datagram(0))
    out = pair.feed(datagram(1), worker(1))
    assert worker(1) in [to for to, _ in out]  # the NoAction copy goes back to the sender
    pair.check_state()


def _ip_port(address: Address) -> tuple[int, int]:
    return int.from_bytes(socket.inet_aton(address[0]), "big"), address[1]


@pytest.mark.fast
def test_control_plane_writes_reach_the_engine(pair: Pair) -> None:
    """Deletes, a new session (a restart), groups changed, a pipeline swapped in."""
    pair.job(world_size=2)
    pair.feed(datagram(0))
    for switch in pair.switches:
        switch.ingress.workers.delete((1, 1, 0, *_ip_port(worker(1))))
    pair.feed(datagram(1), worker(1))  # unbound now
    members = tuple(Member(r, *worker(r)) for r in range(2))
    entries, _ = job_entries(Job(1, 2, 0, 4, OTHER_SESSION, members))
    for switch in pair.switches:
        apply_entry(switch, entries[0])  # the controller's new session for the job
    pair.feed(datagram(0))  # stale session
    pair.feed(datagram(0, session=OTHER_SESSION))  # a new run: the slot starts clean
    for switch in pair.switches:
        switch.pre.groups[1] = ((0, 0), (0, 0), (3, 0))  # three copies to the sender
        switch.ingress.workers.insert((1, 1, 0, *_ip_port(worker(1))), ActionCall("NoAction"))
    assert len(pair.feed(datagram(1, session=OTHER_SESSION), worker(1))) == 3
    for switch in pair.switches:
        del switch.pre.groups[1]
        switch.ingress.drops.set(0, 7, 700)
        switch.ingress.jobs.load({}, ActionCall(names.NO_ACTION.name))
    assert pair.feed(datagram(0, session=OTHER_SESSION)) == []  # unknown job
    pair.check_state()
    for switch in pair.switches:
        switch.ingress.drops.load([0] * len(wire.DropReason), [0] * len(wire.DropReason))
        switch.ingress.round.cells[0] = 9
    pair.check_state()


@pytest.mark.fast
def test_restarts_of_a_static_job_are_new_sessions(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOINs are punted to the CPU; each run's session (drawn alike here) starts clean slots."""
    members = tuple(Member(r, *worker(r)) for r in range(2))
    pair.static(Job(1, 2, 0, 4, 0, members))
    for run, nonce in enumerate((11, 22, 33)):
        monkeypatch.setattr(wire, "new_session", lambda run=run: 0x5E550000 + run)
        assert pair.feed(datagram(0, msg_type=wire.MsgType.JOIN, session=nonce)) == []
        joined = pair.feed(datagram(1, msg_type=wire.MsgType.JOIN, session=nonce), worker(1))
        session = wire.unpack_header(joined[0][1]).session
        assert session == 0x5E550000 + run and len(joined) == 2
        pair.feed(datagram(0, round_=1, session=session), worker(0))
        pair.feed(datagram(1, round_=1, session=session), worker(1))
        pair.feed(datagram(0, round_=2, session=session - 1), worker(0))  # the last run's
    pair.feed(datagram(0, msg_type=wire.MsgType.JOIN, count=K + 1))  # a bad JOIN, counted
    pair.check_state()


def _stream(world_size: int, slots: int, rounds: int, seed: int) -> list[tuple[bytes, Address]]:
    """Every rank's packets of ``rounds`` uses of ``slots`` slots, in order."""
    rng = np.random.default_rng(seed)
    return [
        (datagram(r, s, n, rng.integers(-(2**31), 2**31, K), exponent=int(rng.integers(0, 256)),
                  chunk=n * slots + s), worker(r))
        for n in range(1, rounds + 1) for s in range(slots) for r in range(world_size)
    ]  # fmt: skip


def _disturbed(packets: list, loss: float, duplicate: float, reorder: float, seed: int) -> list:
    """The stream as a network may deliver it: some lost, some twice, some late; then every
    packet of the last rounds once more (the ranks' retransmissions)."""
    rng = random.Random(seed)
    out: list = []
    for packet in packets:
        if rng.random() < loss:
            continue
        out.append(packet)
        if rng.random() < duplicate:
            out.append(packet)
        if rng.random() < reorder and len(out) > 1:
            late = rng.randrange(max(0, len(out) - 20), len(out))
            out.append(out.pop(late))
    return out + packets[-len(packets) // 4 :]


@pytest.mark.fast
@pytest.mark.parametrize(
    ("loss", "duplicate", "reorder"),
    [(0, 0, 0), (0.1, 0, 0), (0, 0.2, 0), (0, 0, 0.3), (0.05, 0.05, 0.1)],
)
def test_loss_duplication_and_reordering(
    pair: Pair, loss: float, duplicate: float, reorder: float
) -> None:
    pair.job(world_size=4, slots=3)
    for data, source in _disturbed(_stream(4, 3, 12, 1), loss, duplicate, reorder, seed=2):
        pair.feed(data, source)
    pair.check_state()


_FIELDS = st.fixed_dictionaries(
    {
        "rank": st.integers(0, 4),
        "slot": st.integers(0, 5),
        "round_": st.integers(0, 6) | st.sampled_from([0x7FFF, 0x8000, 0xFFFF]),
        "value": st.integers(-(2**31), 2**31 - 1),
        "job_id": st.sampled_from([1, 1, 1, 2, 300]),
        "msg_type": st.sampled_from([1, 1, 1, 1, 2, 3, 5, 8, 8, 9, 9]),
        "exponent": st.integers(0, 255),
        "count": st.sampled_from([0, 1, K, K + 1]),
        "format_": st.sampled_from([0, 0, 0, 0x3F]),
        "chunk": st.sampled_from([0, 0, 0, 7]),
        "length": st.sampled_from([1000, 1000, 1000, 5]),
        "session": st.sampled_from([SESSION, SESSION, SESSION, OTHER_SESSION, 0]),
    }
)
_PACKET = st.tuples(
    _FIELDS,
    st.sampled_from([worker(0), worker(1), worker(2), worker(3), ("10.0.0.1", 50000)]),
    st.sampled_from(["whole", "whole", "whole", "whole", "short", "long", "header", "header"]),
)


@pytest.mark.fast
@settings(max_examples=150, deadline=None)
@given(st.lists(_PACKET, max_size=60), st.integers(1, 4), st.integers(0, 3))
def test_any_sequence_of_packets(packets: list, world_size: int, fewer: int) -> None:
    pair = Pair()
    pair.job(world_size=world_size, slots=4, quorum=max(1, world_size - fewer))
    pair.job(world_size=2, slots=2, job_id=2, slot_base=POOL - 1)  # runs past the pool
    for fields, source, size in packets:
        data = datagram(**fields)
        data = {
            "whole": data,
            "short": data[:-3],
            "long": data + b"\x00",
            "header": data[: wire.HEADER_BYTES],  # a RELEASE's size
        }[size]
        pair.feed(data, source)
    pair.check_state()


def test_the_engines_fault_injector_has_the_probabilities_asked() -> None:
    """Served on a socket: each direction loses, duplicates and holds back packets as often
    as asked, and every packet not lost reaches the pipeline (held ones when the link idles)."""
    switch = SoftSwitch(k=K)
    faults = FaultSpec(loss=0.2, duplicate=0.1, reorder=0.1, seed=3)
    sent = 4000
    with UdpSwitch(switch, ("127.0.0.1", 0), faults) as server, _socket() as sock:
        for _ in range(sent):
            # __enter__ returns the switch itself, typed as any SwitchRuntime
            sock.sendto(b"hostile", cast(UdpSwitch, server).address)
            time.sleep(0.00002)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            report = server.report()
            ingress = report["faults"]["ingress"]
            passed = sent - ingress["dropped"] + ingress["duplicated"]
            if report["packets"]["received"] == sent and report["drops"]["bad_header"] == passed:
                break
            time.sleep(0.05)
    assert report["packets"]["received"] == sent
    assert report["drops"]["bad_header"] == passed  # none lost inside, held ones released
    assert abs(ingress["dropped"] / sent - 0.2) < 0.03, ingress
    kept = sent - ingress["dropped"]
    assert abs(ingress["duplicated"] / kept - 0.1) < 0.03, ingress
    assert abs(ingress["reordered"] / kept - 0.1) < 0.03, ingress


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.mark.parametrize("engine", ["compiled", "python"])
def test_allreduce_through_either_engine_with_faults(engine: EngineName) -> None:
    world_size, length = 3, 50 * K + 7
    faults = FaultSpec(loss=0.03, duplicate=0.03, reorder=0.05, seed=4)
    inputs = [synthetic_tensor(5, r, length, "float32") for r in range(world_size)]
    with running_job(world_size, k=K, slots=8, faults=faults, engine=engine) as job:
        results = job.allreduce(inputs)
        report = job.server.report()
    assert report["engine"] == engine
    assert report["faults"]["ingress"]["dropped"] > 0 and report["drops"]["duplicate"] > 0
    for result in results:
        verdict = check(result, inputs, K)
        assert verdict.exact and verdict.within_bound, verdict


@pytest.mark.fast
def test_either_mode_defaults_to_the_compiled_engine() -> None:
    job = Job(1, 1, 0, 4, 0, (Member(0, *worker(0)),))
    assert SwitchOptions(job=job).engine_name == "compiled"
    assert SwitchOptions(job=job, engine="python").engine_name == "python"
    assert SwitchOptions(job=job, raw={1: "eth1"}).engine_name == "compiled"
    assert SwitchOptions(job=job, raw={1: "eth1"}, engine="python").engine_name == "python"
    with pytest.raises(ValueError, match="engine must be one of"):
        SwitchOptions(job=job, engine="fast")  # type: ignore[arg-type]
