"""A bare simple_switch_grpc for tests that talk P4Runtime to BMv2 itself."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from switchreduce.emulation.bmv2 import SIMPLE_SWITCH_GRPC, wait_for_p4runtime
from switchreduce.ports import free_tcp_port


@contextmanager
def simple_switch_grpc(log: Path) -> Iterator[str]:
    """A fresh simple_switch_grpc with no program, on loopback; yields its P4Runtime address.
    Its output goes to ``log``; it is stopped by its PID."""
    address = f"127.0.0.1:{free_tcp_port()}"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [SIMPLE_SWITCH_GRPC, "--device-id", "0", "--no-p4", "--thrift-port",
             str(free_tcp_port()), "--", "--grpc-server-addr", address],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_p4runtime(proc, address, log)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)
