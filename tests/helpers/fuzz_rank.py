"""One rank for the restart fuzz (tests/test_restart_fuzz.py): allreduce after allreduce.

Every call sums int32 tensors every rank can rebuild from the seed, so the
rank checks each result itself and prints one JSON line per call; a failure
prints the exception's type and message and exits 3.

    fuzz_rank.py SWITCH_HOST:PORT BIND_PORT RANK WORLD_SIZE SEED CALLS TIMEOUT SLOTS
"""

from __future__ import annotations

import json
import sys

import numpy as np

from worker.errors import WorkerError
from worker.shim import JobBinding, SwitchCommunicator, WorkerOptions


def call_inputs(seed: int, call: int, world_size: int) -> list[np.ndarray]:
    size = int(np.random.default_rng([seed, call]).integers(1, 3000))
    return [
        np.random.default_rng([seed, call, r]).integers(-(2**20), 2**20, size, dtype=np.int32)
        for r in range(world_size)
    ]


def main() -> int:
    switch, bind_port, rank, world_size, seed, calls, timeout, slots = sys.argv[1:9]
    host, port = switch.rsplit(":", 1)
    rank, world_size, seed = int(rank), int(world_size), int(seed)
    binding = JobBinding(1, rank, world_size, int(slots), (host, int(port)))
    try:
        comm = SwitchCommunicator(
            binding, WorkerOptions(k=64, timeout=float(timeout)), bind=("127.0.0.1", int(bind_port))
        )
        with comm:
            for call in range(int(calls)):
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
