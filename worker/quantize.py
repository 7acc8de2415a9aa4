"""float32 <-> int32 fixed point that cannot overflow in the switch's 32-bit adders.

Each block of K elements (one packet) is scaled by a power of two chosen from
the largest magnitude any worker holds in that block, as in SwitchML. Every
worker computes its block's exponent ``e`` (the smallest with max|x| < 2**e),
the switch reduces the exponents with max, and every worker then quantizes
the block with the same scale::

    m     = floor((2**(b-1) - 1) / n)     # n = world size, b = precision bits (32)
    scale = m / 2**e
    q     = round_half_even(x * scale)    # |x| < 2**e  =>  |q| <= m

so the sum of n contributions is at most n*m <= INT32_MAX in magnitude and
the switch's integer sum is exact. ``b`` below 32 coarsens the grid on
purpose, to study what precision training needs; the bound below holds for
every b, with its scale. Dequantizing gives, for every element::

    |result - sum_i x_i| <= n * (1/2 + 2**-20) / scale + ulp32(result) / 2

(one half-unit of rounding per worker, a negligible float64 product error,
and the final rounding to float32). A sum beyond float32's range becomes
+-inf, as float32 addition gives (and as loss scalers look for). With n = 4
and e = 0 the first term is about 1.9e-9. Exponents travel as one byte,
``e + EXPONENT_BIAS``, with 0 meaning "no data" so that max over workers
ignores empty blocks.

Narrow lanes (``lane_bits`` L = 16 or 8; wire.encode_lanes lays them out):
a 32-bit word carries 32 / L elements, and the switch still adds words.
Each rank's level is then ``m = floor((2**L - 1) / (2n))`` and a level
``q`` in [-m, m] travels biased, as ``q + m`` in [0, 2m]; n of them sum to
at most ``2nm <= 2**L - 1``, so no lane carries into the next, and the
rank subtracts ``n * m`` from each lane's sum. The grid is the lane's
(``precision_bits`` stays 32), and the bound above holds with this ``m``:
about ``n**2 * 2**e / 2**L`` per element, e.g. for e = 0 and n = 4,
2.4e-4 with 16-bit lanes and 6.3e-2 with 8-bit ones (m = 3 for n = 32).

Stochastic rounding (an option beside round-to-nearest) takes
``q = floor(x * scale + u)`` with ``u`` in [0, 1) drawn per element, so
``q`` is ``x * scale`` in expectation and still in [-m, m]; each worker
then errs by less than one unit, so the bound's 1/2 becomes 1. ``u`` is
:func:`uniforms`: splitmix64 of a per-call key plus the element's index,
its top 53 bits over 2**53, which the compiled engine computes alike, so
both engines send the same packets.

A level is clamped to [-m, m]. That changes nothing while every rank's
exponent is in the max (``|x| < 2**e`` bounds it already); it keeps the
sums exact when a quorum of the ranks completed the round that carried
this rank's exponent without it, so the agreed ``e`` can be below this
rank's own: its larger elements are then cut to ``+-m / scale`` (error
feedback carries the cut part to the next step). A quorum's k
contributions sum as n would, the lanes' sums minus ``k * m``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from switchreduce import wire
from switchreduce.wire import EXPONENT_BIAS, EXPONENT_MIN, EXPONENT_NONE
from switchreduce.worker.errors import NonFiniteError

INT32_MAX = np.iinfo(np.int32).max
#: The switch's adders are 32 bits wide; fewer bits only coarsen the grid.
MAX_BITS = 32
MIN_BITS = 8
#: Per-element rounding allowance per worker, in units of 1/scale (see module docstring).
ROUNDING_UNITS = 0.5 + 2.0**-20
#: The same with stochastic rounding: less than one unit, and the product's error.
STOCHASTIC_UNITS = 1.0 + 2.0**-20
_MASK64 = (1 << 64) - 1
#: How a float element meets the grid: round to nearest (ties to even), or stochastically.
Rounding = Literal["nearest", "stochastic"]
ROUNDINGS: tuple[Rounding, ...] = ("nearest", "stochastic")


def splitmix64(value: int) -> int:
    """Steele, Lea and Flood's splitmix64 finalizer of a 64-bit value (bijective, well mixed)."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def call_key(seed: int, rank: int, call: int) -> int:
    """The noise key of a rank's ``call``-th allreduce: distinct streams per rank and call."""
    return splitmix64(splitmix64(splitmix64(seed & _MASK64) ^ rank) ^ call)


def uniforms(key: int, first: int, count: int) -> np.ndarray:
    """Stochastic rounding's ``u`` for elements ``first .. first + count - 1`` of a call:
    splitmix64(key + index) (mod 2**64), its top 53 bits times 2**-53, in [0, 1)."""
    z = np.arange(first, first + count, dtype=np.uint64) + np.uint64(key)
    z += np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def check_finite(values: np.ndarray) -> None:
    """Raise before anything is sent if a float tensor holds NaN or Inf."""
    if values.dtype.kind == "f" and values.size and not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values))
        raise NonFiniteError(
            f"tensor holds {bad.size} non-finite value(s) (first at index {bad[0]}: "
            f"{values.flat[bad[0]]!r}); NaN and Inf cannot be aggregated in fixed point"
        )


def block_exponents(blocks: np.ndarray) -> np.ndarray:
    """Exponent byte per row of ``blocks`` (shape (B, K)): e + bias, or 0 for all-zero rows."""
    if not blocks.size:
        return np.zeros(len(blocks), dtype=np.uint8)
    # max(max, -min) rather than max(abs): no temporary the size of the tensor
    peak = np.maximum(blocks.max(axis=1), -blocks.min(axis=1)).astype(np.float64)
    _, exp = np.frexp(peak)  # peak = mant * 2**exp with mant in [0.5, 1), so peak < 2**exp
    exp = np.maximum(exp, EXPONENT_MIN)
    return np.where(peak > 0, exp + EXPONENT_BIAS, EXPONENT_NONE).astype(np.uint8)


def check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"precision must be {MIN_BITS}..{MAX_BITS} bits, got {bits}")


def peak_level(world_size: int, bits: int = MAX_BITS, lane_bits: int = MAX_BITS) -> int:
    """``m``: the largest level one worker may contribute, so that n of them fit ``bits``
    (signed, 32-bit lanes) or, biased by ``m``, a lane of ``lane_bits`` (16 or 8)."""
    check_bits(bits)
    if wire.check_lanes(lane_bits) != MAX_BITS:
        return (2**lane_bits - 1) // (2 * world_size)
    return (2 ** (bits - 1) - 1) // world_size


def scales(
    exponents: np.ndarray, world_size: int, bits: int = MAX_BITS, lane_bits: int = MAX_BITS
) -> np.ndarray:
    """Scale factor per block for the agreed exponent bytes (any for all-zero blocks)."""
    e = np.asarray(exponents, dtype=np.int32) - EXPONENT_BIAS
    return np.ldexp(float(peak_level(world_size, bits, lane_bits)), -e)


def to_lanes(levels: np.ndarray, world_size: int, lane_bits: int) -> np.ndarray:
    """One rank's levels (in [-m, m]) biased into unsigned lanes (in [0, 2m])."""
    return (levels + peak_level(world_size, lane_bits=lane_bits)).astype(np.uint32)


def from_lanes(
    sums: np.ndarray, world_size: int, lane_bits: int, contributors: int | None = None
) -> np.ndarray:
    """The signed sum of levels from the lanes' sums: each lane minus k * m (int64), for the
    k ``contributors`` in the sums (a quorum of the ``world_size`` ranks; all of them if None)."""
    k = world_size if contributors is None else contributors
    return sums.astype(np.int64) - k * peak_level(world_size, lane_bits=lane_bits)


def quantize_block(
    block: np.ndarray,
    exponent: int,
    world_size: int,
    bits: int = MAX_BITS,
    lane_bits: int = MAX_BITS,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """int32 fixed point of one block for its agreed exponent byte (rounded stochastically
    with ``noise``, :func:`uniforms` of its elements, else to nearest).

    ``x * (m / 2**e)`` is one rounding of the exact product (``m / 2**e`` is
    exact in float64), so this equals the matching row of :func:`quantize`
    bit for bit; the worker quantizes each block as its exponent arrives.
    """
    level = peak_level(world_size, bits, lane_bits)
    scale = math.ldexp(float(level), EXPONENT_BIAS - int(exponent))
    scaled = np.multiply(block, scale, dtype=np.float64)
    if noise is not None:
        np.floor(np.add(scaled, noise, out=scaled), out=scaled)
    else:
        np.rint(scaled, out=scaled)
    return np.clip(scaled, -level, level, out=scaled).astype(np.int32)


def quantize(
    blocks: np.ndarray,
    exponents: np.ndarray,
    world_size: int,
    bits: int = MAX_BITS,
    lane_bits: int = MAX_BITS,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """int32 fixed point of ``blocks`` (shape (B, K)) for agreed exponent bytes (shape (B,)),
    rounded stochastically with ``noise`` (shaped like ``blocks``), else to nearest."""
    scaled = blocks.astype(np.float64) * scales(exponents, world_size, bits, lane_bits)[:, None]
    scaled = np.floor(scaled + noise) if noise is not None else np.rint(scaled)
    level = peak_level(world_size, bits, lane_bits)
    return np.clip(scaled, -level, level, out=scaled).astype(np.int32)


def own_contribution(
    flat: np.ndarray,
    exponents: np.ndarray,
    world_size: int,
    chunk_elements: int,
    bits: int = MAX_BITS,
    lane_bits: int = MAX_BITS,
    noise_key: int | None = None,
) -> np.ndarray:
    """What one rank's float32 ``flat`` added to the sum (float64): its levels, as the window
    quantized them with the agreed exponents (one per chunk of ``chunk_elements``), over the
    scale. Error feedback keeps ``flat`` minus this for the next call."""
    chunks = len(exponents)
    blocks = np.zeros((chunks, chunk_elements), dtype=np.float32)
    blocks.reshape(-1)[: flat.size] = flat
    noise = None
    if noise_key is not None:
        noise = uniforms(noise_key, 0, blocks.size).reshape(blocks.shape)
    levels = quantize(blocks, exponents, world_size, bits, lane_bits, noise)
    own = levels / scales(exponents, world_size, bits, lane_bits)[:, None]
    return own.reshape(-1)[: flat.size]


def dequantize(
    sums: np.ndarray,
    exponents: np.ndarray,
    world_size: int,
    bits: int = MAX_BITS,
    lane_bits: int = MAX_BITS,
) -> np.ndarray:
    """float32 value of integer block sums (shape (B, K)) for their exponent bytes."""
    values = sums.astype(np.float64) / scales(exponents, world_size, bits, lane_bits)[:, None]
    with np.errstate(over="ignore"):  # beyond float32's range is +-inf, as in float32 sums
        return values.astype(np.float32)


def error_bound(
    exponents: np.ndarray,
    world_size: int,
    result: np.ndarray,
    bits: int = MAX_BITS,
    lane_bits: int = MAX_BITS,
    stochastic: bool = False,
) -> np.ndarray:
    """The documented per-element bound on |dequantized sum - exact sum| (finite results)."""
    scale = scales(exponents, world_size, bits, lane_bits)[:, None]
    quant = world_size * (STOCHASTIC_UNITS if stochastic else ROUNDING_UNITS) / scale
    with np.errstate(over="ignore"):
        ulp = np.spacing(np.abs(result).astype(np.float32)).astype(np.float64)
    return quant + ulp / 2
