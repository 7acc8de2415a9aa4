"""Restart fuzz: seeded kills and restarts of ranks and switch while jobs run.

Whatever the order, every sum a rank returns is exact, and every rank that
does not finish stops with a documented exception (SwitchTimeoutError,
SessionEndedError) in bounded time: never a wrong sum, never a hang. After
the chaos, a clean run of the same job must work, so nothing a dead process
left behind blocks the job.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from switchreduce.cli import cli_command
from switchreduce.ports import free_udp_ports

WORLD_SIZE = 3
SLOTS = 4
TIMEOUT = 2.0  # each rank's worker timeout, seconds
RUNS = 6
RANK_SCRIPT = Path(__file__).parent / "helpers" / "fuzz_rank.py"
DOCUMENTED = {"SwitchTimeoutError", "SessionEndedError"}


@dataclass
class Rank:
    proc: subprocess.Popen
    killed: bool = False


@dataclass
class Cluster:
    """One static switch process and the rank processes of its job, all on loopback."""

    tmp: Path
    ports: list[int] = field(default_factory=lambda: free_udp_ports(WORLD_SIZE + 1))
    switch: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports[-1]}"

    def start_switch(self) -> None:
        members = (f"--worker={r}=127.0.0.1:{p}" for r, p in enumerate(self.ports[:-1]))
        command = cli_command(
            "switch", "--listen", self.address, "--world-size", str(WORLD_SIZE),
            "--k", "64", "--slots", str(SLOTS), *members,
        )  # fmt: skip
        self.switch = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.switch.stdout.readline().startswith("listening")
        self.log.append("switch up")

    def kill_switch(self) -> None:
        self.switch.send_signal(signal.SIGKILL)
        self.switch.wait()
        self.log.append("switch killed")

    def start_rank(self, rank: int, seed: int, calls: int) -> Rank:
        self.log.append(f"rank {rank} started (seed {seed}, {calls} calls)")
        args = (self.address, self.ports[rank], rank, WORLD_SIZE, seed, calls, TIMEOUT, SLOTS)
        return Rank(
            subprocess.Popen(
                [sys.executable, str(RANK_SCRIPT), *map(str, args)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )

    def stop(self) -> None:
        if self.switch is not None and self.switch.poll() is None:
            self.switch.kill()
            self.switch.wait()


def settle(cluster: Cluster, ranks: list[Rank], deadline: float) -> list[str]:
    """Wait for every rank; check each call was exact and each failure documented."""
    outcomes = []
    for rank in ranks:
        try:
            out, err = rank.proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rank.proc.kill()
            rank.proc.communicate()
            pytest.fail(f"a rank hung past its deadline; events: {cluster.log}")
        lines = [json.loads(line) for line in out.splitlines()]
        calls = [line for line in lines if "call" in line]
        assert all(c["exact"] for c in calls), (calls, cluster.log)
        if rank.killed:
            outcomes.append("killed")
        elif rank.proc.returncode == 0:
            outcomes.append("finished")
        else:
            assert rank.proc.returncode == 3, (err[-2000:], cluster.log)
            error = lines[-1]
            assert error["error"] in DOCUMENTED, (error, cluster.log)
            assert "job 1 rank" in error["message"], error
            outcomes.append(error["error"])
    return outcomes


@pytest.mark.parametrize("seed", [1, 2])
def test_kills_and_restarts_in_any_order_never_give_a_wrong_sum_or_a_hang(
    seed: int, tmp_path: Path
) -> None:
    rng = np.random.default_rng(seed)
    cluster = Cluster(tmp_path)
    cluster.start_switch()
    seen: set[str] = set()
    try:
        for run in range(RUNS):
            run_seed = seed * 1000 + run
            calls = int(rng.integers(50, 400))
            ranks = [cluster.start_rank(r, run_seed, calls) for r in range(WORLD_SIZE)]
            for _ in range(int(rng.integers(1, 3))):
                time.sleep(float(rng.uniform(0.0, 1.0)))
                event = rng.choice(["none", "kill rank", "replace rank", "restart switch"])
                cluster.log.append(f"run {run}: {event}")
                if event in ("kill rank", "replace rank"):
                    victim = int(rng.integers(len(ranks)))
                    ranks[victim].proc.send_signal(signal.SIGKILL)
                    ranks[victim].proc.wait()
                    ranks[victim].killed = True
                    if event == "replace rank":  # the same program again, as torchrun would
                        rank = victim if victim < WORLD_SIZE else int(rng.integers(WORLD_SIZE))
                        ranks.append(cluster.start_rank(rank, run_seed, calls))
                elif event == "restart switch":
                    cluster.kill_switch()
                    time.sleep(float(rng.uniform(0, TIMEOUT / 2)))
                    cluster.start_switch()
            outcomes = settle(cluster, ranks, time.monotonic() + calls * 0.1 + 4 * TIMEOUT + 10)
            seen.update(outcomes)
            cluster.log.append(f"run {run} outcomes: {outcomes}")
        # After all that, a clean run of the same job works and is exact.
        ranks = [cluster.start_rank(r, seed, 10) for r in range(WORLD_SIZE)]
        assert settle(cluster, ranks, time.monotonic() + 60) == ["finished"] * WORLD_SIZE
    finally:
        cluster.stop()
    assert "finished" in seen, cluster.log
