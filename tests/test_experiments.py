"""Experiment configs, and training runs replayed from them through real switches."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from switchreduce import wire
from switchreduce.experiments import report
from switchreduce.experiments.config import ExperimentConfig, from_dict, load
from switchreduce.experiments.errors import ConfigError, ExperimentError
from switchreduce.experiments.records import metrics_path
from switchreduce.experiments.runner import run_experiment
from switchreduce.experiments.workloads import build_model, build_optimizer, load_dataset
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
        ({"train": {"baseline": True}}, "unknown key 'train.baseline'"),
        ({"train": {"baselines": ["nccl"]}}, "train.baselines must be among gloo, gloo-fp16"),
        ({"train": {"baselines": ["gloo", "gloo"]}}, "train.baselines lists a baseline twice"),
        ({"train": {"baselines": "gloo"}}, "train.baselines must be a list"),
        ({"train": {"powersgd_warmup": 1}}, "train.powersgd_warmup must be >= 2"),
        ({"train": {"target_accuracy": 95}}, r"train.target_accuracy must be in \(0, 1\]"),
        (
            {"train": {"measure": "allreduce", "baselines": ["gloo-powersgd"]}},
            "gloo-powersgd compresses inside the backward pass only",
        ),
        ({"switch": {"lane_bits": 4}}, "switch.lane_bits must be one of 32, 16, 8"),
        ({"switch": {"lane_bits": 8, "precision_bits": 16}}, "precision_bits must stay 32"),
        ({"switch": {"rounding": "up"}}, "switch.rounding must be one of nearest, stochastic"),
        ({"switch": {"error_feedback": 1}}, "switch.error_feedback must be bool"),
        ({"sweep": {"values": [1]}}, "sweep needs either parameter"),
        (
            {"sweep": {"parameters": ["switch.lane_bits", "switch.rounding"], "values": [[8]]}},
            "sweep.values must each list 2 values",
        ),
        (
            {"sweep": {"parameters": ["switch.k"], "parameter": "switch.k", "values": [[64]]}},
            "sweep needs either parameter",
        ),
        ({"topology": {"workers": 3, "slowdown": [1, 2]}}, "topology.slowdown needs one factor"),
        ({"topology": {"slowdown": [1, 1, 1, "x"]}}, r"topology.slowdown\[3\] must be float"),
        ({"switch": {"precision_bits": 40}}, "switch.precision_bits must be 8..32"),
        ({"sweep": {"parameter": "switch.kk", "values": [1]}}, "unknown key 'switch.kk'"),
        ({"sweep": {"parameter": "switch.k", "values": [64, 100]}}, "switch.k must be one of"),
        ({"sweep": {"parameter": "nothing", "values": [1]}}, "is not section.key"),
        ({"sweep": {"parameter": "model", "values": [1]}}, "is not section.key"),
        ({"sweep": {"parameter": "switch.k", "values": []}}, "sweep.values must list"),
        ({"train": {"measure": "backward"}}, "train.measure must be one of training, compute"),
        ({"train": {"bucket_cap_mb": 0}}, "train.bucket_cap_mb must be > 0"),
        ({"switch": {"overlap": "yes"}}, "switch.overlap must be bool"),
        ({"data": {"name": "text"}, "model": {"name": "cnn"}}, "model.name must be mlp with data"),
        ({"data": {"name": "words"}}, "data.name must be digits, synthetic or text"),
        ({"data": {"context": 0}}, "data.context must be 1..256"),
        ({"topology": {"jitter_tail": 1}}, r"topology.jitter_tail must be > 1 \(a finite mean\)"),
        ({"topology": {"jitter_ms": -1}}, "topology.jitter_ms must be >= 0"),
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
    assert [point for point, _ in variants] == [
        {"switch.precision_bits": "12"},
        {"switch.precision_bits": "32"},
    ]
    assert [v.switch.precision_bits for _, v in variants] == [12, 32]
    assert variants[0][1].switch.k == config.switch.k


@pytest.mark.fast
def test_a_sweep_of_several_parameters_sets_them_together() -> None:
    keys = ["switch.lane_bits", "switch.error_feedback", "optimizer.lr"]
    config = from_dict({"sweep": {"parameters": keys, "values": [[32, False, 0.1], [8, True, 1]]}})
    variants = config.variants()
    assert [point for point, _ in variants] == [
        dict(zip(keys, ("32", "False", "0.1"), strict=True)),
        dict(zip(keys, ("8", "True", "1"), strict=True)),
    ]
    settings = [(v.switch.lane_bits, v.switch.error_feedback, v.optimizer.lr) for _, v in variants]
    assert settings == [(32, False, 0.1), (8, True, 1.0)]
    assert all(v.sweep is None for _, v in variants)


def _short(**sections) -> ExperimentConfig:
    raw: dict[str, Any] = {
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
    assert switch_row["packets_sent"] > switch_row["retransmissions"]
    assert (rows[1]["waits"], rows[1]["packets_sent"], rows[1]["late"]) == (None,) * 3  # gloo
    assert switch_row["late"] == 0  # every rank in every round: no quorum
    parameters = sum(p.numel() for p in build_model(config.model, 10).parameters())
    assert switch_row["bytes_per_iteration"] > 2 * 4 * parameters  # both ranks' gradients
    with (tmp_path / "summary.csv").open() as f:
        assert [row["backend"] for row in csv.DictReader(f)] == ["switch", "gloo"]
    assert load(tmp_path / "config.json") == config
    for name in ("loss_vs_iteration.png", "loss_vs_time.png", "accuracy_vs_time.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_loopback_run_with_a_quorum_trains_without_its_slow_rank(tmp_path) -> None:
    """switch.quorum on loopback: the runner's switch holds the job with the quorum (a rank
    given another one refuses to start), and the slow rank is late for the rounds the
    others made without it."""
    config = _short(
        topology={"workers": 3, "compute_ms": 20, "slowdown": [1, 1, 4]},
        switch={"quorum": 2},
        train={"baselines": []},
    )
    (row,) = run_experiment(config, tmp_path, show=_quiet)
    assert row["iterations"] == 12
    assert row["late"] > 0


def test_a_worker_seconds_budget_stops_every_rank_at_the_same_evaluation(tmp_path) -> None:
    """train.worker_seconds: the switch and gloo each train until rank 0 has spent the
    budget (its training time times the workers), then stop at that evaluation, every rank
    at the same iteration (metrics merge rank by rank, strictly)."""
    config = _short(
        topology={"compute_ms": 20.0},
        train={"iterations": 1000, "eval_every": 5, "worker_seconds": 0.8},
    )
    rows = run_experiment(config, tmp_path, show=_quiet)
    records = _records(tmp_path)
    for row in rows:
        mine = [r for r in records if r["backend"] == row["backend"]]
        assert 5 < row["iterations"] < 1000 and row["iterations"] % 5 == 0
        rank0 = [json.loads(line) for line in metrics_path(
            tmp_path, row["backend"], 0).read_text().splitlines()]  # fmt: skip
        evaluated = [r["elapsed"] * 2 for r in rank0 if "accuracy" in r]
        assert evaluated[-1] >= 0.8 > evaluated[-2]  # stopped at the first one past it
        assert mine[-1]["accuracy"] == row["final_accuracy"]


def test_pytorch_s_compression_hooks_train_beside_narrow_lanes(tmp_path) -> None:
    """The switch with 8-bit lanes, stochastic rounding and error feedback, then gloo plain,
    with fp16_compress_hook and with powerSGD_hook, one seed: every method starts from the
    same loss, and each hook changes the trajectory (it is in effect, not just named)."""
    config = _short(
        switch={"lane_bits": 8, "rounding": "stochastic", "error_feedback": True},
        model={"hidden": 64},
        train={
            "baselines": ["gloo", "gloo-fp16", "gloo-powersgd"],
            "powersgd_warmup": 2,
            "target_accuracy": 0.3,
        },
    )
    rows = run_experiment(config, tmp_path, show=_quiet)
    methods = ["switch", "gloo", "gloo-fp16", "gloo-powersgd"]
    assert [row["backend"] for row in rows] == methods
    records = _records(tmp_path)
    losses = {m: [r["loss"] for r in records if r["backend"] == m] for m in methods}
    assert len({round(trail[0], 5) for trail in losses.values()}) == 1  # one model, one batch
    for hooked in ("gloo-fp16", "gloo-powersgd", "switch"):
        assert losses[hooked][-1] != losses["gloo"][-1]
    assert all(row["target_accuracy"] == 0.3 for row in rows)
    reached = [row["time_to_target_s"] for row in rows]
    assert all(t is None or 0 < t <= row["total_s"] for t, row in zip(reached, rows, strict=True))
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.fast
def test_the_text_model_learns_the_next_character_from_its_context() -> None:
    """The corpus is real English: after 150 Adam steps the model guesses the next
    character better than always naming the commonest one (space, about 15%)."""
    config = from_dict({"data": {"name": "text"}, "optimizer": {"name": "adam", "lr": 0.002}})
    data = load_dataset(config.data, seed=0)
    assert data.tokens == config.data.context and data.train_x.shape[1] == data.tokens
    assert 60 <= data.classes <= 128 and len(data.train_y) > 30_000
    torch.manual_seed(0)
    model = build_model(config.model, data.classes, data.tokens)
    optimizer = build_optimizer(config.optimizer, model.parameters())
    for step in range(150):
        batch = slice(step * 64, step * 64 + 64)
        loss = torch.nn.functional.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    commonest = torch.bincount(data.test_y).max().item() / len(data.test_y)
    accuracy = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    assert accuracy > commonest + 0.05, (accuracy, commonest)


def test_the_text_workload_trains_through_8_bit_lanes_beside_gloo(tmp_path) -> None:
    """32- and 8-bit lanes with error feedback, and gloo, on the text workload: one model and
    batch to start from, every method learns, and 8-bit lanes send about a quarter of the
    bytes (the shim's payload bytes on loopback)."""
    raw = json.loads(
        _short(data={"name": "text"}, optimizer={"name": "adam", "lr": 0.002}).to_json()
    )
    raw["sweep"] = {
        "parameters": ["switch.lane_bits", "switch.error_feedback"],
        "values": [[32, False], [8, True]],
    }
    rows = run_experiment(from_dict(raw), tmp_path, show=_quiet)
    assert [(r["switch.lane_bits"], r["backend"]) for r in rows] == [
        ("32", "switch"),
        ("any", "gloo"),
        ("8", "switch"),
    ]
    trails = [
        [r["loss"] for r in _records(sub_run) if r["backend"] == backend]
        for sub_run in sorted(path.parent for path in tmp_path.glob("*/metrics.jsonl"))
        for backend in ("switch", "gloo")
    ]
    trails = [trail for trail in trails if trail]  # gloo ran in the first sub-run only
    assert len(trails) == 3
    assert len({round(trail[0], 5) for trail in trails}) == 1  # one model, one batch
    assert all(trail[-1] < trail[0] for trail in trails)
    assert rows[2]["bytes_per_iteration"] < 0.3 * rows[0]["bytes_per_iteration"]


@pytest.mark.fast
def test_jitter_draws_are_seeded_per_rank_and_heavy_tailed_around_their_mean() -> None:
    topology = from_dict({"topology": {"compute_ms": 10, "jitter_ms": 20}}).topology
    draws = [list(itertools.islice(topology.compute_times(7, rank), 20_000)) for rank in (0, 1)]
    assert draws[0][:50] == list(itertools.islice(topology.compute_times(7, 0), 50))
    assert draws[0][:50] != draws[1][:50]
    assert draws[0][:50] != list(itertools.islice(topology.compute_times(8, 0), 50))
    extra = np.array(draws[0]) - 0.010
    assert extra.min() >= 0
    # Lomax(a = 1.5, scale = 10 ms): median scale * (2**(1/a) - 1), mean 20 ms, a heavy tail
    assert np.median(extra) == pytest.approx(0.010 * (2 ** (1 / 1.5) - 1), rel=0.05)
    assert np.quantile(extra, 0.999) > 20 * 0.020
    light = from_dict({"topology": {"jitter_ms": 20, "jitter_tail": 6}}).topology
    assert np.mean(list(itertools.islice(light.compute_times(0, 0), 20_000))) == pytest.approx(
        0.020, rel=0.05
    )


def test_every_rank_waits_for_the_late_one_of_each_iteration(tmp_path) -> None:
    """Random delays, a different late rank in different iterations: an iteration takes at
    least the longest delay any rank drew for it, on every rank."""
    config = _short(topology={"jitter_ms": 30}, train={"baselines": [], "iterations": 10})
    run_experiment(config, tmp_path, show=_quiet)
    delays = [
        list(itertools.islice(config.topology.compute_times(config.train.seed, rank), 10))
        for rank in (0, 1)
    ]
    late = [0 if a > b else 1 for a, b in zip(*delays, strict=True)]
    assert set(late) == {0, 1}  # each rank is the late one now and then
    for rank in (0, 1):
        lines = (tmp_path / f"metrics-switch-rank{rank}.jsonl").read_text().splitlines()
        seconds = [json.loads(line)["seconds"] for line in lines]
        for iteration, (took, a, b) in enumerate(zip(seconds, *delays, strict=True)):
            assert took >= max(a, b) - 0.005, (rank, iteration, took, a, b)


def test_a_straggler_sets_the_pace_of_every_rank(tmp_path) -> None:
    config = _short(
        topology={"compute_ms": 10.0, "slowdown": [1.0, 4.0]},
        model={"name": "cnn", "hidden": 4},
        data={"name": "synthetic", "samples": 400},
        train={"baselines": [], "iterations": 8},
    )
    [row] = run_experiment(config, tmp_path, show=_quiet)
    for rank in (0, 1):
        lines = (tmp_path / f"metrics-switch-rank{rank}.jsonl").read_text().splitlines()
        seconds = sorted(json.loads(line)["seconds"] for line in lines)
        assert seconds[len(seconds) // 2] >= 0.040  # rank 0 waits for rank 1's 40 ms
    # Waiting is not loss: rank 0 probes (at 10 and 30 ms at most, the timeout floor doubled),
    # it does not resend its window into rounds that hold its packets.
    assert 0 <= row["waits"] <= row["retransmissions"] <= 2 * 8
    assert row["packets_sent"] > row["retransmissions"]


def test_a_sweep_runs_every_value_and_the_baselines_once_per_other_setting(
    tmp_path, capsys
) -> None:
    """Baselines do not read the switch's keys: they run once per seed here, not per lane
    width, and their rows say "any" for the switch's keys. A swept seed is averaged over."""
    raw = json.loads(_short(train={"iterations": 4, "eval_every": 4}).to_json())
    raw["sweep"] = {
        "parameters": ["train.seed", "switch.lane_bits", "switch.error_feedback"],
        "values": [[0, 8, False], [0, 8, True], [1, 8, False]],
    }
    config = from_dict(raw)
    rows = run_experiment(config, tmp_path, show=_quiet)
    keys = ("train.seed", "switch.lane_bits", "switch.error_feedback", "backend")
    assert [tuple(r[key] for key in keys) for r in rows] == [
        ("0", "8", "False", "switch"),
        ("0", "any", "any", "gloo"),
        ("0", "8", "True", "switch"),
        ("1", "8", "False", "switch"),
        ("1", "any", "any", "gloo"),
    ]
    for name in ("sweep.png", "sweep.csv", "tradeoff.png"):
        assert (tmp_path / name).exists()
    with (tmp_path / "sweep.csv").open() as f:
        header = next(csv.reader(f))
    assert header[:4] == list(keys)
    first_run, second_seed = (
        tmp_path / "train.seed=0,switch.lane_bits=8,switch.error_feedback=False",
        tmp_path / "train.seed=1,switch.lane_bits=8,switch.error_feedback=False",
    )
    gloo_losses = [
        next(r["loss"] for r in _records(run) if r["backend"] == "gloo")
        for run in (first_run, second_seed)
    ]
    assert gloo_losses[0] != gloo_losses[1]  # each seed's own model and batches
    with (tmp_path / "seeds.csv").open() as f:
        settings = list(csv.DictReader(f))
    assert [(s["switch.error_feedback"], s["backend"], s["seeds"]) for s in settings] == [
        ("False", "switch", "2"),
        ("any", "gloo", "2"),
        ("True", "switch", "1"),
    ]
    plain = [r["final_accuracy"] for r in rows if r["switch.error_feedback"] == "False"]
    assert float(settings[0]["final_accuracy_mean"]) == pytest.approx(sum(plain) / 2, 1e-5)
    assert float(settings[0]["final_accuracy_min"]) == pytest.approx(min(plain), 1e-5)
    report.print_summary(tmp_path, config, rows)
    shown = capsys.readouterr().out
    assert "accuracy (min to max)" in shown and str(tmp_path / "seeds.csv") in shown


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
