"""The soft switch as a Mininet switch node: real namespaces, veth links and tc shaping."""

from __future__ import annotations

import subprocess

import pytest

from emulation.errors import EmulationError
from emulation.topo import Emulation, TopoOptions, netem_available
from switchreduce import wire

pytestmark = pytest.mark.requires_root


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


@pytest.fixture
def no_leftovers():
    before = _links()
    yield
    assert _links() == before, "interfaces left behind"


def test_hosts_reach_each_other_and_allreduce_is_exact(tmp_path, no_leftovers) -> None:
    with Emulation(TopoOptions(workers=4, run_dir=tmp_path)) as emu:
        assert emu.ping_all() == 0.0
        reports = emu.allreduce(300_000)
    assert all(r["exact"] and r["within_bound"] for r in reports)
    assert sum(r["retransmissions"] for r in reports) == 0


@pytest.mark.requires_netem
def test_exact_under_five_percent_link_loss(tmp_path, no_leftovers) -> None:
    options = TopoOptions(workers=4, loss_pct=5, run_dir=tmp_path)
    with Emulation(options) as emu:
        reports = emu.allreduce(200_000, dtype="int32")
    assert all(r["exact"] for r in reports)
    assert sum(r["retransmissions"] for r in reports) > 0


def test_exact_under_five_percent_loss_at_the_switch_ports(tmp_path, no_leftovers) -> None:
    options = TopoOptions(workers=4, switch_loss=0.05, run_dir=tmp_path)
    with Emulation(options) as emu:
        reports = emu.allreduce(200_000, dtype="int32")
        switch = emu.net.switches[0]
    faults = switch.report()["faults"]
    assert faults["ingress"]["dropped"] > 0 and faults["egress"]["dropped"] > 0
    assert all(r["exact"] for r in reports)
    assert sum(r["retransmissions"] for r in reports) > 0


def test_link_loss_without_netem_is_an_error_not_a_silent_no_op(tmp_path, no_leftovers) -> None:
    if netem_available():
        pytest.skip("this kernel has netem")
    with (
        pytest.raises(EmulationError, match="netem"),
        Emulation(TopoOptions(workers=2, loss_pct=5, run_dir=tmp_path)),
    ):
        pass


def test_time_on_slow_links_is_what_the_bytes_on_the_wire_predict(tmp_path, no_leftovers) -> None:
    """20 Mbit/s links: each host sends (and receives) one frame per chunk, plus priming."""
    elements, bw = 500_000, 20.0
    options = TopoOptions(workers=4, bw=bw, run_dir=tmp_path)
    with Emulation(options) as emu:
        reports = emu.allreduce(elements)
    chunks = -(-elements // options.k)
    frames = chunks + min(options.slots, chunks)
    predicted = frames * (wire.ETH_BYTES + wire.ip_packet_bytes(options.k)) * 8 / (bw * 1e6)
    measured = max(r["seconds"] for r in reports)
    assert all(r["exact"] for r in reports)
    assert abs(measured - predicted) <= 0.3 * predicted, (measured, predicted)


def test_a_failure_inside_the_emulation_leaves_nothing_behind(tmp_path, no_leftovers) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        Emulation(TopoOptions(workers=2, run_dir=tmp_path)),
    ):
        raise RuntimeError("boom")


def test_k_too_large_for_the_links_is_refused() -> None:
    with pytest.raises(ValueError, match="1500-byte MTU"):
        TopoOptions(k=1024)


def test_gloo_baseline_runs_between_the_hosts(tmp_path, no_leftovers) -> None:
    """The comparison's other side: torch.distributed gloo over the same switch and links."""
    with Emulation(TopoOptions(workers=2, run_dir=tmp_path)) as emu:
        reports = emu.allreduce(100_000, backend="gloo", timeout=60)
    assert [r["backend"] for r in reports] == ["gloo", "gloo"]
    assert max(r["max_abs_error"] for r in reports) < 1e-5
