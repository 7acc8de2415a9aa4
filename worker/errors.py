"""Errors raised by the worker package."""

from __future__ import annotations


class WorkerError(Exception):
    """Base class for worker-side failures that are not timeouts."""


class NonFiniteError(WorkerError, ValueError):
    """The tensor holds NaN or Inf, which fixed point cannot carry."""
