"""Errors raised by the worker package.

Every failure of an allreduce through the switch is one of these, and each
names the job, the rank and the switch, so a log line says what to look at.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class for worker-side failures."""


class NonFiniteError(WorkerError, ValueError):
    """The tensor holds NaN or Inf, which fixed point cannot carry."""


class SwitchTimeoutError(WorkerError, TimeoutError):
    """No progress for the configured timeout: the switch, a peer or the path is gone.

    Socket errors on the way (an ICMP port unreachable while the switch
    restarts, say) are retried like losses and end here only if the switch
    does not come back within the timeout.
    """


class SessionEndedError(WorkerError):
    """The switch no longer takes this run's session: another run of the job has started."""


class MismatchError(WorkerError):
    """Ranks disagree on what they sum (dtype, length or precision); the switch refused it."""
