"""Running the README's command lines as written, with a given installation's ``switchreduce``.

``Shell`` is where the commands run: the checkout with `make`'s venv (tests/test_readme.py)
or a fresh venv holding the built wheel, outside the checkout (tests/test_wheel.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from switchreduce import launch

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
#: What a server prints when it is ready (the first word of its first line).
READY = {
    "switch": (launch.LISTENING, launch.P4RUNTIME, launch.SERVING),
    "controller": (launch.CONTROLLER,),
}


def commands_in(text: str) -> list[str]:
    """The command lines of the sh blocks in ``text``: continuations joined, comments gone."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def section(title: str) -> list[str]:
    """The command lines of one README section (up to the next ## heading), in order."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return commands_in(README[start : end if end > 0 else None])


def exact_reports(outputs: list[str]) -> None:
    """Each worker's last line is its JSON report: the sum was exact and within the bound."""
    for out in outputs:
        report = json.loads(out.strip().splitlines()[-1])
        assert report["exact"] and report["within_bound"], report


@dataclass(frozen=True)
class Shell:
    """Where README lines run: ``bin_dir`` first on PATH (its ``switchreduce``), from ``cwd``."""

    bin_dir: Path = Path(sys.executable).parent
    cwd: Path = ROOT

    def environment(self) -> dict[str, str]:
        return dict(os.environ, PATH=f"{self.bin_dir}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")

    @contextmanager
    def server(self, command: str) -> Iterator[subprocess.Popen]:
        """A README server line, running until the block is done; fails if it never gets ready."""
        words = shlex.split(command)
        proc = subprocess.Popen(
            words,
            cwd=self.cwd,
            env=self.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            ready = READY[words[1]]
            assert proc.stdout is not None and proc.stderr is not None
            while True:
                line = proc.stdout.readline()
                assert line, f"{command!r} exited: {proc.stderr.read()[-2000:]}"
                if line.split()[0] in ready and (
                    words[1] != "switch"
                    or "--p4runtime" not in words
                    or line.startswith(launch.LISTENING)
                ):
                    break
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    def run_together(self, commands: list[str], timeout: float = 120) -> list[str]:
        """Start every line at once (the ranks of a job), wait for all; each one's stdout."""
        procs = [
            subprocess.Popen(
                command,
                shell=True,
                cwd=self.cwd,
                env=self.environment(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for command in commands
        ]
        outputs = []
        for command, proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"{command!r} failed:\n{err[-3000:]}"
            outputs.append(out)
        return outputs

    def run_static_job(self) -> None:
        """ "Running the parts yourself": the switch, then its two ranks, twice (a new session)."""
        switch, *workers = section("Running the parts yourself")
        assert switch.startswith("switchreduce switch") and len(workers) == 2
        with self.server(switch):
            for _ in range(2):
                exact_reports(self.run_together(workers))

    @contextmanager
    def controller_job(self) -> Iterator[None]:
        """ "With a controller": switch and controller up (the controller pushes the pipeline),
        the job twice (a finished job is released, so its id runs again), then the curls;
        the servers stay up while the caller's block runs."""
        switch, controller, *rest = section("With a controller")
        workers = [c for c in rest if c.startswith("switchreduce worker")]
        curls = [c for c in rest if c.startswith("curl")]
        assert len(workers) == 2 and len(curls) == 2 and len(rest) == 4
        with self.server(switch), self.server(controller):
            for _ in range(2):
                exact_reports(self.run_together(workers))
            jobs, switch_view = (json.loads(out) for out in self.run_together(curls))
            assert jobs["jobs"] == [] and jobs["switch"] == "available", jobs
            assert switch_view["k"] == 256 and switch_view["data_plane"] == "127.0.0.1:48864"
            yield
