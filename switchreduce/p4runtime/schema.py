"""A compiled program's P4Info, resolved: names <-> ids, bit widths and sizes.

P4Runtime names every table, action, register and counter by a numeric id,
and sends every value as bytes no wider than its field. Both are in the
P4Info p4c emits; this reads it once into small immutable records, so the
controller (encoding its writes), the soft switch's P4Runtime server
(checking them) and the tests (comparing the P4 program with the Python
model) ask the same questions of it the same way. The shape follows finsy's
``p4schema``: one index per kind of object, by name and by id.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from google.protobuf import text_format
from p4.config.v1 import p4info_pb2

from switchreduce.p4program import P4INFO


def load_p4info(path: Path = P4INFO) -> p4info_pb2.P4Info:
    """The P4Info message of a P4Info text file (p4c's ``--p4runtime-files``)."""
    return text_format.Parse(Path(path).read_text(), p4info_pb2.P4Info())


@dataclass(frozen=True)
class P4Field:
    """A table's match field or an action's parameter; ids count within their table or action."""

    id: int
    name: str
    bitwidth: int


@dataclass(frozen=True)
class P4Action:
    id: int
    name: str
    params: tuple[P4Field, ...]


@dataclass(frozen=True)
class P4Table:
    id: int
    name: str
    match_fields: tuple[P4Field, ...]
    #: The actions an entry may invoke (the P4Info's action_refs).
    action_ids: frozenset[int]
    size: int


@dataclass(frozen=True)
class P4Register:
    id: int
    name: str
    bitwidth: int
    size: int


@dataclass(frozen=True)
class P4Counter:
    id: int
    name: str
    size: int


class _Named(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def name(self) -> str: ...


_T = TypeVar("_T", bound=_Named)


class P4Objects(Generic[_T]):
    """The objects of one kind, by name (``str``) or by id (``int``).

    A lookup that misses raises KeyError saying what is missing; ``get``
    returns None instead, for callers that answer a miss their own way.
    """

    def __init__(self, kind: str, objects: Iterable[_T]) -> None:
        self.kind = kind
        self._by_name = {o.name: o for o in objects}
        self._by_id = {o.id: o for o in self._by_name.values()}

    def get(self, key: str | int) -> _T | None:
        return self._by_id.get(key) if isinstance(key, int) else self._by_name.get(key)

    def __getitem__(self, key: str | int) -> _T:
        found = self.get(key)
        if found is None:
            raise KeyError(f"no {self.kind} {key!r} in the P4Info")
        return found

    def __iter__(self) -> Iterator[_T]:
        return iter(self._by_name.values())


def _fields(
    fields: Iterable[p4info_pb2.MatchField | p4info_pb2.Action.Param],
) -> tuple[P4Field, ...]:
    return tuple(P4Field(f.id, f.name, f.bitwidth) for f in fields)


class P4Schema:
    """The tables, actions, registers and counters of one P4Info; ``p4info`` is the message."""

    def __init__(self, p4info: p4info_pb2.P4Info) -> None:
        self.p4info = p4info
        self.tables = P4Objects(
            "table",
            (
                P4Table(
                    t.preamble.id,
                    t.preamble.name,
                    _fields(t.match_fields),
                    frozenset(ref.id for ref in t.action_refs),
                    t.size,
                )
                for t in p4info.tables
            ),
        )
        self.actions = P4Objects(
            "action",
            (P4Action(a.preamble.id, a.preamble.name, _fields(a.params)) for a in p4info.actions),
        )
        self.registers = P4Objects(
            "register",
            (
                P4Register(
                    r.preamble.id, r.preamble.name, r.type_spec.bitstring.bit.bitwidth, r.size
                )
                for r in p4info.registers
            ),
        )
        self.counters = P4Objects(
            "counter", (P4Counter(c.preamble.id, c.preamble.name, c.size) for c in p4info.counters)
        )

    @classmethod
    def load(cls, path: Path = P4INFO) -> P4Schema:
        """The schema of a P4Info file, by default the committed one (K = 256)."""
        return cls(load_p4info(path))

    def size(self, name: str) -> int:
        """Cells of the counter or register ``name``, or entries of the table ``name``."""
        for objects in (self.counters, self.registers, self.tables):
            found = objects.get(name)
            if found is not None:
                return found.size
        raise KeyError(f"no counter, register or table {name!r} in the P4Info")
