"""The launch layer (switchreduce/launch.py) on real processes: ready, go, the last-line
report, and nothing left running after any failure, checked by PID."""

from __future__ import annotations

import socket
import sys
import time
from contextlib import ExitStack

import pytest

from switchreduce.emulation.softswitch.process import LoopbackSwitch
from switchreduce.experiments import bench
from switchreduce.launch import GO, READY, Child, LaunchError, release, reports
from switchreduce.ports import free_udp_ports
from tests.helpers.processes import left_behind, record_children


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


#: A child that starts a grandchild in its group, says READY, and reports after GO.
PARENT_OF_ONE = f"""
import json, subprocess, sys
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print({READY!r}, grandchild.pid, flush=True)
line = sys.stdin.readline()
print("log line, not the report")
print(json.dumps({{"got": line.strip()}}), flush=True)
"""


def test_ready_go_and_the_last_line_report() -> None:
    with ExitStack() as stack:
        children = [
            stack.enter_context(Child(python(PARENT_OF_ONE), f"child {i}", stdin=True))
            for i in range(2)
        ]
        release(children, timeout=30)
        assert reports(children, timeout=30) == [{"got": GO}, {"got": GO}]
    grandchildren = [int(child.said[0].split()[1]) for child in children]
    assert not any(left_behind(pid) for pid in grandchildren)  # the group went with its leader


def test_an_exception_in_the_parent_kills_the_child_and_its_group() -> None:
    with (
        pytest.raises(RuntimeError, match="the parent failed"),
        Child(python(PARENT_OF_ONE), "child", stdin=True) as child,
    ):
        grandchild = int(child.wait_for(READY))
        raise RuntimeError("the parent failed")
    assert not left_behind(child.pid) and not left_behind(grandchild)


def test_a_child_that_dies_before_ready_fails_the_wait_at_once_with_its_stderr() -> None:
    started = time.monotonic()
    with ExitStack() as stack:
        waiting = stack.enter_context(Child(python(PARENT_OF_ONE), "waiting", stdin=True))
        dying = stack.enter_context(
            Child(python("import sys; sys.exit('no port for me')"), "dying", stdin=True)
        )
        with pytest.raises(
            LaunchError, match=r"dying ended before saying 'ready' \(exit status 1\)"
        ):
            # the waiting child said READY; the dying one fails the wait at once
            release([dying, waiting], timeout=60)
    assert time.monotonic() - started < 30
    assert not left_behind(waiting.pid) and not left_behind(dying.pid)


def test_a_child_that_never_says_the_word_times_out_and_is_killed() -> None:
    with (
        pytest.raises(LaunchError, match=r"silent did not say 'listening' within 0.5 s"),
        Child(python("import time; time.sleep(120)"), "silent") as child,
    ):
        child.wait_for("listening", timeout=0.5)
    assert not left_behind(child.pid)


def test_a_stopped_switch_reports_its_counters_and_is_gone() -> None:
    with LoopbackSwitch(free_udp_ports(2), k=256, slots=8) as switch:
        assert switch.address.startswith("127.0.0.1:")
    assert switch.report is not None and "drops" in switch.report
    assert not left_behind(switch.child.pid)


def test_a_failing_worker_makes_the_bench_leave_no_process_behind(monkeypatch) -> None:
    """Rank 1 cannot bind its port. Rank 0 would wait for it in JOIN until its timeout; the
    bench kills it, and the switch, as soon as rank 1 has failed."""
    children = record_children(monkeypatch)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        ports = [*free_udp_ports(1), taken.getsockname()[1]]
        monkeypatch.setattr(bench, "free_udp_ports", lambda n: ports)
        started = time.monotonic()
        with pytest.raises(LaunchError, match="worker rank 1 ended before saying 'ready'") as exc:
            bench.run_bench(bench.BenchOptions(workers=2, elements=100_000, timeout=60))
    assert time.monotonic() - started < 30  # not after rank 0's timeout
    assert "Address already in use" in str(exc.value)
    assert [child.name for child in children] == [
        "the soft switch",
        "worker rank 0",
        "worker rank 1",
    ]
    assert not any(left_behind(child.pid) for child in children)
