"""Choosing the worker's engine: on the worker's command line, in the bench, by name.

What each engine does is compared in test_window.py (the window, datagram by
datagram) and test_allreduce.py (sums over sockets); here, that the choice
reaches the workers and that a name no engine has is refused clearly.
"""

from __future__ import annotations

import json

import pytest

from switchreduce.cli import main
from switchreduce.experiments import bench


@pytest.mark.fast
@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "--rank", "0", "--world-size", "1", "--engine", "rust"],
        ["bench", "allreduce", "--worker-engine", "rust"],
    ],
)
def test_an_unknown_engine_on_the_command_line_is_refused_naming_the_engines(argv, capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    assert "invalid choice: 'rust' (choose from 'compiled', 'python')" in capsys.readouterr().err


@pytest.mark.fast
def test_the_bench_refuses_an_unknown_worker_engine_and_one_for_mininet() -> None:
    with pytest.raises(ValueError, match="worker engine must be one of compiled, python"):
        bench.BenchOptions(worker_engine="rust")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="worker engine is chosen on loopback"):
        bench.BenchOptions(topo="mininet", worker_engine="python")


@pytest.mark.parametrize("engine", ["compiled", "python"])
def test_the_loopback_bench_runs_its_workers_on_the_engine_asked_for(engine, capsys) -> None:
    options = bench.BenchOptions(
        workers=2, elements=100_000, timeout=60, worker_engine=engine, as_json=True
    )
    assert bench.run_bench(options) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["worker_engine"] == engine and report["exact"]
