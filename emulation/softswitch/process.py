"""The soft switch as a process of its own on loopback, with one static job.

What the bench, the experiment runner and the tests start when they need a
switch beside worker processes: ``switchreduce switch`` in UDP mode, its
address read from the line it says when it listens, stopped by PID, its
counters kept from the report it ends with.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from switchreduce.emulation.softswitch.engine import EngineName
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.launch import LISTENING, Child, cli_command


class LoopbackSwitch:
    """Use as a context manager; ``address`` inside, ``report`` after. Its stderr goes to
    ``log`` when given."""

    def __init__(
        self,
        ports: list[int],
        k: int,
        slots: int,
        faults: FaultSpec | None = None,
        log: Path | None = None,
        engine: EngineName = "compiled",
        quorum: int | None = None,
    ) -> None:
        faults = faults or FaultSpec()
        self.command = cli_command(
            "switch", "--listen", "127.0.0.1:0", "--world-size", str(len(ports)),
            "--k", str(k), "--slots", str(slots),
            "--loss", str(faults.loss), "--duplicate", str(faults.duplicate),
            "--reorder", str(faults.reorder), "--seed", str(faults.seed), "--engine", engine,
            *(f"--worker={rank}=127.0.0.1:{port}" for rank, port in enumerate(ports)),
            *(("--quorum", str(quorum)) if quorum is not None else ()),
        )  # fmt: skip
        self.log = log
        self.address = ""
        #: Its engine, drops by reason, injected faults, packets and CPU time, once it has stopped.
        self.report: dict[str, Any] | None = None

    def __enter__(self) -> LoopbackSwitch:
        self.child = Child(self.command, "the soft switch", log=self.log)
        with self.child.killed_on_error():
            self.address = self.child.wait_for(LISTENING)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.child.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.report = self.child.report(timeout=0)
