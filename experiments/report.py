"""What a run leaves behind: merged metrics, summary tables, plots, the one-screen summary.

``metrics.jsonl`` has one record per backend and iteration:

    backend          "switch" or "gloo"
    iteration        1..iterations
    loss             training loss, mean over the ranks' batches
    seconds          the iteration's time on the slowest rank (compute + aggregation)
    elapsed          training time so far on the slowest rank (evaluation excluded)
    bytes_sent       bytes all ranks sent in the iteration: their interfaces' counters in
                     Mininet; the shim's UDP payload bytes on loopback; null for gloo there
    retransmissions  the shim's retransmissions (switch only)
    accuracy, test_loss   on the test set, where evaluated (every rank holds the same model)
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path

from switchreduce.experiments.records import metrics_path

log = logging.getLogger(__name__)

SUMMARY_FIELDS = (
    "backend",
    "mode",
    "iterations",
    "final_loss",
    "final_accuracy",
    "median_iteration_s",
    "mean_iteration_s",
    "total_s",
    "bytes_per_iteration",
    "retransmissions",
)


def show_progress(backend: str, record: dict) -> None:
    """Log one progress record of a training run."""
    accuracy = f"  accuracy {record['accuracy']:.1%}" if "accuracy" in record else ""
    log.info(
        "%s",
        f"  {backend:6s} iteration {record['iteration']:5d}  loss {record['loss']:.4f}  "
        f"{record['seconds'] * 1000:7.1f} ms/it{accuracy}",
    )


def merge_metrics(out: Path, backends, workers: int) -> list[dict]:
    """Every rank's per-iteration records, merged into one record per backend and iteration."""
    merged = []
    for backend in backends:
        per_rank = []
        for rank in range(workers):
            lines = metrics_path(out, backend, rank).read_text().splitlines()
            per_rank.append([json.loads(line) for line in lines])
        for records in zip(*per_rank, strict=True):
            first = records[0]
            sent = [r["bytes_sent"] for r in records]
            record = {
                "backend": backend,
                "iteration": first["iteration"],
                "loss": statistics.fmean(r["loss"] for r in records),
                "seconds": max(r["seconds"] for r in records),
                "elapsed": max(r["elapsed"] for r in records),
                "bytes_sent": None if None in sent else sum(sent),
                "retransmissions": sum(r.get("retransmissions", 0) for r in records),
            }
            for key in ("accuracy", "test_loss"):
                if key in first:
                    record[key] = first[key]
            merged.append(record)
    return merged


def summarize(backend: str, records: list[dict], mode: str) -> dict:
    mine = [r for r in records if r["backend"] == backend]
    evaluated = [r for r in mine if "accuracy" in r]
    seconds = [r["seconds"] for r in mine]
    sent = [r["bytes_sent"] for r in mine]
    return {
        "backend": backend,
        "mode": mode,
        "iterations": len(mine),
        "final_loss": statistics.fmean(r["loss"] for r in mine[-10:]),
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "median_iteration_s": statistics.median(seconds),
        "mean_iteration_s": statistics.fmean(seconds),
        "total_s": mine[-1]["elapsed"],
        "bytes_per_iteration": None if None in sent else sum(sent) / len(sent),
        "retransmissions": sum(r["retransmissions"] for r in mine),
    }


def write_run(out: Path, records: list[dict], rows: list[dict]) -> None:
    with (out / "metrics.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    _write_csv(out / "summary.csv", SUMMARY_FIELDS, rows)
    _plot_run(out, records)


def write_sweep(run_dir: Path, parameter: str, rows: list[dict]) -> None:
    _write_csv(run_dir / "sweep.csv", (parameter, *SUMMARY_FIELDS), rows)
    plt = _pyplot()
    fig, (acc, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in ("switch", "gloo"):
        mine = [r for r in rows if r["backend"] == backend]
        if not mine:
            continue
        labels = [str(r[parameter]) for r in mine]
        if labels == ["any"]:  # the baseline, run once: a reference line
            acc.axhline(mine[0]["final_accuracy"], color="grey", ls="--", label="gloo")
            speed.axhline(mine[0]["median_iteration_s"] * 1000, color="grey", ls="--", label="gloo")
            continue
        acc.plot(labels, [r["final_accuracy"] for r in mine], "o-", label=backend)
        speed.plot(labels, [r["median_iteration_s"] * 1000 for r in mine], "o-", label=backend)
    acc.set(xlabel=parameter, ylabel="final test accuracy")
    speed.set(xlabel=parameter, ylabel="median iteration time (ms)")
    for ax in (acc, speed):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "sweep.png", dpi=110)
    plt.close(fig)


def _write_csv(path: Path, fields, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in fields})


def _cell(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else value


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PLOTS = ("loss_vs_iteration.png", "loss_vs_time.png", "accuracy_vs_time.png")


def _plot_run(out: Path, records: list[dict]) -> None:
    plt = _pyplot()
    backends = list(dict.fromkeys(r["backend"] for r in records))
    specs = [
        ("iteration", "loss", "iteration", "training loss"),
        ("elapsed", "loss", "wall time (s)", "training loss"),
        ("elapsed", "accuracy", "wall time (s)", "test accuracy"),
    ]
    for name, (x, y, xlabel, ylabel) in zip(PLOTS, specs, strict=True):
        fig, ax = plt.subplots(figsize=(6, 4))
        for backend in backends:
            points = [(r[x], r[y]) for r in records if r["backend"] == backend and y in r]
            ax.plot(
                *zip(*points, strict=True),
                "o-" if y == "accuracy" else "-",
                label="through the switch" if backend == "switch" else "gloo allreduce",
            )
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def print_summary(run_dir: Path, config, rows: list[dict]) -> None:
    """The one screen a run ends with."""
    sweep = config.sweep
    key = sweep.parameter if sweep else None
    print()
    print(
        f"{'':14s}{'backend':8s}{'accuracy':>9s}{'loss':>8s}{'ms/it':>9s}{'total s':>9s}"
        f"{'KB/it':>9s}{'retx':>7s}"
    )
    for row in rows:
        label = f"{row[key]}" if key else ""
        kb = (
            "-" if row["bytes_per_iteration"] is None else f"{row['bytes_per_iteration'] / 1e3:.1f}"
        )
        acc = "-" if row["final_accuracy"] is None else f"{row['final_accuracy']:.1%}"
        print(
            f"{label:14s}{row['backend']:8s}{acc:>9s}{row['final_loss']:8.4f}"
            f"{row['median_iteration_s'] * 1000:9.1f}{row['total_s']:9.1f}{kb:>9s}"
            f"{row['retransmissions']:7d}"
        )
    switch = [r for r in rows if r["backend"] == "switch"]
    gloo = [r for r in rows if r["backend"] == "gloo"]
    if len(switch) == 1 and len(gloo) == 1:
        s, g = switch[0], gloo[0]
        print(
            f"time per iteration, switch / gloo: "
            f"{s['median_iteration_s'] / g['median_iteration_s']:.2f}"
        )
        if s["final_accuracy"] is not None and g["final_accuracy"] is not None:
            delta = (s["final_accuracy"] - g["final_accuracy"]) * 100
            print(f"final accuracy, switch - gloo: {delta:+.1f} points")
    print(f"run directory: {run_dir}")
    if sweep:
        print(f"  {run_dir / 'sweep.csv'}\n  {run_dir / 'sweep.png'}")
    else:
        for name in ("summary.csv", *PLOTS):
            print(f"  {run_dir / name}")
