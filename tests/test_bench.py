"""The bench's baselines: gloo on loopback beside the soft switch, and its options.

The Mininet side (gloo through the switch and over a Linux bridge) is in
test_mininet.py.
"""

from __future__ import annotations

import json

import pytest

from switchreduce import wire
from switchreduce.emulation.bridge import SCALE, loss_ruleset
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.topo import TopoOptions
from switchreduce.experiments import bench
from tests.helpers.processes import left_behind, record_children


def test_the_loopback_bench_times_gloo_on_loopback_too(capsys, monkeypatch) -> None:
    """The same tensor between as many gloo processes on loopback: its time, its rate and the
    switch's ratio to it, all positive; no process of either run is left."""
    children = record_children(monkeypatch)
    options = bench.BenchOptions(workers=2, elements=200_000, timeout=60, as_json=True)
    assert bench.run_bench(options) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["exact"] and report["seconds"] > 0
    assert report["gloo_seconds"] > 0 and report["gloo_elements_per_s"] > 0
    # the times are rounded to 0.1 ms, and gloo may take only a few ms here
    assert report["ratio_gloo"] == pytest.approx(report["seconds"] / report["gloo_seconds"], 0.05)
    assert report["gloo_max_abs_error"] < 1e-5  # gloo sums float32 in float32
    names = [child.name for child in children]
    assert names == [
        "the soft switch",
        "worker rank 0",
        "worker rank 1",
        "gloo rank 0",
        "gloo rank 1",
    ]
    assert not any(left_behind(child.pid) for child in children)


def test_narrow_lanes_in_the_bench_send_fewer_bytes_and_sum_what_the_reference_says(
    capsys,
) -> None:
    """``bench allreduce --lane-bits 8|16 --rounding ...``: every rank's result is bit for bit
    the reference's for its lanes and noise (exact), and the workers' bytes fall to the
    issue's bounds against 32-bit lanes (a tensor large enough that the window's priming
    packets do not count), measured in the same run of the test."""
    sent = {}
    for lanes, rounding in ((32, "nearest"), (16, "stochastic"), (8, "nearest")):
        options = bench.BenchOptions(
            workers=3, elements=2_000_000, timeout=60, lane_bits=lanes, rounding=rounding,
            as_json=True,
        )  # fmt: skip
        assert bench.run_bench(options) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["exact"] and report["within_bound"]
        assert (report["lane_bits"], report["rounding"]) == (lanes, rounding)
        resent = report["retransmissions"] * (wire.HEADER_BYTES + 4 * report["k"])
        sent[lanes] = report["bytes_sent"] - resent
    assert sent[16] <= 0.55 * sent[32] and sent[8] <= 0.3 * sent[32]


@pytest.mark.fast
def test_lanes_and_rounding_are_checked() -> None:
    with pytest.raises(ValueError, match="lane width"):
        bench.BenchOptions(lane_bits=4)
    with pytest.raises(ValueError, match="rounding"):
        bench.BenchOptions(rounding="up")


@pytest.mark.fast
def test_the_largest_k_is_what_the_mtu_carries() -> None:
    assert wire.largest_k(1500) == wire.MAX_K_STANDARD_MTU == 256
    assert wire.largest_k(9000) == 1024
    assert wire.largest_k(wire.ip_packet_bytes(512)) == 512
    assert wire.largest_k(wire.ip_packet_bytes(512) - 1) == 256
    with pytest.raises(ValueError, match="no supported K fits"):
        wire.largest_k(300)


@pytest.mark.fast
def test_jumbo_frames_take_k_up_to_1024_in_mininet() -> None:
    assert bench.BenchOptions(topo="mininet").topology().k == 256
    jumbo = bench.BenchOptions(topo="mininet", mtu=9000).topology()
    assert (jumbo.k, jumbo.mtu) == (1024, 9000)
    assert TopoOptions(k=1024, mtu=9000).k == 1024
    with pytest.raises(ValueError, match="1500-byte MTU; use K <= 256 \\(or jumbo frames"):
        TopoOptions(k=512)
    with pytest.raises(ValueError, match="MTU must be"):
        TopoOptions(mtu=100)


@pytest.mark.fast
def test_link_options_are_mininet_s() -> None:
    with pytest.raises(ValueError, match="Mininet's"):
        bench.BenchOptions(mtu=9000)
    with pytest.raises(ValueError, match="Mininet's"):
        bench.BenchOptions(bw=20)
    assert bench.BenchOptions(topo="mininet", engine="python").topology().engine == "python"
    with pytest.raises(ValueError, match="the soft switch's"):
        bench.BenchOptions(topo="mininet", switch="bmv2", engine="python")


@pytest.mark.fast
def test_mininet_loss_without_nft_is_refused_up_front(monkeypatch) -> None:
    """Loss is applied to the bridge baseline too; without nft that cannot be, so the bench
    refuses before it spends minutes on the switch's side."""
    monkeypatch.setattr(bench, "nft_available", lambda: False)
    with pytest.raises(ValueError, match="nftables"):
        bench.BenchOptions(topo="mininet", faults=FaultSpec(loss=0.01))
    bench.BenchOptions(topo="mininet")  # no loss, no rule needed
    bench.BenchOptions(faults=FaultSpec(loss=0.01))  # loopback: the switch's ports only


@pytest.mark.fast
def test_the_bridge_drops_on_the_way_in_and_on_the_way_out() -> None:
    rules = loss_ruleset(0.01)
    assert rules.count(f"numgen random mod {SCALE} < {SCALE // 100}") == 2
    assert "hook prerouting" in rules and "hook postrouting" in rules
    with pytest.raises(ValueError):
        loss_ruleset(0)
