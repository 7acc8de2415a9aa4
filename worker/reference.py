"""Synthetic tensors and the reference sums a run is checked against.

Every rank can rebuild every other rank's tensor from the seed, so a worker
checks its own result without shipping it anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from switchreduce.worker import quantize as q


def synthetic_tensor(seed: int, rank: int, elements: int, dtype: str) -> np.ndarray:
    """Rank ``rank``'s input: normal floats, or int32 small enough never to overflow."""
    rng = np.random.default_rng([seed, rank])
    if dtype == "float32":
        return rng.standard_normal(elements, dtype=np.float32)
    if dtype == "int32":
        return rng.integers(-(2**20), 2**20, elements, dtype=np.int32)
    raise ValueError(f"dtype must be float32 or int32, got {dtype!r}")


@dataclass(frozen=True)
class Check:
    """How a result compares with the references."""

    exact: bool  # bit-identical to the fixed-point (or integer) sum computed locally
    max_abs_error: float  # against the float64 sum of the inputs
    within_bound: bool  # every element within worker.quantize's documented bound


def reference_sum(
    inputs: list[np.ndarray],
    k: int,
    bits: int = q.MAX_BITS,
    lane_bits: int = q.MAX_BITS,
    noise_keys: list[int] | None = None,
) -> np.ndarray:
    """What the switch must return: the integer sum, or the dequantized fixed-point sum
    (``k``: elements per packet, which narrow lanes multiply; ``noise_keys``: each rank's
    stochastic rounding key, or None for rounding to nearest)."""
    if inputs[0].dtype == np.int32:
        return np.stack(inputs).sum(axis=0, dtype=np.int64).astype(np.int32)
    n = len(inputs)
    blocks = [_blocks(x, k) for x in inputs]
    exps = np.max([q.block_exponents(b) for b in blocks], axis=0)
    noise: list[np.ndarray | None] = [None] * n
    if noise_keys is not None:
        noise = [
            q.uniforms(key, 0, b.size).reshape(b.shape)
            for key, b in zip(noise_keys, blocks, strict=True)
        ]
    levels = [
        q.quantize(b, exps, n, bits, lane_bits, u) for b, u in zip(blocks, noise, strict=True)
    ]
    total = np.stack(levels).sum(axis=0, dtype=np.int64)
    peak = q.INT32_MAX if lane_bits == q.MAX_BITS else n * q.peak_level(n, lane_bits=lane_bits)
    assert np.abs(total).max(initial=0) <= peak, "quantizer overflowed its lanes"
    return q.dequantize(total, exps, n, bits, lane_bits).reshape(-1)[: inputs[0].size]


def check(
    result: np.ndarray,
    inputs: list[np.ndarray],
    k: int,
    bits: int = q.MAX_BITS,
    lane_bits: int = q.MAX_BITS,
    noise_keys: list[int] | None = None,
) -> Check:
    exact_sum = np.sum([x.astype(np.float64) for x in inputs], axis=0)
    error = np.abs(result.astype(np.float64) - exact_sum)  # inf where float32 overflowed
    expected = reference_sum(inputs, k, bits, lane_bits, noise_keys)
    if result.dtype == np.int32:
        bound = np.zeros_like(error)
    else:
        n = len(inputs)
        exps = np.max([q.block_exponents(_blocks(x, k)) for x in inputs], axis=0)
        stochastic = noise_keys is not None
        bound = q.error_bound(exps, n, _blocks(result, k), bits, lane_bits, stochastic)
        bound = bound.reshape(-1)[: result.size]
    return Check(
        exact=bool(np.array_equal(result, expected)),
        max_abs_error=float(error.max(initial=0.0)),
        within_bound=bool((error <= bound).all()),
    )


def _blocks(x: np.ndarray, k: int) -> np.ndarray:
    padded = np.zeros(-(-x.size // k) * k, dtype=x.dtype)
    padded[: x.size] = x.reshape(-1)
    return padded.reshape(-1, k)
