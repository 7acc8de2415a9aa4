"""Errors raised by the emulation package (soft switch, topologies)."""

from __future__ import annotations


class EmulationError(Exception):
    """Base class for emulation failures."""


class TableError(EmulationError):
    """A table write the switch refuses; ``code`` is the P4Runtime status it maps to."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code
