"""Errors raised by the controller package.

The registration API answers each with its own HTTP status (controller/api.py),
so a worker learns whether to fix its request, wait, or give up.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base class for control-plane failures."""


class AdmissionError(ControllerError, ValueError):
    """A job cannot be admitted (or released) as asked; nothing was left on the switch."""


class CapacityError(AdmissionError):
    """The switch has no room for the job now (slots, jobs); it may have later."""


class UnknownJobError(AdmissionError):
    """The job is not admitted (never was, or was released)."""


class SwitchUnavailableError(ControllerError):
    """The switch's P4Runtime server does not answer."""


class NotPrimaryError(ControllerError):
    """Another controller holds a higher election id: this one may not write."""


class WriteError(ControllerError):
    """The switch refused a write; ``failures`` holds (google.rpc code, message) per update."""

    def __init__(self, message: str, failures: list[tuple[int, str]]) -> None:
        super().__init__(message)
        self.failures = failures
