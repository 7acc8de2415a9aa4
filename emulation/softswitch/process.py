"""The soft switch as a process of its own on loopback, with one static job.

What the bench, the experiment runner and the tests start when they need a
switch beside worker processes: ``switchreduce switch`` in UDP mode, its
address read from the line it prints when it listens, stopped by PID, its
counters kept from the line it prints when it stops.
"""

from __future__ import annotations

import json
import os
import subprocess

from switchreduce.emulation.errors import EmulationError
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.launch import cli_command, piped


class LoopbackSwitch:
    """Use as a context manager; ``address`` inside, ``report`` after."""

    def __init__(
        self,
        ports: list[int],
        k: int,
        slots: int,
        faults: FaultSpec | None = None,
        stderr=None,
    ) -> None:
        faults = faults or FaultSpec()
        self.command = cli_command(
            "switch", "--listen", "127.0.0.1:0", "--world-size", str(len(ports)),
            "--k", str(k), "--slots", str(slots),
            "--loss", str(faults.loss), "--duplicate", str(faults.duplicate),
            "--reorder", str(faults.reorder), "--seed", str(faults.seed),
            *(f"--worker={rank}=127.0.0.1:{port}" for rank, port in enumerate(ports)),
        )  # fmt: skip
        self.stderr = stderr
        self.address = ""
        #: Drops by reason, injected faults and CPU time, once the switch has stopped.
        self.report: dict | None = None

    def __enter__(self) -> LoopbackSwitch:
        self.proc = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        ready = piped(self.proc.stdout).readline().split()
        if not ready or ready[0] != "listening":
            self.__exit__()
            raise EmulationError(f"the soft switch did not start (said {ready!r})")
        self.address = ready[1]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        lines = out.strip().splitlines()
        self.report = json.loads(lines[-1]) if lines else None
