"""Every command line the README shows runs as written.

The README's ``sh`` blocks are read here, and each command line in them must
be one this file runs verbatim: the quick ones in every test run, the long
ones (whole experiments, Mininet benchmarks) under the ``long`` marker
(``make test-long``). A command added to the README that no test runs fails
:func:`test_every_readme_command_is_run_by_a_test`.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers.readme import README, ROOT, Shell, commands_in, section

SHELL = Shell()


def test_the_static_job_commands_run_and_rerun_exactly() -> None:
    SHELL.run_static_job()


def test_the_controller_commands_and_torchrun_run_and_rerun() -> None:
    """ "With a controller" as written, then the training section's torchrun line, twice."""
    (torchrun,) = [c for c in section("Training and experiments") if c.startswith("torchrun")]
    with SHELL.controller_job():
        for _ in range(2):
            (out,) = SHELL.run_together([torchrun], timeout=300)
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
    "switchreduce bench allreduce --topo mininet --workers 4 --bw 20 --elements 4000000 --json",
    "switchreduce bench allreduce --topo mininet --switch bmv2 --workers 4 --bw 1 --slots 4 "
    "--elements 50000 --json",
    "for e in compiled python; do switchreduce bench allreduce --workers 4 --elements 10000000 "
    "--engine $e --json; done",
    "for e in compiled python; do switchreduce bench allreduce --workers 4 --elements 10000000 "
    "--worker-engine $e --json; done",
    "switchreduce bench allreduce --workers 4 --elements 2000000 --loss 0.05 --worker-engine "
    "python --json",
    "for bw in 20 100 1000; do switchreduce bench allreduce --topo mininet --workers 4 --bw $bw "
    "--elements 4000000 --json; done",
    "switchreduce bench allreduce --topo mininet --workers 4 --bw 1000 --mtu 9000 "
    "--elements 4000000 --json",
    "switchreduce bench allreduce --topo mininet --workers 4 --bw 100 --elements 4000000 "
    "--loss 0.01 --json",
    "switchreduce bench allreduce --topo mininet --workers 4 --bw 100 --elements 4000000 --json",
    "switchreduce bench switch --repeat 3 --json",
    "switchreduce run experiments/configs/overlap-parts.toml",
    "switchreduce run experiments/configs/overlap.toml",
    "switchreduce run experiments/configs/compression.toml",
    "switchreduce run experiments/configs/compression-text.toml",
    "switchreduce tune experiments/configs/tune.toml --algorithm grid --seed 0 --run-dir runs/tune",
    "switchreduce tune experiments/configs/tune.toml --algorithm random --algorithm tpe "
    "--algorithm asha --algorithm cost-aware --run-dir runs/tune",
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
    needs_root = needs_root or "tune" in command  # tune.toml shapes its links (Mininet)
    if needs_root and os.geteuid() != 0:
        pytest.skip("Mininet needs root")
    if "bmv2" in command and not shutil.which("simple_switch_grpc"):
        pytest.skip("simple_switch_grpc not on PATH")
    if "mininet" in command and "--loss" in command and not shutil.which("nft"):
        pytest.skip("nft not on PATH: the bridge baseline's loss is an nftables rule")
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        env=SHELL.environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        # compression-text.toml trains 27 times; tune.toml's comparison runs 12 studies
        timeout=4 * 3600 if "tune" in command else 3600,
    )
    assert result.returncode == 0, f"{command!r}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
