"""The soft switch's P4Runtime server gives simple_switch_grpc's answers, call by call.

simple_switch_grpc is BMv2 behind p4lang/PI, so the answers expected here
are PI's (proto/frontend/src/device_mgr.cpp, proto/server/pi_server.cpp).
Each scenario sees the switch over P4Runtime only: the soft switch must give
the expected answers, and where simple_switch_grpc and p4c are on PATH,
``test_bmv2_gives_the_same_answers`` plays every scenario against both
servers and compares every answer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from google.rpc import code_pb2, status_pb2
from p4.config.v1 import p4info_pb2
from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

from switchreduce.emulation.bmv2 import compile_program
from switchreduce.emulation.softswitch.p4runtime_server import (
    CLONE_SESSIONS,
    RESERVED_GROUPS,
    serve,
)
from switchreduce.emulation.softswitch.pipeline import SoftSwitch
from switchreduce.p4runtime import names
from switchreduce.p4runtime.entities import encode_value
from switchreduce.p4runtime.schema import load_p4info
from switchreduce.ports import free_tcp_port
from tests.helpers.bmv2 import simple_switch_grpc

K = 256
JOBS, SET_JOB, NO_ACTION = names.JOBS.name, names.SET_JOB.name, names.NO_ACTION.name
DROPS = names.DROPS
Set = p4runtime_pb2.SetForwardingPipelineConfigRequest
Get = p4runtime_pb2.GetForwardingPipelineConfigRequest
Update = p4runtime_pb2.Update
Write = p4runtime_pb2.WriteRequest


def _unchecked(value: int) -> bytes:
    """``value`` in P4Runtime's bytes however wide it is: a scenario may send one too wide for
    its field, which the server must refuse."""
    return encode_value(value, value.bit_length())


@dataclass
class Target:
    """A P4Runtime server under test, and the config its program is pushed with."""

    address: str
    p4info: p4info_pb2.P4Info
    device_config: bytes
    switch: SoftSwitch | None = None  # the soft switch's, to look at its data plane


@contextmanager
def soft_switch() -> Iterator[Target]:
    switch = SoftSwitch(k=K)
    address = f"127.0.0.1:{free_tcp_port()}"
    server = serve(switch, address)
    try:
        # the soft switch loads no device config, but keeps it for GetForwardingPipelineConfig
        yield Target(address, load_p4info(), b'{"soft": "switch"}', switch)
    finally:
        server.stop(grace=None)


@contextmanager
def bmv2_switch(program, log: Path) -> Iterator[Target]:
    """A fresh simple_switch_grpc with no program, on loopback; stopped by its PID."""
    with simple_switch_grpc(log) as address:
        yield Target(address, load_p4info(program.p4info), program.bmv2_json.read_bytes())


def _sorted_replicas(entity: p4runtime_pb2.Entity) -> p4runtime_pb2.Entity:
    """A copy with the replicas in one order: P4Runtime lets a server read them back in any."""
    entity = p4runtime_pb2.Entity.FromString(entity.SerializeToString())
    pre = entity.packet_replication_engine_entry
    kind = pre.WhichOneof("type")
    if kind is not None:
        entry = getattr(pre, kind)
        replicas = sorted(entry.replicas, key=lambda r: (r.instance, r.egress_port, r.port))
        del entry.replicas[:]
        entry.replicas.extend(replicas)
    return entity


def texts(*entities: p4runtime_pb2.Entity) -> list[str]:
    """Entities as comparable text, in one order (a read may answer in any)."""
    return sorted(
        text_format.MessageToString(_sorted_replicas(e), as_one_line=True) for e in entities
    )


class Stream:
    """An open StreamChannel; a thread collects what the server sends on it."""

    def __init__(self, stub: p4runtime_pb2_grpc.P4RuntimeStub, election: int, device_id: int):
        self._requests: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self._call = stub.StreamChannel(iter(self._requests.get, None))
        threading.Thread(target=self._collect, daemon=True).start()
        self.send(election, device_id)

    def _collect(self) -> None:
        try:
            for reply in self._call:
                self._replies.put(reply)
        except grpc.RpcError as exc:
            self._replies.put(exc)

    def send(self, election: int, device_id: int = 0) -> None:
        request = p4runtime_pb2.StreamMessageRequest()
        request.arbitration.device_id = device_id
        request.arbitration.election_id.low = election
        self._requests.put(request)

    def next(self, timeout: float = 5.0) -> str:
        """'CODE election' of the next arbitration update, 'ended CODE' if the server ended
        the stream, 'nothing' if nothing came within ``timeout``."""
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            return "nothing"
        if isinstance(reply, grpc.RpcError):
            return f"ended {reply.code().name}"
        update = reply.arbitration
        return f"{code_pb2.Code.Name(update.status.code)} {update.election_id.low}"

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


@dataclass
class Client:
    """Raw P4Runtime calls to one target, their answers reduced to status codes and entity
    text. ``expect`` checks an answer, or with ``strict`` off only records it."""

    target: Target
    strict: bool = True
    answers: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target.address)
        self.stub = p4runtime_pb2_grpc.P4RuntimeStub(self.channel)
        info = self.target.p4info
        self.ids = {o.preamble.name: o.preamble.id for o in (*info.tables, *info.actions)}
        self.ids.update({c.preamble.name: c.preamble.id for c in info.counters})
        self.sizes = {c.preamble.name: c.size for c in info.counters}
        self.params = {a.preamble.name: {p.name: p.id for p in a.params} for a in info.actions}
        self.streams: list[Stream] = []

    def close(self) -> None:
        for stream in self.streams:
            stream.close()
        self.channel.close()

    def expect(self, answer, expected) -> None:
        self.answers.append(answer)
        if self.strict:
            assert answer == expected

    # -- calls -------------------------------------------------------------------

    def stream(self, election: int, device_id: int = 0) -> Stream:
        stream = Stream(self.stub, election, device_id)
        self.streams.append(stream)
        return stream

    def push(
        self, action: int = Set.VERIFY_AND_COMMIT, election: int | None = 1, config: bool = True,
        device_id: int = 0,
    ) -> str:  # fmt: skip
        request = Set(device_id=device_id, action=action)
        if election is not None:
            request.election_id.low = election
        if config:
            request.config.p4info.CopyFrom(self.target.p4info)
            request.config.p4_device_config = self.target.device_config
        return self._unary(self.stub.SetForwardingPipelineConfig, request)[0]

    def get_pipeline(self, response_type: int = Get.ALL, device_id: int = 0) -> str:
        """The status code and which parts of the config came back."""
        code, response = self._unary(
            self.stub.GetForwardingPipelineConfig,
            Get(device_id=device_id, response_type=response_type),
        )
        if response is None:
            return code
        config = response.config
        has_p4info = config.p4info == self.target.p4info
        has_device_config = config.p4_device_config == self.target.device_config
        return f"{code} p4info={has_p4info} device_config={has_device_config}"

    def write(
        self, *updates: p4runtime_pb2.Update, election: int | None = 1,
        atomicity: int = Write.CONTINUE_ON_ERROR, device_id: int = 0,
    ) -> str:  # fmt: skip
        """'OK', the status code, or 'UNKNOWN [each update's code]' for a refused batch."""
        request = Write(device_id=device_id, updates=updates, atomicity=atomicity)
        if election is not None:
            request.election_id.low = election
        try:
            self.stub.Write(request, timeout=5)
        except grpc.RpcError as exc:
            codes = []
            for key, value in exc.trailing_metadata() or ():
                if key == "grpc-status-details-bin":
                    for detail in status_pb2.Status.FromString(value).details:
                        error = p4runtime_pb2.Error()
                        detail.Unpack(error)
                        codes.append(code_pb2.Code.Name(error.canonical_code))
            return f"{exc.code().name} [{', '.join(codes)}]" if codes else exc.code().name
        return "OK"

    def read(self, *entities: p4runtime_pb2.Entity, device_id: int = 0) -> tuple[str, list[str]]:
        """The status code and every entity that came back, a failed read's included."""
        found = []
        request = p4runtime_pb2.ReadRequest(device_id=device_id, entities=entities)
        try:
            for response in self.stub.Read(request, timeout=5):
                found.extend(response.entities)
        except grpc.RpcError as exc:
            return exc.code().name, texts(*found)
        return "OK", texts(*found)

    def _unary(self, method, request) -> tuple[str, Any]:
        try:
            return "OK", method(request, timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name, None

    # -- entities ----------------------------------------------------------------

    def _action(self, out: p4runtime_pb2.Action, name: str, args: dict[str, int]) -> None:
        out.action_id = self.ids[name]
        for param, value in args.items():
            out.params.add(param_id=self.params[name][param], value=_unchecked(value))

    def job(
        self, job_id: int, world_size: int | None = 2, *, priority: int = 0,
        controller_metadata: int = 0, metadata: bytes = b"", table: str = JOBS,
    ) -> p4runtime_pb2.Entity:  # fmt: skip
        """A jobs entry; ``world_size=None`` leaves the action out (a key, to read or delete)."""
        entity = p4runtime_pb2.Entity()
        entry = entity.table_entry
        entry.table_id = self.ids.get(table, 0x02FFFFFF)
        entry.match.add(field_id=1).exact.value = _unchecked(job_id)
        entry.priority = priority
        entry.controller_metadata, entry.metadata = controller_metadata, metadata
        if world_size is not None:
            args = {"world_size": world_size, "quorum": world_size, "slot_base": 0, "slot_count": 8,
                    "mcast_grp": job_id, "session": 1}  # fmt: skip
            self._action(entry.action.action, SET_JOB, args)
        return entity

    def jobs(self) -> p4runtime_pb2.Entity:
        """Every entry of the jobs table (a read)."""
        return p4runtime_pb2.Entity(table_entry=p4runtime_pb2.TableEntry(table_id=self.ids[JOBS]))

    def default(
        self, action: str | None = None, controller_metadata: int = 0, metadata: bytes = b"",
        **args: int,
    ) -> p4runtime_pb2.Entity:  # fmt: skip
        """The jobs table's default entry, with ``action`` or (to read or reset it) none."""
        entity = self.jobs()
        entry = entity.table_entry
        entry.is_default_action = True
        entry.controller_metadata, entry.metadata = controller_metadata, metadata
        if action is not None:
            self._action(entry.action.action, action, args)
        return entity

    def counter(
        self, index: int | None, packets: int | None = None, nbytes: int = 0
    ) -> p4runtime_pb2.Entity:
        """A cell of the drops counter (``index=None``: all), with data if ``packets`` is set."""
        entity = p4runtime_pb2.Entity()
        entry = entity.counter_entry
        entry.counter_id = self.ids[DROPS]
        if index is not None:
            entry.index.index = index
        if packets is not None:
            entry.data.packet_count, entry.data.byte_count = packets, nbytes
        return entity

    @staticmethod
    def group(gid: int, *replicas: tuple[int, int]) -> p4runtime_pb2.Entity:
        entity = p4runtime_pb2.Entity()
        group = entity.packet_replication_engine_entry.multicast_group_entry
        group.multicast_group_id = gid
        for port, instance in replicas:
            group.replicas.add(egress_port=port, instance=instance)
        return entity

    @staticmethod
    def clone(
        sid: int, *replicas: tuple[int, int], packet_length: int = 0, cos: int = 0
    ) -> p4runtime_pb2.Entity:
        entity = p4runtime_pb2.Entity()
        clone = entity.packet_replication_engine_entry.clone_session_entry
        clone.session_id, clone.packet_length_bytes, clone.class_of_service = (
            sid, packet_length, cos,
        )  # fmt: skip
        for port, instance in replicas:
            clone.replicas.add(egress_port=port, instance=instance)
        return entity


def update(kind: int, entity: p4runtime_pb2.Entity) -> p4runtime_pb2.Update:
    return p4runtime_pb2.Update(type=kind, entity=entity)


def primary(c: Client, election: int = 1) -> Stream:
    """Become primary with ``election`` and push the program (which starts it empty)."""
    stream = c.stream(election)
    c.expect(stream.next(), f"OK {election}")
    c.expect(c.push(election=election), "OK")
    return stream


# -- scenarios: each a session with a fresh switch ------------------------------------


def reads_by_key(c: Client) -> None:
    """A read with a key answers that entry, or nothing (PI: table_read_one, fetch_wkey)."""
    primary(c)
    c.expect(c.write(update(Update.INSERT, c.job(7)), update(Update.INSERT, c.job(8))), "OK")
    c.expect(c.read(c.job(7, None)), ("OK", texts(c.job(7))))
    c.expect(c.read(c.job(9, None)), ("OK", []))
    c.expect(c.read(c.jobs()), ("OK", texts(c.job(7), c.job(8))))


def default_entry(c: Client) -> None:
    """MODIFY of the default entry without an action resets it to the program's default;
    INSERT and DELETE of it are refused (PI: table_modify, table_insert, table_delete)."""
    primary(c)
    set_job = c.default(
        SET_JOB, world_size=3, quorum=3, slot_base=0, slot_count=8, mcast_grp=1, session=1
    )
    c.expect(c.write(update(Update.MODIFY, set_job)), "OK")
    c.expect(c.read(c.default()), ("OK", texts(set_job)))
    c.expect(c.write(update(Update.MODIFY, c.default())), "OK")
    c.expect(c.read(c.default()), ("OK", texts(c.default(NO_ACTION))))
    c.expect(
        c.write(update(Update.INSERT, c.default(NO_ACTION)), update(Update.DELETE, c.default())),
        "UNKNOWN [INVALID_ARGUMENT, INVALID_ARGUMENT]",
    )


def counter_writes(c: Client) -> None:
    """A counter cell is set by MODIFY and zeroed by DELETE; INSERT is INVALID_ARGUMENT and
    a write without an index UNIMPLEMENTED (PI: counter_write)."""
    primary(c)
    c.expect(c.write(update(Update.MODIFY, c.counter(3, 5, 500))), "OK")
    c.expect(c.read(c.counter(3)), ("OK", texts(c.counter(3, 5, 500))))
    c.expect(c.write(update(Update.DELETE, c.counter(3))), "OK")
    c.expect(c.read(c.counter(3)), ("OK", texts(c.counter(3, 0))))
    c.expect(
        c.write(update(Update.INSERT, c.counter(3, 1)), update(Update.MODIFY, c.counter(None, 1))),
        "UNKNOWN [INVALID_ARGUMENT, UNIMPLEMENTED]",
    )


def counter_indices(c: Client) -> None:
    """A negative index is INVALID_ARGUMENT; one past the array is the target's error,
    UNKNOWN, after an answer holding the requested entry (PI: counter_read_one)."""
    primary(c)
    size = c.sizes[DROPS]
    c.expect(c.read(c.counter(-1)), ("INVALID_ARGUMENT", []))
    c.expect(c.read(c.counter(size)), ("UNKNOWN", texts(c.counter(size))))
    c.expect(
        c.write(update(Update.MODIFY, c.counter(-1, 1)), update(Update.MODIFY, c.counter(size, 1))),
        "UNKNOWN [INVALID_ARGUMENT, UNKNOWN]",
    )


def clone_sessions(c: Client) -> None:
    """Clone sessions are written and read back as PI's PreCloneMgr keeps them; BMv2 does
    not truncate clones, so a packet length is the target's error, UNKNOWN."""
    primary(c)
    session = c.clone(5, (2, 1), (1, 1))
    c.expect(c.write(update(Update.INSERT, session)), "OK")
    c.expect(c.read(c.clone(5)), ("OK", texts(session)))
    c.expect(c.write(update(Update.INSERT, session)), "UNKNOWN [ALREADY_EXISTS]")
    c.expect(c.write(update(Update.MODIFY, c.clone(5, (3, 2)))), "OK")
    c.expect(c.read(c.clone(0)), ("OK", texts(c.clone(5, (3, 2)))))
    c.expect(c.write(update(Update.DELETE, c.clone(5))), "OK")
    c.expect(c.read(c.clone(5)), ("NOT_FOUND", []))
    refused = [c.clone(0, (1, 1)), c.clone(CLONE_SESSIONS, (1, 1)), c.clone(6, (1, 1), (1, 1)),
               c.clone(6, (1, 1), cos=1), c.clone(6, (1, 1), packet_length=128)]  # fmt: skip
    c.expect(
        c.write(*(update(Update.INSERT, e) for e in refused), update(Update.MODIFY, c.clone(7))),
        "UNKNOWN [INVALID_ARGUMENT, INVALID_ARGUMENT, INVALID_ARGUMENT, UNIMPLEMENTED, UNKNOWN, "
        "NOT_FOUND]",
    )


def duplicate_election_id(c: Client) -> None:
    """A second stream with a live stream's election id is ended with INVALID_ARGUMENT
    (PI: DeviceState::add_connection); the primary stays."""
    first = c.stream(10)
    c.expect(first.next(), "OK 10")
    c.expect(c.stream(10).next(), "ended INVALID_ARGUMENT")
    c.expect(first.next(timeout=0.5), "nothing")
    c.expect(c.push(election=10), "OK")


def primary_changes(c: Client) -> None:
    """Every stream hears when the primary changes; a new or updated backup hears alone
    (PI: add_connection, update_connection, cleanup_connection, notify_all)."""
    a = c.stream(5)
    c.expect(a.next(), "OK 5")
    b = c.stream(3)
    c.expect(b.next(), "ALREADY_EXISTS 5")
    c.expect(a.next(timeout=0.5), "nothing")
    top = c.stream(10)
    c.expect([top.next(), a.next(), b.next()], ["OK 10", "ALREADY_EXISTS 10", "ALREADY_EXISTS 10"])
    top.close()  # the next highest is primary at once
    c.expect([a.next(), b.next()], ["OK 5", "ALREADY_EXISTS 5"])
    a.send(1)  # the primary steps down below b
    c.expect([a.next(), b.next()], ["ALREADY_EXISTS 3", "OK 3"])
    b.send(4)  # still primary: only b hears
    c.expect([b.next(), a.next(timeout=0.5)], ["OK 4", "nothing"])
    c.expect(c.push(election=4), "OK")
    c.expect(c.push(election=1), "PERMISSION_DENIED")


def too_many_streams(c: Client) -> None:
    """PI serves 16 streams a device; the next is ended with RESOURCE_EXHAUSTED."""
    streams = []
    for election in range(16, 0, -1):  # one at a time: each first hears of itself
        streams.append(c.stream(election))
        c.expect(streams[-1].next(), "OK 16" if election == 16 else "ALREADY_EXISTS 16")
    c.expect(c.stream(17).next(), "ended RESOURCE_EXHAUSTED")
    streams[0].close()
    c.expect(streams[1].next(), "OK 15")  # the primary's place is free
    c.expect(c.stream(17).next(), "OK 17")


def who_may_write(c: Client) -> None:
    """With no stream open a call without an election id goes through and one with an id is
    refused; once a stream is open only the primary's id is taken (PI: pi_server's Write)."""
    c.expect(c.read(c.jobs()), ("FAILED_PRECONDITION", []))
    c.expect(c.get_pipeline(), "FAILED_PRECONDITION")
    c.expect(c.write(update(Update.INSERT, c.job(7)), election=None), "FAILED_PRECONDITION")
    c.expect(c.push(election=1), "PERMISSION_DENIED")
    c.expect(c.push(election=None), "OK")
    c.expect(c.write(update(Update.INSERT, c.job(7)), election=None), "OK")
    c.expect(c.write(update(Update.INSERT, c.job(8)), election=1), "PERMISSION_DENIED")
    c.expect(c.stream(2).next(), "OK 2")
    for election in (None, 1):
        c.expect(c.write(update(Update.INSERT, c.job(8)), election=election), "PERMISSION_DENIED")
    c.expect(c.write(update(Update.INSERT, c.job(8)), election=2), "OK")
    c.expect(c.read(c.jobs()), ("OK", texts(c.job(7), c.job(8))))


def new_pipeline_starts_empty(c: Client) -> None:
    """VERIFY_AND_COMMIT loads the program anew: no entries, groups or clone sessions, the
    default action back, counters at zero (PI: p4_change; BMv2: load_new_config)."""
    primary(c)
    filled = [c.job(7, controller_metadata=1), c.group(5, (1, 1)), c.clone(5, (1, 1))]
    c.expect(c.write(*(update(Update.INSERT, e) for e in filled)), "OK")
    set_job = c.default(
        SET_JOB, world_size=3, quorum=3, slot_base=0, slot_count=8, mcast_grp=1, session=1
    )
    c.expect(c.write(update(Update.MODIFY, set_job), update(Update.MODIFY, c.counter(3, 5))), "OK")
    c.expect(c.push(), "OK")
    c.expect(
        c.read(c.jobs(), c.default(), c.counter(3), c.group(0), c.clone(0)),
        ("OK", texts(c.default(NO_ACTION), c.counter(3, 0))),
    )


def saved_pipeline(c: Client) -> None:
    """VERIFY_AND_SAVE loads a pipeline that Reads and Writes use at once; COMMIT swaps
    it in (BMv2: load_new_config, then swap_configs). An unset action is INVALID_ARGUMENT."""
    primary(c)
    c.expect(c.write(update(Update.INSERT, c.job(7))), "OK")
    c.expect(c.push(Set.VERIFY_AND_SAVE), "OK")
    c.expect(c.read(c.jobs()), ("OK", []))
    c.expect(c.get_pipeline(Get.P4INFO_AND_COOKIE), "OK p4info=True device_config=False")
    c.expect(c.write(update(Update.INSERT, c.job(8))), "OK")
    c.expect(c.push(Set.COMMIT, config=False), "OK")
    c.expect(c.read(c.jobs()), ("OK", texts(c.job(8))))
    c.expect(c.push(Set.UNSPECIFIED), "INVALID_ARGUMENT")


def atomic_writes(c: Client) -> None:
    """ROLLBACK_ON_ERROR and DATAPLANE_ATOMIC batches are UNIMPLEMENTED, nothing written
    (PI: write_)."""
    primary(c)
    for atomicity in (Write.ROLLBACK_ON_ERROR, Write.DATAPLANE_ATOMIC):
        batch = (update(Update.INSERT, c.job(7)), update(Update.DELETE, c.job(9, None)))
        c.expect(c.write(*batch, atomicity=atomicity), "UNIMPLEMENTED")
    c.expect(c.read(c.jobs()), ("OK", []))


def priority_on_exact_match(c: Client) -> None:
    """A priority on an exact-match entry is INVALID_ARGUMENT, in a write or a read by key
    (PI: construct_match_key)."""
    primary(c)
    c.expect(c.write(update(Update.INSERT, c.job(7, priority=10))), "UNKNOWN [INVALID_ARGUMENT]")
    c.expect(c.read(c.job(7, None, priority=10)), ("INVALID_ARGUMENT", []))
    c.expect(c.read(c.jobs()), ("OK", []))


def entry_metadata(c: Client) -> None:
    """controller_metadata and metadata are kept per entry and default entry, replaced by
    MODIFY and cleared by a default reset (PI: TableInfoStore)."""
    primary(c)
    entry = c.job(7, controller_metadata=42, metadata=b"rack 3")
    c.expect(c.write(update(Update.INSERT, entry)), "OK")
    c.expect(c.read(c.job(7, None)), ("OK", texts(entry)))
    modified = c.job(7, 3, controller_metadata=43)
    c.expect(c.write(update(Update.MODIFY, modified)), "OK")
    c.expect(c.read(c.jobs()), ("OK", texts(modified)))
    marked = c.default(NO_ACTION, controller_metadata=9, metadata=b"d")
    c.expect(c.write(update(Update.MODIFY, marked)), "OK")
    c.expect(c.read(c.default()), ("OK", texts(marked)))
    c.expect(c.write(update(Update.MODIFY, c.default())), "OK")
    c.expect(c.read(c.default()), ("OK", texts(c.default(NO_ACTION))))


def other_refusals(c: Client) -> None:
    """Codes PI gives for ids, values and multicast groups it refuses."""
    primary(c)
    c.expect(
        c.write(
            update(Update.INSERT, c.job(7, table="no such table")),
            update(Update.INSERT, c.job(1 << 16)),  # job_id is 16 bits
            update(Update.UNSPECIFIED, c.job(7)),
            update(Update.INSERT, c.group(0, (1, 1))),
            update(Update.INSERT, c.group(RESERVED_GROUPS, (1, 1))),
            update(Update.INSERT, c.group(5, (1, 1), (1, 1))),
            update(Update.MODIFY, c.group(6, (1, 1))),
        ),
        "UNKNOWN [INVALID_ARGUMENT, INVALID_ARGUMENT, INVALID_ARGUMENT, INVALID_ARGUMENT, "
        "OUT_OF_RANGE, INVALID_ARGUMENT, NOT_FOUND]",
    )
    c.expect(c.read(c.job(7, None, table="no such table")), ("INVALID_ARGUMENT", []))
    c.expect(c.read(c.group(5)), ("NOT_FOUND", []))
    c.expect(c.read(c.group(RESERVED_GROUPS)), ("OUT_OF_RANGE", []))
    c.expect(c.write(update(Update.INSERT, c.group(5, (2, 1), (1, 1)))), "OK")
    c.expect(c.read(c.group(0)), ("OK", texts(c.group(5, (1, 1), (2, 1)))))
    c.expect(c.write(update(Update.INSERT, c.job(7))), "OK")
    # a read that fails answers what it read before the failure, then the failure
    c.expect(c.read(c.jobs(), c.group(6)), ("NOT_FOUND", texts(c.job(7))))


def pipeline_parts(c: Client) -> None:
    """GetForwardingPipelineConfig answers the parts asked for (PI: pipeline_config_get)."""
    primary(c)
    c.expect(
        [c.get_pipeline(kind) for kind in Get.ResponseType.values()],
        ["OK p4info=True device_config=True", "OK p4info=False device_config=False",
         "OK p4info=True device_config=False", "OK p4info=False device_config=True"],
    )  # fmt: skip


SCENARIOS: list[Callable[[Client], None]] = [
    reads_by_key, default_entry, counter_writes, counter_indices, clone_sessions,
    duplicate_election_id, primary_changes, too_many_streams, who_may_write,
    new_pipeline_starts_empty, saved_pipeline, atomic_writes, priority_on_exact_match,
    entry_metadata, other_refusals, pipeline_parts,
]  # fmt: skip


def play(target: Target, scenario: Callable[[Client], None], strict: bool = True) -> list:
    client = Client(target, strict)
    try:
        scenario(client)
    finally:
        client.close()
    return client.answers


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_the_soft_switch_answers_as_pi(scenario) -> None:
    with soft_switch() as target:
        play(target, scenario)


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return compile_program(tmp_path_factory.mktemp("p4"), K)


@pytest.mark.requires_bmv2
@pytest.mark.requires_p4c
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_bmv2_gives_the_same_answers(scenario, program, tmp_path) -> None:
    """Every answer of simple_switch_grpc, compared with the soft switch's, one by one."""
    with soft_switch() as target:
        soft = play(target, scenario, strict=False)
    with bmv2_switch(program, tmp_path / "bmv2.log") as target:
        bmv2 = play(target, scenario, strict=False)
    assert [(i, a) for i, a in enumerate(bmv2)] == [(i, a) for i, a in enumerate(soft)]
