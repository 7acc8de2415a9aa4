"""P4Runtime entities in P4 names, and their P4Runtime messages.

A TableEntry names its table, match fields, action and parameters as the P4
program does; code that builds or compares entries never sees an id.
``encode`` and ``decode`` translate through a P4Schema, which gives the
ids and the width every value must fit, so the same entry is written to
BMv2, written to the soft switch, or applied to the soft switch directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from p4.v1 import p4runtime_pb2

from switchreduce.p4runtime.schema import P4Schema


class UpdateKind(IntEnum):
    """What a write does with an entity: P4Runtime's Update types."""

    INSERT = p4runtime_pb2.Update.INSERT
    MODIFY = p4runtime_pb2.Update.MODIFY
    DELETE = p4runtime_pb2.Update.DELETE


def encode_value(value: int, bitwidth: int) -> bytes:
    """P4Runtime's canonical bytes: big-endian, no leading zero bytes (zero is one byte).

    ValueError if ``value`` is negative or wider than ``bitwidth`` bits.
    """
    if value < 0 or value >> bitwidth:
        raise ValueError(f"{value} does not fit within {bitwidth} bits")
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def decode_value(data: bytes, bitwidth: int) -> int:
    """The value of P4Runtime bytes of any length (PI takes padded ones too).

    ValueError if a bit past ``bitwidth`` is set.
    """
    value = int.from_bytes(data, "big")
    if value >> bitwidth:
        raise ValueError(f"{value} does not fit within {bitwidth} bits")
    return value


@dataclass(frozen=True)
class TableEntry:
    """A table entry in P4 names: exact-match key values and an action with its arguments."""

    table: str
    match: dict[str, int]
    action: str
    params: dict[str, int]

    def encode(self, schema: P4Schema) -> p4runtime_pb2.TableEntry:
        """The P4Runtime message, match fields and parameters in the P4Info's order.

        KeyError for a name the program lacks or a parameter missing or extra;
        ValueError for a value wider than its field.
        """
        table = schema.tables[self.table]
        unknown = set(self.match) - {f.name for f in table.match_fields}
        if unknown:
            raise KeyError(f"{self.table} has no match fields {sorted(unknown)}")
        out = p4runtime_pb2.TableEntry(table_id=table.id)
        for field in table.match_fields:
            if field.name in self.match:
                value = encode_value(self.match[field.name], field.bitwidth)
                out.match.add(field_id=field.id).exact.value = value
        action = schema.actions[self.action]
        names = {p.name for p in action.params}
        if set(self.params) != names:
            raise KeyError(f"{self.action} takes {sorted(names)}, got {sorted(self.params)}")
        out.action.action.action_id = action.id
        for param in action.params:
            value = encode_value(self.params[param.name], param.bitwidth)
            out.action.action.params.add(param_id=param.id, value=value)
        return out

    @classmethod
    def decode(cls, schema: P4Schema, message: p4runtime_pb2.TableEntry) -> TableEntry:
        """The entry a P4Runtime message (as a switch reads it back) holds."""
        table = schema.tables[message.table_id]
        fields = {f.id: f for f in table.match_fields}
        action = schema.actions[message.action.action.action_id]
        params = {p.id: p for p in action.params}
        match = {}
        for m in message.match:
            field = fields[m.field_id]
            match[field.name] = decode_value(m.exact.value, field.bitwidth)
        args = {}
        for p in message.action.action.params:
            param = params[p.param_id]
            args[param.name] = decode_value(p.value, param.bitwidth)
        return cls(table.name, match, action.name, args)


#: One replica of a multicast group: (egress port, instance).
Replica = tuple[int, int]


class MulticastGroup(NamedTuple):
    """A multicast group of the packet replication engine: its id and its replicas."""

    group_id: int
    replicas: list[Replica]

    def encode(self) -> p4runtime_pb2.MulticastGroupEntry:
        out = p4runtime_pb2.MulticastGroupEntry(multicast_group_id=self.group_id)
        for port, instance in self.replicas:
            out.replicas.add(egress_port=port, instance=instance)
        return out

    @classmethod
    def decode(cls, message: p4runtime_pb2.MulticastGroupEntry) -> MulticastGroup:
        return cls(
            message.multicast_group_id, [(r.egress_port, r.instance) for r in message.replicas]
        )


#: One write: what it does, and to which entity.
Update = tuple[UpdateKind, TableEntry | MulticastGroup]


def encode_update(schema: P4Schema, update: Update) -> p4runtime_pb2.Update:
    kind, item = update
    out = p4runtime_pb2.Update(type=kind)
    if isinstance(item, TableEntry):
        out.entity.table_entry.CopyFrom(item.encode(schema))
    else:
        pre = out.entity.packet_replication_engine_entry
        pre.multicast_group_entry.CopyFrom(item.encode())
    return out
