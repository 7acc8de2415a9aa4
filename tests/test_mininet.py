"""The soft switch as a Mininet switch node: real namespaces, veth links and tc shaping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from switchreduce import launch, wire
from switchreduce.emulation.bridge import nft_available
from switchreduce.emulation.errors import EmulationError
from switchreduce.emulation.topo import (
    CONTROLLER_HTTP_PORT,
    CONTROLLER_IP,
    SWITCH_IP,
    WORKER_UDP_PORT,
    Emulation,
    TopoOptions,
    netem_available,
    p4runtime_address,
)
from switchreduce.experiments import bench
from switchreduce.launch import LaunchError
from tests.helpers.processes import left_behind, record_children

pytestmark = pytest.mark.requires_root


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


#: The switch nodes a scenario runs on; BMv2 where simple_switch_grpc and p4c are installed.
SWITCHES = [
    "soft",
    pytest.param("bmv2", marks=[pytest.mark.requires_bmv2, pytest.mark.requires_p4c]),
]


@pytest.fixture
def no_leftovers():
    before = _links()
    yield
    assert _links() == before, "interfaces left behind"


@pytest.mark.parametrize("engine", [None, "python"])  # the default: the compiled one
def test_hosts_reach_each_other_and_allreduce_is_exact(engine, tmp_path, no_leftovers) -> None:
    with Emulation(TopoOptions(workers=4, engine=engine, run_dir=tmp_path)) as emu:
        assert emu.ping_all() == 0.0
        reports = emu.allreduce(300_000)
        switch = emu.net.switches[0]
    report = switch.report()
    drops = report["drops"]
    assert report["engine"] == (engine or "compiled")
    assert report["packets"]["received"] > 4 * 300_000 / emu.options.k  # the sums went through it
    assert all(r["exact"] and r["within_bound"] for r in reports)
    # A loaded 2-core machine may delay a result past the RTO; the spurious
    # retransmission is then a duplicate or stale at the switch, never anything else.
    assert {reason for reason, n in drops.items() if n} <= {"duplicate", "stale"}


@pytest.mark.requires_netem
@pytest.mark.parametrize("switch", SWITCHES)
def test_exact_under_five_percent_link_loss(switch, tmp_path, no_leftovers) -> None:
    options = TopoOptions(workers=4, switch=switch, loss_pct=5, slots=16, run_dir=tmp_path)
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


@pytest.mark.parametrize(
    ("switch", "bw", "elements", "slots"),
    [
        ("soft", 20.0, 500_000, 64),
        # BMv2 takes ~2,800 aggregation packets/s here: slower links, so they are the limit;
        # a window the size of the bandwidth-delay product (more slots only queue at the link)
        pytest.param(
            "bmv2", 1.0, 50_000, 4, marks=[pytest.mark.requires_bmv2, pytest.mark.requires_p4c]
        ),
    ],
)
def test_time_on_slow_links_is_what_the_bytes_on_the_wire_predict(
    switch, bw, elements, slots, tmp_path, no_leftovers
) -> None:
    """Each host sends (and receives) one frame per chunk, plus one priming frame per slot."""
    options = TopoOptions(workers=4, switch=switch, bw=bw, slots=slots, run_dir=tmp_path)
    with Emulation(options) as emu:
        reports = emu.allreduce(elements)
    chunks = -(-elements // options.k)
    frames = chunks + min(options.slots, chunks)
    predicted = frames * (wire.ETH_BYTES + wire.ip_packet_bytes(options.k)) * 8 / (bw * 1e6)
    measured = max(r["seconds"] for r in reports)
    assert all(r["exact"] for r in reports)
    assert abs(measured - predicted) <= 0.3 * predicted, (measured, predicted)


def test_the_bench_times_gloo_over_a_linux_bridge_as_the_bytes_predict(
    tmp_path, no_leftovers, monkeypatch, capsys
) -> None:
    """The bench's three runs between the same hosts on 20 Mbit/s links: through the switch,
    gloo through the switch, gloo over a Linux bridge in its place. A ring allreduce sends
    2(n-1)/n of the tensor from each host, in full TCP segments (1,448 bytes of payload in
    1,514-byte frames); the bridge adds nothing to that. No process is left."""
    monkeypatch.chdir(tmp_path)  # the bench's run directory, runs/topo
    children = record_children(monkeypatch)
    n, bw, elements = 4, 20.0, 500_000
    options = bench.BenchOptions(
        topo="mininet", workers=n, bw=bw, elements=elements, timeout=60, as_json=True
    )
    assert bench.run_bench(options) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("switch_seconds", "switch_gloo_seconds", "bridge_gloo_seconds"):
        assert report[key] > 0, key
    assert report["ratio_bridge_gloo"] == pytest.approx(
        report["switch_seconds"] / report["bridge_gloo_seconds"], 0.01
    )
    assert report["ratio_switch_gloo"] == pytest.approx(
        report["switch_seconds"] / report["switch_gloo_seconds"], 0.01
    )
    assert report["bridge"] is None  # no loss: no rule on the bridge
    segments = 2 * (n - 1) / n * elements * 4 / 1448
    predicted = segments * 1514 * 8 / (bw * 1e6)
    # at least the bytes' time; above it by what a ring's start-up and steps cost
    assert 0.95 * predicted <= report["bridge_gloo_seconds"] <= 1.6 * predicted, (
        report["bridge_gloo_seconds"],
        predicted,
    )
    workers = [child for child in children if child.name.startswith("worker")]
    assert len(workers) == 3 * n and len(children) == 3 * n + 1  # and the switch node's
    assert not any(left_behind(child.pid) for child in children)


def test_a_plain_bridge_forwards_everything_with_the_hosts_own_offloads(
    tmp_path, no_leftovers
) -> None:
    with Emulation(TopoOptions(workers=3, run_dir=tmp_path)) as emu:
        bridge = emu.bridge()
        assert emu.ping_all() == 0.0
        h1 = emu.hosts[0]
        offloads = h1.cmd(f"ethtool -k {h1.defaultIntf().name}")
        assert bridge.counters() is None  # no loss: no rule
    assert "tcp-segmentation-offload: on" in offloads, offloads


@pytest.mark.skipif(not nft_available(), reason="nft (Debian package nftables) not installed")
def test_a_lossy_bridge_drops_at_the_rate_asked_on_the_way_in_and_out(
    tmp_path, no_leftovers
) -> None:
    """10% in each direction: about 10% of the frames that enter, and 10% of those leaving;
    a ping and its reply cross the bridge twice, so 1 - 0.9**4 = 34% of pings are lost."""
    with Emulation(TopoOptions(workers=2, run_dir=tmp_path)) as emu:
        node = emu.net.switches[0]
        bridge = emu.bridge(loss=0.1)
        assert node.child.proc.returncode is not None  # the switch stopped; its report stays
        assert "drops" in node.report()
        h1, h2 = emu.hosts
        # checksum offloads are back, but with loss not TSO: the rule drops frames, not bursts
        offloads = h1.cmd(f"ethtool -k {h1.defaultIntf().name}")
        assert "tx-checksumming: on" in offloads and "tcp-segmentation-offload: off" in offloads
        out = h1.cmd(f"ping -q -c 1000 -i 0.002 -W 1 {h2.IP()}")
        counters = bridge.counters()
    lost = float(out.split("% packet loss")[0].split()[-1]) / 100
    assert 0.27 <= lost <= 0.42, out
    assert counters is not None and counters["frames_in"] >= 1000
    assert 0.07 <= counters["dropped_in"] / counters["frames_in"] <= 0.13, counters
    out_of = counters["frames_in"] - counters["dropped_in"]
    assert 0.07 <= counters["dropped_out"] / out_of <= 0.13, counters


def test_jumbo_frames_carry_k_1024(tmp_path, no_leftovers) -> None:
    """MTU 9000 on both ends of every link: the worker's path MTU check passes at K = 1024."""
    options = TopoOptions(workers=2, mtu=9000, k=1024, run_dir=tmp_path)
    with Emulation(options) as emu:
        for link in emu.net.links:
            for intf in (link.intf1, link.intf2):
                assert intf.node.cmd(f"cat /sys/class/net/{intf.name}/mtu").strip() == "9000"
        reports = emu.allreduce(300_000)
    assert all(r["exact"] and r["within_bound"] for r in reports)
    assert max(r["packets_sent"] for r in reports) < 2 * 300_000 / 1024


def test_a_failure_inside_the_emulation_leaves_nothing_behind(tmp_path, no_leftovers) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        Emulation(TopoOptions(workers=2, run_dir=tmp_path)),
    ):
        raise RuntimeError("boom")


SQUAT = """
import socket, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("{ip}", {port}))
print("bound", flush=True)
time.sleep(120)
"""


def test_a_failing_worker_leaves_no_process_behind(tmp_path, no_leftovers, monkeypatch) -> None:
    """Rank 1 cannot bind its port; ranks 0 and 2 wait for it (JOIN) and are killed at once,
    not left to time out; the switch node is stopped with the emulation."""
    children = record_children(monkeypatch)
    with Emulation(TopoOptions(workers=3, run_dir=tmp_path)) as emu:
        h2 = emu.hosts[1]
        squatter = h2.popen(
            [sys.executable, "-c", SQUAT.format(ip=h2.IP(), port=WORKER_UDP_PORT)],
            stdout=subprocess.PIPE,
        )
        try:
            assert squatter.stdout.readline() == b"bound\n"
            with pytest.raises(LaunchError, match="rank 1 on h2 ended before saying 'ready'"):
                emu.allreduce(100_000, timeout=30)
        finally:
            squatter.kill()
            squatter.wait()
        workers = [child for child in children if child.name.startswith("worker")]
        assert len(workers) == 3
        assert not any(left_behind(child.pid) for child in workers)
    assert len(children) == 4  # the workers and the switch node's soft switch
    assert not any(left_behind(child.pid) for child in children)


def test_a_run_directory_deeper_than_a_unix_sockets_path_still_has_a_controller(
    tmp_path, no_leftovers
) -> None:
    """A sweep's run directories are often deeper than the 107 bytes a Unix socket's path
    may have: the switch node's P4Runtime socket is elsewhere, the controller reaches it, and
    it is gone once the emulation is."""
    deep = tmp_path / ("d" * 100) / "topology.slowdown=1-1-1-4,switch.quorum=3"
    options = TopoOptions(workers=2, controller=True, run_dir=deep)
    socket_path = Path(p4runtime_address(options).removeprefix("unix:"))
    with Emulation(options) as emu:
        assert socket_path.is_socket()
        assert emu.controller is not None  # it says so once it reached the switch
    assert not socket_path.exists()


def test_k_too_large_for_the_links_is_refused() -> None:
    with pytest.raises(ValueError, match="1500-byte MTU"):
        TopoOptions(k=1024)


def test_gloo_baseline_runs_between_the_hosts(tmp_path, no_leftovers) -> None:
    """The comparison's other side: torch.distributed gloo over the same switch and links."""
    with Emulation(TopoOptions(workers=2, run_dir=tmp_path)) as emu:
        reports = emu.allreduce(100_000, backend="gloo", timeout=60)
    assert [r["backend"] for r in reports] == ["gloo", "gloo"]
    assert max(r["max_abs_error"] for r in reports) < 1e-5


SPOOF = """
import socket, sys, time
import numpy as np
from switchreduce import wire
header = wire.Header(wire.MsgType.DATA, 3, 0, 0, 1, 0, 1, 0, {k})  # job 3, rank 0: not ours
packet = wire.encode(header, np.full({k}, 10**6, dtype=np.int32))
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("{ip}", 0))
for _ in range({count}):
    sock.sendto(packet, ("{switch}", {port}))
    time.sleep(0.001)  # paced: a burst could overflow the link's queue, which is not the point
"""


def _controller_view(host) -> dict:
    """GET /v1/jobs from a host: jobs, counters and drops as the controller reads them."""
    url = f"http://{CONTROLLER_IP}:{CONTROLLER_HTTP_PORT}/v1/jobs"
    code = (
        f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    )
    proc = host.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    return json.loads(out)


@pytest.mark.parametrize("switch", SWITCHES)
def test_a_controller_runs_two_jobs_while_a_host_forges_packets(
    switch, tmp_path, no_leftovers
) -> None:
    """Controller on c0 (P4Runtime over a Unix socket); jobs 3 and 4 register with it."""
    # long enough that both jobs still run when the controller is asked (compiled workers and
    # switch sum 200,000 elements before it answers); BMv2 takes ~2,800 packets/s here
    elements = 3_000_000 if switch == "soft" else 20_000
    options = TopoOptions(workers=8, switch=switch, controller=True, slots=16, run_dir=tmp_path)
    with Emulation(options) as emu:
        hosts = emu.hosts
        job3 = emu.start_workers(elements, dtype="int32", hosts=hosts[0:3], job_id=3)
        job4 = emu.start_workers(elements, dtype="int32", hosts=hosts[3:7], job_id=4, seed=1)
        launch.release(job3 + job4, timeout=120)  # both jobs admitted and running
        running = _controller_view(hosts[0])
        forger = hosts[7].popen(
            [
                sys.executable,
                "-c",
                SPOOF.format(
                    k=options.k,
                    ip=hosts[7].IP(),
                    count=300,
                    switch=SWITCH_IP,
                    port=wire.DEFAULT_SWITCH_PORT,
                ),
            ]
        )
        results = launch.reports(job3 + job4, timeout=180)
        assert forger.wait(timeout=30) == 0
        view = _controller_view(hosts[0])
    assert all(r["exact"] for r in results) and len(results) == 7
    assert {job["job_id"] for job in running["jobs"]} == {3, 4}
    # released when their ranks left (what the workers logged says why not)
    assert view["jobs"] == [], [child.errors for child in job3 + job4]
    # the forged packets: unbound while their job runs, of an unknown job once it ended
    assert view["drops"]["unbound_worker"] + view["drops"]["unknown_job"] == 300
    chunks = -(-elements // options.k)
    assert min(r["packets_received"] for r in results) >= chunks  # the sums came from the switch


@pytest.mark.requires_bmv2
@pytest.mark.requires_p4c
def test_bmv2_node_forwards_and_aggregates_exactly(tmp_path, no_leftovers) -> None:
    """The P4 program itself as the data plane: ping through it, then an exact allreduce."""
    options = TopoOptions(workers=4, switch="bmv2", slots=16, run_dir=tmp_path)
    with Emulation(options) as emu:
        assert emu.ping_all() == 0.0
        reports = emu.allreduce(50_000)
    assert all(r["exact"] and r["within_bound"] for r in reports)
    assert (tmp_path / "switchreduce_k256.json").exists()  # compiled for the topology's K


def test_bmv2_where_it_is_missing_is_a_clear_error(no_leftovers, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with (
        pytest.raises(EmulationError, match="simple_switch_grpc and p4c-bm2-ss"),
        Emulation(TopoOptions(workers=2, switch="bmv2", run_dir=tmp_path)),
    ):
        pass
