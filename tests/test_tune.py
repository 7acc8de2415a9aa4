"""``switchreduce tune``: search spaces, studies run to their budget through the switch,
pruning, resuming after a kill, two tuners on one PostgreSQL study, optuna-dashboard."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

from switchreduce.experiments import search
from switchreduce.experiments.config import from_dict
from switchreduce.experiments.errors import ConfigError, ExperimentError
from switchreduce.experiments.tune import CONFIG_ATTR, Study, across_seeds, open_storage
from switchreduce.launch import Child, cli_command
from switchreduce.ports import free_tcp_port
from tests.helpers.threads import in_threads

#: Two ranks on loopback, a small MLP, 20 iterations: a trial takes a few seconds.
BASE = {
    "name": "small",
    "topology": {"mode": "loopback", "workers": 2},
    "model": {"hidden": 16},
    "train": {"iterations": 20, "eval_every": 5, "target_accuracy": 0.5},
}
SPACE = {
    "optimizer.lr": {"log_uniform": [0.01, 0.3]},
    "model.hidden": {"integer": [8, 32], "log": True},
    "switch.lane_bits": {"choices": [8, 32]},
}


def _config(**tune: object) -> dict:
    return {**BASE, "tune": {"space": SPACE, **tune}}


def _write(path: Path, raw: dict) -> Path:
    """A config as TOML (json.dumps writes TOML's inline tables and arrays for these)."""
    lines = [f'name = "{raw["name"]}"']
    for section, values in raw.items():
        if section in ("name", "tune"):
            continue
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    tune = dict(raw["tune"])
    space = tune.pop("space")
    lines.append("[tune]")
    lines += [f"{key} = {json.dumps(value)}" for key, value in tune.items()]
    lines.append("[tune.space]")
    for key, spec in space.items():
        inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in spec.items())
        lines.append(f'"{key}" = {{ {inline} }}')
    path.write_text("\n".join(lines) + "\n")
    return path


def _tune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command("tune", *args), capture_output=True, text=True, timeout=timeout, check=False
    )


def _study(run_dir: Path, name: str, url: str | None = None) -> optuna.Study:
    """The study as a tuner left it; opened as the tuner opens its storage, since a test
    that looks while a tuner still creates the tables races it as a second tuner would."""
    storage = open_storage(url or f"sqlite:///{run_dir}/studies.db")
    return optuna.load_study(study_name=name, storage=storage)


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _left_running(marker: Path) -> list[str]:
    """Command lines of processes that mention ``marker`` (a test's own directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(marker) in cmdline:
            found.append(cmdline)
    return found


# -- the search space ------------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"space": {"optimizer.lrr": {"uniform": [0.1, 0.2]}}}, "unknown key 'optimizer.lrr'"),
        ({"space": {"switch.lane_bits": {"choices": [8, 12]}}},
         "tune.space.switch.lane_bits: switch.lane_bits must be one of 32, 16, 8, got 12"),
        ({"space": {"optimizer.lr": {"uniform": [0.3, 0.1]}}},
         "tune.space.optimizer.lr needs low < high"),
        ({"space": {"optimizer.lr": {"log_uniform": [0, 0.1]}}},
         "tune.space.optimizer.lr a log scale needs low > 0"),
        ({"space": {"optimizer.lr": {"uniform": [0.1, 0.2], "choices": [0.1]}}},
         "tune.space.optimizer.lr needs exactly one of"),
        ({"space": {"optimizer.lr": {"uniform": [-1.0, 0.1]}}},
         "tune.space.optimizer.lr: optimizer.lr must be > 0"),
        ({"space": {"model": {"choices": [1]}}}, "'model' is not section.key"),
        ({"space": {"tune.trials": {"choices": [1]}}}, "must name a setting of topology"),
        ({"space": {}}, "tune.space must name at least one"),
        ({"trials": None}, "tune needs a budget"),
        ({"algorithms": ["hyperband"]}, "tune.algorithms must be among grid, random"),
        ({"objective": "time_to_target", "algorithms": ["asha"]}, "asha and cost-aware prune"),
        ({"parallel": 2, "algorithms": ["random"]}, None),  # loopback: allowed
        ({"algorithms": ["asha"], "trial_worker_seconds": 5},
         "tune.trial_worker_seconds is cost-aware's"),
        ({"max_iterations": 10}, "tune.max_iterations must be at least train.iterations (20)"),
        ({"min_iterations": 20}, "tune.min_iterations must be below train.iterations (20)"),
        ({"space": {"train.iterations": {"choices": [10, 20]}}},
         "tune.space.train.iterations is set on every trial by the tuner (cost-aware's top"),
        ({"algorithms": ["asha"], "space": {"train.iterations": {"choices": [10, 20]}}}, None),
        ({"algorithms": ["tpe"], "space": {"train.seed": {"choices": [1, 2]}}},
         "tune.space.train.seed is set on every trial by the tuner (the study's seed)"),
        ({"min_worker_seconds": 5, "trial_worker_seconds": 2},
         "tune.min_worker_seconds must be below tune.trial_worker_seconds"),
        ({"parallel": 2, "space": {"switch.slots": {"choices": [8, 16]}}},
         "tune.space.switch.slots is the shared switch's"),
    ],
)  # fmt: skip
def test_a_bad_search_space_is_an_error_naming_the_key(tune: dict, message: str | None) -> None:
    raw = _config(trials=2)
    raw["tune"] = {k: v for k, v in {**raw["tune"], **tune}.items() if v is not None}
    if message is None:
        from_dict(raw)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(raw)


@pytest.mark.fast
def test_a_search_cannot_be_a_sweep_and_parallel_trials_share_the_star_s_links() -> None:
    with pytest.raises(ConfigError, match=r"tune cannot be combined with \[sweep\]"):
        from_dict({**_config(trials=2), "sweep": {"parameter": "train.seed", "values": [0, 1]}})
    raw = _config(trials=2, parallel=2)
    raw["topology"] = {**raw["topology"], "mode": "mininet", "bw_mbps": 20}
    raw["tune"]["space"] = {**SPACE, "topology.compute_ms": {"choices": [0, 10]}}
    from_dict(raw)  # each trial's own emulated compute may differ
    raw["tune"]["space"] = {**SPACE, "topology.bw_mbps": {"choices": [10, 20]}}
    with pytest.raises(ConfigError, match=r"tune\.space\.topology\.bw_mbps is the shared"):
        from_dict(raw)
    raw["topology"]["mode"] = "loopback"  # on loopback a trial's ranks are its own processes
    raw["tune"]["space"] = {**SPACE, "topology.workers": {"choices": [2, 3]}}
    from_dict(raw)
    raw["train"] = {**raw["train"], "worker_seconds": 5.0}  # cost-aware sets it per trial
    with pytest.raises(ConfigError, match=r"train\.worker_seconds is set on every cost-aware"):
        from_dict(raw)


@pytest.mark.fast
def test_grid_search_spreads_ranges_and_takes_choices_by_index() -> None:
    config = from_dict(_config(algorithms=["grid"], grid_points=3))
    assert config.tune is not None
    space = config.tune.space
    assert space["optimizer.lr"].grid(3) == pytest.approx([0.01, 0.3**0.5 * 0.1, 0.3])
    assert space["model.hidden"].grid(3) == [8, 16, 32]  # geometric, integers
    assert search.grid(space, 3)["switch.lane_bits"] == [0, 1]  # indices of the choices
    # every trial's config must be one the runner accepts
    for lr in space["optimizer.lr"].grid(3):
        assert config.with_values({"optimizer.lr": lr}).optimizer.lr == lr


# -- studies through the switch --------------------------------------------------------


def test_a_study_runs_its_budget_through_the_switch_and_writes_what_it_found(
    tmp_path: Path,
) -> None:
    raw = _config(algorithms=["random"], trials=3)
    raw["tune"]["space"] = {**SPACE, "topology.workers": {"choices": [2, 3]}}
    config = _write(tmp_path / "small.toml", raw)
    run_dir = tmp_path / "run"
    result = _tune(str(config), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "small-random-s0" in result.stdout  # the comparison table
    study = _study(run_dir, "small-random-s0")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    rows = _rows(run_dir / "small-random-s0" / "trials.csv")
    for trial, row in zip(trials, rows, strict=True):
        out = run_dir / "small-random-s0" / f"trial-{trial.number:04d}"
        resolved = json.loads((out / "config.json").read_text())
        # the trial trained with the values the study recorded for it
        assert resolved["optimizer"]["lr"] == pytest.approx(trial.params["optimizer.lr"])
        assert resolved["switch"]["lane_bits"] == int(row["switch.lane_bits"])
        assert resolved["train"]["baselines"] == []
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 20
        assert trial.value == pytest.approx(metrics[-1]["accuracy"])
        workers = resolved["topology"]["workers"]
        assert workers == int(row["topology.workers"])
        assert trial.user_attrs["worker_seconds"] == pytest.approx(workers * metrics[-1]["elapsed"])
        assert [e[3] for e in trial.user_attrs["evals"]] == [5, 10, 15, 20]
    (comparison,) = _rows(run_dir / "comparison.csv")
    assert int(comparison["complete"]) == 3
    assert float(comparison["best_accuracy"]) >= max(t.value for t in trials if t.value)
    for name in ("comparison.png", "small-random-s0/history.png", "small-random-s0/cost.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    assert not _left_running(tmp_path)

    # optuna-dashboard serves the study from the same storage
    port = free_tcp_port()
    dashboard = ["optuna-dashboard", f"sqlite:///{run_dir}/studies.db", "--host", "127.0.0.1",
                 "--port", str(port)]  # fmt: skip
    executable = Path(sys.executable).parent / dashboard[0]
    with Child([str(executable), *dashboard[1:]], "optuna-dashboard", speaks=False,
               log=tmp_path / "dashboard.log") as child:  # fmt: skip
        body = _get(f"http://127.0.0.1:{port}/api/studies", deadline=30)
        child.stop()
    assert "small-random-s0" in body


def _get(url: str, deadline: float) -> str:
    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.3)


def test_halving_prunes_trials_mid_run_and_stops_their_processes(tmp_path: Path) -> None:
    """asha (rungs in iterations) and cost-aware (rungs in worker-seconds) on a space where
    half the learning rates cannot learn in 20 iterations: both prune, a pruned trial's
    ranks are stopped at once, and cost-aware indexes its reports by what they cost."""
    raw = _config(algorithms=["asha", "cost-aware"], trials=6, reduction_factor=2)
    raw["topology"] = {**raw["topology"], "compute_ms": 50.0}  # 20 iterations: over a second
    raw["tune"]["space"] = {
        "optimizer.lr": {"choices": [0.00001, 0.1]},
        "switch.lane_bits": {"choices": [8, 32]},
    }
    config = _write(tmp_path / "small.toml", raw)
    run_dir = tmp_path / "run"
    result = _tune(str(config), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    for algorithm in ("asha", "cost-aware"):
        study = _study(run_dir, f"small-{algorithm}-s0")
        pruned = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.PRUNED]
        # pruned at a rung before the last evaluation: stopped there, mid-run
        early = [t for t in pruned if t.user_attrs["evals"][-1][3] < 20]
        assert early, f"{algorithm}: nothing pruned before its end"
        for trial in early:
            out = run_dir / f"small-{algorithm}-s0" / f"trial-{trial.number:04d}"
            done = (out / "metrics-switch-rank0.jsonl").read_text().splitlines()
            assert len(done) < 20
            assert not (out / "summary.csv").exists()
    # cost-aware's first trial ran train.iterations and measured the top rung: what it
    # spent on them; every later trial ends once it has spent that much
    cost_aware = _study(run_dir, "small-cost-aware-s0")
    first = cost_aware.trials[0]
    assert first.user_attrs["evals"][-1][3] == 20
    top = cost_aware.user_attrs[search.TOP_RUNG_MS]
    assert top == pytest.approx(first.user_attrs["evals"][-1][1] * 1000)
    for trial in cost_aware.trials[1:]:
        out = run_dir / "small-cost-aware-s0" / f"trial-{trial.number:04d}"
        train = json.loads((out / "config.json").read_text())["train"]
        assert train["worker_seconds"] == pytest.approx(top / 1000)
    assert sorted(first.intermediate_values) == [
        round(e[1] * 1000) for e in first.user_attrs["evals"]
    ]
    assert sorted(_study(run_dir, "small-asha-s0").trials[0].intermediate_values) == [5, 10, 15, 20]
    assert not _left_running(tmp_path)


def test_cost_aware_trials_end_at_their_cost_so_cheap_ones_train_further(
    tmp_path: Path,
) -> None:
    """cost-aware's top rung is a cost: each trial ends at its first evaluation past
    tune.trial_worker_seconds, after up to tune.max_iterations, so a configuration with
    a fifth of the compute per iteration runs more iterations for the same spend."""
    raw = _config(algorithms=["cost-aware"], trials=6, trial_worker_seconds=2.0,
                  max_iterations=400)  # fmt: skip
    raw["tune"]["space"] = {"topology.compute_ms": {"choices": [10.0, 50.0]}}
    config = _write(tmp_path / "small.toml", raw)
    run_dir = tmp_path / "run"
    result = _tune(str(config), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(run_dir, "small-cost-aware-s0")
    assert search.TOP_RUNG_MS not in study.user_attrs  # given, not measured
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    iterations: dict[float, list[int]] = {10.0: [], 50.0: []}
    for trial in complete:
        spent = [e[1] for e in trial.user_attrs["evals"]]
        assert spent[-1] >= 2.0 > spent[-2]  # ended at the first evaluation past its cost
        assert trial.user_attrs["iterations"] < 400
        compute = [10.0, 50.0][trial.params["topology.compute_ms"]]
        iterations[compute].append(trial.user_attrs["iterations"])
    assert iterations[10.0] and iterations[50.0], iterations
    assert min(iterations[10.0]) > max(iterations[50.0])
    assert not _left_running(tmp_path)


def test_a_killed_tuner_leaves_nothing_running_and_its_study_resumes(tmp_path: Path) -> None:
    config = _write(tmp_path / "small.toml", _config(algorithms=["random"], trials=3))
    run_dir = tmp_path / "run"
    command = cli_command("tune", str(config), "--run-dir", str(run_dir))
    with (tmp_path / "first.log").open("w") as log:
        tuner = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        running = _wait_for_trial(run_dir, "small-random-s0", number=1, deadline=120)
    finally:
        tuner.kill()
        tuner.wait()
    assert running.state == optuna.trial.TrialState.RUNNING
    deadline = time.monotonic() + 15  # the ranks and the switch die with their parent
    while _left_running(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _left_running(run_dir)

    result = _tune(str(config), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _study(run_dir, "small-random-s0").get_trials()
    states = {t.number: t.state for t in trials}
    assert states[1] == optuna.trial.TrialState.FAIL  # the killed one ...
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == running.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE  # ... ran again, same values
    assert retry.params == running.params
    counted = [t for t in trials if t.state != optuna.trial.TrialState.FAIL]
    assert len(counted) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)


def _wait_for_trial(run_dir: Path, name: str, number: int, deadline: float):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if (run_dir / "studies.db").exists():
            try:
                trials = _study(run_dir, name).get_trials()
            except KeyError:  # the study is not there yet
                trials = []
            if len(trials) > number and trials[number].user_attrs.get("iterations"):
                return trials[number]
        time.sleep(0.3)
    raise AssertionError(f"trial {number} of {name} did not start training")


def test_the_cli_names_the_bad_key_and_run_refuses_a_search(tmp_path: Path) -> None:
    raw = _config(trials=2)
    raw["tune"]["space"] = {"switch.lane_bits": {"choices": [8, 12]}}
    result = _tune(str(_write(tmp_path / "bad.toml", raw)), timeout=60)
    assert result.returncode != 0
    assert "tune.space.switch.lane_bits" in result.stderr
    good = _write(tmp_path / "good.toml", _config(trials=2))
    ran = subprocess.run(cli_command("run", str(good), "--runs", str(tmp_path)),
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert ran.returncode != 0
    assert "`switchreduce tune` it" in ran.stderr


# -- one study, two tuners, PostgreSQL ---------------------------------------------------


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return found[-1].parent if found else None


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL server of its own (Debian's package), on a free loopback port, stopped
    and removed after the test; its URL. As root it runs as the postgres user (it refuses
    root), in a directory of that user's outside pytest's root-only tree."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (make installs Debian's postgresql)")
    home = Path(tempfile.mkdtemp(prefix="switchreduce-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = home / "data"
    try:
        initdb = subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data),
                                 "-U", "postgres", "--auth=trust"],
                                capture_output=True, text=True)  # fmt: skip
        assert initdb.returncode == 0, initdb.stdout + initdb.stderr
        port = free_tcp_port()
        server = [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                  "-c", "listen_addresses=127.0.0.1",
                  "-c", f"unix_socket_directories={home}"]  # fmt: skip
        with Child(server, "postgres", speaks=False, log=tmp_path / "postgres.log") as child:
            end = time.monotonic() + 30
            while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p",
                                  str(port)], capture_output=True).returncode != 0:  # fmt: skip
                assert time.monotonic() < end, child.errors
                time.sleep(0.2)
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
            child.signal_group(signal.SIGINT)  # PostgreSQL's fast shutdown
            child.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_two_tuners_finish_one_postgresql_study_without_duplicated_or_lost_trials(
    tmp_path: Path, postgres: str
) -> None:
    config = _write(tmp_path / "small.toml", _config(algorithms=["random"], trials=6))
    commands = [cli_command("tune", str(config), "--storage", postgres, "--study", "shared",
                            "--run-dir", str(tmp_path / f"tuner{i}")) for i in (1, 2)]  # fmt: skip
    logs = [(tmp_path / f"tuner{i}.log").open("w") for i in (1, 2)]
    tuners = [
        subprocess.Popen(c, stdout=log, stderr=log) for c, log in zip(commands, logs, strict=True)
    ]
    for i, tuner in enumerate(tuners, 1):
        assert tuner.wait(timeout=300) == 0, (tmp_path / f"tuner{i}.log").read_text()[-3000:]
    trials = _study(tmp_path, "shared-random-s0", url=postgres).get_trials()
    ran = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(ran) == 6
    # a FAIL may only be a trial one tuner asked for after the other took the last one
    for t in trials:
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        if t.state == optuna.trial.TrialState.FAIL:
            assert t.user_attrs["error"].startswith("not run: the budget was spent")
    # each trial ran exactly once, in one tuner or the other, and both tuners worked
    dirs = {
        tuner: {p.name for p in (tmp_path / tuner / "shared-random-s0").glob("trial-*")
                if (p / "summary.csv").exists()}
        for tuner in ("tuner1", "tuner2")
    }  # fmt: skip
    assert not dirs["tuner1"] & dirs["tuner2"]
    assert dirs["tuner1"] | dirs["tuner2"] == {f"trial-{t.number:04d}" for t in ran}
    assert dirs["tuner1"] and dirs["tuner2"]


def test_parallel_trials_are_jobs_side_by_side_on_one_switch_and_each_is_released(
    tmp_path: Path,
) -> None:
    """tune.parallel = 2 on loopback: one soft switch and its controller for the study,
    each trial a job registered with it; trials overlap in time, and every job admitted,
    pruned ones included, is released when its trial ends."""
    raw = _config(algorithms=["asha"], trials=6, parallel=2, reduction_factor=2)
    raw["topology"] = {**raw["topology"], "compute_ms": 50.0}
    raw["tune"]["space"] = {"optimizer.lr": {"choices": [0.00001, 0.1]},
                            "switch.lane_bits": {"choices": [8, 32]}}  # fmt: skip
    run_dir = tmp_path / "run"
    result = _tune(str(_write(tmp_path / "small.toml", raw)), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    _side_by_side_jobs(run_dir, "small-asha-s0", count=6)
    assert not _left_running(tmp_path)


def _side_by_side_jobs(run_dir: Path, name: str, count: int) -> list[FrozenTrial]:
    """The study's ``count`` trials, none failed, at least two of them overlapping in
    time; each was a job the shared controller admitted, and released when it ended."""
    trials = _study(run_dir, name).get_trials()
    assert len(trials) == count
    assert all(t.state != optuna.trial.TrialState.FAIL for t in trials)
    spans = [(t.datetime_start, t.datetime_complete) for t in trials]
    assert all(start and end for start, end in spans)
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(spans, 2))  # type: ignore[operator]
    log = (run_dir / name / "switch" / "controller.log").read_text()
    admitted = re.findall(r"job (\d+) admitted", log)
    assert len(admitted) == count
    assert sorted(admitted) == sorted(re.findall(r"job (\d+) released", log))
    return trials


@pytest.mark.requires_root
def test_parallel_trials_in_mininet_are_jobs_on_groups_of_one_star_s_hosts(
    tmp_path: Path,
) -> None:
    """tune.parallel = 2 in Mininet: one star of 2 x 2 hosts at 20 Mbit/s, its soft switch
    and the controller on c0 for the study; each trial a job on a free group of two hosts.
    Trials overlap in time, every job admitted is released, each rank counts the bytes of
    its own host's interface, and nothing is left running."""
    raw = _config(algorithms=["asha"], trials=4, parallel=2, reduction_factor=2)
    raw["topology"] = {**raw["topology"], "mode": "mininet", "bw_mbps": 20}
    raw["tune"]["space"] = {"optimizer.lr": {"choices": [0.00001, 0.1]}}
    run_dir = tmp_path / "run"
    result = _tune(str(_write(tmp_path / "small.toml", raw)), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _side_by_side_jobs(run_dir, "small-asha-s0", count=4)
    # each rank counted what it sent from its own host's interface; a pruned trial's ranks
    # were killed with their metrics still in their buffers, so the complete ones say
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    for trial in complete:
        out = run_dir / "small-asha-s0" / f"trial-{trial.number:04d}"
        for rank in (0, 1):
            lines = (out / f"metrics-switch-rank{rank}.jsonl").read_text().splitlines()
            assert len(lines) == 20
            assert all(json.loads(line)["bytes_sent"] > 0 for line in lines)
    assert not _left_running(tmp_path)


@pytest.mark.fast
def test_tuners_opening_a_new_sqlite_database_at_once_all_open_it(tmp_path: Path) -> None:
    """Six at once race to create the tables, ten times over: SQLite tells the losers with an
    OperationalError ("table ... already exists"), and each opens the storage again."""
    for attempt in range(10):
        url = f"sqlite:///{tmp_path}/studies-{attempt}.db"
        opened = in_threads(6, functools.partial(_open_storage_of, url))
        assert all(isinstance(storage, RDBStorage) for storage in opened), opened


def _open_storage_of(url: str, rank: int) -> RDBStorage:
    return open_storage(url)


@pytest.mark.fast
def test_a_study_reopened_for_another_config_is_an_error_but_not_for_a_newer_setting(
    tmp_path: Path,
) -> None:
    """A study keeps the config it was made for: reopening it with another setting is an
    error; a claim written before a setting existed (the key absent) still matches while
    that setting is unset."""
    storage = open_storage(f"sqlite:///{tmp_path}/studies.db")

    def reopen(**changes: object) -> Study:
        raw = _config(algorithms=["random"], trials=2)
        raw["model"] = {**raw["model"], **changes}
        return Study(from_dict(raw), "random", 0, storage, "s", tmp_path / "s")

    study = reopen()
    held = json.loads(study.study.user_attrs[CONFIG_ATTR])
    assert held["config"]["tune"]["max_iterations"] is None
    del held["config"]["tune"]["max_iterations"]  # as a version without the setting wrote it
    study.study.set_user_attr(CONFIG_ATTR, json.dumps(held, sort_keys=True))
    reopen()
    with pytest.raises(ExperimentError, match="study 's' in this storage was made for another"):
        reopen(hidden=17)


@pytest.mark.fast
def test_a_study_s_spend_at_an_evaluation_counts_every_trial_as_far_as_it_had_got(
    tmp_path: Path,
) -> None:
    """Two trials side by side: at each evaluation the study has spent what each trial had
    spent by then; cluster time to a target is the spend at the first evaluation showing
    it; across seeds each algorithm gets its mean, lowest and highest."""
    config = from_dict(_config(algorithms=["random"], trials=2, targets=[0.5, 0.9]))
    storage = open_storage(f"sqlite:///{tmp_path}/studies.db")
    study = Study(config, "random", 0, storage, "s", tmp_path / "s")
    # (wall time, worker-seconds, accuracy, iteration) of each evaluation
    for evals in (
        [[1.0, 2.0, 0.3, 5], [3.0, 4.0, 0.6, 10]],
        [[2.0, 1.0, 0.4, 5], [4.0, 3.0, 0.5, 10]],
    ):
        study.study.add_trial(optuna.create_trial(
            value=evals[-1][2], user_attrs={"evals": evals, "worker_seconds": evals[-1][1]},
            params={}, distributions={},
        ))  # fmt: skip
    assert study.timeline() == [(2.0, 0.3), (3.0, 0.4), (5.0, 0.6), (7.0, 0.6)]
    row = study.summary()
    assert (row["worker_seconds"], row["best_value"], row["best_trial"]) == (7.0, 0.6, 0)
    assert (row["worker_seconds_to_0.5"], row["worker_seconds_to_0.9"]) == (5.0, None)
    other = {**row, "seed": 1, "best_value": 0.4, "worker_seconds_to_0.5": 9.0}
    (spread,) = across_seeds(config, [row, other])
    assert spread["best_value_mean"] == pytest.approx(0.5)
    assert (spread["best_value_min"], spread["best_value_max"]) == (0.4, 0.6)
    assert (spread["reached_0.5"], spread["worker_seconds_to_0.5_mean"]) == (2, 7.0)
    assert spread["reached_0.9"] == 0


def test_an_interrupted_tuner_stops_its_trial_and_the_next_one_runs_it_again(
    tmp_path: Path,
) -> None:
    """SIGTERM (or Ctrl-C): the running trial is stopped, its processes with it, and put
    back in the study with the same values; the next tuner runs it without waiting for a
    heartbeat to go stale."""
    raw = _config(algorithms=["random"], trials=2)
    raw["topology"] = {**raw["topology"], "compute_ms": 100.0}  # 20 iterations: 2 s and more
    config = _write(tmp_path / "small.toml", raw)
    run_dir = tmp_path / "run"
    with (tmp_path / "first.log").open("w") as log:
        tuner = subprocess.Popen(
            cli_command("tune", str(config), "--run-dir", str(run_dir)), stdout=log, stderr=log
        )
    try:
        stopped = _wait_for_trial(run_dir, "small-random-s0", number=0, deadline=120)
        tuner.send_signal(signal.SIGTERM)
        assert tuner.wait(timeout=60) == 130
    finally:
        tuner.kill()
    assert "interrupted; everything started was stopped" in (tmp_path / "first.log").read_text()
    assert not _left_running(run_dir)
    first = _study(run_dir, "small-random-s0").get_trials()
    assert first[0].state == optuna.trial.TrialState.FAIL
    assert first[0].user_attrs["stopped"] == "the tuner was interrupted"
    assert first[1].state == optuna.trial.TrialState.WAITING
    assert first[1].params == stopped.params

    started = time.monotonic()
    result = _tune(str(config), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _study(run_dir, "small-random-s0").get_trials()
    assert [t.state for t in trials[1:]] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[1].params == stopped.params
    assert time.monotonic() - started < 60
