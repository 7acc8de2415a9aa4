"""Match-action state of the soft switch: exact-match tables, registers, counters.

These are the Python counterparts of the P4 objects of the same fully
qualified names, built from their declarations (``switchreduce.p4runtime.names``),
so a control plane writes the soft switch exactly as it writes BMv2.

They are also how a control plane drives the compiled engine
(``engine.py``): a table given a :class:`TableSink` hands it every write, as
PI hands BMv2 what it keeps in its own store, and a register or counter bound
to the engine's memory reads and writes it there. Tables are written through
their methods only (never ``entries`` itself), so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from switchreduce.emulation.errors import TableError
from switchreduce.p4runtime.names import (
    NO_ACTION,
    ActionSpec,
    FieldSpec,
    RegisterSpec,
    TableSpec,
)


@dataclass(frozen=True, slots=True)
class ActionCall:
    """An action with concrete parameter values (in the action's order), as stored in an entry."""

    name: str
    args: tuple[int, ...] = ()


class TableSink(Protocol):
    """Where a table's writes go besides its own dict: the compiled engine's copy."""

    def write(self, key: tuple[int, ...], call: ActionCall) -> None: ...

    def delete(self, key: tuple[int, ...]) -> None: ...

    def clear(self) -> None: ...


class CounterSink(Protocol):
    """What changes a counter bound to the engine: every change is one locked engine call."""

    def count(self, index: int, nbytes: int) -> None: ...

    def set(self, index: int, packets: int, nbytes: int) -> None: ...


def _check_width(table: str, what: str, spec: FieldSpec, value: int) -> None:
    """A value wider than its field can never be matched or carried (P4Runtime refuses it)."""
    if not 0 <= value < 1 << spec.bitwidth:
        raise TableError(
            f"{table}: {what} {spec.name}={value} does not fit {spec.bitwidth} bits",
            code="INVALID_ARGUMENT",
        )


@dataclass
class ExactTable:
    """The exact-match table ``spec`` declares: key tuple -> action call, with a default for
    misses (the P4 program's is NoAction)."""

    spec: TableSpec
    size: int = 1024
    default_action: ActionCall = ActionCall(NO_ACTION.name)
    entries: dict[tuple[int, ...], ActionCall] = field(default_factory=dict)
    #: The engine's copy, if one is attached; not carried over by ``dataclasses.replace``.
    sink: TableSink | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def key_fields(self) -> tuple[str, ...]:
        return self.spec.key_names

    def action(self, name: str) -> ActionSpec:
        for action in self.spec.actions:
            if action.name == name:
                return action
        raise TableError(f"{self.name}: no action {name!r}")

    def _check(self, key: tuple[int, ...], call: ActionCall) -> None:
        if len(key) != len(self.key_fields):
            raise TableError(f"{self.name}: key has {len(key)} fields, expected {self.key_fields}")
        action = self.action(call.name)
        if len(call.args) != len(action.params):
            raise TableError(
                f"{self.name}: action {call.name} takes {action.param_names}, got {call.args}"
            )
        for spec, value in zip(self.spec.keys, key, strict=True):
            _check_width(self.name, "key", spec, value)
        for spec, value in zip(action.params, call.args, strict=True):
            _check_width(self.name, call.name, spec, value)

    def insert(self, key: tuple[int, ...], call: ActionCall) -> None:
        self._check(key, call)
        if key in self.entries:
            raise TableError(f"{self.name}: entry {key} already exists", code="ALREADY_EXISTS")
        if len(self.entries) >= self.size:
            raise TableError(
                f"{self.name}: table full ({self.size} entries)", code="RESOURCE_EXHAUSTED"
            )
        self._write(key, call)

    def modify(self, key: tuple[int, ...], call: ActionCall) -> None:
        self._check(key, call)
        if key not in self.entries:
            raise TableError(f"{self.name}: no entry {key}", code="NOT_FOUND")
        self._write(key, call)

    def _write(self, key: tuple[int, ...], call: ActionCall) -> None:
        if self.sink is not None:
            self.sink.write(key, call)
        self.entries[key] = call

    def delete(self, key: tuple[int, ...]) -> None:
        if key not in self.entries:
            raise TableError(f"{self.name}: no entry {key}", code="NOT_FOUND")
        if self.sink is not None:
            self.sink.delete(key)
        del self.entries[key]

    def set_default(self, call: ActionCall) -> None:
        """A miss never runs the default in this program's tables (the pipeline checks hits),
        so the engine needs no copy of it."""
        self.action(call.name)
        self.default_action = call

    def load(self, entries: dict[tuple[int, ...], ActionCall], default_action: ActionCall) -> None:
        """Replace every entry and the default (a pipeline swapped in), entries checked."""
        for key, call in entries.items():
            self._check(key, call)
        if self.sink is not None:
            self.sink.clear()
            for key, call in entries.items():
                self.sink.write(key, call)
        self.entries = dict(entries)
        self.default_action = default_action

    def attach(self, sink: TableSink) -> None:
        """From now on every write goes to ``sink`` too, starting with the entries there are."""
        sink.clear()
        for key, call in self.entries.items():
            sink.write(key, call)
        self.sink = sink

    def lookup(self, key: tuple[int, ...]) -> tuple[bool, ActionCall]:
        """(hit, action call): the entry's action, or the default action on a miss."""
        call = self.entries.get(key)
        if call is None:
            return False, self.default_action
        return True, call


@dataclass
class Register:
    """The register array ``spec`` declares, of ``size`` cells.

    Cells are plain ints (cheaper per packet than numpy scalars), except with
    ``columns > 1``: then cell ``r * columns + c`` lives at ``cells[r, c]`` of an
    int32 array, so a packet can read or add a whole row at once.
    """

    spec: RegisterSpec
    size: int
    columns: int = 1

    @property
    def name(self) -> str:
        return self.spec.name

    def __post_init__(self) -> None:
        self.cells: list[int] | np.ndarray
        if self.columns > 1:
            self.cells = np.zeros((self.size // self.columns, self.columns), dtype=np.int32)
        else:
            self.cells = [0] * self.size

    def bind(self, cells: np.ndarray) -> None:
        """Keep the cells in ``cells`` (the engine's memory, shaped as ``self.cells``) from now on,
        starting from their current values."""
        cells[...] = np.asarray(self.cells, dtype=cells.dtype).reshape(cells.shape)
        self.cells = cells

    @property
    def rows(self) -> np.ndarray:
        """The cells of a register with ``columns > 1``, one array row per register row."""
        if not isinstance(self.cells, np.ndarray):
            raise TypeError(f"{self.name} has one column: its cells are a list, not rows")
        return self.cells


@dataclass
class Counter:
    """An indexed packets-and-bytes counter array, as P4's ``counter(N, packets_and_bytes)``.

    ``packets`` and ``bytes`` are read directly (lists, or the engine's uint64 cells once
    bound); they change only through ``count``, ``set`` and ``load``, which a bound counter
    hands to the engine so that no increment of its data path is lost.
    """

    name: str
    size: int
    sink: CounterSink | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.packets: list[int] | np.ndarray = [0] * self.size
        self.bytes: list[int] | np.ndarray = [0] * self.size

    def count(self, index: int, nbytes: int) -> None:
        if self.sink is not None:
            self.sink.count(index, nbytes)
        elif 0 <= index < self.size:  # out-of-range indices are ignored, as BMv2 does
            self.packets[index] += 1
            self.bytes[index] += nbytes

    def set(self, index: int, packets: int, nbytes: int) -> None:
        if self.sink is not None:
            self.sink.set(index, packets, nbytes)
        else:
            self.packets[index], self.bytes[index] = packets, nbytes

    def load(self, packets: Iterable[int], nbytes: Iterable[int]) -> None:
        """Every cell at once (a pipeline swapped in)."""
        for index, cell in enumerate(zip(packets, nbytes, strict=True)):
            self.set(index, *cell)

    def bind(self, sink: CounterSink, packets: np.ndarray, nbytes: np.ndarray) -> None:
        """Read the cells from the engine's memory and change them through ``sink`` from now on,
        starting from their current values."""
        current = list(zip(self.packets, self.bytes, strict=True))
        self.sink, self.packets, self.bytes = sink, packets, nbytes
        for index, (count, total) in enumerate(current):
            self.set(index, count, total)
