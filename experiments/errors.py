"""Errors of the experiment runner."""

from __future__ import annotations


class ExperimentError(Exception):
    """An experiment could not run to the end."""


class ConfigError(ExperimentError, ValueError):
    """A config file is malformed: an unknown key, a wrong type, a value out of range."""
