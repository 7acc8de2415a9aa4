"""The P4 program on BMv2: compiling it with p4c, and waiting for ``simple_switch_grpc``.

Neither tool comes from a package registry; where they are missing, callers
say so (``bmv2_available``) and the soft switch stands in.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from switchreduce.emulation.errors import EmulationError
from switchreduce.p4program import P4_SOURCE

P4C = "p4c-bm2-ss"
SIMPLE_SWITCH_GRPC = "simple_switch_grpc"


def bmv2_available() -> bool:
    """Whether the BMv2 switch node can run here: simple_switch_grpc and p4c on PATH."""
    return shutil.which(SIMPLE_SWITCH_GRPC) is not None and shutil.which(P4C) is not None


@dataclass(frozen=True)
class CompiledProgram:
    bmv2_json: Path  # the device config BMv2 runs
    p4info: Path  # P4Info text, for the controller


def compile_program(out_dir: Path, k: int) -> CompiledProgram:
    """p4src/switchreduce.p4 for K elements per packet, into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    program = CompiledProgram(
        out_dir / f"switchreduce_k{k}.json", out_dir / f"switchreduce_k{k}.p4info.txtpb"
    )
    # Names relative to out_dir: p4c splits --p4runtime-files at commas, which a sweep's run
    # directories have (one parameter=value per sweep parameter, comma-separated).
    result = subprocess.run(
        [P4C, "--arch", "v1model", f"-DK={k}", "-o", program.bmv2_json.name,
         "--p4runtime-files", program.p4info.name, str(P4_SOURCE.resolve())],
        capture_output=True, text=True, cwd=out_dir,
    )  # fmt: skip
    if result.returncode != 0:
        raise EmulationError(f"p4c failed on {P4_SOURCE} with K={k}:\n{result.stderr[-3000:]}")
    return program


def wait_for_p4runtime(
    proc: subprocess.Popen, address: str, log: Path, timeout: float = 30
) -> None:
    """Return once the P4Runtime server at ``address`` accepts a channel; if the switch
    exits or never answers, fail with its log's tail."""
    import grpc

    deadline = time.monotonic() + timeout
    while True:
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                pass
        if proc.poll() is not None or time.monotonic() > deadline:
            state = "exited" if proc.poll() is not None else "did not answer"
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise EmulationError(f"simple_switch_grpc {state} ({address}):\n{tail}")
