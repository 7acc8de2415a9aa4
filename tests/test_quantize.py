"""The quantizer: never overflows the switch's int32 adders, and stays within its bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from switchreduce.worker import quantize as q
from switchreduce.worker.errors import NonFiniteError

pytestmark = pytest.mark.fast

K = 64

finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
blocks_of = hnp.arrays(
    np.float32, st.tuples(st.integers(1, 4), st.just(K)), elements=finite_float32
)


@st.composite
def worker_blocks(draw):
    """Inputs of n workers with magnitudes spread over float32's whole range."""
    n = draw(st.integers(1, 32))
    shape = (draw(st.integers(1, 3)), K)
    return [draw(hnp.arrays(np.float32, shape, elements=finite_float32)) for _ in range(n)]


@settings(max_examples=300, deadline=None)
@given(worker_blocks(), st.integers(q.MIN_BITS, q.MAX_BITS))
def test_sum_never_overflows_and_stays_within_bound(inputs: list[np.ndarray], bits: int) -> None:
    n = len(inputs)
    exps = np.max([q.block_exponents(b) for b in inputs], axis=0)
    quantized = [q.quantize(b, exps, n, bits).astype(np.int64) for b in inputs]
    total = np.sum(quantized, axis=0)
    assert np.abs(total).max() <= 2 ** (bits - 1) - 1
    result = q.dequantize(total.astype(np.int32), exps, n, bits)
    exact = np.sum([b.astype(np.float64) for b in inputs], axis=0)
    bound = q.error_bound(exps, n, result, bits)
    finite = np.isfinite(result)
    error = np.abs(result[finite].astype(np.float64) - exact[finite])
    assert (error <= bound[finite]).all()
    # Only sums that leave float32's range become infinite, with their sign.
    overflow = ~finite
    quantization = q.error_bound(exps, n, np.zeros_like(result), bits)
    assert (np.abs(exact[overflow]) + quantization[overflow] > np.finfo(np.float32).max).all()
    assert (np.sign(result[overflow]) == np.sign(exact[overflow])).all()


@settings(max_examples=100, deadline=None)
@given(blocks_of)
def test_blockwise_quantization_equals_whole_tensor_quantization(blocks: np.ndarray) -> None:
    """The worker's per-block path is bit-identical to the vectorized one the reference uses."""
    exps = q.block_exponents(blocks)
    whole = q.quantize(blocks, exps, 4)
    for i in range(len(blocks)):
        assert np.array_equal(q.quantize_block(blocks[i], int(exps[i]), 4), whole[i])


def test_exponent_is_smallest_power_of_two_above_the_peak() -> None:
    blocks = np.zeros((4, K), dtype=np.float32)
    blocks[0, 3] = 1.0  # 1.0 < 2**1
    blocks[1, 0] = -0.75  # 0.75 < 2**0
    blocks[2, 5] = np.finfo(np.float32).max  # < 2**128
    exps = q.block_exponents(blocks).astype(int) - q.EXPONENT_BIAS
    assert exps[:3].tolist() == [1, 0, 128]
    assert q.block_exponents(blocks)[3] == q.EXPONENT_NONE  # all-zero block


@pytest.mark.parametrize("n", [1, 3, 4, 32])
def test_a_block_peak_uses_its_whole_share_of_int32(n: int) -> None:
    """The largest value of a block maps to floor(INT32_MAX / n) within float32 resolution."""
    peak = np.nextafter(np.float32(1.0), np.float32(0))  # the largest float32 below 2**0
    block = np.full((1, K), peak, dtype=np.float32)
    quantized = int(q.quantize(block, q.block_exponents(block), n).max())
    share = q.INT32_MAX // n
    assert share * (1 - 2**-23) <= quantized <= share


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise_with_their_index(bad: float) -> None:
    values = np.ones(100, dtype=np.float32)
    values[42] = bad
    with pytest.raises(NonFiniteError, match="index 42"):
        q.check_finite(values)


@settings(max_examples=300, deadline=None)
@given(worker_blocks(), st.sampled_from([16, 8]))
def test_narrow_lanes_never_carry_and_stay_within_their_bound(
    inputs: list[np.ndarray], lane_bits: int
) -> None:
    """Biased levels of n ranks sum within one lane, and the lanes' sum meets the bound."""
    n = len(inputs)
    exps = np.max([q.block_exponents(b) for b in inputs], axis=0)
    levels = [q.quantize(b, exps, n, lane_bits=lane_bits) for b in inputs]
    lanes = np.sum([q.to_lanes(x, n, lane_bits).astype(np.int64) for x in levels], axis=0)
    assert lanes.min() >= 0 and lanes.max() <= 2**lane_bits - 1
    result = q.dequantize(q.from_lanes(lanes, n, lane_bits), exps, n, lane_bits=lane_bits)
    exact = np.sum([b.astype(np.float64) for b in inputs], axis=0)
    bound = q.error_bound(exps, n, result, lane_bits=lane_bits)
    finite = np.isfinite(result)
    error = np.abs(result[finite].astype(np.float64) - exact[finite])
    assert (error <= bound[finite]).all()


@pytest.mark.parametrize("lane_bits", [16, 8])
@pytest.mark.parametrize("n", range(1, 33))
def test_lane_level_is_documented_and_leaves_no_room_for_a_carry(lane_bits: int, n: int) -> None:
    m = q.peak_level(n, lane_bits=lane_bits)
    assert m == (2**lane_bits - 1) // (2 * n) and m >= 3
    assert 2 * n * m <= 2**lane_bits - 1 < 2 * n * (m + 1)


@settings(max_examples=200, deadline=None)
@given(worker_blocks(), st.sampled_from([32, 16, 8]), st.integers(0, 2**64 - 1))
def test_stochastic_rounding_stays_in_range_and_within_its_bound(
    inputs: list[np.ndarray], lane_bits: int, seed: int
) -> None:
    n = len(inputs)
    exps = np.max([q.block_exponents(b) for b in inputs], axis=0)
    noise = [q.uniforms(q.call_key(seed, r, 1), 0, b.size).reshape(b.shape) for r, b in
             enumerate(inputs)]  # fmt: skip
    levels = [q.quantize(b, exps, n, lane_bits=lane_bits, noise=u) for b, u in
              zip(inputs, noise, strict=True)]  # fmt: skip
    m = q.peak_level(n, lane_bits=lane_bits)
    assert all(np.abs(x).max() <= m for x in levels)
    total = np.sum([x.astype(np.int64) for x in levels], axis=0)
    result = q.dequantize(total, exps, n, lane_bits=lane_bits)
    exact = np.sum([b.astype(np.float64) for b in inputs], axis=0)
    bound = q.error_bound(exps, n, result, lane_bits=lane_bits, stochastic=True)
    finite = np.isfinite(result)
    assert (np.abs(result[finite].astype(np.float64) - exact[finite]) <= bound[finite]).all()


def test_stochastic_rounding_is_unbiased_where_rounding_to_nearest_is_not() -> None:
    """A level of 0.3 rounds to 0 every time to nearest, and to 1 in about 30% of calls
    stochastically (4,000 calls: the mean is within 5 standard errors of 0.3)."""
    m = q.peak_level(1, lane_bits=8)
    block = np.full((1, K), np.float32(0.3 / m), dtype=np.float32)  # levels 0.3: e = 0
    block[0, 0] = np.nextafter(np.float32(1.0), np.float32(0.0))
    exps = q.block_exponents(block)
    scaled = float(np.float64(block[0, 1]) * m)
    calls = [
        q.quantize(block, exps, 1, lane_bits=8, noise=q.uniforms(q.call_key(3, 0, c), 0, K)[None])
        for c in range(4000)
    ]
    ones = np.array([x[0, 1:] for x in calls], dtype=np.float64)
    assert set(np.unique(ones)) == {0.0, 1.0}
    spread = np.sqrt(scaled * (1 - scaled) / ones.size)
    assert abs(ones.mean() - scaled) < 5 * spread
    assert not q.quantize(block, exps, 1, lane_bits=8)[0, 1:].any()  # to nearest: always 0


def test_uniforms_are_splitmix64_of_key_plus_index() -> None:
    """The generator the compiled engine mirrors, pinned to splitmix64's reference value."""
    assert q.splitmix64(0) == 0xE220A8397B1DCDAF  # the first output of splitmix64 seeded 0
    key = q.call_key(1, 2, 3)
    expected = [(q.splitmix64((key + i) % 2**64) >> 11) * 2.0**-53 for i in range(10, 14)]
    assert q.uniforms(key, 10, 4).tolist() == expected


@pytest.mark.parametrize("lane_bits", [32, 16, 8])
@pytest.mark.parametrize("stochastic", [False, True])
def test_a_block_above_the_agreed_exponent_is_clamped_to_the_peak_level(
    lane_bits: int, stochastic: bool
) -> None:
    """A rank whose exponent a quorum did not hear quantizes with a smaller one: its levels are
    cut to +-m, so n of them still fit the switch's adders and lanes."""
    n, m = 4, q.peak_level(4, lane_bits=lane_bits)
    block = np.array([-100.0, -1.5, -0.25, 0.0, 0.25, 1.5, 100.0], dtype=np.float32)
    noise = q.uniforms(7, 0, block.size) if stochastic else None
    levels = q.quantize_block(block, q.EXPONENT_BIAS, n, lane_bits=lane_bits, noise=noise)
    assert levels.tolist()[0] == -m and levels.tolist()[-1] == m and levels[3] == 0
    assert (np.abs(levels) <= m).all()
    batch = q.quantize(block[None, :], np.array([q.EXPONENT_BIAS]), n, lane_bits=lane_bits,
                       noise=None if noise is None else noise[None, :])  # fmt: skip
    assert batch[0].tolist() == levels.tolist()
