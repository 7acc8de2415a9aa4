"""The switch bench: its load is the P4 program's packets, its check fails on any wrong,
repeated or stray result, and it measures the soft switch (both engines) and BMv2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from switchreduce import wire
from switchreduce.cli import build_parser, main
from switchreduce.emulation.softswitch.pipeline import SoftSwitch, int_to_ip
from switchreduce.emulation.softswitch.process import LoopbackSwitch
from switchreduce.emulation.softswitch.static import install_static_job
from switchreduce.experiments import switchbench
from switchreduce.experiments.switchbench import (
    JOB_ID,
    SwitchBenchError,
    SwitchBenchOptions,
    Traffic,
    UdpPorts,
    Window,
    drive,
)
from switchreduce.launch import Child, cli_command
from switchreduce.p4runtime.jobs import Job, Member
from tests.helpers.processes import left_behind, record_children

WORKERS, K, SLOTS = 3, 64, 8
SESSION = 0x5EED_0000_0000_0001


def _results(traffic: Traffic, batches: list[int]) -> dict[int, list[bytes]]:
    """What the Python pipeline sends each rank for ``batches`` of the traffic: rank -> the
    result datagrams, in order."""
    switch = SoftSwitch(k=traffic.k)
    ranks = {("127.0.0.1", 40000 + r): r for r in range(traffic.workers)}
    members = tuple(Member(r, ip, port) for (ip, port), r in ranks.items())
    install_static_job(switch, Job(JOB_ID, traffic.workers, 0, traffic.slots, SESSION, members))
    out = defaultdict(list)
    for batch in batches:
        for rank, packets in enumerate(traffic.batch(batch)):
            for packet in packets:
                pkt = switch.parser.parse_datagram(
                    packet.tobytes(), ("127.0.0.1", 40000 + rank), ("127.0.0.1", 48864)
                )
                for result in switch.process(pkt):
                    to = ranks[(int_to_ip(result.ip_dst), result.udp_dport)]
                    out[to].append(switch.deparser.datagram(result))
    return out


def _traffic(rounds: int = 3) -> Traffic:
    """The fast tests' load: WORKERS ranks, K elements, SLOTS slots in two groups of four."""
    return Traffic(WORKERS, K, SLOTS, rounds=rounds, session=SESSION, group=4)


def _received(traffic: Traffic, rank: int, datagrams: list[bytes]) -> tuple:
    """(ranks, records) as the ports hand them over."""
    records = np.frombuffer(b"".join(datagrams), traffic.dtype).copy()
    return np.full(len(records), rank), records


@pytest.mark.fast
def test_the_load_is_the_wire_format() -> None:
    """Every packet decodes with wire.py to the header the bench means, and its elements."""
    traffic = _traffic(rounds=5)
    assert traffic.groups == 2 and traffic.batches == 10
    packets = traffic.batch(7)  # round 4 of slots 4..7
    assert packets.shape == (WORKERS, 4)
    datagram = packets[2, 1].tobytes()
    assert wire.unpack_header(datagram) == wire.Header(
        wire.MsgType.DATA, JOB_ID, rank=2, slot=5, version=0, exponent=wire.EXPONENT_BIAS + 2,
        round=4, chunk=3 * SLOTS + 5, count=K, format=wire.encode_format("int32", 32),
        length=5 * SLOTS * K, session=SESSION,
    )  # fmt: skip
    assert np.array_equal(wire.decode_elements(datagram, K), packets[2, 1]["elements"])
    late = wire.unpack_header(traffic.batch(2 * 70_000 + 1)[0, 0].tobytes())  # it wraps
    assert (late.slot, late.version, late.round) == (4, 1, 70_001 - 65_536)
    assert late.chunk == 70_000 * SLOTS + 4


@pytest.mark.fast
def test_results_of_the_p4_pipeline_are_taken_and_complete_the_rounds() -> None:
    """The Python pipeline's results for the first batches, as every rank receives them."""
    traffic = _traffic()
    window = Window(traffic)
    due = window.due()
    assert due == [0, 1, 2, 3]  # two rounds of both groups of slots
    results = _results(traffic, due)
    for rank in range(WORKERS):
        assert len(results[rank]) == 2 * SLOTS
        window.take(*_received(traffic, rank, results[rank]))
    assert (window.completed, window.results, window.missing) == (4, 2 * SLOTS * WORKERS, 0)
    assert window.due() == [4, 5]  # the last round


@pytest.mark.fast
@pytest.mark.parametrize(
    "spoil, error",
    [
        (lambda r: r["elements"].__setitem__((1, 0), r["elements"][1, 0] + 1), "1 of its 64 sums"),
        (lambda r: r["exponent"].__setitem__(0, 1), "exponent 1 \\(expected 129\\)"),
        (lambda r: r["session"].__setitem__(0, 7), "session 7"),
        (lambda r: r["round"].__setitem__(0, 5), "slot 0 round 5: round 5 \\(expected 1\\)$"),
        (lambda r: r.__setitem__(1, r[0]), "slot 0 round 1 came twice"),
    ],
)
def test_a_wrong_result_fails_the_run(spoil, error: str) -> None:
    """Wrong sums, a wrong header field, a round not in flight (the same variant of the
    payload, four rounds on), a repeat: each is an error naming it, and nothing counts."""
    traffic = _traffic()
    window = Window(traffic)
    results = _results(traffic, window.due())
    ranks, records = _received(traffic, 0, results[0][:4])
    spoil(records)
    with pytest.raises(SwitchBenchError, match=error):
        window.take(ranks, records)
    assert window.results == 0


def _summary(options: SwitchBenchOptions, capsys: pytest.CaptureFixture[str]) -> dict:
    """A successful bench run's JSON summary."""
    assert switchbench.run_switch_bench(options) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("mode", ["udp", pytest.param("raw", marks=pytest.mark.requires_root)])
def test_the_soft_switch_is_measured_with_both_engines(mode: str, capsys, monkeypatch) -> None:
    """Real runs, on loopback (UDP mode) or veth pairs (raw mode): every result exact, rates
    positive, the switch's own counters agree, and nothing is left running."""
    children = record_children(monkeypatch)
    options = SwitchBenchOptions(
        switches=("soft",), modes=(mode,), packets=20_000, repeat=2, as_json=True
    )
    summary = _summary(options, capsys)
    assert summary["ratios"] == {}
    assert [run["engine"] for run in summary["runs"]] == ["compiled", "python"] * 2
    for run in summary["runs"]:
        assert run["mode"] == mode
        contributions = run["rounds"] * options.workers * run["slots"]
        assert run["contributions"] == run["results"] == contributions >= 20_000
        assert run["contributions_per_s"] > 0 and run["switch_cpu_seconds"] >= 0
        assert run["switch_report"]["engine"] == run["engine"]
        packets = run["switch_report"]["packets"]
        assert packets["received"] == contributions + options.workers  # and a JOIN each
        assert packets["sent"] == contributions + options.workers  # and a JOINED each
        assert not any(run["switch_report"]["drops"].values())
    medians = summary["medians"]
    assert list(medians) == [f"soft compiled {mode}", f"soft python {mode}"]
    for label, median in medians.items():
        rates = sorted(
            run["contributions_per_s"] for run in summary["runs"] if run["label"] == label
        )
        assert median["contributions_per_s"] == sum(rates) / 2  # the median of two
    assert not any(left_behind(child.pid) for child in children)


@dataclass
class LiveBench:
    """The bench's load for two ranks, joined to a soft switch process's static job."""

    traffic: Traffic
    ports: UdpPorts
    switch_pid: int

    def drive(self, timeout: float) -> None:
        drive(self.traffic, self.ports, self.switch_pid, timeout)


@pytest.fixture
def live_bench() -> Iterator[LiveBench]:
    ports = UdpPorts(2, K)
    try:
        with LoopbackSwitch(ports.ports, K, SLOTS) as switch:
            host, _, port = switch.address.rpartition(":")
            ports.connect((host, int(port)))
            traffic = Traffic(2, K, SLOTS, rounds=50, session=ports.join(10.0))
            yield LiveBench(traffic, ports, switch.child.pid)
    finally:
        ports.close()


def test_a_switch_that_sums_otherwise_fails_the_bench(live_bench: LiveBench) -> None:
    """A real switch, and a load whose expected sums are off by one in one slot: the run
    stops at that slot's first result, naming it."""
    live_bench.traffic.results["elements"][1, 3, 0] += 1  # round 2 (variant 1), slot 3
    with pytest.raises(SwitchBenchError, match="slot 3 round 2: 1 of its 64 sums wrong"):
        live_bench.drive(timeout=10.0)


def test_a_switch_that_loses_fails_the_bench(live_bench: LiveBench) -> None:
    """Contributions the switch never sees: the run fails after the timeout, counting what
    is missing."""
    live_bench.traffic.packets["job_id"][:, 1, 2] = 99  # rank 1's slot 2: an unknown job
    missing = "no result for 1 s: 4 results of the 2 batches in flight missing"
    with pytest.raises(SwitchBenchError, match=missing):
        live_bench.drive(timeout=1.0)


@pytest.mark.fast
def test_the_command_line_makes_the_options() -> None:
    args = build_parser().parse_args(
        ["bench", "switch", "--switch", "soft", "--engine", "python", "--packets", "10"]
    )
    assert (args.switch, args.engine, args.packets, args.slots) == (["soft"], ["python"], 10, None)
    with pytest.raises(SystemExit, match="BMv2 takes at most 16 slots"):
        main(["bench", "switch", "--switch", "bmv2", "--slots", "64"])
    targets = SwitchBenchOptions(switches=("soft",), modes=("udp",)).targets()
    assert [target.label for target in targets] == ["soft compiled udp", "soft python udp"]


@pytest.mark.requires_root
@pytest.mark.requires_bmv2
@pytest.mark.requires_p4c
def test_bmv2_is_measured_against_the_soft_switch(capsys, monkeypatch) -> None:
    """BMv2 on veths in a namespace of the bench's own, beside the compiled soft switch: the
    ratio of the two in the same run; the namespace and links are gone afterwards."""
    children = record_children(monkeypatch)
    options = SwitchBenchOptions(
        switches=("soft", "bmv2"),
        engines=("compiled",),
        modes=("udp",),
        k=K,
        packets=2_000,
        as_json=True,
    )
    summary = _summary(options, capsys)
    soft, bmv2 = summary["runs"]
    assert bmv2["switch"] == "bmv2"
    assert bmv2["contributions"] == bmv2["results"] >= 2_000
    assert bmv2["switch_cpu_seconds"] > 0 and bmv2["switch_busy"] > 0
    ratio = summary["ratios"]["soft compiled udp / bmv2"]["packet_rate"]
    assert ratio == pytest.approx(soft["contributions_per_s"] / bmv2["contributions_per_s"], 0.01)
    assert not any(left_behind(child.pid) for child in children)
    assert _with_tag(f"sb{os.getpid()}") == []


def _with_tag(tag: str) -> list[str]:
    """Namespaces, links and command lines that name ``tag``."""
    found = [
        line
        for command in (["ip", "netns", "list"], ["ip", "-o", "link"])
        for line in subprocess.run(command, capture_output=True, text=True).stdout.splitlines()
        if tag in line
    ]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if tag in (args := cmdline.read_bytes().replace(b"\0", b" ").decode()):
                found.append(args)
        except OSError:  # it ended meanwhile
            pass
    return found


@pytest.mark.requires_root
def test_a_terminated_bench_leaves_nothing_behind() -> None:
    """SIGTERM in the middle of a raw-mode run: the switch stops, its namespace and links
    are deleted."""
    with Child(
        cli_command(
            "bench", "switch", "--switch", "soft", "--mode", "raw", "--packets", "10000000"
        ),
        "the bench",
    ) as bench:
        tag = f"sb{bench.pid}"
        deadline = time.monotonic() + 30
        while not any("switch --raw" in line for line in _with_tag(tag)):  # the switch runs
            assert time.monotonic() < deadline, "the bench did not start its switch"
            time.sleep(0.1)
        bench.signal_group(signal.SIGTERM)
        assert bench.finish(timeout=30) != 0
    assert _with_tag(tag) == []
