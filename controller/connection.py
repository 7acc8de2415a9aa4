"""One controller-side P4Runtime connection per switch, addressed by P4 names.

p4runtime-shell keeps a single global client per process; a controller that
drives several switches needs one connection object each, so this talks to
the p4runtime package's generated stubs directly. Tables, actions, match
fields, parameters and counters are named as in the P4 program and resolved
to ids through the P4Info (``switchreduce.p4runtime``), which is what makes
the same controller code drive BMv2 and the soft switch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import grpc
from google.rpc import code_pb2, status_pb2
from p4.config.v1 import p4info_pb2
from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

from switchreduce.controller.errors import NotPrimaryError, SwitchUnavailableError, WriteError
from switchreduce.p4runtime.entities import (
    MulticastGroup,
    Replica,
    TableEntry,
    Update,
    UpdateKind,
    encode_update,
)
from switchreduce.p4runtime.schema import P4Schema, load_p4info

#: Reconnect within a second once a restarted switch listens again (gRPC's default backoff
#: grows to two minutes).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class SwitchConnection:
    """A P4Runtime session with one switch; use as a context manager.

    As primary (the default) it holds the arbitration stream open and may
    write; when that stream ends without ``close`` (the switch died or
    restarted), ``lost`` is set and ``on_lost`` called, since the switch
    has forgotten this controller. ``primary=False`` opens no stream: a
    reader, which P4Runtime lets read beside the primary without taking
    its place.
    """

    def __init__(
        self,
        address: str,
        device_id: int = 0,
        election_id: int = 1,
        p4info: p4info_pb2.P4Info | None = None,
        timeout: float = 5.0,
        *,
        primary: bool = True,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.address = address
        self.device_id = device_id
        self.election_id = election_id
        self.timeout = timeout
        self.schema = P4Schema(p4info or load_p4info())
        self.lost = threading.Event()
        self._on_lost = on_lost
        self._closing = False
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = p4runtime_pb2_grpc.P4RuntimeStub(self._channel)
        self._requests: queue.Queue = queue.Queue()
        self._connect()
        if primary:
            self._arbitrate()

    # -- session -------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise SwitchUnavailableError(
                f"no P4Runtime server answers at {self.address} within {self.timeout}s"
            ) from None

    def _arbitrate(self) -> None:
        request = p4runtime_pb2.StreamMessageRequest()
        request.arbitration.device_id = self.device_id
        request.arbitration.election_id.low = self.election_id
        self._requests.put(request)
        stream = self._stub.StreamChannel(iter(self._requests.get, None))
        replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_stream, args=(stream, replies), daemon=True).start()
        try:
            reply = replies.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            raise SwitchUnavailableError(f"{self.address}: no arbitration answer") from None
        if isinstance(reply, grpc.RpcError):
            self.close()
            raise SwitchUnavailableError(f"{self.address}: {reply.details()}") from None
        if reply.arbitration.status.code != code_pb2.OK:
            self.close()
            raise NotPrimaryError(
                f"{self.address}: election id {self.election_id} is not the highest; another "
                f"controller is primary"
            )

    def _read_stream(self, stream: Iterator, replies: queue.Queue) -> None:
        try:
            for reply in stream:
                if reply.HasField("arbitration"):
                    replies.put(reply)
        except grpc.RpcError as exc:
            replies.put(exc)
        if not self._closing:
            self.lost.set()
            if self._on_lost is not None:
                self._on_lost()

    def close(self) -> None:
        self._closing = True
        self._requests.put(None)  # ends the request iterator, closing the stream
        self._channel.close()

    def __enter__(self) -> SwitchConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def p4info(self) -> p4info_pb2.P4Info:
        """The P4Info this connection names things by, and pushes."""
        return self.schema.p4info

    def _request(self, message):
        message.device_id = self.device_id
        message.election_id.low = self.election_id
        return message

    # -- pipeline ----------------------------------------------------------------

    def push_pipeline(self, device_config: bytes = b"") -> None:
        """Install the P4Info (and BMv2's JSON, for BMv2) as the forwarding pipeline."""
        request = self._request(p4runtime_pb2.SetForwardingPipelineConfigRequest())
        request.action = p4runtime_pb2.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT
        request.config.p4info.CopyFrom(self.p4info)
        request.config.p4_device_config = device_config
        self._call(self._stub.SetForwardingPipelineConfig, request)

    def installed_p4info(self) -> p4info_pb2.P4Info | None:
        """The P4Info the switch runs now, or None if it has no pipeline yet."""
        request = p4runtime_pb2.GetForwardingPipelineConfigRequest(
            device_id=self.device_id,
            # not BMv2's JSON, which is megabytes for a large K: this is polled
            response_type=p4runtime_pb2.GetForwardingPipelineConfigRequest.P4INFO_AND_COOKIE,
        )
        try:
            response = self._stub.GetForwardingPipelineConfig(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                return None
            raise _rpc_error(self.address, exc) from None
        return response.config.p4info if response.config.HasField("p4info") else None

    # -- writes --------------------------------------------------------------------

    def write(self, updates: Sequence[Update]) -> None:
        """Apply updates in one batch: (what to do, TableEntry or MulticastGroup)."""
        request = self._request(p4runtime_pb2.WriteRequest())
        request.updates.extend(encode_update(self.schema, update) for update in updates)
        self._call(self._stub.Write, request)

    def insert(self, entry: TableEntry) -> None:
        self.write([(UpdateKind.INSERT, entry)])

    def delete(self, entry: TableEntry) -> None:
        self.write([(UpdateKind.DELETE, entry)])

    # -- reads ---------------------------------------------------------------------

    def _read(self, entity: p4runtime_pb2.Entity) -> Iterator[p4runtime_pb2.Entity]:
        request = p4runtime_pb2.ReadRequest(device_id=self.device_id, entities=[entity])
        try:
            for response in self._stub.Read(request, timeout=self.timeout):
                yield from response.entities
        except grpc.RpcError as exc:
            raise _rpc_error(self.address, exc) from None

    def read_table(self, table: str) -> list[TableEntry]:
        entity = p4runtime_pb2.Entity()
        entity.table_entry.table_id = self.schema.tables[table].id
        return [TableEntry.decode(self.schema, e.table_entry) for e in self._read(entity)]

    def read_multicast_groups(self) -> dict[int, list[Replica]]:
        entity = p4runtime_pb2.Entity()
        entity.packet_replication_engine_entry.multicast_group_entry.multicast_group_id = 0
        groups = {}
        for found in self._read(entity):
            group = MulticastGroup.decode(
                found.packet_replication_engine_entry.multicast_group_entry
            )
            groups[group.group_id] = group.replicas
        return groups

    def read_counter(self, counter: str, index: int) -> tuple[int, int]:
        """(packets, bytes) of one cell of an indexed counter."""
        entity = p4runtime_pb2.Entity()
        entity.counter_entry.counter_id = self.schema.counters[counter].id
        entity.counter_entry.index.index = index
        for found in self._read(entity):
            data = found.counter_entry.data
            return data.packet_count, data.byte_count
        raise WriteError(f"{self.address}: counter {counter}[{index}] not found", [])

    def _call(self, method, request) -> None:
        try:
            method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _rpc_error(self.address, exc) from None


def _rpc_error(address: str, exc: grpc.RpcError) -> Exception:
    """A WriteError with every failed update's code and message, or the plain RPC error."""
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return SwitchUnavailableError(f"switch {address} unavailable: {exc.details()}")
    if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
        return NotPrimaryError(f"{address}: {exc.details()}")
    failures = []
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                error = p4runtime_pb2.Error()
                detail.Unpack(error)
                failures.append((error.canonical_code, error.message))
    failed = [(code, msg) for code, msg in failures if code != code_pb2.OK]
    summary = "; ".join(f"{code_pb2.Code.Name(code)}: {msg}" for code, msg in failed)
    return WriteError(f"{address}: {summary or exc.details()}", failed)
