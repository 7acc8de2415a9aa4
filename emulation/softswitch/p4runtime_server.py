"""A P4Runtime server for the soft switch, as ``simple_switch_grpc`` serves BMv2.

It covers what a controller of this pipeline uses: Capabilities,
Set/GetForwardingPipelineConfig, Write (table entries and default actions,
multicast groups), Read (table entries, counters, multicast groups) and
StreamChannel arbitration (only the primary may write). P4Runtime ids are
mapped to the soft switch's objects through the P4Info the controller
pushes, by their P4 names, so the same controller drives BMv2 and this.
Errors use P4Runtime's status codes, with one ``p4.v1.Error`` per update.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from p4.config.v1 import p4info_pb2
from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

from controller.connection import decode_value, encode_value
from emulation.errors import TableError
from emulation.softswitch.pipeline import SoftSwitch
from emulation.softswitch.tables import ActionCall, Counter, ExactTable

API_VERSION = "1.3.0"


class P4RuntimeError(Exception):
    """One update's failure: a google.rpc code and a message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


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
        raise P4RuntimeError(
            code_pb2.INVALID_ARGUMENT, f"P4Info {kind} {name} is not in this switch"
        )
    return found


def _check_k(cells: int, switch: SoftSwitch) -> None:
    """The P4Info's ``value`` register (rows x K cells) must be this switch's: a controller
    holding another K's P4Info would size packets this switch drops."""
    rows = 2 * switch.ingress.pool_size
    if cells == rows * switch.k:
        return
    compiled = f"K={cells // rows}" if cells % rows == 0 else f"another pool than {rows} rows"
    raise P4RuntimeError(
        code_pb2.INVALID_ARGUMENT,
        f"the P4Info is compiled for {compiled} (its value register has {cells} cells), "
        f"this soft switch runs K={switch.k}",
    )


class _Pipeline:
    """The P4Info pushed by the controller, resolved against the soft switch's objects."""

    def __init__(self, switch: SoftSwitch, config: p4runtime_pb2.ForwardingPipelineConfig):
        self.config = config
        info = config.p4info
        tables = switch.tables()
        counters = switch.counters()
        self.tables: dict[int, tuple[ExactTable, p4info_pb2.Table]] = {}
        self.actions: dict[int, p4info_pb2.Action] = {a.preamble.id: a for a in info.actions}
        self.action_ids = {a.preamble.name: a.preamble.id for a in info.actions}
        for table in info.tables:
            soft = _in_switch(tables, table.preamble.name, "table")
            keys = tuple(f.name for f in table.match_fields)
            if keys != soft.key_fields:
                raise P4RuntimeError(
                    code_pb2.INVALID_ARGUMENT,
                    f"{table.preamble.name}: P4Info keys {keys} != {soft.key_fields}",
                )
            self.tables[table.preamble.id] = (soft, table)
        self.counters: dict[int, Counter] = {}
        for counter in info.counters:
            self.counters[counter.preamble.id] = _in_switch(
                counters, counter.preamble.name, "counter"
            )
        for register in info.registers:
            if register.preamble.name == "SwitchReduceIngress.value":
                _check_k(register.size, switch)

    def table(self, table_id: int) -> tuple[ExactTable, p4info_pb2.Table]:
        found = self.tables.get(table_id)
        if found is None:
            raise P4RuntimeError(code_pb2.NOT_FOUND, f"no table with id {table_id}")
        return found

    def counter(self, counter_id: int) -> Counter:
        found = self.counters.get(counter_id)
        if found is None:
            raise P4RuntimeError(code_pb2.NOT_FOUND, f"no counter with id {counter_id}")
        return found

    def key(self, info: p4info_pb2.Table, matches) -> tuple[int, ...]:
        by_id = {m.field_id: m for m in matches}
        key = []
        for field in info.match_fields:
            match = by_id.pop(field.id, None)
            if match is None or not match.HasField("exact"):
                raise P4RuntimeError(
                    code_pb2.INVALID_ARGUMENT,
                    f"{info.preamble.name}: needs an exact match on {field.name}",
                )
            value = decode_value(match.exact.value)
            if value >> field.bitwidth:
                raise P4RuntimeError(
                    code_pb2.OUT_OF_RANGE,
                    f"{field.name}: {value} does not fit {field.bitwidth} bits",
                )
            key.append(value)
        if by_id:
            raise P4RuntimeError(code_pb2.INVALID_ARGUMENT, f"unknown match fields {list(by_id)}")
        return tuple(key)

    def action_call(self, info: p4info_pb2.Table, action: p4runtime_pb2.Action) -> ActionCall:
        if action.action_id not in {ref.id for ref in info.action_refs}:
            raise P4RuntimeError(
                code_pb2.INVALID_ARGUMENT,
                f"{info.preamble.name}: action {action.action_id} not allowed",
            )
        spec = self.actions[action.action_id]
        by_id = {p.param_id: p for p in action.params}
        args = []
        for param in spec.params:
            given = by_id.get(param.id)
            if given is None:
                raise P4RuntimeError(
                    code_pb2.INVALID_ARGUMENT,
                    f"{spec.preamble.name}: missing parameter {param.name}",
                )
            value = decode_value(given.value)
            if value >> param.bitwidth:
                raise P4RuntimeError(
                    code_pb2.OUT_OF_RANGE,
                    f"{param.name}: {value} does not fit {param.bitwidth} bits",
                )
            args.append(value)
        return ActionCall(spec.preamble.name, tuple(args))

    def entry(self, table_id: int, info: p4info_pb2.Table, key, call: ActionCall, default: bool):
        out = p4runtime_pb2.TableEntry(table_id=table_id, is_default_action=default)
        if not default:
            for field, value in zip(info.match_fields, key, strict=True):
                match = out.match.add(field_id=field.id)
                match.exact.value = encode_value(value)
        action_id = self.action_ids[call.name]
        out.action.action.action_id = action_id
        for param, value in zip(self.actions[action_id].params, call.args, strict=True):
            out.action.action.params.add(param_id=param.id, value=encode_value(value))
        return out


class P4RuntimeService(p4runtime_pb2_grpc.P4RuntimeServicer):
    """The gRPC servicer; one per switch, device id ``device_id``."""

    def __init__(self, switch: SoftSwitch, device_id: int = 0) -> None:
        self.switch = switch
        self.device_id = device_id
        self.pipeline: _Pipeline | None = None
        self._lock = threading.Lock()  # the data plane reads tables while we write them
        self._election_ids: dict[int, tuple[int, int]] = {}  # stream id -> election id
        self._next_stream = 0

    # -- arbitration -------------------------------------------------------------

    def _primary(self) -> tuple[int, int] | None:
        return max(self._election_ids.values(), default=None)

    def _check_primary(self, request, context) -> None:
        if request.device_id != self.device_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no device {request.device_id}")
        election = (request.election_id.high, request.election_id.low)
        if election != self._primary():
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not the primary controller")

    def StreamChannel(self, request_iterator, context) -> Iterator:
        with self._lock:
            stream = self._next_stream
            self._next_stream += 1
        try:
            for request in request_iterator:
                if not request.HasField("arbitration"):
                    continue
                update = request.arbitration
                if update.device_id != self.device_id:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"no device {update.device_id}")
                with self._lock:
                    self._election_ids[stream] = (update.election_id.high, update.election_id.low)
                    primary = self._primary()
                response = p4runtime_pb2.StreamMessageResponse()
                response.arbitration.device_id = self.device_id
                response.arbitration.election_id.high, response.arbitration.election_id.low = (
                    primary
                )
                is_primary = primary == self._election_ids[stream]
                response.arbitration.status.code = (
                    code_pb2.OK if is_primary else code_pb2.ALREADY_EXISTS
                )
                yield response
        finally:
            with self._lock:
                self._election_ids.pop(stream, None)

    # -- pipeline ----------------------------------------------------------------

    def Capabilities(self, request, context):
        return p4runtime_pb2.CapabilitiesResponse(p4runtime_api_version=API_VERSION)

    def SetForwardingPipelineConfig(self, request, context):
        self._check_primary(request, context)
        action = request.action
        if action not in (
            p4runtime_pb2.SetForwardingPipelineConfigRequest.VERIFY,
            p4runtime_pb2.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT,
            p4runtime_pb2.SetForwardingPipelineConfigRequest.RECONCILE_AND_COMMIT,
        ):
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"pipeline action {action}")
        try:
            pipeline = _Pipeline(self.switch, request.config)
        except P4RuntimeError as exc:
            context.abort(grpc.StatusCode(_grpc_code(exc.code)), str(exc))
        if action != p4runtime_pb2.SetForwardingPipelineConfigRequest.VERIFY:
            with self._lock:
                self.pipeline = pipeline
        return p4runtime_pb2.SetForwardingPipelineConfigResponse()

    def GetForwardingPipelineConfig(self, request, context):
        if self.pipeline is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no pipeline configured")
        return p4runtime_pb2.GetForwardingPipelineConfigResponse(config=self.pipeline.config)

    # -- write -------------------------------------------------------------------

    def Write(self, request, context):
        self._check_primary(request, context)
        if self.pipeline is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no pipeline configured")
        errors = []
        with self._lock:
            for update in request.updates:
                try:
                    self._apply(update)
                    errors.append(p4runtime_pb2.Error(canonical_code=code_pb2.OK))
                except P4RuntimeError as exc:
                    errors.append(p4runtime_pb2.Error(canonical_code=exc.code, message=str(exc)))
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
        elif kind == "packet_replication_engine_entry":
            self._write_multicast_group(update.type, entity.packet_replication_engine_entry)
        else:
            raise P4RuntimeError(code_pb2.UNIMPLEMENTED, f"writing {kind} is not supported")

    def _write_table_entry(self, kind: int, entry: p4runtime_pb2.TableEntry) -> None:
        table, info = self.pipeline.table(entry.table_id)
        try:
            if entry.is_default_action:
                if kind != p4runtime_pb2.Update.MODIFY:
                    raise P4RuntimeError(
                        code_pb2.INVALID_ARGUMENT, "a default action can only be modified"
                    )
                table.set_default(self.pipeline.action_call(info, entry.action.action))
                return
            key = self.pipeline.key(info, entry.match)
            if kind == p4runtime_pb2.Update.DELETE:
                table.delete(key)
                return
            call = self.pipeline.action_call(info, entry.action.action)
            if kind == p4runtime_pb2.Update.INSERT:
                table.insert(key, call)
            elif kind == p4runtime_pb2.Update.MODIFY:
                table.modify(key, call)
            else:
                raise P4RuntimeError(code_pb2.INVALID_ARGUMENT, f"update type {kind}")
        except TableError as exc:
            raise P4RuntimeError(_TABLE_ERROR_CODES[exc.code], str(exc)) from None

    def _write_multicast_group(self, kind: int, entry) -> None:
        if not entry.HasField("multicast_group_entry"):
            raise P4RuntimeError(code_pb2.UNIMPLEMENTED, "only multicast groups are supported")
        group = entry.multicast_group_entry
        groups = self.switch.pre.groups
        gid = group.multicast_group_id
        if gid == 0:
            raise P4RuntimeError(code_pb2.INVALID_ARGUMENT, "multicast group id 0 is reserved")
        exists = gid in groups
        if kind == p4runtime_pb2.Update.INSERT and exists:
            raise P4RuntimeError(code_pb2.ALREADY_EXISTS, f"multicast group {gid} exists")
        if kind in (p4runtime_pb2.Update.MODIFY, p4runtime_pb2.Update.DELETE) and not exists:
            raise P4RuntimeError(code_pb2.NOT_FOUND, f"no multicast group {gid}")
        if kind == p4runtime_pb2.Update.DELETE:
            del groups[gid]
            return
        replicas = tuple(
            (r.egress_port or decode_value(r.port), r.instance) for r in group.replicas
        )
        groups[gid] = replicas

    # -- read --------------------------------------------------------------------

    def Read(self, request, context):
        if self.pipeline is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no pipeline configured")
        response = p4runtime_pb2.ReadResponse()
        try:
            with self._lock:
                for entity in request.entities:
                    for found in self._read(entity):
                        response.entities.append(found)
        except P4RuntimeError as exc:
            context.abort(grpc.StatusCode(_grpc_code(exc.code)), str(exc))
        yield response

    def _read(self, entity: p4runtime_pb2.Entity) -> Iterator[p4runtime_pb2.Entity]:
        kind = entity.WhichOneof("entity")
        pipeline = self.pipeline
        if kind == "table_entry":
            wanted = entity.table_entry
            ids = [wanted.table_id] if wanted.table_id else list(pipeline.tables)
            for table_id in ids:
                table, info = pipeline.table(table_id)
                if wanted.is_default_action:
                    found = pipeline.entry(table_id, info, (), table.default_action, True)
                    yield p4runtime_pb2.Entity(table_entry=found)
                    continue
                for key, call in list(table.entries.items()):
                    found = pipeline.entry(table_id, info, key, call, False)
                    yield p4runtime_pb2.Entity(table_entry=found)
        elif kind == "counter_entry":
            wanted = entity.counter_entry
            ids = [wanted.counter_id] if wanted.counter_id else list(pipeline.counters)
            for counter_id in ids:
                counter = pipeline.counter(counter_id)
                indices = [wanted.index.index] if wanted.HasField("index") else range(counter.size)
                for index in indices:
                    found = p4runtime_pb2.CounterEntry(counter_id=counter_id)
                    found.index.index = index
                    found.data.packet_count = counter.packets[index]
                    found.data.byte_count = counter.bytes[index]
                    yield p4runtime_pb2.Entity(counter_entry=found)
        elif kind == "packet_replication_engine_entry":
            wanted = entity.packet_replication_engine_entry.multicast_group_entry
            groups = self.switch.pre.groups
            ids = [wanted.multicast_group_id] if wanted.multicast_group_id else sorted(groups)
            for gid in ids:
                if gid not in groups:
                    continue
                found = p4runtime_pb2.Entity()
                group = found.packet_replication_engine_entry.multicast_group_entry
                group.multicast_group_id = gid
                for port, rid in groups[gid]:
                    group.replicas.add(egress_port=port, instance=rid)
                yield found
        else:
            raise P4RuntimeError(code_pb2.UNIMPLEMENTED, f"reading {kind} is not supported")


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


def serve(switch: SoftSwitch, address: str, device_id: int = 0) -> grpc.Server:
    """Start a P4Runtime gRPC server for ``switch`` on ``address`` (e.g. '127.0.0.1:9559')."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    p4runtime_pb2_grpc.add_P4RuntimeServicer_to_server(P4RuntimeService(switch, device_id), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server
