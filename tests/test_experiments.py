"""Experiment configs, and training runs replayed from them through real switches."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from switchreduce import wire
from switchreduce.experiments.config import ExperimentConfig, from_dict, load
from switchreduce.experiments.errors import ConfigError, ExperimentError
from switchreduce.experiments.runner import run_experiment
from switchreduce.experiments.workloads import build_model
from switchreduce.launch import CONTROLLER, Child, cli_command
from switchreduce.p4runtime.names import JobStat
from switchreduce.ports import free_tcp_port

CONFIGS = sorted((Path(__file__).parents[1] / "experiments" / "configs").glob("*.toml"))


def _quiet(backend: str, record: dict) -> None:
    pass


@pytest.mark.fast
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_is_valid_and_replays_from_its_resolved_form(path, tmp_path) -> None:
    config = load(path)
    resolved = tmp_path / "config.json"
    resolved.write_text(config.to_json())
    assert load(resolved) == config
    assert all(variant.sweep is None for _, variant in config.variants())


@pytest.mark.fast
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"topolgy": {}}, "unknown key 'topolgy'"),
        ({"switch": {"kk": 64}}, "unknown key 'switch.kk'"),
        ({"switch": {"k": "256"}}, "switch.k must be int"),
        ({"switch": {"k": 100}}, "switch.k must be one of"),
        ({"train": {"baseline": 1}}, "train.baseline must be bool"),
        ({"topology": {"workers": 3, "slowdown": [1, 2]}}, "topology.slowdown needs one factor"),
        ({"topology": {"slowdown": [1, 1, 1, "x"]}}, r"topology.slowdown\[3\] must be float"),
        ({"switch": {"precision_bits": 40}}, "switch.precision_bits must be 8..32"),
        ({"sweep": {"parameter": "switch.kk", "values": [1]}}, "unknown key 'switch.kk'"),
        ({"sweep": {"parameter": "switch.k", "values": [64, 100]}}, "switch.k must be one of"),
        ({"sweep": {"parameter": "nothing", "values": [1]}}, "is not section.key"),
        ({"sweep": {"parameter": "switch.k", "values": []}}, "sweep.values must list"),
        ({"train": {"measure": "backward"}}, "train.measure must be one of training, compute"),
        ({"train": {"bucket_cap_mb": 0}}, "train.bucket_cap_mb must be > 0"),
        ({"switch": {"overlap": "yes"}}, "switch.overlap must be bool"),
    ],
)
def test_bad_configs_are_rejected_naming_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


@pytest.mark.fast
def test_a_config_file_error_names_the_file(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nname = 'resnet'\n")
    with pytest.raises(ConfigError, match=r"bad.toml: model.name must be mlp or cnn"):
        load(path)


@pytest.mark.fast
def test_a_sweep_expands_into_valid_variants() -> None:
    config = from_dict({"sweep": {"parameter": "switch.precision_bits", "values": [12, 32]}})
    variants = config.variants()
    assert [label for label, _ in variants] == [
        "switch.precision_bits=12",
        "switch.precision_bits=32",
    ]
    assert [v.switch.precision_bits for _, v in variants] == [12, 32]
    assert variants[0][1].switch.k == config.switch.k


def _short(**sections) -> ExperimentConfig:
    raw = {
        "name": "short",
        "topology": {"mode": "loopback", "workers": 2},
        "model": {"hidden": 32},
        "train": {"iterations": 12, "eval_every": 6, "timeout": 20.0},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return from_dict(raw)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_short_loopback_run_writes_metrics_summary_and_plots(tmp_path) -> None:
    config = _short(topology={"switch_loss": 0.02})
    rows = run_experiment(config, tmp_path, show=_quiet)
    records = _records(tmp_path)
    assert [(r["backend"], r["iteration"]) for r in records] == [
        (b, i) for b in ("switch", "gloo") for i in range(1, 13)
    ]
    by_backend = {b: [r for r in records if r["backend"] == b] for b in ("switch", "gloo")}
    # Same seed, same data, same initial model: the first losses agree to float precision,
    # and the trajectories stay together (the switch's sums are gloo's within 2^-30 or so).
    assert by_backend["switch"][0]["loss"] == pytest.approx(by_backend["gloo"][0]["loss"], 1e-6)
    assert by_backend["switch"][-1]["loss"] == pytest.approx(by_backend["gloo"][-1]["loss"], 1e-2)
    assert [r["iteration"] for r in by_backend["switch"] if "accuracy" in r] == [6, 12]
    switch_row = rows[0]
    assert switch_row["retransmissions"] > 0  # the injected loss was healed
    parameters = sum(p.numel() for p in build_model(config.model, 10).parameters())
    assert switch_row["bytes_per_iteration"] > 2 * 4 * parameters  # both ranks' gradients
    with (tmp_path / "summary.csv").open() as f:
        assert [row["backend"] for row in csv.DictReader(f)] == ["switch", "gloo"]
    assert load(tmp_path / "config.json") == config
    for name in ("loss_vs_iteration.png", "loss_vs_time.png", "accuracy_vs_time.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_straggler_sets_the_pace_of_every_rank(tmp_path) -> None:
    config = _short(
        topology={"compute_ms": 10.0, "slowdown": [1.0, 4.0]},
        model={"name": "cnn", "hidden": 4},
        data={"name": "synthetic", "samples": 400},
        train={"baseline": False, "iterations": 8},
    )
    run_experiment(config, tmp_path, show=_quiet)
    for rank in (0, 1):
        lines = (tmp_path / f"metrics-switch-rank{rank}.jsonl").read_text().splitlines()
        seconds = sorted(json.loads(line)["seconds"] for line in lines)
        assert seconds[len(seconds) // 2] >= 0.040  # rank 0 waits for rank 1's 40 ms


def test_a_sweep_runs_every_value_and_the_baseline_once(tmp_path) -> None:
    raw = json.loads(_short(train={"iterations": 4, "eval_every": 4}).to_json())
    raw["sweep"] = {"parameter": "switch.precision_bits", "values": [8, 32]}
    rows = run_experiment(from_dict(raw), tmp_path, show=_quiet)
    assert [(r["switch.precision_bits"], r["backend"]) for r in rows] == [
        ("8", "switch"),
        ("any", "gloo"),
        ("32", "switch"),
    ]
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "sweep.csv").exists()
    assert (tmp_path / "switch.precision_bits=8" / "metrics.jsonl").exists()


def test_compute_and_allreduce_alone_are_the_two_parts_of_a_training_iteration(tmp_path) -> None:
    """Compute alone sends nothing; allreduce alone sends each iteration what a training
    iteration sends once DDP has cut its buckets (several here), and no compute is done."""
    config = _short(
        model={"name": "cnn", "hidden": 8},
        data={"name": "synthetic", "samples": 400},
        train={"iterations": 5, "eval_every": 5, "bucket_cap_mb": 0.03},
    )
    raw = json.loads(config.to_json())
    measures = ("compute", "allreduce", "training")
    raw["sweep"] = {"parameter": "train.measure", "values": list(measures)}
    run_experiment(from_dict(raw), tmp_path, show=_quiet)
    runs = {
        (m, backend): [
            r for r in _records(tmp_path / f"train.measure={m}") if r["backend"] == backend
        ]
        for m in measures
        for backend in ("switch", "gloo")
    }
    assert all(r["bytes_sent"] == 0 for r in runs["compute", "switch"])
    # Each rank kept its own gradients with either backend: the same losses, none summed.
    assert [r["loss"] for r in runs["compute", "switch"]] == [
        r["loss"] for r in runs["compute", "gloo"]
    ]
    assert runs["compute", "switch"][-1]["loss"] != runs["training", "switch"][-1]["loss"]
    datagram = wire.datagram_bytes(config.switch.k)

    def first_sends(record: dict) -> float:  # datagrams sent, resends left out
        return record["bytes_sent"] / datagram - record["retransmissions"]

    steady = first_sends(runs["training", "switch"][-1])  # DDP's buckets, cut after one pass
    assert steady != first_sends(runs["training", "switch"][0])  # one bucket at first
    assert [first_sends(r) for r in runs["allreduce", "switch"]] == [steady] * 5
    for backend in ("switch", "gloo"):  # no training: the model never changes
        assert len({r["loss"] for r in runs["allreduce", backend]}) == 1


def test_shaped_links_on_loopback_are_an_error_not_ignored(tmp_path) -> None:
    with pytest.raises(ExperimentError, match="mininet"):
        run_experiment(_short(topology={"bw_mbps": 20.0}), tmp_path, show=_quiet)


def test_torchrun_launches_ranks_that_register_and_train_through_the_switch(
    programmable_switch, tmp_path
) -> None:
    """What a user runs on real hosts: the controller, then torchrun on each host."""
    config = _short(switch={"slots": 8}, train={"iterations": 5, "eval_every": 5})
    (tmp_path / "config.json").write_text(config.to_json())
    data_host, data_port = programmable_switch.data_plane
    http_port = free_tcp_port()
    with Child(
        cli_command("controller", "--p4runtime", programmable_switch.p4runtime,
                    "--data-plane", f"{data_host}:{data_port}",
                    "--listen", f"127.0.0.1:{http_port}", "--k", "256", "--slots", "8"),
        "controller", log=tmp_path / "controller.log",
    ) as controller:  # fmt: skip
        assert controller.wait_for(CONTROLLER) == f"http://127.0.0.1:{http_port}"
        torchrun = Path(sys.executable).parent / "torchrun"
        subprocess.run(
            [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_tcp_port()),
             "-m", "switchreduce.cli", "train", str(tmp_path / "config.json"),
             "--controller", f"http://127.0.0.1:{http_port}", "--bind", "127.0.0.1:0",
             "--out", str(tmp_path)],
            check=True, timeout=180, capture_output=True,
        )  # fmt: skip
    for rank in (0, 1):
        lines = (tmp_path / f"metrics-switch-rank{rank}.jsonl").read_text().splitlines()
        assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4, 5]
    parameters = sum(p.numel() for p in build_model(config.model, 10).parameters())
    results = programmable_switch.switch.ingress.job_stats[JobStat.RESULTS].packets[1]
    assert results >= 5 * parameters / 256  # every iteration's gradients were summed there


@pytest.mark.requires_root
def test_switch_trains_as_well_as_gloo_and_faster_on_20_mbit_links(tmp_path) -> None:
    """The acceptance run: 4 Mininet hosts, digits, the same seed for both backends."""
    config = load(Path(__file__).parents[1] / "experiments" / "configs" / "headline.toml")
    config = config.with_value("train.iterations", 60).with_value("topology.mode", "mininet")
    rows = {row["backend"]: row for row in run_experiment(config, tmp_path, show=_quiet)}
    switch, gloo = rows["switch"], rows["gloo"]
    assert abs(switch["final_accuracy"] - gloo["final_accuracy"]) <= 0.01
    assert switch["final_accuracy"] > 0.85
    assert switch["median_iteration_s"] < gloo["median_iteration_s"]
    assert switch["mode"] == "mininet"
    # Interface counters: each host sends each gradient element once through the switch.
    assert switch["bytes_per_iteration"] < gloo["bytes_per_iteration"]
