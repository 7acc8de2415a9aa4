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
    waits            of those, the ones the switch answered WAITING: their round held the
                     contribution and waited for another rank (switch only)
    packets_sent     the shim's packets, first sendings and resends (switch only)
    late             chunks whose sums a quorum completed without the rank's contribution
                     (switch only; always 0 without a quorum)
    accuracy, test_loss   on the test set, where evaluated (every rank holds the same model)
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections.abc import Sequence
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
    "waits",
    "packets_sent",
    "late",
    "target_accuracy",
    "time_to_target_s",
)
#: The shim's counts a record carries, none for gloo.
SHIM_COUNTS = ("waits", "packets_sent", "late")
#: A swept seed: sweep.csv's rows are then also averaged over it, in seeds.csv.
SEED = "train.seed"
ACROSS_SEEDS_FIELDS = (
    "backend",
    "seeds",
    "final_accuracy_mean",
    "final_accuracy_min",
    "final_accuracy_max",
    "median_iteration_s_mean",
    "bytes_per_iteration_mean",
    "reached_target",
    "time_to_target_s_mean",
)
#: How plots name the backends (worker.backends).
LABELS = {
    "switch": "through the switch",
    "gloo": "gloo allreduce",
    "gloo-fp16": "gloo + fp16_compress_hook",
    "gloo-powersgd": "gloo + powerSGD_hook",
}


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
                **{key: _total(records, key) for key in SHIM_COUNTS},
            }
            for key in ("accuracy", "test_loss"):
                if key in first:
                    record[key] = first[key]
            merged.append(record)
    return merged


def _total(records: Sequence[dict], key: str) -> int | None:
    """The sum of a count the records carry, or None where the backend keeps none (gloo)."""
    counts = [r[key] for r in records if r.get(key) is not None]
    return sum(counts) if counts else None


def summarize(backend: str, records: list[dict], mode: str, target: float | None = None) -> dict:
    """One backend's row; ``time_to_target_s`` is the training time (evaluation excluded)
    at the first evaluation that reached ``target`` accuracy (None: never, or no target)."""
    mine = [r for r in records if r["backend"] == backend]
    evaluated = [r for r in mine if "accuracy" in r]
    reached = [r["elapsed"] for r in evaluated if target is not None and r["accuracy"] >= target]
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
        **{key: _total(mine, key) for key in SHIM_COUNTS},
        "target_accuracy": target,
        "time_to_target_s": reached[0] if reached else None,
    }


def write_run(out: Path, records: list[dict], rows: list[dict], plots: bool = True) -> None:
    with (out / "metrics.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    write_csv(out / "summary.csv", SUMMARY_FIELDS, rows)
    if plots:
        _plot_run(out, records, rows)


def write_sweep(run_dir: Path, keys: tuple[str, ...], rows: list[dict]) -> None:
    """sweep.csv, sweep.png (accuracy and time against the swept values) and tradeoff.png;
    with a swept seed, seeds.csv (each setting averaged over the seeds)."""
    write_csv(run_dir / "sweep.csv", (*keys, *SUMMARY_FIELDS), rows)
    if SEED in keys:
        others, settings = across_seeds(keys, rows)
        write_csv(run_dir / "seeds.csv", (*others, *ACROSS_SEEDS_FIELDS), settings)
    plt = pyplot()
    fig, (acc, speed) = plt.subplots(1, 2, figsize=(10, 4))
    xlabel = ", ".join(keys)
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        labels = [_point(r, keys) for r in mine]
        name = LABELS.get(backend, backend)
        if set(labels) == {_point(dict.fromkeys(keys, "any"), keys)}:  # run once: a line
            acc.axhline(mine[0]["final_accuracy"], color=_color(backend), ls="--", label=name)
            speed.axhline(
                mine[0]["median_iteration_s"] * 1000, color=_color(backend), ls="--", label=name
            )
            continue
        acc.plot(labels, [r["final_accuracy"] for r in mine], "o-", label=name)
        speed.plot(labels, [r["median_iteration_s"] * 1000 for r in mine], "o-", label=name)
    acc.set(xlabel=xlabel, ylabel="final test accuracy")
    speed.set(xlabel=xlabel, ylabel="median iteration time (ms)")
    for ax in (acc, speed):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(run_dir / "sweep.png", dpi=110)
    plt.close(fig)
    _plot_tradeoff(run_dir / "tradeoff.png", rows, keys)


def across_seeds(keys: tuple[str, ...], rows: list[dict]) -> tuple[tuple[str, ...], list[dict]]:
    """The swept keys but the seed, and one row per setting of them and backend: accuracy's
    mean and range over the seeds, mean time and bytes, and how many seeds reached the
    target accuracy (their mean time to it)."""
    others = tuple(key for key in keys if key != SEED)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((*(row[key] for key in others), row["backend"]), []).append(row)
    settings = []
    for group in groups.values():
        accuracy = [r["final_accuracy"] for r in group if r["final_accuracy"] is not None]
        sent = [r["bytes_per_iteration"] for r in group if r["bytes_per_iteration"] is not None]
        reached = [r["time_to_target_s"] for r in group if r["time_to_target_s"] is not None]
        settings.append(
            {
                **{key: group[0][key] for key in others},
                "backend": group[0]["backend"],
                "seeds": len(group),
                "final_accuracy_mean": statistics.fmean(accuracy) if accuracy else None,
                "final_accuracy_min": min(accuracy, default=None),
                "final_accuracy_max": max(accuracy, default=None),
                "median_iteration_s_mean": statistics.fmean(r["median_iteration_s"] for r in group),
                "bytes_per_iteration_mean": (
                    statistics.fmean(sent) if len(sent) == len(group) else None
                ),
                "reached_target": len(reached),
                "time_to_target_s_mean": statistics.fmean(reached) if reached else None,
            }
        )
    return others, settings


def _point(row: dict, keys: tuple[str, ...]) -> str:
    """A sub-run's swept values, short: the keys' last parts with their values."""
    return ", ".join(f"{key.rpartition('.')[2]}={row[key]}" for key in keys)


def _color(backend: str) -> str:
    return f"C{list(LABELS).index(backend) % 10}" if backend in LABELS else "grey"


def _plot_tradeoff(path: Path, rows: list[dict], keys: tuple[str, ...]) -> None:
    """Final accuracy against bytes per iteration, one point per method and setting (with a
    swept seed, the mean over the seeds with their range as an error bar): the trade-off
    between communication and model quality. Runs without byte counts (gloo on loopback)
    are left out."""
    if SEED in keys:
        keys, settings = across_seeds(keys, rows)
        points = [
            (s, s["bytes_per_iteration_mean"], s["final_accuracy_mean"],
             (s["final_accuracy_mean"] - s["final_accuracy_min"],
              s["final_accuracy_max"] - s["final_accuracy_mean"]))
            for s in settings if s["final_accuracy_mean"] is not None
        ]  # fmt: skip
    else:
        points = [(r, r["bytes_per_iteration"], r["final_accuracy"], (0.0, 0.0)) for r in rows]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 6))
    counted = [(row, x, y, err) for row, x, y, err in points if x is not None and y is not None]
    for i, (row, x, y, (below, above)) in enumerate(counted):
        name = LABELS.get(row["backend"], row["backend"])
        if any(row[key] != "any" for key in keys):
            name = f"{name}: {_point(row, keys)}"
        ax.errorbar(
            x / 1e3, y, yerr=[[below], [above]], fmt="os^vDPX*"[i % 8], color=f"C{i % 10}",
            capsize=3, label=name,
        )  # fmt: skip
    ax.set(xlabel="bytes sent per iteration, all ranks (KB)", ylabel="final test accuracy")
    if counted:
        ax.set_xscale("log")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    else:
        ax.set_title("no run counted its bytes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_csv(path: Path, fields, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in fields})


def _cell(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else value


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PLOTS = ("loss_vs_iteration.png", "loss_vs_time.png", "accuracy_vs_time.png")


def _plot_run(out: Path, records: list[dict], rows: list[dict]) -> None:
    plt = pyplot()
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
                label=LABELS.get(backend, backend),
            )
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    _plot_tradeoff(out / "tradeoff.png", rows, ())


def print_summary(run_dir: Path, config, rows: list[dict]) -> None:
    """The one screen a run ends with."""
    sweep = config.sweep
    keys = sweep.keys if sweep else ()
    target = config.train.target_accuracy
    labels, width = _labels(rows, keys)
    print()
    print(
        f"{'':{width}s}{'backend':15s}{'accuracy':>9s}{'loss':>8s}{'ms/it':>9s}{'total s':>9s}"
        f"{'KB/it':>9s}{'retx':>7s}" + (f"{'s to ' + format(target, '.0%'):>11s}" if target else "")
    )
    for label, row in zip(labels, rows, strict=True):
        acc = "-" if row["final_accuracy"] is None else f"{row['final_accuracy']:.1%}"
        reached = row["time_to_target_s"]
        to_target = ("-" if reached is None else f"{reached:.1f}") if target else ""
        print(
            f"{label:{width}s}{row['backend']:15s}{acc:>9s}{row['final_loss']:8.4f}"
            f"{row['median_iteration_s'] * 1000:9.1f}{row['total_s']:9.1f}"
            f"{_kilobytes(row['bytes_per_iteration']):>9s}"
            f"{row['retransmissions']:7d}{to_target:>11s}"
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
    if SEED in keys:
        _print_across_seeds(keys, rows, target)
    print(f"run directory: {run_dir}")
    if sweep:
        for name in ("sweep.csv", *(("seeds.csv",) if SEED in keys else ()), "sweep.png"):
            print(f"  {run_dir / name}")
        print(f"  {run_dir / 'tradeoff.png'}")
    else:
        for name in ("summary.csv", *PLOTS, "tradeoff.png"):
            print(f"  {run_dir / name}")


def _print_across_seeds(keys: tuple[str, ...], rows: list[dict], target: float | None) -> None:
    others, settings = across_seeds(keys, rows)
    labels, width = _labels(settings, others)
    print()
    print(
        f"{'':{width}s}{'backend':15s}{'seeds':>6s}{'accuracy (min to max)':>24s}{'ms/it':>9s}"
        f"{'KB/it':>9s}" + (f"{'reached':>9s}{'s to it':>9s}" if target else "")
    )
    for label, row in zip(labels, settings, strict=True):
        acc = "-"
        if row["final_accuracy_mean"] is not None:
            acc = (
                f"{row['final_accuracy_mean']:.1%} ({row['final_accuracy_min']:.1%} to "
                f"{row['final_accuracy_max']:.1%})"
            )
        reached = row["time_to_target_s_mean"]
        to_target = (
            f"{row['reached_target']:>9d}{'-' if reached is None else f'{reached:.1f}':>9s}"
            if target
            else ""
        )
        print(
            f"{label:{width}s}{row['backend']:15s}{row['seeds']:6d}{acc:>24s}"
            f"{row['median_iteration_s_mean'] * 1000:9.1f}"
            f"{_kilobytes(row['bytes_per_iteration_mean']):>9s}{to_target}"
        )


def _labels(rows: list[dict], keys: tuple[str, ...]) -> tuple[list[str], int]:
    """Each row's swept values, and the width of a column that holds them."""
    labels = [",".join(str(row[key]) for key in keys) for row in rows]
    return labels, max([14, *(len(label) + 2 for label in labels)])


def _kilobytes(sent: float | None) -> str:
    return "-" if sent is None else f"{sent / 1e3:.1f}"
