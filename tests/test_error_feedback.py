"""Error feedback (EF-SGD) through a running soft switch: quantization error does not pile up.

Each rank keeps what its quantized contribution missed and adds it to the
same call position's tensor of the next step, so over T steps the summed
results miss the summed exact sums by about one step's error, where without
it the error of every step adds up. Both worker engines give the same sums.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import pytest

from switchreduce.worker import quantize as q
from switchreduce.worker import shim
from switchreduce.worker.engine import ENGINES, EngineName
from switchreduce.worker.errors import WorkerError
from switchreduce.worker.reference import reference_sum, synthetic_tensor
from switchreduce.worker.shim import WorkerOptions

K = 256
STEPS = 20
LENGTHS = (5_000, 700)  # two "buckets" a step


class _Common(TypedDict):
    """The WorkerOptions both runs of a comparison share."""

    k: int
    timeout: float
    lane_bits: int
    engine: EngineName


def _train(
    job_factory, world_size: int, options: WorkerOptions
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """STEPS steps of one allreduce per bucket (the same gradients every step): per bucket,
    the summed results, the exact sum of all steps and the largest gradient magnitude."""
    grads = [
        [synthetic_tensor(b, r, n, "float32") * 0.01 for r in range(world_size)]
        for b, n in enumerate(LENGTHS)
    ]
    totals = [np.zeros(n, np.float64) for n in LENGTHS]
    with job_factory(world_size, k=K, options=options) as job:
        for _ in range(STEPS):
            for bucket, inputs in enumerate(grads):
                results = job.allreduce(inputs)
                assert all(np.array_equal(r, results[0]) for r in results)
                totals[bucket] += results[0]
            for comm in job.comms:
                comm.step()
    exact = [np.sum([x.astype(np.float64) for x in g], axis=0) * STEPS for g in grads]
    peaks = [max(float(np.abs(x).max()) for x in g) for g in grads]
    return list(zip(totals, exact, peaks, strict=True))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("lanes", [8, 16])
def test_error_feedback_keeps_the_error_of_many_steps_at_about_one_steps(
    job_factory, lanes: int, engine: EngineName
) -> None:
    world_size = 3
    common: _Common = {"k": K, "timeout": 20.0, "lane_bits": lanes, "engine": engine}
    with_feedback = _train(job_factory, world_size, WorkerOptions(**common, error_feedback=True))
    without = _train(job_factory, world_size, WorkerOptions(**common))
    m = q.peak_level(world_size, lane_bits=lanes)
    for (fed, exact, peak), (plain, _, _) in zip(with_feedback, without, strict=True):
        # One unit of the grid: 2**e / m for the blocks' largest exponent (residuals included).
        e = int(np.frexp(peak * 1.01)[1])
        unit = 2.0**e / m
        fed_error = np.abs(fed - exact).max()
        plain_error = np.abs(plain - exact).max()
        assert fed_error <= world_size * unit / 2 + 1e-6  # the last residuals, float32 sums
        assert plain_error > 5 * fed_error


def test_both_engines_feed_back_alike(job_factory) -> None:
    """Error feedback is a step on each rank's float32 input, so both engines give the same
    sums bit for bit, step after step (8-bit lanes and stochastic rounding included)."""
    sums = {}
    for engine in ENGINES:
        options = WorkerOptions(
            k=K, timeout=20.0, lane_bits=8, error_feedback=True, rounding="stochastic",
            rounding_seed=5, engine=engine,
        )  # fmt: skip
        sums[engine] = _train(job_factory, 2, options)
    for (a, _, _), (b, _, _) in zip(*sums.values(), strict=True):
        assert np.array_equal(a, b)


def test_a_call_of_another_length_at_a_position_starts_without_a_residual(job_factory) -> None:
    """The contract: position k of a step reuses position k's residual only at its length."""
    options = WorkerOptions(k=K, timeout=20.0, lane_bits=8, error_feedback=True)
    a, b = synthetic_tensor(1, 0, 1_000, "float32"), synthetic_tensor(2, 0, 500, "float32")
    plain_b = reference_sum([b], K * 4, lane_bits=8)
    with job_factory(1, k=K, options=options) as job:
        comm = job.comms[0]
        comm.allreduce(a)
        comm.step()
        assert np.array_equal(comm.allreduce(b), plain_b)  # a's residual is not b's
        comm.step()
        assert not np.array_equal(comm.allreduce(b), plain_b)  # b's own residual is


def test_calls_without_step_beyond_the_bound_are_refused_not_kept(job_factory, monkeypatch) -> None:
    """A residual per call position: a caller that never ends a step is told so, rather than
    holding a residual for every call it ever made."""
    monkeypatch.setattr(shim, "MAX_STEP_CALLS", 3)
    options = WorkerOptions(k=K, timeout=20.0, lane_bits=8, error_feedback=True)
    x = synthetic_tensor(1, 0, 1_000, "float32")
    with job_factory(1, k=K, options=options) as job:
        comm = job.comms[0]
        for _ in range(3):
            comm.allreduce(x)
        with pytest.raises(WorkerError, match="3 calls came without step"):
            comm.allreduce(x)
