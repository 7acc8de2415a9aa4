"""A soft switch and a controller as the processes users start, on fixed loopback ports.

Fixed ports, so a test can kill either with SIGKILL and start it again where
its peers expect it. Everything started is stopped by its PID.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from switchreduce.controller.connection import SwitchConnection
from switchreduce.controller.jobs import JOB_TABLES
from switchreduce.launch import cli_command
from switchreduce.ports import free_tcp_port, free_udp_ports


def _start(command: list[str], log: Path, marker: str) -> tuple[subprocess.Popen, list[str]]:
    """Start ``command``; returns it and its stdout lines up to one starting with ``marker``."""
    with log.open("a") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
    lines = []
    while not lines or not lines[-1].startswith(marker):
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            raise RuntimeError(f"{command[3]} exited {proc.returncode}: {log.read_text()[-2000:]}")
        lines.append(line.strip())
    return proc, lines


def _stop(proc: subprocess.Popen | None, kill: bool = False) -> None:
    if proc is None or proc.poll() is not None:
        return
    if kill:
        proc.kill()
    else:
        proc.terminate()
    proc.wait(timeout=30)


class SwitchProcess:
    """``switchreduce switch --p4runtime``: an empty soft switch for a controller."""

    def __init__(self, log_dir: Path, k: int = 256) -> None:
        self.k = k
        self.p4runtime = f"127.0.0.1:{free_tcp_port()}"
        self.data_plane = f"127.0.0.1:{free_udp_ports(1)[0]}"
        self.log = log_dir / "switch.log"
        self.proc: subprocess.Popen | None = None
        self._reader: SwitchConnection | None = None

    def start(self) -> SwitchProcess:
        self.proc, _ = _start(
            cli_command("switch", "--listen", self.data_plane, "--p4runtime", self.p4runtime,
                        "--k", str(self.k)),
            self.log, "listening",
        )  # fmt: skip
        return self

    def stop(self, kill: bool = False) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        _stop(self.proc, kill)

    @property
    def reader(self) -> SwitchConnection:
        """A connection that reads beside the controller without taking its place (kept:
        connecting takes a fifth of a second)."""
        if self._reader is None:
            self._reader = SwitchConnection(self.p4runtime, primary=False)
        return self._reader

    def job_state(self) -> dict:
        """Everything jobs put on the switch: their table entries and multicast groups."""
        state = {table: self.reader.read_table(table) for table in JOB_TABLES}
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
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        return cli_command(
            "controller", "--p4runtime", self.switch.p4runtime,
            "--data-plane", self.switch.data_plane, "--listen", self.listen,
            "--k", str(self.switch.k), *self.options,
        )  # fmt: skip

    def start(self) -> ControllerProcess:
        self.proc, lines = _start(self.command, self.log, "controller http://")
        assert lines == [f"controller {self.url}"], lines  # the first line, machine-readable
        return self

    def stop(self, kill: bool = False) -> None:
        _stop(self.proc, kill)

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
