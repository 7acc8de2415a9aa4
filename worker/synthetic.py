"""``switchreduce worker``: one rank of a synthetic allreduce, checked where it runs.

Each rank sums a seeded random tensor through a backend and checks the
result against the sum it computes from every rank's seed, so a job needs
nothing but its ranks' command lines. It ends with a JSON report
(``launch.print_report``); with ``wait_for_go`` it first says READY and waits
for GO, so that a parent times the allreduce alone (the bench, the topology).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

from switchreduce import wire
from switchreduce.launch import print_report, wait_for_go
from switchreduce.worker import quantize as q
from switchreduce.worker.backends import GroupOptions, open_backend
from switchreduce.worker.reference import check, synthetic_tensor


@dataclass(frozen=True)
class SyntheticOptions:
    """One rank's part: the backend and group, and the tensor every rank can rebuild."""

    group: GroupOptions
    backend: str = "switch"
    elements: int = 1_000_000
    dtype: str = "float32"
    seed: int = 0
    wait_for_go: bool = False

    def __post_init__(self) -> None:
        if self.backend == "gloo" and self.group.master is None:
            raise ValueError("--master HOST:PORT is required with gloo")


def run(options: SyntheticOptions) -> int:
    """Sum, check, report; 0 unless a sum through the switch was not exact."""
    group = options.group
    data = synthetic_tensor(options.seed, group.rank, options.elements, options.dtype)
    with open_backend(options.backend, group) as backend:
        if options.wait_for_go:
            wait_for_go()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = backend.allreduce(data)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        usage = resource.getrusage(resource.RUSAGE_SELF)
        stats = backend.stats()
    inputs = [
        synthetic_tensor(options.seed, r, options.elements, options.dtype)
        for r in range(group.world_size)
    ]
    stochastic = group.rounding == "stochastic"
    noise_keys = [q.call_key(group.rounding_seed, r, 1) for r in range(group.world_size)]
    verdict = check(
        result,
        inputs,
        group.k * wire.lanes_per_word(group.lane_bits),  # elements per packet
        lane_bits=group.lane_bits,
        noise_keys=noise_keys if stochastic else None,  # the communicator's first call's
    )
    through_switch = options.backend == "switch"
    print_report(
        {
            "rank": group.rank,
            "backend": options.backend,
            "engine": group.engine if through_switch else None,
            "lane_bits": group.lane_bits if through_switch else None,
            "rounding": group.rounding if through_switch else None,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "context_switches": usage.ru_nvcsw + usage.ru_nivcsw,
            # gloo sums float32 in float32: neither the fixed-point reference nor its bound apply
            "exact": verdict.exact if through_switch else None,
            "within_bound": verdict.within_bound if through_switch else None,
            "max_abs_error": verdict.max_abs_error,
            **stats,
        }
    )
    return 0 if not through_switch or (verdict.exact and verdict.within_bound) else 1
