"""Failures: a worker dying mid-job, hostile traffic during a job, and bad configuration."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from switchreduce import wire
from switchreduce.emulation.softswitch.process import LoopbackSwitch
from switchreduce.launch import START_TIMEOUT, cli_command, release
from switchreduce.ports import free_udp_ports
from switchreduce.worker.reference import check, synthetic_tensor
from switchreduce.worker.shim import JobBinding, SwitchCommunicator, WorkerOptions
from tests.helpers.workers import loopback_workers

K = 256


def test_survivors_time_out_naming_missing_chunks_when_a_worker_dies() -> None:
    """Three worker processes; one is killed mid-job; the others raise TimeoutError in time."""
    timeout = 2.0
    ports = free_udp_ports(3)
    options = ("--k", str(K), "--elements", "30000000", "--timeout", str(timeout))
    with (
        LoopbackSwitch(ports, K, 64) as switch,
        loopback_workers(switch.address, ports, *options, wait_for_go=True) as workers,
    ):
        release(workers, START_TIMEOUT)  # joined, tensor built: all start together
        time.sleep(0.3)  # into the transfer (30 M elements take seconds)
        killed_at = time.monotonic()
        workers[2].kill()
        for survivor in workers[:2]:
            assert survivor.finish(timeout=60) != 0, survivor.errors[-2000:]
            stderr = survivor.errors
            assert "TimeoutError" in stderr and "chunks missing" in stderr, stderr[-2000:]
        assert time.monotonic() - killed_at < timeout + 10


def test_hostile_traffic_is_dropped_and_counted_while_a_job_stays_exact(job_factory) -> None:
    world_size = 3
    inputs = [synthetic_tensor(8, r, 400_000, "float32") for r in range(world_size)]
    with job_factory(world_size, k=K, slots=32) as job:
        switch_address = job.server.address
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        attacker.bind(("127.0.0.1", 0))
        header = wire.Header(wire.MsgType.DATA, 1, 0, 0, 0, 0, 1, 0, K)
        good_shape = wire.encode(header, np.ones(K, dtype=np.int32))
        hostile = {
            "bad_header": [good_shape[:10], good_shape[:-4], os.urandom(700), b""],
            "unknown_job": [wire.encode(header._replace(job_id=99), np.ones(K))],
            "rank_out_of_range": [wire.encode(header._replace(rank=world_size), np.ones(K))],
            "slot_out_of_range": [wire.encode(header._replace(slot=32), np.ones(K))],
            "unbound_worker": [good_shape],  # rank 0's identity from the wrong address
        }
        stop = threading.Event()
        sent = dict.fromkeys(hostile, 0)

        def attack() -> None:
            while not stop.is_set():
                for reason, packets in hostile.items():
                    for packet in packets:
                        attacker.sendto(packet, switch_address)
                        sent[reason] += 1
                time.sleep(0.001)

        thread = threading.Thread(target=attack)
        thread.start()
        try:
            results = job.allreduce(inputs)
        finally:
            stop.set()
            thread.join()
        deadline = time.monotonic() + 10  # the switch may still be draining its socket
        while any(job.drops()[r] < n for r, n in sent.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
        drops = job.drops()
        for reason, count in sent.items():
            assert drops[reason] == count, (reason, drops)
        for result in results:
            verdict = check(result, inputs, K)
            assert verdict.exact and verdict.within_bound
        # The switch is still serving: another allreduce on the same job works.
        again = job.allreduce([np.full(10, r, dtype=np.int32) for r in range(world_size)])
        assert all((a == 3).all() for a in again)


def test_k_larger_than_the_path_mtu_is_refused() -> None:
    """On a 1500-byte MTU path a 1024-element packet would fragment; the worker says so."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    ns = f"srmtu{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up", "mtu", "1500"], check=True)
        code = (
            "from worker.shim import *\n"
            "try:\n"
            "    SwitchCommunicator(JobBinding(1, 0, 1, 4, ('127.0.0.1', 48864)),"
            " WorkerOptions(k=1024))\n"
            "except ValueError as e:\n"
            "    print(e)\n"
        )
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.getcwd(),
        )
        assert "path MTU to the switch is 1500" in out.stdout, out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("binding", "message"),
    [
        (dict(job_id=1, rank=4, world_size=4, slot_count=8), "rank 4 out of range"),
        (dict(job_id=1, rank=0, world_size=33, slot_count=8), "world size"),
        (dict(job_id=1, rank=0, world_size=2, slot_count=0), "slot count"),
        (dict(job_id=70000, rank=0, world_size=2, slot_count=8), "job id"),
    ],
)
def test_bad_bindings_are_rejected(binding: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JobBinding(switch=("127.0.0.1", 1), **binding)


def test_bench_reports_every_field_and_an_exact_result() -> None:
    out = subprocess.run(
        cli_command(
            "bench",
            "allreduce",
            "--workers",
            "2",
            "--elements",
            "100000",
            "--loss",
            "0.01",
            "--json",
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(out.stdout)
    for key in (
        "workers",
        "elements",
        "loss",
        "seconds",
        "elements_per_s",
        "packets",
        "retransmissions",
        "max_abs_error",
        "exact",
    ):
        assert key in report, key
    assert report["workers"] == 2 and report["elements"] == 100000 and report["exact"]
    assert report["packets"] > 2 * 100000 / wire.DEFAULT_K


@pytest.mark.fast
def test_worker_options_are_validated() -> None:
    with pytest.raises(ValueError, match="min_rto"):
        WorkerOptions(min_rto=2.0, max_rto=1.0)
    with pytest.raises(ValueError, match="elements per packet"):
        WorkerOptions(k=100)
    assert SwitchCommunicator is not None  # the public entry point is importable from worker.shim
