"""BMv2 sums a narrow-lane job's packets bit for bit as the soft switch does.

The p4src program adds 32-bit words and knows nothing of lanes; this runs
three ranks' windows (worker/window.py) with 16- and 8-bit lanes against the
soft switch's pipeline, records every frame they send, and replays those
frames into BMv2: every output frame must be the soft switch's, and the
ranks' results the lanes' exact fixed-point sum. Uses the namespace, veth
ports and configuration of tests/test_bmv2_differential.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from switchreduce import wire
from switchreduce.emulation.softswitch.engine import PythonDatapath
from switchreduce.worker.reference import reference_sum
from switchreduce.worker.window import Job, RoundTrip, Transfer, WindowStats, early_results
from tests.test_bmv2_differential import (  # noqa: F401  (bmv2: the fixture)
    SESSION,
    K,
    _cli_commands,
    _configured_switch,
    _drain,
    _frame,
    _soft_outputs,
    bmv2,
    pytestmark,
)

RANKS = 3
SLOTS = 8  # the configured job's


def _lanes_run(lanes: int) -> tuple[list[tuple[int, bytes]], list[np.ndarray], list[np.ndarray]]:
    """Every frame the ranks send through the soft switch (port, frame), their inputs and
    their results. Inputs sit at the lanes' extremes: levels +-m and 0."""
    below_one = np.nextafter(np.float32(1.0), np.float32(0.0))
    elements = 2 * K * 32 // lanes + 7
    rng = np.random.default_rng(lanes)
    inputs = [
        (rng.choice([-1.0, 0.0, 1.0, 0.37], elements) * below_one).astype(np.float32)
        for _ in range(RANKS)
    ]
    format = wire.encode_format("float32", 32, lanes)
    transfers = [
        Transfer(
            Job(1, r, RANKS, SLOTS, K, SESSION, lane_bits=lanes),
            inputs[r],
            format,
            [0] * SLOTS,
            RoundTrip(0.01, 1.0),
            WindowStats(),
            early_results(SLOTS, K),
        )
        for r in range(RANKS)
    ]
    datapath = PythonDatapath(_configured_switch())
    queue = [(r, d) for r, t in enumerate(transfers) for d in t.start(0.0)]
    frames = []
    while queue:
        rank, datagram = queue.pop(0)
        frame = _frame(rank + 1, payload=datagram)
        frames.append((rank + 1, frame))
        for port, out in datapath.process_frame(frame, rank + 1):
            answer = out[wire.L2_L4_BYTES :]
            queue += [(port - 1, d) for d in transfers[port - 1].receive(answer, 0.0)]
    assert all(t.done for t in transfers)
    return frames, inputs, [t.out for t in transfers]


@pytest.mark.parametrize("lanes", [16, 8])
def test_bmv2_sums_narrow_lanes_as_the_soft_switch_does(bmv2, lanes: int) -> None:  # noqa: F811
    socks, cli = bmv2
    frames, inputs, results = _lanes_run(lanes)
    per_packet = K * 32 // lanes
    expected = reference_sum(inputs, per_packet, lane_bits=lanes)
    assert np.abs(expected).max() == RANKS  # every rank at +-m somewhere: lanes full or empty
    for result in results:
        assert np.array_equal(result, expected)
    want, _ = _soft_outputs(frames, PythonDatapath)
    cli(_cli_commands(_configured_switch()))
    _drain(socks)
    for i, (port, frame) in enumerate(frames):
        socks[port].send(frame)
        time.sleep(0.15)
        got = sorted(_drain(socks))
        assert got == want[i], f"frame {i}: BMv2 {got!r} != soft switch {want[i]!r}"
    chunks = -(-inputs[0].size // per_packet)
    assert sum(len(w) for w in want) == RANKS * 2 * chunks  # each round's result to every rank
