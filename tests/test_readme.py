"""Every command line the README shows runs as written.

The README's ``sh`` blocks are read here, and each command line in them must
be one this file runs verbatim: the quick ones in every test run, the long
ones (whole experiments, Mininet benchmarks) under the ``long`` marker
(``make test-long``). A command added to the README that no test runs fails
:func:`test_every_readme_command_is_run_by_a_test`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
#: What a server prints when it is ready (the first word of its first line).
READY = {"switch": ("listening", "p4runtime", "serving"), "controller": ("controller",)}


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


def environment() -> dict[str, str]:
    """The README assumes `make`'s venv: its bin first on PATH, run from the checkout."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")


@contextmanager
def server(command: str) -> Iterator[subprocess.Popen]:
    """A README server line, running until the block is done; fails if it never gets ready."""
    words = shlex.split(command)
    proc = subprocess.Popen(
        words,
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = READY[words[1]]
        while True:
            line = proc.stdout.readline()
            assert line, f"{command!r} exited: {proc.stderr.read()[-2000:]}"
            if line.split()[0] in ready and (
                words[1] != "switch" or "--p4runtime" not in words or line.startswith("listening")
            ):
                break
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_together(commands: list[str], timeout: float = 120) -> list[str]:
    """Start every line at once (the ranks of a job), wait for all; each one's stdout."""
    procs = [
        subprocess.Popen(
            command,
            shell=True,
            cwd=ROOT,
            env=environment(),
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


def exact_reports(outputs: list[str]) -> None:
    for out in outputs:
        report = json.loads(out.strip().splitlines()[-1])
        assert report["exact"] and report["within_bound"], report


def test_the_static_job_commands_run_and_rerun_exactly() -> None:
    switch, *workers = section("Running the parts yourself")
    assert switch.startswith("switchreduce switch") and len(workers) == 2
    with server(switch):
        for _ in range(2):  # the same run again: a new session, exact again
            exact_reports(run_together(workers))


def test_the_controller_commands_and_torchrun_run_and_rerun() -> None:
    """ "With a controller" as written, then the training section's torchrun line, twice."""
    switch, controller, *rest = section("With a controller")
    workers = [c for c in rest if c.startswith("switchreduce worker")]
    curls = [c for c in rest if c.startswith("curl")]
    assert len(workers) == 2 and len(curls) == 2 and len(rest) == 4
    (torchrun,) = [c for c in section("Training and experiments") if c.startswith("torchrun")]
    with server(switch), server(controller):
        for _ in range(2):  # a finished job is released, so the same job id runs again
            exact_reports(run_together(workers))
        jobs, switch_view = (json.loads(out) for out in run_together(curls))
        assert jobs["jobs"] == [] and jobs["switch"] == "available", jobs
        assert switch_view["k"] == 256 and switch_view["data_plane"] == "127.0.0.1:48864"
        for _ in range(2):
            (out,) = run_together([torchrun], timeout=300)
            assert '"iteration": 200' in out, out[-2000:]


#: The README's long commands: whole experiments and Mininet benchmarks (make test-long).
LONG = [
    "make run",
    "make bench",
    "make topo",
    "switchreduce topo --workers 8 --bw 20 --cli",
    "switchreduce bench allreduce --topo mininet --workers 4 --bw 20 --elements 4000000",
    "switchreduce bench allreduce --topo mininet --switch bmv2 --workers 4 --bw 1 --slots 4 "
    "--elements 50000",
    "switchreduce run experiments/configs/headline.toml",
    'switchreduce run "$(ls -d runs/headline-* | tail -n 1)/config.json"',
    "for k in 256 512 1024; do for p in 0 0.01; do switchreduce bench allreduce --workers 4 "
    "--elements 10000000 --k $k --loss $p --json; done; done",
    "switchreduce bench allreduce --topo mininet --workers 4 --bw 20 --elements 4000000 --json",
    "switchreduce bench allreduce --topo mininet --switch bmv2 --workers 4 --bw 1 --slots 4 "
    "--elements 50000 --json",
]
#: CI runs this one; running it from a test would run the suite inside itself.
CI_RUNS = ["make test"]


def test_every_readme_command_is_run_by_a_test() -> None:
    run_here = (
        section("Running the parts yourself")
        + section("With a controller")
        + [c for c in section("Training and experiments") if c.startswith("torchrun")]
    )
    missing = [c for c in commands_in(README) if c not in run_here + LONG + CI_RUNS]
    assert not missing, f"README command lines no test runs: {missing}"
    stale = [c for c in LONG if c not in commands_in(README)]
    assert not stale, f"commands in LONG that the README no longer shows: {stale}"


@pytest.mark.long
@pytest.mark.parametrize("command", LONG)
def test_long_readme_command_runs_as_written(command: str) -> None:
    needs_root = "mininet" in command or "topo" in command or command == "make run"
    if needs_root and os.geteuid() != 0:
        pytest.skip("Mininet needs root")
    if "bmv2" in command and not shutil.which("simple_switch_grpc"):
        pytest.skip("simple_switch_grpc not on PATH")
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        env=environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, f"{command!r}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
