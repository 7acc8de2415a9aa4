"""One rank for the restart fuzz (tests/test_restart_fuzz.py): allreduce after allreduce.

Every call sums int32 tensors every rank can rebuild from the seed, so the
rank checks each result itself and prints one JSON line per call; a failure
prints the exception's type and message and exits 3.

    fuzz_rank.py SWITCH_HOST:PORT BIND_PORT RANK WORLD_SIZE SEED CALLS TIMEOUT SLOTS
    fuzz_rank.py http://CONTROLLER RANK WORLD_SIZE SEED CALLS TIMEOUT K

The first joins a static job (the switch hands out the session), the second
registers with a controller and holds its membership while it sums.
"""

from __future__ import annotations

import json
import socket
import sys
from contextlib import ExitStack

import numpy as np

from switchreduce.worker.errors import WorkerError
from switchreduce.worker.registration import join
from switchreduce.worker.shim import JobBinding, SwitchCommunicator, WorkerOptions


def call_inputs(seed: int, call: int, world_size: int) -> list[np.ndarray]:
    size = int(np.random.default_rng([seed, call]).integers(1, 3000))
    return [
        np.random.default_rng([seed, call, r]).integers(-(2**20), 2**20, size, dtype=np.int32)
        for r in range(world_size)
    ]


def communicator(stack: ExitStack, args: list[str]) -> tuple[SwitchCommunicator, list[int]]:
    """The communicator for the command line's job, and [rank, world size, seed, calls]."""
    if args[0].startswith("http://"):
        controller, rank, world_size, seed, calls, timeout, k = args
        sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.bind(("127.0.0.1", 0))
        membership = stack.enter_context(
            join(
                sock,
                1,
                int(rank),
                int(world_size),
                int(k),
                controller=controller,
                timeout=float(timeout),
            )
        )
        options = WorkerOptions(k=int(k), timeout=float(timeout))
        comm = SwitchCommunicator(membership.binding, options, sock)
    else:
        switch, bind_port, rank, world_size, seed, calls, timeout, slots = args
        host, port = switch.rsplit(":", 1)
        binding = JobBinding(1, int(rank), int(world_size), int(slots), (host, int(port)))
        options = WorkerOptions(k=64, timeout=float(timeout))
        comm = SwitchCommunicator(binding, options, bind=("127.0.0.1", int(bind_port)))
    return stack.enter_context(comm), [int(rank), int(world_size), int(seed), int(calls)]


def main() -> int:
    try:
        with ExitStack() as stack:
            comm, (rank, world_size, seed, calls) = communicator(stack, sys.argv[1:])
            for call in range(calls):
                inputs = call_inputs(seed, call, world_size)
                result = comm.allreduce(inputs[rank])
                expected = np.sum(inputs, axis=0, dtype=np.int64).astype(np.int32)
                print(json.dumps({"call": call, "exact": bool(np.array_equal(result, expected))}))
                sys.stdout.flush()
    except (WorkerError, TimeoutError) as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
