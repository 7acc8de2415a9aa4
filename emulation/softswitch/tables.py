"""Match-action state of the soft switch: exact-match tables, registers, counters.

These are the Python counterparts of the P4 objects of the same fully
qualified names, built from their declarations (``switchreduce.p4runtime.names``),
so a control plane writes the soft switch exactly as it writes BMv2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from switchreduce.emulation.errors import TableError
from switchreduce.p4runtime.names import NO_ACTION, ActionSpec, RegisterSpec, TableSpec


@dataclass(frozen=True, slots=True)
class ActionCall:
    """An action with concrete parameter values (in the action's order), as stored in an entry."""

    name: str
    args: tuple[int, ...] = ()


@dataclass
class ExactTable:
    """The exact-match table ``spec`` declares: key tuple -> action call, with a default for
    misses (the P4 program's is NoAction)."""

    spec: TableSpec
    size: int = 1024
    default_action: ActionCall = ActionCall(NO_ACTION.name)
    entries: dict[tuple[int, ...], ActionCall] = field(default_factory=dict)

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

    def insert(self, key: tuple[int, ...], call: ActionCall) -> None:
        self._check(key, call)
        if key in self.entries:
            raise TableError(f"{self.name}: entry {key} already exists", code="ALREADY_EXISTS")
        if len(self.entries) >= self.size:
            raise TableError(
                f"{self.name}: table full ({self.size} entries)", code="RESOURCE_EXHAUSTED"
            )
        self.entries[key] = call

    def modify(self, key: tuple[int, ...], call: ActionCall) -> None:
        self._check(key, call)
        if key not in self.entries:
            raise TableError(f"{self.name}: no entry {key}", code="NOT_FOUND")
        self.entries[key] = call

    def delete(self, key: tuple[int, ...]) -> None:
        if self.entries.pop(key, None) is None:
            raise TableError(f"{self.name}: no entry {key}", code="NOT_FOUND")

    def set_default(self, call: ActionCall) -> None:
        self.action(call.name)
        self.default_action = call

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

    @property
    def rows(self) -> np.ndarray:
        """The cells of a register with ``columns > 1``, one array row per register row."""
        if not isinstance(self.cells, np.ndarray):
            raise TypeError(f"{self.name} has one column: its cells are a list, not rows")
        return self.cells


@dataclass
class Counter:
    """An indexed packets-and-bytes counter array, as P4's ``counter(N, packets_and_bytes)``."""

    name: str
    size: int

    def __post_init__(self) -> None:
        self.packets = [0] * self.size
        self.bytes = [0] * self.size

    def count(self, index: int, nbytes: int) -> None:
        if 0 <= index < self.size:  # out-of-range indices are ignored, as BMv2 does
            self.packets[index] += 1
            self.bytes[index] += nbytes
