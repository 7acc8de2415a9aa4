"""Starting the project's own commands as child processes.

Every layer that runs a switch, controller or worker as a process (bench, topology,
experiment runner, tests) builds its command line here, so nothing below the CLI
imports the CLI.
"""

from __future__ import annotations

import sys
from typing import IO, AnyStr


def cli_command(*args: str) -> list[str]:
    """The command line that runs ``switchreduce ARGS...`` with this interpreter."""
    return [sys.executable, "-m", "switchreduce.cli", *args]


def piped(stream: IO[AnyStr] | None) -> IO[AnyStr]:
    """A child's stdin, stdout or stderr, which is there when it was started with PIPE."""
    if stream is None:
        raise ValueError("the process was started without this stream piped")
    return stream
