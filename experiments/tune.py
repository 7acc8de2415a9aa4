"""``switchreduce tune CONFIG``: a hyperparameter search on the emulated cluster.

The config's ``[tune]`` section (experiments.config.TuneConfig) names a search space
over any ``section.key``, an objective, a budget and the algorithms to compare
(experiments.search). Each algorithm with each seed is one Optuna study; a trial is one
training run through the switch on its own cluster (runner.LoopbackCluster or
MininetCluster), followed as it goes: rank 0's evaluations are reported to the study,
and a pruned trial's processes are stopped at once. ::

    RUN/config.json              the resolved config
    RUN/studies.db               the studies (SQLite), unless --storage names another
    RUN/STUDY/trial-NNNN/        each trial's config, metrics and logs
    RUN/STUDY/trials.csv         each trial: state, values, cost, iterations
    RUN/STUDY/history.png        Optuna's optimization history, and the parameters'
    RUN/STUDY/importance.png     importance (once enough trials have completed)
    RUN/STUDY/cost.png           each trial's accuracy against its cost
    RUN/comparison.csv, .png     per study: budget spent, best value and accuracy, cluster
                                 time to each of tune.targets; best accuracy against
                                 cluster time
    RUN/algorithms.csv           per algorithm over its seeds: mean, lowest and highest

Studies live in Optuna storage, so they resume: run the same command with
``--run-dir RUN`` (or the same ``--storage``) after a kill. Trials of a dead process
stop sending heartbeats; the next process marks them failed and runs their parameters
again. Several processes (machines) may work on one study through a shared database
(``--storage postgresql://...``): the budget is counted in the storage.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
import typing
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from switchreduce.experiments import report, search
from switchreduce.experiments.config import ExperimentConfig, TuneConfig
from switchreduce.experiments.errors import ExperimentError
from switchreduce.experiments.runner import (
    Cluster,
    LoopbackCluster,
    MininetCluster,
    SharedMininet,
    SharedSwitch,
    resolve_mode,
)

log = logging.getLogger(__name__)

# Heartbeats, stale-trial retries and the matplotlib plots are marked experimental in
# Optuna; the tuner records heartbeats itself (_Heartbeat), as Study.optimize would.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
optuna.logging.set_verbosity(optuna.logging.WARNING)

#: Seconds between a running trial's heartbeats, and without one after which another
#: process takes the trial for dead (and runs its parameters again, once).
HEARTBEAT_S = 1
GRACE_S = 10
#: Puts a trial that died with its tuner, or was stopped when the tuner was interrupted,
#: back in the study (WAITING, the same values) for the next tuner: once.
RETRY = RetryHeartbeatStaleTrialCallback(max_retry=1)
#: The study user attribute holding the config a study was made for, and the keys of
#: [tune] it leaves out.
CONFIG_ATTR = "config"
UNCLAIMED = ("algorithms", "seeds", "trials", "worker_seconds", "parallel", "targets")
TRIAL_FIELDS = ("number", "state", "value", "worker_seconds", "iterations", "ms_per_iteration",
                "retried_from", "error")  # fmt: skip
COMPARISON_FIELDS = ("study", "algorithm", "seed", "trials", "complete", "pruned", "failed",
                     "worker_seconds", "best_value", "best_trial", "best_accuracy")  # fmt: skip


@dataclass(frozen=True)
class TuneOptions:
    runs: Path = Path("runs")
    #: Use (or resume) this run directory instead of a new one under ``runs``.
    run_dir: Path | None = None
    #: An Optuna storage URL (sqlite:///..., postgresql://...); default RUN/studies.db.
    storage: str | None = None
    #: The studies' names start with this (default: the config's name).
    study: str | None = None
    #: Run only these of the config's algorithms and seeds (default: all of them).
    algorithms: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()


class _Stop(Exception):
    """A running trial is stopped early: ``state`` says as what, ``why`` what for."""

    def __init__(self, state: TrialState, why: str) -> None:
        super().__init__(why)
        self.state = state
        self.why = why


def open_storage(url: str) -> RDBStorage:
    """An Optuna RDB storage with heartbeats: a trial whose process died is failed and its
    parameters are enqueued again (once) by the next process that looks.

    Tuners started together on a new database race to create its tables; the loser's
    CREATE fails on what the winner made (PostgreSQL says so with an IntegrityError or a
    ProgrammingError, SQLite with an OperationalError), and it opens the storage again."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    attempts = 5
    while True:
        attempts -= 1
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=RETRY,
            )
        except Exception as exc:  # SQLAlchemy's errors for a bad URL, a refused connection, ...
            raced = isinstance(
                exc, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.ProgrammingError
            ) or (isinstance(exc, sqlalchemy.exc.OperationalError) and "already exists" in str(exc))
            if not raced or not attempts:
                raise ExperimentError(f"cannot open the storage {url!r}: {exc}") from None
            time.sleep(0.5)


class Study:
    """One algorithm with one seed: an Optuna study that runs its trials to the budget."""

    def __init__(
        self, config: ExperimentConfig, algorithm: str, seed: int, storage: RDBStorage,
        name: str, out: Path,
    ) -> None:  # fmt: skip
        assert config.tune is not None
        self.config = config
        self.tune: TuneConfig = config.tune
        self.algorithm = algorithm
        self.seed = seed
        self.name = name
        self.out = out
        self.mode = resolve_mode(config.topology.mode)
        self.maximize = self.tune.objective == "accuracy"
        self.sampler = search.sampler(algorithm, self.tune, seed)
        self.study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=self.sampler,
            pruner=search.pruner(algorithm, config),
            direction="maximize" if self.maximize else "minimize",
            load_if_exists=True,
        )
        self._claim(config)
        self._stop = threading.Event()
        self._why_stop = ""
        self._lock = threading.Lock()
        self._mine: set[int] = set()  # the trials this process runs
        self.shared: SharedSwitch | SharedMininet | None = None  # tune.parallel above 1

    def _claim(self, config: ExperimentConfig) -> None:
        """A study holds the trials of one config, algorithm and seed: resuming it with
        another would mix them. The first process to open it records what it is for; the
        budget and the other studies' algorithms and seeds may change (a study may be
        taken further)."""
        raw = json.loads(config.to_json())
        for key in UNCLAIMED:  # what may change between the commands that run a study
            del raw["tune"][key]
        mine = {"config": raw, "algorithm": self.algorithm, "seed": self.seed}
        held = self.study.user_attrs.get(CONFIG_ATTR)
        if held is None:
            self.study.set_user_attr(CONFIG_ATTR, json.dumps(mine, sort_keys=True))
        elif _without_unset(json.loads(held)) != _without_unset(mine):
            raise ExperimentError(
                f"study {self.name!r} in this storage was made for another config, algorithm "
                "or seed; give another --study name or --run-dir"
            )

    # -- the budget ----------------------------------------------------------------------

    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def spent(self) -> float:
        """Worker-seconds of training of every trial so far (running ones too, as far as
        they have reported)."""
        return sum(t.user_attrs.get("worker_seconds", 0.0) for t in self.trials())

    def _may_start(self) -> bool:
        trials = self.trials()
        if any(t.state == TrialState.WAITING for t in trials):  # a dead process's retry
            return True
        if isinstance(self.sampler, optuna.samplers.GridSampler):  # the whole grid
            return not self.sampler.is_exhausted(self.study)
        if self.tune.trials is not None:
            counted = [t for t in trials if t.state != TrialState.FAIL]
            if len(counted) >= self.tune.trials:
                return False
        return self.tune.worker_seconds is None or self.spent() < self.tune.worker_seconds

    def _others_running(self) -> bool:
        """Whether trials not run by this process are RUNNING."""
        return any(t.state == TrialState.RUNNING and t.number not in self._mine
                   for t in self.trials())  # fmt: skip

    def _beyond_budget(self, trial: optuna.Trial) -> bool:
        """Whether another process took the last trial of the budget between our look and
        our ask: the trial numbers below ours that count fill it."""
        if self.tune.trials is None or self.algorithm == "grid":
            return False
        below = [t for t in self.trials()
                 if t.number < trial.number and t.state != TrialState.FAIL]  # fmt: skip
        return len(below) >= self.tune.trials

    # -- running -------------------------------------------------------------------------

    def run(self) -> None:
        """Trials until the budget is spent, ``tune.parallel`` at a time. A trial that
        fails stops the study with its error (its state says FAIL, its logs why)."""
        self.out.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            if self.tune.parallel > 1:
                switch, logs = self.config.switch, self.out / "switch"
                if self.mode == "mininet":  # groups of one star's hosts
                    self.shared = stack.enter_context(
                        SharedMininet(self.config, self.tune.parallel, logs)
                    )
                else:
                    self.shared = stack.enter_context(
                        SharedSwitch(switch.k, switch.slot_count, logs)
                    )
            self._run_lanes()

    def _run_lanes(self) -> None:
        with ThreadPoolExecutor(self.tune.parallel, thread_name_prefix=self.name) as pool:
            futures = [pool.submit(self._trials) for _ in range(self.tune.parallel)]
            errors = []
            for future in futures:
                try:
                    future.result()
                except BaseException as exc:  # stop the other lanes, then raise the first
                    self._why_stop = (
                        "the tuner was interrupted"
                        if isinstance(exc, KeyboardInterrupt)
                        else "another trial of the study failed"
                    )
                    self._stop.set()
                    errors.append(exc)
        if errors:
            raise errors[0]

    def _trials(self) -> None:
        while not self._stop.is_set():
            with self._lock:  # one look-and-ask at a time in this process
                fail_stale_trials(self.study)
                may_start = self._may_start()
                if may_start:
                    trial = self.study.ask()
                    self._mine.add(trial.number)
            if not may_start:
                if not self._others_running():
                    return
                # a trial another process runs may still fail, or its process be dead:
                # then its parameters come back (WAITING) to be run here
                self._stop.wait(HEARTBEAT_S)
                continue
            if self._beyond_budget(trial):
                trial.set_user_attr("error", "not run: the budget was spent by other trials")
                self.study.tell(trial, state=TrialState.FAIL)
                return
            self._run_trial(trial)

    def _run_trial(self, trial: optuna.Trial) -> None:
        values = search.suggest(trial, self.tune.space)
        variant = self.config.with_values(
            {**values, "train.baselines": [], "train.seed": self.seed, **self._top_rung()}
        )
        out = self.out / f"trial-{trial.number:04d}"
        out.mkdir(parents=True, exist_ok=True)
        config_path = out / "config.json"
        config_path.write_text(variant.to_json())
        shown = ", ".join(f"{key}={_short(value)}" for key, value in values.items())
        log.info("%s", f"[{self.name}] trial {trial.number}: {shown}")
        heartbeat = _Heartbeat(self.study, trial)
        cluster: Cluster
        if isinstance(self.shared, SharedMininet):  # a job on a group of the star's hosts
            cluster = MininetCluster(variant, out, self.shared, self.shared.next_job())
        elif self.shared is not None:  # a job beside the others on the shared switch
            cluster = LoopbackCluster(variant, out, self.shared, self.shared.next_job())
        elif self.mode == "mininet":
            cluster = MininetCluster(variant, out)
        else:
            cluster = LoopbackCluster(variant, out)
        state, value, why = TrialState.COMPLETE, None, ""
        try:
            with heartbeat, cluster:
                cluster.train("switch", config_path, self._follower(trial, variant))
        except _Stop as stop:
            state, why = stop.state, stop.why
        except BaseException as exc:
            trial.set_user_attr("error", str(exc) or type(exc).__name__)
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        if state == TrialState.COMPLETE:
            value = self._finish(trial, out, variant)[self.tune.objective]
            self.study.tell(trial, value)
        else:
            trial.set_user_attr("stopped", why)
            frozen = self.study.tell(trial, state=state)
            if state == TrialState.FAIL:  # stopped for no fault of its own: run it again
                RETRY(self.study, frozen)
        self._progress(trial.number, state, value, why)

    def _top_rung(self) -> dict[str, object]:
        """cost-aware's trials end once they have spent its top rung, after up to
        tune.max_iterations; until the top is known (measured on the first trial to reach
        train.iterations), a trial runs train.iterations like any other."""
        if self.algorithm != "cost-aware":
            return {}
        rungs = search.cost_rungs(self.config, self.study.user_attrs.get(search.TOP_RUNG_MS))
        if rungs is None:
            return {}
        iterations = self.tune.max_iterations or self.config.train.iterations
        return {"train.worker_seconds": rungs[1] / 1000, "train.iterations": iterations}

    def _follower(
        self, trial: optuna.Trial, variant: ExperimentConfig
    ) -> Callable[[str, dict], None]:
        """The runner's progress callback for one trial: records its cost, reports its
        evaluations, and stops it when it is pruned, the budget is spent or a lane failed."""
        workers = variant.topology.workers  # the space may set it
        evals: list[list[float]] = []

        def follow(backend: str, record: dict) -> None:
            if self._stop.is_set():
                raise _Stop(TrialState.FAIL, self._why_stop)
            worker_seconds = workers * record["elapsed"]
            trial.set_user_attr("worker_seconds", worker_seconds)
            trial.set_user_attr("iterations", record["iteration"])
            if "accuracy" not in record:
                return
            evals.append([time.time(), worker_seconds, record["accuracy"], record["iteration"]])
            trial.set_user_attr("evals", evals)
            if (  # the study's first trial to get this far measures cost-aware's top rung
                self.algorithm == "cost-aware"
                and variant.train.worker_seconds is None
                and record["iteration"] >= self.config.train.iterations
            ):
                with self._lock:  # the first of this process's lanes
                    if search.TOP_RUNG_MS not in self.study.user_attrs:
                        self.study.set_user_attr(search.TOP_RUNG_MS, worker_seconds * 1000)
            if self.maximize:
                trial.report(
                    record["accuracy"],
                    search.step(self.algorithm, record["iteration"], worker_seconds),
                )
                if trial.should_prune():
                    raise _Stop(TrialState.PRUNED, f"pruned at iteration {record['iteration']}")
            budget = self.tune.worker_seconds
            if budget is not None and self.algorithm != "grid" and self.spent() >= budget:
                raise _Stop(TrialState.PRUNED, "stopped: the study's worker-seconds are spent")

        return follow

    def _finish(self, trial: optuna.Trial, out: Path, variant: ExperimentConfig) -> dict:
        """A trial that ran to its end: its summary from every rank's metrics, and its
        objective values."""
        workers = variant.topology.workers
        records = report.merge_metrics(out, ("switch",), workers)
        target = variant.train.target_accuracy
        row = report.summarize("switch", records, self.mode, target)
        report.write_run(out, records, [row], plots=False)
        trial.set_user_attr("worker_seconds", workers * row["total_s"])
        trial.set_user_attr("iterations", row["iterations"])
        trial.set_user_attr("ms_per_iteration", row["median_iteration_s"] * 1000)
        reached = row["time_to_target_s"]
        return {"accuracy": row["final_accuracy"],
                "time_to_target": math.inf if reached is None else reached}  # fmt: skip

    def _progress(self, number: int, state: TrialState, value: float | None, why: str) -> None:
        trials = self.trials()
        count = {s: sum(t.state == s for t in trials) for s in TrialState}
        best = self.best()
        budget = self.tune.worker_seconds
        spent = f"{self.spent():.0f}" + (f"/{budget:g}" if budget is not None else "")
        outcome = _short(value) if state == TrialState.COMPLETE else why
        best_text = f", best {best.value:.4g} (trial {best.number})" if best else ""
        log.info(
            "%s",
            f"[{self.name}] trial {number} {state.name.lower()}: {outcome} | running "
            f"{count[TrialState.RUNNING]}, complete {count[TrialState.COMPLETE]}, pruned "
            f"{count[TrialState.PRUNED]}, failed {count[TrialState.FAIL]}; "
            f"{spent} worker-s{best_text}",
        )

    def best(self) -> FrozenTrial | None:
        complete = [t for t in self.trials()
                    if t.state == TrialState.COMPLETE and t.value is not None
                    and math.isfinite(t.value)]  # fmt: skip
        if not complete:
            return None
        pick = max if self.maximize else min
        return pick(complete, key=lambda t: typing.cast(float, t.value))

    # -- what it found -------------------------------------------------------------------

    def timeline(self) -> list[tuple[float, float]]:
        """(cluster worker-seconds spent by the study, best accuracy any trial had shown)
        at each evaluation, in the order they happened: what the search had found for
        what it had spent."""
        evals = [(e[0], t.number, e[1], e[2]) for t in self.trials()
                 for e in t.user_attrs.get("evals", [])]  # fmt: skip
        evals.sort()
        spent_by: dict[int, float] = {}
        best, points = -math.inf, []
        for _, number, worker_seconds, accuracy in evals:
            spent_by[number] = worker_seconds
            best = max(best, accuracy)
            points.append((sum(spent_by.values()), best))
        return points

    def summary(self) -> dict:
        """The study's comparison row; ``worker_seconds_to_A`` for each target accuracy A
        (``targets``) is what it had spent when a trial first showed A (None: never)."""
        trials = self.trials()
        best = self.best()
        timeline = self.timeline()
        reached = {
            _to_target(target): next((spent for spent, shown in timeline if shown >= target), None)
            for target in targets(self.config)
        }
        return {
            "study": self.name,
            "algorithm": self.algorithm,
            "seed": self.seed,
            "trials": len(trials),
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials),
            "worker_seconds": self.spent(),
            "best_value": None if best is None else best.value,
            "best_trial": None if best is None else best.number,
            "best_accuracy": _best_accuracy(trials),
            **reached,
        }

    def write(self) -> None:
        """trials.csv and the study's plots."""
        rows = []
        for t in self.trials():
            row = {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "retried_from": RetryHeartbeatStaleTrialCallback.retried_trial_number(t),
                **{key: t.user_attrs.get(key) for key in TRIAL_FIELDS[3:] if key != "retried_from"},
                **_param_values(self.tune, t),
            }
            rows.append(row)
        report.write_csv(self.out / "trials.csv", (*TRIAL_FIELDS, *self.tune.space), rows)
        _plot_study(self)


class _Heartbeat:
    """Records a running trial's heartbeat every HEARTBEAT_S seconds from a thread of its
    own, so that a trial is taken for dead only when its process is."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self.storage = study._storage
        self.trial_id = trial._trial_id
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.done.wait(HEARTBEAT_S):
            self.storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]

    def __enter__(self) -> _Heartbeat:
        self.storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def _without_unset(claim: object) -> object:
    """A claim without its unset (None) settings: a setting added since a study was made
    is unset in it unless given, and the study stays the same one."""
    if isinstance(claim, dict):
        return {key: _without_unset(value) for key, value in claim.items() if value is not None}
    return claim


def targets(config: ExperimentConfig) -> tuple[float, ...]:
    """The accuracies the comparison reports cluster time to."""
    assert config.tune is not None
    target = config.train.target_accuracy
    return config.tune.targets or (() if target is None else (target,))


def _to_target(target: float) -> str:
    return f"worker_seconds_to_{target:g}"


def _best_accuracy(trials: list[FrozenTrial]) -> float | None:
    """The best test accuracy any trial showed at any of its evaluations."""
    shown = [e[2] for t in trials for e in t.user_attrs.get("evals", [])]
    return max(shown) if shown else None


def _param_values(tune: TuneConfig, trial: FrozenTrial) -> dict[str, object]:
    """The trial's value of each key (a choice's value, not its index)."""
    values: dict[str, object] = {}
    for key, spec in tune.space.items():
        if key in trial.params:
            raw = trial.params[key]
            values[key] = spec.choices[raw] if spec.kind == "choices" else raw
    return values


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plot_study(study: Study) -> None:
    plt = report.pyplot()
    from optuna.visualization import matplotlib as optuna_plots

    complete = [t for t in study.trials() if t.state == TrialState.COMPLETE]
    if complete:
        ax = optuna_plots.plot_optimization_history(study.study)
        _save(ax, study.out / "history.png")
    if len(complete) >= 2 and len(study.tune.space) >= 2:
        try:
            ax = optuna_plots.plot_param_importances(study.study)
        except (RuntimeError, ValueError) as exc:  # e.g. every trial with the same value
            log.info("%s", f"[{study.name}] no importance plot: {exc}")
        else:
            _save(ax, study.out / "importance.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for state, marker in ((TrialState.COMPLETE, "o"), (TrialState.PRUNED, "x")):
        last = [t.user_attrs["evals"][-1] for t in study.trials()
                if t.state == state and t.user_attrs.get("evals")]  # fmt: skip
        points = [(worker_seconds, accuracy) for _, worker_seconds, accuracy, _ in last]
        if points:
            ax.plot(*zip(*points, strict=True), marker, ls="", label=state.name.lower())
    ax.set(xlabel="trial's cost (worker-seconds of training)", ylabel="last test accuracy",
           title=study.name)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(study.out / "cost.png", dpi=110)
    plt.close(fig)


def _save(ax, path: Path) -> None:
    """An Optuna matplotlib plot (its Axes) into a PNG."""
    figure = ax.get_figure(root=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    report.pyplot().close(figure)


def _plot_comparison(run_dir: Path, studies: list[Study]) -> None:
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}
    for study in studies:
        points = study.timeline()
        if not points:
            continue
        color = colors.setdefault(study.algorithm, f"C{len(colors)}")
        first = study.algorithm not in {line.get_label() for line in ax.get_lines()}
        ax.step(*zip(*points, strict=True), where="post", color=color, alpha=0.8,
                label=study.algorithm if first else "_")  # fmt: skip
    for target in targets(studies[0].config) if studies else ():
        ax.axhline(target, color="grey", ls=":", lw=0.8)
    ax.set(xlabel="cluster time spent by the search (worker-seconds)",
           ylabel="best test accuracy found")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "comparison.png", dpi=110)
    plt.close(fig)


def tune(config: ExperimentConfig, options: TuneOptions) -> list[dict]:
    """Every study of the config's [tune] (or those ``options`` picks) to its budget, in
    a run directory; one comparison row per study, those of the config that an earlier
    command ran into the same storage included."""
    if config.tune is None:
        raise ExperimentError("the config has no [tune] section: `switchreduce run` it instead")
    spec = config.tune
    for what, picked, known in (("algorithm", options.algorithms, spec.algorithms),
                                ("seed", options.seeds, spec.seeds)):  # fmt: skip
        unknown = [p for p in picked if p not in known]
        if unknown:
            raise ExperimentError(
                f"--{what} {unknown[0]} is not among the config's tune.{what}s {list(known)}"
            )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = options.run_dir or options.runs / f"{config.name}-tune-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.to_json())
    url = options.storage or f"sqlite:///{(run_dir / 'studies.db').resolve()}"
    storage = open_storage(url)
    log.info("%s", f"{config.name}: tuning into {run_dir} (storage {_redact(url)})")
    studies = []
    held = set(optuna.get_all_study_names(storage))
    for seed in spec.seeds:  # every algorithm with a seed before the next seed
        for algorithm in spec.algorithms:
            name = f"{options.study or config.name}-{algorithm}-s{seed}"
            chosen = algorithm in (options.algorithms or spec.algorithms) and seed in (
                options.seeds or spec.seeds
            )
            if not chosen and name not in held:  # neither run now nor before
                continue
            study = Study(config, algorithm, seed, storage, name, run_dir / name)
            if chosen:
                try:
                    study.run()
                finally:
                    study.write()
            studies.append(study)
    rows = [study.summary() for study in studies]
    fields = (*COMPARISON_FIELDS, *map(_to_target, targets(config)))
    report.write_csv(run_dir / "comparison.csv", fields, rows)
    seeds = across_seeds(config, rows)
    report.write_csv(run_dir / "algorithms.csv", tuple(seeds[0]) if seeds else (), seeds)
    _plot_comparison(run_dir, studies)
    _print_comparison(run_dir, config, rows)
    _print_algorithms(config, seeds)
    return rows


def across_seeds(config: ExperimentConfig, rows: list[dict]) -> list[dict]:
    """Per algorithm, over its seeds: the mean, lowest and highest best value, the mean
    worker-seconds spent, and for each target how many seeds reached it and their mean,
    lowest and highest worker-seconds to it."""
    out = []
    for algorithm in dict.fromkeys(row["algorithm"] for row in rows):
        mine = [row for row in rows if row["algorithm"] == algorithm]
        best = [row["best_value"] for row in mine if row["best_value"] is not None]
        summary: dict[str, object] = {
            "algorithm": algorithm,
            "seeds": len(mine),
            "worker_seconds": statistics.fmean(row["worker_seconds"] for row in mine),
            **_spread("best_value", best),
        }
        for target in targets(config):
            key = _to_target(target)
            reached = [row[key] for row in mine if row[key] is not None]
            summary[f"reached_{target:g}"] = len(reached)
            summary.update(_spread(key, reached))
        out.append(summary)
    return out


def _spread(name: str, values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"{name}_mean": None, f"{name}_min": None, f"{name}_max": None}
    return {f"{name}_mean": statistics.fmean(values), f"{name}_min": min(values),
            f"{name}_max": max(values)}  # fmt: skip


def _print_algorithms(config: ExperimentConfig, seeds: list[dict]) -> None:
    """Per algorithm over its seeds: best value and worker-seconds to each target as
    'mean (lowest to highest)', with how many seeds reached it."""
    if not any(row["seeds"] > 1 for row in seeds):
        return
    print()
    print(f"{'algorithm':12s}{'seeds':>6s}{'worker-s':>10s}{'best':>26s}"
          + "".join(f"{'w-s to ' + format(t, '.1%'):>30s}" for t in targets(config)))  # fmt: skip
    for row in seeds:
        cells = [_mean_range(row, "best_value", ".4f")]
        for target in targets(config):
            reached = f"[{row[f'reached_{target:g}']}/{row['seeds']}]"
            cells.append(f"{_mean_range(row, _to_target(target), '.1f')} {reached}")
        print(f"{row['algorithm']:12s}{row['seeds']:6d}{row['worker_seconds']:10.1f}"
              f"{cells[0]:>26s}" + "".join(f"{cell:>30s}" for cell in cells[1:]))  # fmt: skip


def _mean_range(row: dict, name: str, spec: str) -> str:
    mean = row[f"{name}_mean"]
    if mean is None:
        return "-"
    low, high = row[f"{name}_min"], row[f"{name}_max"]
    return f"{mean:{spec}} ({low:{spec}} to {high:{spec}})"


def _redact(url: str) -> str:
    """A storage URL without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':')[0]}:***@{host}"


def _print_comparison(run_dir: Path, config: ExperimentConfig, rows: list[dict]) -> None:
    """The table a tune command ends with: worker-seconds spent, the best objective value of
    a complete trial, the best accuracy any evaluation showed, and worker-seconds to each
    target ('-': never)."""
    reach = targets(config)
    print()
    print(f"{'study':30s}{'trials':>7s}{'pruned':>7s}{'worker-s':>10s}{'best':>9s}{'shown':>7s}"
          + "".join(f"{'w-s to ' + format(t, '.1%'):>15s}" for t in reach))  # fmt: skip
    for row in rows:
        best = "-" if row["best_value"] is None else f"{row['best_value']:.4g}"
        shown = row["best_accuracy"]
        spent = [row[_to_target(t)] for t in reach]
        print(
            f"{row['study']:30s}{row['trials']:7d}{row['pruned']:7d}"
            f"{row['worker_seconds']:10.1f}{best:>9s}"
            f"{'-' if shown is None else format(shown, '.1%'):>7s}"
            + "".join(f"{'-' if s is None else format(s, '.1f'):>15s}" for s in spent)
        )
    print(f"run directory: {run_dir}")
