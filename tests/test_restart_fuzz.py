"""Restart fuzz: seeded kills and restarts of ranks, switch and controller while jobs run.

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

from switchreduce.launch import LISTENING, Child, cli_command
from switchreduce.ports import free_udp_ports
from tests.helpers.processes import ControllerProcess, SwitchProcess

WORLD_SIZE = 3
SLOTS = 4
TIMEOUT = 2.0  # each rank's worker timeout, seconds
LEASE = 2.0  # the controller's lease, seconds
RUNS = 6
RANK_SCRIPT = Path(__file__).parent / "helpers" / "fuzz_rank.py"
#: What a rank may fail with: no progress in time, another run took the job, the
#: controller refused or could not be reached (it was restarting, or the job still held).
DOCUMENTED = {"SwitchTimeoutError", "SessionEndedError", "RegistrationError"}


@dataclass
class Rank:
    proc: subprocess.Popen
    killed: bool = False


@dataclass
class Cluster:
    """The switch (and the controller) of one job, and its rank processes, all on loopback."""

    tmp: Path
    controlled: bool  # ranks register with a controller, else the switch's job is static
    ports: list[int] = field(default_factory=lambda: free_udp_ports(WORLD_SIZE + 1))
    static_switch: Child | None = None
    switch: SwitchProcess | None = None
    controller: ControllerProcess | None = None
    log: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports[-1]}"

    def start(self) -> None:
        if self.controlled:
            self.switch = SwitchProcess(self.tmp).start()
            self.controller = ControllerProcess(
                self.switch, self.tmp, "--lease", str(LEASE), "--slots", str(SLOTS),
                "--register-timeout", str(TIMEOUT),
            ).start()  # fmt: skip
        else:
            self._start_static_switch()
        self.log.append("up")

    def _start_static_switch(self) -> None:
        members = (f"--worker={r}=127.0.0.1:{p}" for r, p in enumerate(self.ports[:-1]))
        command = cli_command(
            "switch", "--listen", self.address, "--world-size", str(WORLD_SIZE),
            "--k", "64", "--slots", str(SLOTS), *members,
        )  # fmt: skip
        self.static_switch = Child(command, "static switch")
        with self.static_switch.killed_on_error():
            self.static_switch.wait_for(LISTENING)

    def restart_switch(self, pause: float) -> None:
        """kill -9 the switch, then start it again on the same ports."""
        if self.controlled:
            assert self.switch is not None
            self.switch.stop(kill=True)
            time.sleep(pause)
            self.switch.start()
        else:
            assert self.static_switch is not None
            self.static_switch.kill()
            time.sleep(pause)
            self._start_static_switch()

    def restart_controller(self, pause: float) -> None:
        assert self.controller is not None
        self.controller.stop(kill=True)
        time.sleep(pause)
        self.controller.start()

    def start_rank(self, rank: int, seed: int, calls: int) -> Rank:
        self.log.append(f"rank {rank} started (seed {seed}, {calls} calls)")
        args: tuple[object, ...]
        if self.controlled:
            assert self.controller is not None and self.switch is not None
            args = (self.controller.url, rank, WORLD_SIZE, seed, calls, TIMEOUT, self.switch.k)
        else:
            args = (self.address, self.ports[rank], rank, WORLD_SIZE, seed, calls, TIMEOUT, SLOTS)
        return Rank(
            subprocess.Popen(
                [sys.executable, str(RANK_SCRIPT), *map(str, args)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )

    def settled(self) -> None:
        """A controller's job ends once its ranks are gone (left, or their lease expired), and
        a restarted switch is back once the controller has re-programmed it."""
        if self.controlled:
            assert self.controller is not None
            self.controller.wait_for(
                lambda view: not view["jobs"] and view["switch"] == "available",
                timeout=LEASE + 10,
            )

    def stop(self) -> None:
        if self.static_switch is not None:
            self.static_switch.kill()
        for process in (self.controller, self.switch):
            if process is not None:
                process.stop(kill=True)


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
            if rank.proc.returncode != 3:  # not a documented failure: show all of it
                pytest.fail(f"a rank crashed:\n{err[-4000:]}\nevents: {cluster.log}")
            error = lines[-1]
            assert error["error"] in DOCUMENTED, (error, cluster.log)
            assert "job 1" in error["message"], error
            outcomes.append(error["error"])
            cluster.log.append(f"{error['error']}: {error['message']}")
    cluster.settled()
    return outcomes


@pytest.mark.parametrize(
    ("controlled", "seed"),
    [(False, 1), (False, 2), (True, 1), (True, 2)],
    ids=["static-1", "static-2", "controller-1", "controller-2"],
)
def test_kills_and_restarts_in_any_order_never_give_a_wrong_sum_or_a_hang(
    controlled: bool, seed: int, tmp_path: Path
) -> None:
    rng = np.random.default_rng(seed)
    cluster = Cluster(tmp_path, controlled)
    cluster.start()
    events = ["none", "kill rank", "replace rank", "restart switch"]
    events += ["restart controller"] if controlled else []
    try:
        for run in range(RUNS):
            run_seed = seed * 1000 + run
            calls = int(rng.integers(50, 400))
            ranks = [cluster.start_rank(r, run_seed, calls) for r in range(WORLD_SIZE)]
            for _ in range(int(rng.integers(1, 3))):
                time.sleep(float(rng.uniform(0.0, 1.0)))
                event = rng.choice(events)
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
                    cluster.restart_switch(float(rng.uniform(0, TIMEOUT / 2)))
                elif event == "restart controller":
                    cluster.restart_controller(float(rng.uniform(0, TIMEOUT / 2)))
            outcomes = settle(cluster, ranks, time.monotonic() + calls * 0.1 + 4 * TIMEOUT + 10)
            cluster.log.append(f"run {run} outcomes: {outcomes}")
        # After all that, a clean run of the same job works and is exact.
        ranks = [cluster.start_rank(r, seed, 10) for r in range(WORLD_SIZE)]
        outcomes = settle(cluster, ranks, time.monotonic() + 60)
        assert outcomes == ["finished"] * WORLD_SIZE, cluster.log[-8:]
    finally:
        cluster.stop()
