"""A soft switch and a controller as the processes users start, on fixed loopback ports.

Fixed ports, so a test can kill either with SIGKILL and start it again where
its peers expect it. Everything started is stopped by its PID.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from switchreduce.controller.connection import SwitchConnection
from switchreduce.controller.jobs import JOB_TABLES
from switchreduce.launch import CONTROLLER, LISTENING, Child, cli_command
from switchreduce.ports import free_tcp_port, free_udp_ports


def record_children(monkeypatch: pytest.MonkeyPatch) -> list[Child]:
    """Every Child started from now on in the test, to check afterwards by its PID."""
    started: list[Child] = []
    start = Child.__init__

    def recording(self: Child, *args, **kwargs) -> None:
        start(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(Child, "__init__", recording)
    return started


def left_behind(pid: int, grace: float = 5.0) -> bool:
    """Whether the process ``pid``, or any process in its group, still runs ``grace`` seconds
    from now: one SIGKILLed a moment ago may not have died yet. A zombie does not count: it
    runs nothing, and whoever reaps orphans here may take its time."""
    deadline = time.monotonic() + grace
    while _running(pid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)
    return False


def _running(pid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended while we looked
            continue
        state, _, group = text[text.rindex(")") + 2 :].split()[:3]
        if state != "Z" and pid in (int(stat.parent.name), int(group)):
            return True
    return False


def _stop(child: Child | None, kill: bool) -> None:
    if child is None:
        return
    if kill:
        child.kill()
    else:
        child.stop()


class SwitchProcess:
    """``switchreduce switch --p4runtime``: an empty soft switch for a controller."""

    def __init__(self, log_dir: Path, k: int = 256) -> None:
        self.k = k
        self.p4runtime = f"127.0.0.1:{free_tcp_port()}"
        self.data_plane = f"127.0.0.1:{free_udp_ports(1)[0]}"
        self.log = log_dir / "switch.log"
        self.child: Child | None = None
        self._reader: SwitchConnection | None = None

    def start(self) -> SwitchProcess:
        self.child = Child(
            cli_command("switch", "--listen", self.data_plane, "--p4runtime", self.p4runtime,
                        "--k", str(self.k)),
            "switch", log=self.log,
        )  # fmt: skip
        with self.child.killed_on_error():
            self.child.wait_for(LISTENING)
        return self

    def stop(self, kill: bool = False) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        _stop(self.child, kill)

    @property
    def reader(self) -> SwitchConnection:
        """A connection that reads beside the controller without taking its place (kept:
        connecting takes a fifth of a second)."""
        if self._reader is None:
            self._reader = SwitchConnection(self.p4runtime, primary=False)
        return self._reader

    def job_state(self) -> dict:
        """Everything jobs put on the switch: their table entries and multicast groups."""
        state: dict[str, object] = {table: self.reader.read_table(table) for table in JOB_TABLES}
        state["groups"] = self.reader.read_multicast_groups()
        return state

    def holds_nothing(self) -> bool:
        return not any(self.job_state().values())


class ControllerProcess:
    """``switchreduce controller`` for ``switch``, its API on a fixed port."""

    def __init__(self, switch: SwitchProcess, log_dir: Path, *options: str) -> None:
        self.switch = switch
        self.options = options
        self.listen = f"127.0.0.1:{free_tcp_port()}"
        self.url = f"http://{self.listen}"
        self.log = log_dir / "controller.log"
        self.child: Child | None = None

    @property
    def command(self) -> list[str]:
        return cli_command(
            "controller", "--p4runtime", self.switch.p4runtime,
            "--data-plane", self.switch.data_plane, "--listen", self.listen,
            "--k", str(self.switch.k), *self.options,
        )  # fmt: skip

    def start(self) -> ControllerProcess:
        self.child = Child(self.command, "controller", log=self.log)
        with self.child.killed_on_error():
            self.child.wait_for(CONTROLLER)
        assert self.child.said == [f"{CONTROLLER} {self.url}"]  # its first line
        return self

    def stop(self, kill: bool = False) -> None:
        _stop(self.child, kill)

    def request(self, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict]:
        """(HTTP status, JSON answer); an error status is an answer too."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def jobs(self) -> dict:
        status, answer = self.request("GET", "/v1/jobs")
        assert status == 200, answer
        return answer

    def wait_for(self, condition, timeout: float = 10.0) -> dict:
        """Poll GET /v1/jobs until ``condition(answer)``; returns that answer."""
        deadline = time.monotonic() + timeout
        while not condition(answer := self.jobs()):
            assert time.monotonic() < deadline, f"still {answer}"
            time.sleep(0.05)
        return answer
