"""A P4Runtime server for the soft switch that answers as ``simple_switch_grpc`` does.

simple_switch_grpc is BMv2 behind p4lang/PI: ``proto/server`` (arbitration,
and what each RPC needs first) in front of ``proto/frontend``'s DeviceMgr
(what each Read and Write does). This server gives PI's answers, status codes
included, so a controller tested here meets the same answers on BMv2:

- Arbitration: the live stream with the highest election id is primary. A
  stream whose election id another live stream holds is ended with
  INVALID_ARGUMENT. When the primary changes (a higher id arrives, the
  primary leaves or changes its id) every stream is told, OK to the primary
  and ALREADY_EXISTS to the others; otherwise only the stream that spoke is.
  As in PI (unlike the spec's ``election_id_past``), the next live stream
  becomes primary at once when the primary leaves.
- Write and SetForwardingPipelineConfig take the primary's election id (or
  none while no stream is open); Write only CONTINUE_ON_ERROR.
- VERIFY_AND_COMMIT starts the pipeline empty, as BMv2 loading a program
  does: no entries, the program's default actions, no groups or clone
  sessions, counters and registers at zero. VERIFY_AND_SAVE loads it beside
  the running state (Reads and Writes then use it, packets still the old
  one) and COMMIT swaps it in; RECONCILE_AND_COMMIT keeps the state.
- Table entries keep their controller_metadata and metadata; a read by key
  returns that entry or nothing; a default entry MODIFY without an action
  goes back to the program's default action.

Where the spec and PI disagree this follows the spec: an unknown device id
is NOT_FOUND (PI takes any id for a device without a pipeline: Read and Get
answer FAILED_PRECONDITION, Write PERMISSION_DENIED, and the stream is
taken); COMMIT is NOT_FOUND with nothing saved and INVALID_ARGUMENT with a
config (BMv2: UNKNOWN, and the config ignored); RECONCILE_AND_COMMIT keeps
the state (PI replays it as INSERTs, counters included, which it refuses:
UNKNOWN for this program); a full table is RESOURCE_EXHAUSTED (BMv2:
UNKNOWN), which the controller reads as a capacity refusal. The soft switch
has no CPU port and its program does not clone: PacketOut is dropped, and
clone sessions are state that Reads return.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator, MutableMapping
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

from switchreduce.emulation.errors import TableError
from switchreduce.emulation.softswitch.pipeline import Replicas, SoftSwitch
from switchreduce.emulation.softswitch.tables import ActionCall, Counter, ExactTable, Register
from switchreduce.p4runtime.entities import TableEntry, decode_value
from switchreduce.p4runtime.names import VALUE
from switchreduce.p4runtime.schema import P4Schema, P4Table

API_VERSION = "1.3.0"
#: PI's limit on open arbitration streams per device.
MAX_STREAMS = 16
#: PI keeps multicast groups from here on for clone sessions: user groups are below.
RESERVED_GROUPS = 1 << 15
#: PI's clone session ids are 1 up to (not including) this.
CLONE_SESSIONS = 32768
#: The ``space`` PI gives each failed update's p4.v1.Error.
ERROR_SPACE = "ALL-sswitch-p4org"
#: A replica's port given as bytes is no wider than one given as ``egress_port`` (a uint32).
_PORT_BITS = 32

SetPipeline = p4runtime_pb2.SetForwardingPipelineConfigRequest
GetPipeline = p4runtime_pb2.GetForwardingPipelineConfigRequest
Update = p4runtime_pb2.Update


class P4RuntimeError(Exception):
    """One update's or request's failure: a google.rpc code and a message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> P4RuntimeError:
    return P4RuntimeError(code_pb2.INVALID_ARGUMENT, message)


_TABLE_ERROR_CODES = {
    "ALREADY_EXISTS": code_pb2.ALREADY_EXISTS,
    "NOT_FOUND": code_pb2.NOT_FOUND,
    "RESOURCE_EXHAUSTED": code_pb2.RESOURCE_EXHAUSTED,
    "INVALID_ARGUMENT": code_pb2.INVALID_ARGUMENT,
}


def _in_switch(objects: dict, name: str, kind: str):
    """The soft switch's object of that P4 name, or INVALID_ARGUMENT: another program's P4Info."""
    found = objects.get(name)
    if found is None:
        raise _invalid(f"P4Info {kind} {name} is not in this switch")
    return found


def _check_k(cells: int, switch: SoftSwitch) -> None:
    """The P4Info's ``value`` register (rows x K cells) must be this switch's: a controller
    holding another K's P4Info would size packets this switch drops."""
    rows = 2 * switch.ingress.pool_size
    if cells == rows * switch.k:
        return
    compiled = f"K={cells // rows}" if cells % rows == 0 else f"another pool than {rows} rows"
    raise _invalid(
        f"the P4Info is compiled for {compiled} (its value register has {cells} cells), "
        f"this soft switch runs K={switch.k}"
    )


def _fit(data: bytes, bitwidth: int, what: str) -> int:
    """A P4Runtime bytestring as an int: PI takes any length, but no bit past ``bitwidth``."""
    try:
        return decode_value(data, bitwidth)
    except ValueError as exc:
        raise _invalid(f"{what}: {exc}") from None


def _update_type(kind: int, allowed: Iterable[int]) -> None:
    if kind not in allowed:
        raise _invalid(
            "Update type is not set" if kind == Update.UNSPECIFIED else "Invalid update type"
        )


def _replicas(replicas: Iterable[p4runtime_pb2.Replica]) -> Replicas:
    """(port, instance) per replica; PI refuses one without a port, or the same one twice."""
    out: list[tuple[int, int]] = []
    for replica in replicas:
        kind = replica.WhichOneof("port_kind")
        if kind is None:
            raise _invalid("Missing port in multicast group replica")
        port = (
            replica.egress_port
            if kind == "egress_port"
            else _fit(replica.port, _PORT_BITS, "replica port")
        )
        if (port, replica.instance) in out:
            raise _invalid("Duplicate replica in multicast group")
        out.append((port, replica.instance))
    return tuple(out)


def _add_replicas(out, replicas: Replicas) -> None:
    """Replicas as PI reads them back: by instance, then port."""
    for port, instance in sorted(replicas, key=lambda r: (r[1], r[0])):
        out.add(egress_port=port, instance=instance)


def _zero(register: Register) -> None:
    if isinstance(register.cells, list):
        register.cells[:] = [0] * len(register.cells)
    else:
        register.cells[...] = 0


@dataclass
class _State:
    """What a pipeline's Writes change and its Reads return.

    The running switch's tables, counters and multicast groups, or, from
    VERIFY_AND_SAVE to COMMIT, fresh ones that COMMIT copies into the switch
    (as BMv2 loads a program beside the running one and swaps it in). Clone
    sessions and entries' metadata live only here: the program does not clone,
    and PI keeps metadata beside the target, not in it.
    """

    tables: dict[str, ExactTable]
    counters: dict[str, Counter]
    groups: MutableMapping[int, Replicas]
    #: session id -> replicas; class_of_service and packet_length_bytes are always 0 (as on BMv2).
    clone_sessions: dict[int, Replicas] = field(default_factory=dict)
    #: (table, key; None for the default entry) -> (controller_metadata, metadata), if set.
    metadata: dict[tuple[str, tuple[int, ...] | None], tuple[int, bytes]] = field(
        default_factory=dict
    )


class _Pipeline:
    """A pushed config, its P4Info resolved by P4 names against the state it programs."""

    def __init__(
        self, switch: SoftSwitch, config: p4runtime_pb2.ForwardingPipelineConfig, state: _State
    ) -> None:
        self.config = config
        self.state = state
        self.schema = schema = P4Schema(config.p4info)
        self.tables: dict[int, tuple[ExactTable, P4Table]] = {}
        for table in schema.tables:
            soft = _in_switch(state.tables, table.name, "table")
            keys = tuple(f.name for f in table.match_fields)
            if keys != soft.key_fields:
                raise _invalid(f"{table.name}: P4Info keys {keys} != {soft.key_fields}")
            self.tables[table.id] = (soft, table)
        self.counters: dict[int, Counter] = {
            counter.id: _in_switch(state.counters, counter.name, "counter")
            for counter in schema.counters
        }
        value = schema.registers.get(VALUE.name)
        if value is not None:
            _check_k(value.size, switch)

    def table(self, table_id: int) -> tuple[ExactTable, P4Table]:
        found = self.tables.get(table_id)
        if found is None:
            raise _invalid(f"Invalid P4 id: no table {table_id}")
        return found

    def counter(self, counter_id: int) -> Counter:
        found = self.counters.get(counter_id)
        if found is None:
            raise _invalid(f"Invalid P4 id: no counter {counter_id}")
        return found

    def key(self, info: P4Table, entry: p4runtime_pb2.TableEntry) -> tuple[int, ...] | None:
        """The entry's exact-match key, None for the default entry, refused where PI refuses it."""
        if entry.is_default_action:
            if entry.match:
                raise _invalid("Non-empty key for default entry")
            if entry.priority:
                raise _invalid("Non-zero priority for default entry")
            return None
        given = {m.field_id: m for m in entry.match}
        if len(given) != len(entry.match):
            raise _invalid("A field appears twice in the match key")
        key = []
        for field_info in info.match_fields:
            match = given.pop(field_info.id, None)
            if match is None:
                raise _invalid(f"Missing non-ternary field in match key: {field_info.name}")
            if match.WhichOneof("field_match_type") != "exact":
                raise _invalid(f"Invalid match type for {field_info.name}: the table is exact")
            key.append(_fit(match.exact.value, field_info.bitwidth, field_info.name))
        if given:
            raise _invalid(f"Unknown field in match key: {sorted(given)}")
        if entry.priority > 0:
            raise _invalid("Non-zero priority for non-ternary match")
        return tuple(key)

    def action_call(self, info: P4Table, action: p4runtime_pb2.TableAction) -> ActionCall:
        if action.WhichOneof("type") != "action":
            raise _invalid("Cannot provide indirect action for direct table")
        spec = self.schema.actions.get(action.action.action_id)
        if spec is None:
            raise _invalid(f"Invalid P4 id: no action {action.action.action_id}")
        if spec.id not in info.action_ids:
            raise _invalid(f"Invalid action for table: {spec.name}")
        params = {p.id: p for p in spec.params}
        given = {p.param_id: p.value for p in action.action.params}
        if len(action.action.params) != len(params) or len(given) != len(params):
            raise _invalid(f"Unexpected number of action parameters for {spec.name}")
        args = {}
        for param_id, value in given.items():
            param = params.get(param_id)
            if param is None:
                raise _invalid(f"Unknown action parameter {param_id}")
            args[param_id] = _fit(value, param.bitwidth, param.name)
        return ActionCall(spec.name, tuple(args[p.id] for p in spec.params))

    def entry(
        self, table_id: int, key: tuple[int, ...] | None, call: ActionCall
    ) -> p4runtime_pb2.Entity:
        """The entity a Read answers for one entry (``key`` None: the default entry)."""
        table, info = self.tables[table_id]
        fields = [f.name for f in info.match_fields]
        params = [p.name for p in self.schema.actions[call.name].params]
        entry = TableEntry(
            info.name,
            dict(zip(fields, key, strict=True)) if key is not None else {},
            call.name,
            dict(zip(params, call.args, strict=True)),
        )
        found = p4runtime_pb2.Entity()
        out = found.table_entry
        out.CopyFrom(entry.encode(self.schema))
        out.is_default_action = key is None
        out.controller_metadata, out.metadata = self.state.metadata.get((table.name, key), (0, b""))
        return found


def _no_unsupported_fields(entry: p4runtime_pb2.TableEntry) -> None:
    """This program's tables have no direct meters or counters and no idle timeout."""
    if entry.HasField("meter_config"):
        raise _invalid("Table has no direct meters")
    if entry.HasField("counter_data"):
        raise _invalid("Table has no direct counters")
    if entry.idle_timeout_ns:
        raise _invalid(
            "idle_timeout_ns must be set to 0 for tables which do not support idle timeout"
        )


class _Stream:
    """A StreamChannel that has sent arbitration: its election id, and where its replies go."""

    def __init__(self, election_id: tuple[int, int], outbox: queue.SimpleQueue) -> None:
        self.election_id = election_id
        self.outbox = outbox


class P4RuntimeService(p4runtime_pb2_grpc.P4RuntimeServicer):
    """The gRPC servicer; one per switch, device id ``device_id``."""

    def __init__(self, switch: SoftSwitch, device_id: int = 0) -> None:
        self.switch = switch
        self.device_id = device_id
        #: The program's default actions, which a new pipeline starts with and a default
        #: entry MODIFY without an action goes back to: the switch is served as built.
        self._defaults = {name: t.default_action for name, t in switch.tables().items()}
        #: What Reads and Writes use: the running pipeline, or the saved one awaiting COMMIT.
        self.pipeline: _Pipeline | None = None
        self._pending = False
        #: The switch's state as P4Runtime programs it, from the first commit on.
        self._running: _State | None = None
        self._lock = threading.Lock()  # RPCs and streams; the data plane takes no lock
        self._streams: list[_Stream] = []

    def _check_device(self, device_id: int, context: grpc.ServicerContext) -> None:
        if device_id != self.device_id:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"no device {device_id}: this is {self.device_id}"
            )

    # -- arbitration -------------------------------------------------------------

    @property
    def _loaded(self) -> _Pipeline:
        """The pipeline the switch runs; Write and Read refuse to start without one."""
        if self.pipeline is None:
            raise P4RuntimeError(code_pb2.FAILED_PRECONDITION, _NO_PIPELINE)
        return self.pipeline

    def _primary(self) -> _Stream | None:
        return max(self._streams, key=lambda s: s.election_id, default=None)

    def _notify(self, stream: _Stream) -> None:
        """Tell ``stream`` the primary's election id and whether it is the primary."""
        primary = self._primary()
        if primary is None:
            return  # no stream left to tell
        response = p4runtime_pb2.StreamMessageResponse()
        update = response.arbitration
        update.device_id = self.device_id
        update.election_id.high, update.election_id.low = primary.election_id
        if stream is primary:
            update.status.code, update.status.message = code_pb2.OK, "Is primary"
        else:
            update.status.code, update.status.message = code_pb2.ALREADY_EXISTS, "Is backup"
        stream.outbox.put(response)

    def _notify_all(self) -> None:
        for stream in self._streams:
            self._notify(stream)

    def _held(self, election_id: tuple[int, int]) -> bool:
        return any(s.election_id == election_id for s in self._streams)

    def _arbitrate(
        self,
        stream: _Stream | None,
        update: p4runtime_pb2.MasterArbitrationUpdate,
        outbox: queue.SimpleQueue,
    ) -> _Stream:
        """Apply one arbitration update from a stream (None before its first one)."""
        election = (update.election_id.high, update.election_id.low)
        with self._lock:
            if stream is None:
                if update.device_id != self.device_id:
                    raise P4RuntimeError(code_pb2.NOT_FOUND, f"no device {update.device_id}")
                if len(self._streams) >= MAX_STREAMS:
                    raise P4RuntimeError(code_pb2.RESOURCE_EXHAUSTED, "Too many connections")
                if self._held(election):
                    raise _invalid("Election id already exists")
                stream = _Stream(election, outbox)
                self._streams.append(stream)
                if self._primary() is stream:
                    self._notify_all()
                else:
                    self._notify(stream)
                return stream
            if update.device_id != self.device_id:
                raise P4RuntimeError(code_pb2.FAILED_PRECONDITION, "Invalid device id")
            if election == stream.election_id:
                return stream  # PI answers nothing
            if self._held(election):
                raise _invalid("New election id already exists")
            was_primary = self._primary() is stream
            stream.election_id = election
            if (self._primary() is stream) != was_primary:
                self._notify_all()
            else:
                self._notify(stream)
            return stream

    def _leave(self, stream: _Stream) -> None:
        with self._lock:
            was_primary = self._primary() is stream
            self._streams.remove(stream)
            if was_primary and self._streams:
                self._notify_all()

    def _take_requests(self, requests: Iterator, outbox: queue.SimpleQueue) -> None:
        """Read one stream's requests until it ends. Only arbitration is served: PacketOut
        and digest acks are dropped, the soft switch having no CPU port and no digests."""
        stream = None
        try:
            for request in requests:
                if request.HasField("arbitration"):
                    stream = self._arbitrate(stream, request.arbitration, outbox)
        except P4RuntimeError as exc:
            outbox.put(exc)
        except grpc.RpcError:
            pass  # the client went away
        finally:
            if stream is not None:
                self._leave(stream)
            outbox.put(None)

    def StreamChannel(
        self, request_iterator, context
    ) -> Iterator[p4runtime_pb2.StreamMessageResponse]:
        # Replies come from other streams' updates too, so requests are read in a thread
        # of their own and every reply goes through this stream's outbox.
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        context.add_callback(lambda: outbox.put(None))
        threading.Thread(
            target=self._take_requests, args=(request_iterator, outbox), daemon=True
        ).start()
        while (reply := outbox.get()) is not None:
            if isinstance(reply, P4RuntimeError):
                _abort(context, reply)
            yield reply

    def _check_primary(self, request, context: grpc.ServicerContext) -> None:
        """PI lets only the primary's election id through, or, with no stream open, none."""
        primary = self._primary()
        if primary is None:
            allowed = not request.HasField("election_id")
        else:
            allowed = (request.election_id.high, request.election_id.low) == primary.election_id
        if not allowed:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "Not primary")

    # -- pipeline ----------------------------------------------------------------

    def Capabilities(self, request, context):
        return p4runtime_pb2.CapabilitiesResponse(p4runtime_api_version=API_VERSION)

    def SetForwardingPipelineConfig(self, request, context):
        self._check_device(request.device_id, context)
        with self._lock:
            self._check_primary(request, context)
            try:
                self._set_pipeline(request)
            except P4RuntimeError as exc:
                _abort(context, exc)
        return p4runtime_pb2.SetForwardingPipelineConfigResponse()

    def _set_pipeline(self, request: p4runtime_pb2.SetForwardingPipelineConfigRequest) -> None:
        action = request.action
        if action == SetPipeline.COMMIT:
            if request.HasField("config"):
                raise _invalid("COMMIT takes no config: it commits the saved one")
            if not self._pending:
                raise P4RuntimeError(code_pb2.NOT_FOUND, "no saved config: VERIFY_AND_SAVE first")
            self._realize(self._loaded)
        elif action == SetPipeline.RECONCILE_AND_COMMIT:
            if self._running is None:
                switch = self.switch
                self._running = _State(switch.tables(), switch.counters(), switch.pre.groups)
            self.pipeline = _Pipeline(self.switch, request.config, self._running)
            self._pending = False
        elif action in (
            SetPipeline.VERIFY,
            SetPipeline.VERIFY_AND_SAVE,
            SetPipeline.VERIFY_AND_COMMIT,
        ):
            pipeline = _Pipeline(self.switch, request.config, self._fresh_state())
            if action == SetPipeline.VERIFY_AND_SAVE:
                self.pipeline, self._pending = pipeline, True
            elif action == SetPipeline.VERIFY_AND_COMMIT:
                self._realize(pipeline)
        else:
            raise _invalid("Invalid SetForwardingPipeline action")

    def _fresh_state(self) -> _State:
        """A newly loaded program's state: empty tables with the program's default actions,
        counters at zero, no multicast groups."""
        tables = {
            name: dataclasses.replace(table, entries={}, default_action=self._defaults[name])
            for name, table in self.switch.tables().items()
        }
        counters = {name: Counter(name, c.size) for name, c in self.switch.counters().items()}
        return _State(tables, counters, {})

    def _realize(self, pipeline: _Pipeline) -> None:
        """Copy ``pipeline``'s state into the running switch, registers zeroed, as BMv2 swaps
        in a loaded program; from now on the pipeline programs the switch itself."""
        switch, state = self.switch, pipeline.state
        for name, table in switch.tables().items():
            table.load(state.tables[name].entries, state.tables[name].default_action)
        for name, counter in switch.counters().items():
            counter.load(state.counters[name].packets, state.counters[name].bytes)
        switch.pre.groups.clear()
        switch.pre.groups.update(state.groups)
        for register in switch.registers().values():
            _zero(register)
        self._running = _State(
            switch.tables(), switch.counters(), switch.pre.groups,
            state.clone_sessions, state.metadata,
        )  # fmt: skip
        self.pipeline = _Pipeline(switch, pipeline.config, self._running)
        self._pending = False

    def GetForwardingPipelineConfig(self, request, context):
        self._check_device(request.device_id, context)
        with self._lock:
            pipeline = self.pipeline
        if pipeline is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, _NO_PIPELINE)
        stored, out = pipeline.config, p4runtime_pb2.ForwardingPipelineConfig()
        kind = request.response_type
        if kind not in GetPipeline.ResponseType.values():
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Invalid response_type in GetForwardingPipelineConfigRequest",
            )
        if kind in (GetPipeline.ALL, GetPipeline.P4INFO_AND_COOKIE):
            out.p4info.CopyFrom(stored.p4info)
        if kind in (GetPipeline.ALL, GetPipeline.DEVICE_CONFIG_AND_COOKIE):
            out.p4_device_config = stored.p4_device_config
        if stored.HasField("cookie"):
            out.cookie.CopyFrom(stored.cookie)
        return p4runtime_pb2.GetForwardingPipelineConfigResponse(config=out)

    # -- write -------------------------------------------------------------------

    def Write(self, request, context):
        self._check_device(request.device_id, context)
        with self._lock:
            self._check_primary(request, context)
            if self.pipeline is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, _NO_PIPELINE)
            if request.atomicity != p4runtime_pb2.WriteRequest.CONTINUE_ON_ERROR:
                context.abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    "Support for atomic write modes has not been implemented yet",
                )
            errors = []
            for update in request.updates:
                try:
                    self._apply(update)
                    errors.append(p4runtime_pb2.Error(canonical_code=code_pb2.OK))
                except P4RuntimeError as exc:
                    errors.append(
                        p4runtime_pb2.Error(
                            canonical_code=exc.code, message=str(exc), space=ERROR_SPACE
                        )
                    )
        if any(e.canonical_code != code_pb2.OK for e in errors):
            status = status_pb2.Status(code=code_pb2.UNKNOWN, message="write failed")
            for error in errors:
                detail = any_pb2.Any()
                detail.Pack(error)
                status.details.append(detail)
            context.abort_with_status(_RichStatus(status))
        return p4runtime_pb2.WriteResponse()

    def _apply(self, update: p4runtime_pb2.Update) -> None:
        entity = update.entity
        kind = entity.WhichOneof("entity")
        if kind == "table_entry":
            self._write_table_entry(update.type, entity.table_entry)
        elif kind == "counter_entry":
            self._write_counter(update.type, entity.counter_entry)
        elif kind == "packet_replication_engine_entry":
            pre = entity.packet_replication_engine_entry
            if pre.HasField("multicast_group_entry"):
                self._write_group(update.type, pre.multicast_group_entry)
            elif pre.HasField("clone_session_entry"):
                self._write_clone_session(update.type, pre.clone_session_entry)
            else:
                raise _invalid("Invalid PRE operation")
        elif kind is None:
            raise P4RuntimeError(code_pb2.UNKNOWN, "Incorrect entity type")
        else:
            raise P4RuntimeError(code_pb2.UNIMPLEMENTED, f"writing {kind} is not supported")

    def _write_table_entry(self, kind: int, entry: p4runtime_pb2.TableEntry) -> None:
        pipeline = self._loaded
        table, info = pipeline.table(entry.table_id)
        if entry.HasField("time_since_last_hit"):
            raise _invalid("has_time_since_last_hit must not be set in WriteRequest")
        _update_type(kind, (Update.INSERT, Update.MODIFY, Update.DELETE))
        if entry.is_default_action and kind != Update.MODIFY:
            raise _invalid(f"Cannot use {Update.Type.Name(kind)} for default entry")
        if kind == Update.INSERT and not entry.HasField("action"):
            raise _invalid("'action' field must be set")
        key = pipeline.key(info, entry)
        call = None
        if kind != Update.DELETE:
            if entry.HasField("action"):
                call = pipeline.action_call(info, entry.action)
            elif key is not None:
                raise _invalid("'action' field must be set for non-default entries")
            _no_unsupported_fields(entry)
        try:
            if key is None:
                table.set_default(call or self._defaults[table.name])
            elif kind == Update.DELETE:
                table.delete(key)
            elif call is None:  # unreachable: a keyed INSERT or MODIFY was refused without one
                raise _invalid("'action' field must be set for non-default entries")
            elif kind == Update.INSERT:
                table.insert(key, call)
            else:
                table.modify(key, call)
        except TableError as exc:
            raise P4RuntimeError(_TABLE_ERROR_CODES[exc.code], str(exc)) from None
        metadata = pipeline.state.metadata
        if call is not None and (entry.controller_metadata or entry.metadata):
            metadata[table.name, key] = (entry.controller_metadata, entry.metadata)
        else:
            metadata.pop((table.name, key), None)

    def _write_counter(self, kind: int, entry: p4runtime_pb2.CounterEntry) -> None:
        counter = self._loaded.counter(entry.counter_id)
        if not entry.HasField("index"):
            raise P4RuntimeError(
                code_pb2.UNIMPLEMENTED, "Wildcard write is not supported for indirect counters yet"
            )
        index = entry.index.index
        if index < 0:
            raise _invalid("A negative number is not a valid index value")
        if kind == Update.INSERT:
            raise _invalid("INSERT update type not supported for counters")
        _update_type(kind, (Update.MODIFY, Update.DELETE))
        if index >= counter.size:
            raise P4RuntimeError(
                code_pb2.UNKNOWN,
                f"Error when writing to counter: index {index} of {counter.size} cells",
            )
        data = entry.data if kind == Update.MODIFY else p4runtime_pb2.CounterData()
        counter.set(index, data.packet_count, data.byte_count)  # DELETE zeroes it, as PI does

    def _write_group(self, kind: int, group: p4runtime_pb2.MulticastGroupEntry) -> None:
        gid = group.multicast_group_id
        if gid == 0:
            raise _invalid("0 is not a valid group id")
        if gid >= RESERVED_GROUPS:
            raise P4RuntimeError(code_pb2.OUT_OF_RANGE, "Group id value is too high")
        _update_type(kind, (Update.INSERT, Update.MODIFY, Update.DELETE))
        groups = self._loaded.state.groups
        if kind == Update.INSERT and gid in groups:
            raise P4RuntimeError(code_pb2.ALREADY_EXISTS, f"Multicast group {gid} already exists")
        if kind != Update.INSERT and gid not in groups:
            raise P4RuntimeError(code_pb2.NOT_FOUND, f"Multicast group {gid} does not exist")
        if kind == Update.DELETE:
            del groups[gid]
        else:
            groups[gid] = _replicas(group.replicas)

    def _write_clone_session(self, kind: int, clone: p4runtime_pb2.CloneSessionEntry) -> None:
        sid = clone.session_id
        if sid == 0:
            raise _invalid("0 is not a valid session id")
        _update_type(kind, (Update.INSERT, Update.MODIFY, Update.DELETE))
        if sid >= CLONE_SESSIONS:
            raise _invalid("Clone session id out-of-range")
        sessions = self._loaded.state.clone_sessions
        if kind == Update.INSERT and sid in sessions:
            raise P4RuntimeError(code_pb2.ALREADY_EXISTS, "Clone session id already exists")
        if kind != Update.INSERT and sid not in sessions:
            raise P4RuntimeError(code_pb2.NOT_FOUND, "Clone session id does not exist")
        if kind == Update.DELETE:
            del sessions[sid]
            return
        replicas = _replicas(clone.replicas)
        if clone.class_of_service:
            raise P4RuntimeError(code_pb2.UNIMPLEMENTED, "COS for clone sessions not supported yet")
        if clone.packet_length_bytes:
            raise P4RuntimeError(
                code_pb2.UNKNOWN,
                "Error when creating clone session in target: BMv2 does not truncate clones",
            )
        sessions[sid] = replicas

    # -- read --------------------------------------------------------------------

    def Read(self, request, context):
        self._check_device(request.device_id, context)
        response, failure = p4runtime_pb2.ReadResponse(), None
        with self._lock:
            if self.pipeline is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, _NO_PIPELINE)
            try:
                for entity in request.entities:
                    for found in self._read(entity):
                        response.entities.append(found)
            except P4RuntimeError as exc:
                failure = exc
        yield response  # PI sends what it read before a failure, then the failure
        if failure is not None:
            _abort(context, failure)

    def _read(self, entity: p4runtime_pb2.Entity) -> Iterator[p4runtime_pb2.Entity]:
        kind = entity.WhichOneof("entity")
        if kind == "table_entry":
            yield from self._read_table_entries(entity.table_entry)
        elif kind == "counter_entry":
            yield from self._read_counters(entity.counter_entry)
        elif kind == "packet_replication_engine_entry":
            pre = entity.packet_replication_engine_entry
            if pre.HasField("multicast_group_entry"):
                yield from self._read_groups(pre.multicast_group_entry.multicast_group_id)
            elif pre.HasField("clone_session_entry"):
                yield from self._read_clone_sessions(pre.clone_session_entry.session_id)
            else:
                raise _invalid("Invalid PRE operation")
        elif kind is None:
            raise P4RuntimeError(code_pb2.UNKNOWN, "Incorrect entity type")
        else:
            raise P4RuntimeError(code_pb2.UNIMPLEMENTED, f"reading {kind} is not supported")

    def _read_table_entries(
        self, wanted: p4runtime_pb2.TableEntry
    ) -> Iterator[p4runtime_pb2.Entity]:
        pipeline = self._loaded
        for table_id in [wanted.table_id] if wanted.table_id else list(pipeline.tables):
            table, info = pipeline.table(table_id)
            if wanted.HasField("time_since_last_hit"):
                raise _invalid("time_since_last_hit is set but the table has no idle timeout")
            if wanted.is_default_action:
                yield pipeline.entry(table_id, None, table.default_action)
            elif wanted.match:  # one entry: that key's, if there is one
                key = pipeline.key(info, wanted)
                if key is not None and key in table.entries:
                    yield pipeline.entry(table_id, key, table.entries[key])
            else:
                for key, call in list(table.entries.items()):
                    yield pipeline.entry(table_id, key, call)

    def _read_counters(self, wanted: p4runtime_pb2.CounterEntry) -> Iterator[p4runtime_pb2.Entity]:
        pipeline = self._loaded
        for counter_id in [wanted.counter_id] if wanted.counter_id else list(pipeline.counters):
            counter = pipeline.counter(counter_id)
            indices: Iterable[int] = range(counter.size)
            if wanted.HasField("index"):
                index = wanted.index.index
                if index < 0:
                    raise _invalid("A negative number is not a valid index value")
                if index >= counter.size:
                    # PI has added the requested entry to the answer before BMv2 refuses the index
                    yield p4runtime_pb2.Entity(counter_entry=wanted)
                    raise P4RuntimeError(
                        code_pb2.UNKNOWN,
                        f"Error when reading counter from target: index {index} of "
                        f"{counter.size} cells",
                    )
                indices = [index]
            for index in indices:
                found = p4runtime_pb2.Entity()
                entry = found.counter_entry
                entry.counter_id = counter_id
                entry.index.index = index
                entry.data.packet_count = int(counter.packets[index])
                entry.data.byte_count = int(counter.bytes[index])
                yield found

    def _read_groups(self, gid: int) -> Iterator[p4runtime_pb2.Entity]:
        if gid >= RESERVED_GROUPS:
            raise P4RuntimeError(code_pb2.OUT_OF_RANGE, "Group id value is too high")
        groups = self._loaded.state.groups
        if gid and gid not in groups:
            raise P4RuntimeError(code_pb2.NOT_FOUND, f"Multicast group {gid} does not exist")
        for found_id in [gid] if gid else sorted(groups):
            found = p4runtime_pb2.Entity()
            group = found.packet_replication_engine_entry.multicast_group_entry
            group.multicast_group_id = found_id
            _add_replicas(group.replicas, groups[found_id])
            yield found

    def _read_clone_sessions(self, sid: int) -> Iterator[p4runtime_pb2.Entity]:
        sessions = self._loaded.state.clone_sessions
        if sid and sid not in sessions:
            raise P4RuntimeError(code_pb2.NOT_FOUND, "Clone session id does not exist")
        for found_id in [sid] if sid else sorted(sessions):
            found = p4runtime_pb2.Entity()
            clone = found.packet_replication_engine_entry.clone_session_entry
            clone.session_id = found_id
            _add_replicas(clone.replicas, sessions[found_id])
            yield found


_NO_PIPELINE = "No forwarding pipeline config set for this device"


class _RichStatus(grpc.Status):
    """A status whose details (here: one p4.v1.Error per update) travel in the trailer.

    This is what grpcio-status's ``rpc_status.to_status`` builds; that package
    would require a newer protobuf than p4runtime-shell allows.
    """

    def __init__(self, status: status_pb2.Status) -> None:
        self.code = grpc.StatusCode(_grpc_code(status.code))
        self.details = status.message
        self.trailing_metadata = (("grpc-status-details-bin", status.SerializeToString()),)


def _grpc_code(code: int) -> tuple:
    """grpc.StatusCode for a google.rpc code number."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.value
    return grpc.StatusCode.UNKNOWN.value


def _abort(context: grpc.ServicerContext, exc: P4RuntimeError) -> None:
    context.abort(grpc.StatusCode(_grpc_code(exc.code)), str(exc))


def serve(switch: SoftSwitch, address: str, device_id: int = 0) -> grpc.Server:
    """Start a P4Runtime gRPC server for ``switch`` on ``address`` (e.g. '127.0.0.1:9559')."""
    # Each open stream holds a worker: room for PI's limit of streams and the calls beside.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 8))
    p4runtime_pb2_grpc.add_P4RuntimeServicer_to_server(P4RuntimeService(switch, device_id), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server
