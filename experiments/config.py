"""Experiment configs: TOML (or the JSON a run writes back) into frozen dataclasses.

One file is one question. Every section and key is checked: an unknown key
is an error that names it, a value of the wrong type is an error that names
its key, and nothing is silently defaulted except keys that are absent.
A config may sweep parameters over a list of values (``[sweep]``); the
run then holds one sub-run per value and a table across them.

    name = "headline"
    [topology]
    workers = 4
    bw_mbps = 20
    [switch]
    k = 256
    [sweep]
    parameter = "switch.precision_bits"
    values = [12, 16, 32]

or several parameters at once, one list of values per sub-run::

    [sweep]
    parameters = ["switch.lane_bits", "switch.error_feedback"]
    values = [[32, false], [8, false], [8, true]]

A config may instead be a hyperparameter search (``[tune]``, run by
``switchreduce tune``; experiments.tune): a search space over any
``section.key``, an objective, a budget and the algorithms to compare::

    [tune]
    algorithms = ["asha", "cost-aware"]
    worker_seconds = 120
    [tune.space]
    "optimizer.lr" = { log_uniform = [0.003, 0.3] }
    "switch.lane_bits" = { choices = [8, 16, 32] }
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from switchreduce import wire
from switchreduce.emulation.topo import DEFAULT_SLOTS
from switchreduce.experiments.errors import ConfigError
from switchreduce.worker import quantize


@dataclass(frozen=True)
class TopologyConfig:
    """Where the workers run and what their links are like."""

    #: mininet (root, a star of hosts), loopback (processes on one host), or auto:
    #: Mininet when root and Mininet is installed, loopback otherwise.
    mode: str = "auto"
    workers: int = 4
    bw_mbps: float | None = None  # per link (Mininet)
    delay_ms: float | None = None  # per link (Mininet, tc netem)
    loss_pct: float | None = None  # per link (Mininet, tc netem)
    #: Drop probability at the soft switch's ports, each direction (any mode).
    switch_loss: float = 0.0
    #: Emulated compute time per iteration, in ms, that each worker spends before its
    #: backward pass (a larger model's compute), multiplied by its slowdown.
    compute_ms: float = 0.0
    #: One factor per worker (empty: all 1): a straggler has a factor above 1.
    slowdown: tuple[float, ...] = ()
    #: Mean of a random extra compute time in ms, drawn for every worker and iteration
    #: from a Pareto (Lomax) distribution of shape ``jitter_tail``, seeded by train.seed:
    #: a cluster where a different worker is now and then much later than the rest.
    jitter_ms: float = 0.0
    #: The Pareto shape: the smaller (above 1), the heavier the tail.
    jitter_tail: float = 1.5

    def __post_init__(self) -> None:
        _check(
            self.mode in ("auto", "mininet", "loopback"),
            "topology.mode",
            f"must be auto, mininet or loopback, got {self.mode!r}",
        )
        _check(
            1 <= self.workers <= wire.MAX_WORKERS,
            "topology.workers",
            f"must be 1..{wire.MAX_WORKERS}, got {self.workers}",
        )
        _check(self.bw_mbps is None or self.bw_mbps > 0, "topology.bw_mbps", "must be > 0")
        _check(self.delay_ms is None or self.delay_ms >= 0, "topology.delay_ms", "must be >= 0")
        _check(
            self.loss_pct is None or 0 <= self.loss_pct < 100,
            "topology.loss_pct",
            "must be in [0, 100)",
        )
        _check(0 <= self.switch_loss < 1, "topology.switch_loss", "is a probability in [0, 1)")
        _check(self.compute_ms >= 0, "topology.compute_ms", "must be >= 0")
        _check(
            not self.slowdown or len(self.slowdown) == self.workers,
            "topology.slowdown",
            f"needs one factor per worker ({self.workers}), got {len(self.slowdown)}",
        )
        _check(all(f >= 1 for f in self.slowdown), "topology.slowdown", "factors must be >= 1")
        _check(self.jitter_ms >= 0, "topology.jitter_ms", "must be >= 0")
        _check(
            self.jitter_tail > 1,
            "topology.jitter_tail",
            f"must be > 1 (a finite mean), got {self.jitter_tail}",
        )

    def slowdown_of(self, rank: int) -> float:
        return self.slowdown[rank] if self.slowdown else 1.0

    def compute_times(self, seed: int, rank: int) -> Iterator[float]:
        """The seconds ``rank`` computes in each iteration: ``compute_ms`` times its
        slowdown, plus its jitter draw (the same for the same seed and rank, whatever
        the backend, so every backend meets the same unevenness)."""
        steady = self.compute_ms / 1000 * self.slowdown_of(rank)
        rng = np.random.default_rng([seed, rank, 0x5EED])
        scale = self.jitter_ms / 1000 * (self.jitter_tail - 1)  # a Lomax's mean is scale/(a-1)
        while True:
            yield steady + (scale * rng.pareto(self.jitter_tail) if self.jitter_ms else 0.0)


@dataclass(frozen=True)
class SwitchConfig:
    """The switch and how workers use it."""

    backend: str = "soft"  # soft | bmv2
    k: int = wire.MAX_K_STANDARD_MTU
    #: Slots per job (the window); None: the switch kind's default (emulation.topo's
    #: DEFAULT_SLOTS: 64 for the soft switch, 8 for BMv2), which slot_count resolves.
    slots: int | None = None
    #: Fixed-point precision of gradients (worker.quantize): 32 is the switch's full width.
    precision_bits: int = quantize.MAX_BITS
    #: Bits per gradient element on the wire: 32, 16 or 8 (a packet carries 1, 2 or 4
    #: elements per 32-bit word; worker.quantize). Narrow lanes leave precision_bits at 32.
    lane_bits: int = quantize.MAX_BITS
    #: How gradients meet the grid: "nearest" (ties to even) or "stochastic" (unbiased).
    rounding: str = "nearest"
    #: Error feedback (EF-SGD): each rank adds its last step's quantization error to its
    #: next gradient, so a coarse grid does not drift.
    error_feedback: bool = False
    #: Workers join through the controller (Mininet) instead of a statically installed job.
    controller: bool = False
    #: Floor of the workers' adaptive retransmission timeout: how soon a loss is repaired.
    min_rto_ms: float = 10.0
    #: DDP's gradient buckets are summed while the backward pass goes on (worker.ddp's
    #: switch_allreduce_hook); False: each before it goes on (switch_blocking_hook).
    overlap: bool = True
    #: How many ranks' gradients complete a round (1..workers): the first that many to arrive;
    #: the others' are late, kept for their next step with error_feedback, else dropped.
    #: None: every rank's (synchronous). docs/protocol.md, Quorum.
    quorum: int | None = None

    def __post_init__(self) -> None:
        _check(
            self.backend in ("soft", "bmv2"),
            "switch.backend",
            f"must be soft or bmv2, got {self.backend!r}",
        )
        _check(self.k in wire.SUPPORTED_K, "switch.k", f"must be one of {wire.SUPPORTED_K}")
        _check(1 <= self.slot_count <= 4096, "switch.slots", f"must be 1..4096, got {self.slots}")
        _check(0 < self.min_rto_ms <= 1000, "switch.min_rto_ms", "must be in (0, 1000]")
        _check(
            quantize.MIN_BITS <= self.precision_bits <= quantize.MAX_BITS,
            "switch.precision_bits",
            f"must be {quantize.MIN_BITS}..{quantize.MAX_BITS}",
        )
        _check(
            self.lane_bits in wire.LANE_BITS,
            "switch.lane_bits",
            f"must be one of {', '.join(map(str, wire.LANE_BITS))}, got {self.lane_bits}",
        )
        _check(
            self.lane_bits == quantize.MAX_BITS or self.precision_bits == quantize.MAX_BITS,
            "switch.precision_bits",
            f"must stay {quantize.MAX_BITS} with {self.lane_bits}-bit lanes (they set the grid)",
        )
        _check(
            self.rounding in quantize.ROUNDINGS,
            "switch.rounding",
            f"must be one of {', '.join(quantize.ROUNDINGS)}, got {self.rounding!r}",
        )

    @property
    def slot_count(self) -> int:
        """The window: ``slots``, or the switch kind's default."""
        return DEFAULT_SLOTS[self.backend] if self.slots is None else self.slots


@dataclass(frozen=True)
class ModelConfig:
    #: mlp (on text data it embeds each character first: a character-level language
    #: model) | cnn (images only)
    name: str = "mlp"
    hidden: int = 256  # MLP hidden width, or CNN channels of the first convolution

    def __post_init__(self) -> None:
        _check(self.name in ("mlp", "cnn"), "model.name", f"must be mlp or cnn, got {self.name!r}")
        _check(self.hidden >= 1, "model.hidden", "must be >= 1")


@dataclass(frozen=True)
class DataConfig:
    """A data set that ships with a package or is generated: nothing is downloaded."""

    #: digits (scikit-learn's 8x8 digits) | synthetic | text (the next character of
    #: the data set descriptions scikit-learn ships, from the ``context`` before it)
    name: str = "digits"
    batch_size: int = 32  # per worker
    test_fraction: float = 0.25
    samples: int = 4000  # synthetic only
    classes: int = 10  # synthetic only
    context: int = 16  # text only: characters the model sees before the one it predicts

    def __post_init__(self) -> None:
        _check(
            self.name in ("digits", "synthetic", "text"),
            "data.name",
            f"must be digits, synthetic or text, got {self.name!r}",
        )
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        _check(self.samples >= 10, "data.samples", "must be >= 10")
        _check(2 <= self.classes <= 100, "data.classes", "must be 2..100")
        _check(1 <= self.context <= 256, "data.context", "must be 1..256")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9  # sgd only

    def __post_init__(self) -> None:
        _check(
            self.name in ("sgd", "adam"),
            "optimizer.name",
            f"must be sgd or adam, got {self.name!r}",
        )
        _check(self.lr > 0, "optimizer.lr", "must be > 0")
        _check(0 <= self.momentum < 1, "optimizer.momentum", "must be in [0, 1)")


MEASURES = ("training", "compute", "allreduce")
#: The backends a run may train with beside the switch (worker.backends registers them).
BASELINES = ("gloo", "gloo-fp16", "gloo-powersgd")


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 300
    eval_every: int = 50
    seed: int = 0
    #: What else trains on the same hosts with the same seed after the switch: gloo's
    #: allreduce, and gloo with PyTorch's fp16_compress_hook or powerSGD_hook
    #: (worker.backends); empty: the switch alone.
    baselines: tuple[str, ...] = ("gloo",)
    #: PowerSGD's rank (matrix_approximation_rank) and its warm-up: iterations of plain
    #: allreduce before it compresses (start_powerSGD_iter).
    powersgd_rank: int = 1
    powersgd_warmup: int = 10
    #: Test accuracy whose first reaching is reported as time to accuracy (None: not).
    target_accuracy: float | None = None
    #: Stop at the first evaluation once training has cost this many worker-seconds
    #: (training time, communication included, times the workers; rank 0's count), or at
    #: ``iterations``, whichever comes first (None: at ``iterations``): accuracy under a
    #: time budget.
    worker_seconds: float | None = None
    #: Seconds without progress after which a worker gives up.
    timeout: float = 30.0
    #: torch intra-op threads per rank. Emulated ranks share this machine's cores, and
    #: spinning OpenMP threads starve gloo's and the shim's (100x slower iterations here).
    threads: int = 1
    #: DDP's bucket size in MB (None: DDP's default, 25): smaller makes more buckets.
    bucket_cap_mb: float | None = None
    #: What an iteration does: training; compute (training with no gradient summed: each
    #: rank keeps its own); allreduce (the buckets of one backward pass summed as training
    #: sums them, without the compute). The two parts of a training iteration, timed alone.
    measure: str = "training"

    def __post_init__(self) -> None:
        _check(self.iterations >= 1, "train.iterations", "must be >= 1")
        _check(
            self.measure in MEASURES,
            "train.measure",
            f"must be one of {', '.join(MEASURES)}, got {self.measure!r}",
        )
        _check(
            self.bucket_cap_mb is None or self.bucket_cap_mb > 0,
            "train.bucket_cap_mb",
            "must be > 0",
        )
        _check(self.eval_every >= 1, "train.eval_every", "must be >= 1")
        _check(
            self.worker_seconds is None or self.worker_seconds > 0,
            "train.worker_seconds",
            "must be > 0",
        )
        _check(
            set(self.baselines) <= set(BASELINES),
            "train.baselines",
            f"must be among {', '.join(BASELINES)}, got {list(self.baselines)}",
        )
        _check(
            len(set(self.baselines)) == len(self.baselines),
            "train.baselines",
            "lists a baseline twice",
        )
        _check(self.powersgd_rank >= 1, "train.powersgd_rank", "must be >= 1")
        # PowerSGD's error feedback and warm start need one plain iteration first
        _check(self.powersgd_warmup >= 2, "train.powersgd_warmup", "must be >= 2")
        _check(
            self.target_accuracy is None or 0 < self.target_accuracy <= 1,
            "train.target_accuracy",
            "must be in (0, 1]",
        )
        _check(
            self.measure != "allreduce" or "gloo-powersgd" not in self.baselines,
            "train.baselines",
            "gloo-powersgd compresses inside the backward pass only: it cannot be timed "
            "with train.measure = 'allreduce'",
        )
        _check(self.timeout > 0, "train.timeout", "must be > 0")
        _check(self.threads >= 1, "train.threads", "must be >= 1")


@dataclass(frozen=True)
class SweepConfig:
    """One sub-run per value: of one ``parameter`` (``section.key``), or of several
    ``parameters`` at once, each value then a list with one entry per parameter."""

    parameter: str = ""
    parameters: tuple[str, ...] = ()
    values: tuple[object, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return self.parameters or (self.parameter,)

    def points(self) -> list[dict[str, object]]:
        """Each sub-run's settings, ``section.key`` to value."""
        if not self.parameters:
            return [{self.parameter: value} for value in self.values]
        rows = [typing.cast(tuple, value) for value in self.values]  # lists, checked on load
        return [dict(zip(self.parameters, row, strict=True)) for row in rows]


#: Search algorithms (experiments.search): every trial to the end (grid, random, tpe), or
#: random trials pruned by asynchronous successive halving whose rungs are iterations
#: (asha, as Optuna's SuccessiveHalvingPruner) or measured cluster time (cost-aware).
ALGORITHMS = ("grid", "random", "tpe", "asha", "cost-aware")
#: What a study optimizes: the test accuracy at a trial's end (maximized), or the training
#: seconds until train.target_accuracy (minimized).
OBJECTIVES = ("accuracy", "time_to_target")
#: Settings of the switch that trials running side by side as jobs on it share.
SWITCH_WIDE = ("switch.backend", "switch.k", "switch.slots", "switch.controller",
               "topology.mode", "topology.switch_loss")  # fmt: skip
#: What trials side by side on one Mininet star share besides: its hosts and links.
HOSTS_AND_LINKS = ("topology.workers", "topology.bw_mbps", "topology.delay_ms",
                   "topology.loss_pct")  # fmt: skip


@dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter's range: exactly one of a float range (``uniform``, or
    ``log_uniform`` for scales such as a learning rate), an integer range (``integer``,
    ``log = true`` for a log scale) or a list of ``choices``."""

    uniform: tuple[float, ...] = ()
    log_uniform: tuple[float, ...] = ()
    integer: tuple[int, ...] = ()
    log: bool = False  # integer only
    choices: tuple[object, ...] = ()

    @property
    def kind(self) -> str:
        (kind,) = [name for name in ("uniform", "log_uniform", "integer", "choices")
                   if getattr(self, name)]  # fmt: skip
        return kind

    @property
    def bounds(self) -> tuple:
        """(low, high) of a range; the choices of a list."""
        return typing.cast(tuple, getattr(self, self.kind))

    def grid(self, points: int) -> list[object]:
        """Grid search's values: the choices, or ``points`` values spread over the range
        (geometrically on a log scale), integers rounded and deduplicated."""
        if self.kind == "choices":
            return list(self.choices)
        low, high = self.bounds
        if self.kind == "log_uniform" or (self.kind == "integer" and self.log):
            values = np.geomspace(low, high, points)
        else:
            values = np.linspace(low, high, points)
        if self.kind == "integer":
            return list(dict.fromkeys(int(np.rint(v)) for v in values))
        return [float(v) for v in values]


@dataclass(frozen=True)
class TuneConfig:
    """A hyperparameter search (experiments.tune): each algorithm with each seed is one
    Optuna study over ``space``, within the same budget."""

    algorithms: tuple[str, ...] = ("cost-aware",)
    seeds: tuple[int, ...] = (0,)
    objective: str = "accuracy"
    #: The budget of each study: trials started, and/or worker-seconds of training (each
    #: trial's training time, communication included, times its workers). Grid search
    #: runs its whole grid: it is the reference a budget is set against.
    trials: int | None = None
    worker_seconds: float | None = None
    #: Trials that run at once. Above 1 they are jobs side by side on one soft switch,
    #: registered with its controller (runner.SharedSwitch on loopback; in Mininet,
    #: runner.SharedMininet: each on a group of topology.workers hosts of one star).
    parallel: int = 1
    #: Successive halving: a rung keeps the best 1/reduction_factor of the trials that
    #: reach it. asha's first rung is at min_iterations (default: train.eval_every) and its
    #: trials end at train.iterations. cost-aware's rungs are worker-seconds of a trial's
    #: training: its trials end once they have spent trial_worker_seconds (default: what
    #: the study's first trial spent on train.iterations), after up to max_iterations
    #: (default: train.iterations); its first rung is min_worker_seconds (default: the
    #: same share of the top as min_iterations is of train.iterations).
    reduction_factor: int = 3
    min_iterations: int | None = None
    min_worker_seconds: float | None = None
    trial_worker_seconds: float | None = None
    max_iterations: int | None = None
    #: Values per range in grid search (choices are taken as they are).
    grid_points: int = 3
    #: Test accuracies at which the comparison reports each study's cluster time to reach
    #: them (default: train.target_accuracy).
    targets: tuple[float, ...] = ()
    #: ``"section.key" = { log_uniform = [low, high] }`` and so on (ParamSpec).
    space: dict[str, ParamSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.algorithms), "tune.algorithms", "must name at least one")
        for algorithm in self.algorithms:
            _check(
                algorithm in ALGORITHMS,
                "tune.algorithms",
                f"must be among {', '.join(ALGORITHMS)}, got {algorithm!r}",
            )
        _check(bool(self.seeds), "tune.seeds", "must list at least one seed")
        _check(
            self.objective in OBJECTIVES,
            "tune.objective",
            f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}",
        )
        _check(
            self.trials is not None or self.worker_seconds is not None or
            self.algorithms == ("grid",),
            "tune",
            "needs a budget: trials and/or worker_seconds (grid search alone may omit it)",
        )  # fmt: skip
        _check(self.trials is None or self.trials >= 1, "tune.trials", "must be >= 1")
        _check(
            self.worker_seconds is None or self.worker_seconds > 0,
            "tune.worker_seconds",
            "must be > 0",
        )
        _check(self.parallel >= 1, "tune.parallel", "must be >= 1")
        _check(self.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2")
        _check(
            self.min_iterations is None or self.min_iterations >= 1,
            "tune.min_iterations",
            "must be >= 1",
        )
        for key in ("min_worker_seconds", "trial_worker_seconds", "max_iterations"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"tune.{key}", "must be > 0")
            _check(
                value is None or "cost-aware" in self.algorithms,
                f"tune.{key}",
                "is cost-aware's: add cost-aware to tune.algorithms",
            )
        _check(
            self.min_worker_seconds is None
            or self.trial_worker_seconds is None
            or self.min_worker_seconds < self.trial_worker_seconds,
            "tune.min_worker_seconds",
            "must be below tune.trial_worker_seconds",
        )
        _check(self.grid_points >= 2, "tune.grid_points", "must be >= 2")
        _check(all(0 < t <= 1 for t in self.targets), "tune.targets", "must be in (0, 1]")
        _check(bool(self.space), "tune.space", "must name at least one section.key")
        for key, spec in self.space.items():
            where = f"tune.space.{key}"
            kinds = [name for name in ("uniform", "log_uniform", "integer", "choices")
                     if getattr(spec, name)]  # fmt: skip
            _check(
                len(kinds) == 1,
                where,
                "needs exactly one of uniform, log_uniform, integer or choices, "
                f"got {', '.join(kinds) or 'none'}",
            )
            _check(not spec.log or spec.kind == "integer", where, "log is for integer ranges")
            if spec.kind == "choices":
                _check(
                    len(set(map(repr, spec.choices))) == len(spec.choices),
                    where,
                    "lists a choice twice",
                )
                continue
            _check(len(spec.bounds) == 2, where, f"needs [low, high], got {list(spec.bounds)}")
            low, high = spec.bounds
            _check(low < high, where, f"needs low < high, got [{low}, {high}]")
            _check(
                low > 0 or not (spec.kind == "log_uniform" or spec.log),
                where,
                "a log scale needs low > 0",
            )

    @property
    def prunes(self) -> bool:
        """Whether any algorithm stops trials early (a multi-fidelity one)."""
        return bool({"asha", "cost-aware"} & set(self.algorithms))


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    description: str = ""
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    switch: SwitchConfig = field(default_factory=SwitchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig | None = None
    tune: TuneConfig | None = None

    def __post_init__(self) -> None:
        quorum = self.switch.quorum
        _check(
            quorum is None or 1 <= quorum <= self.topology.workers,
            "switch.quorum",
            f"must be 1..{self.topology.workers} (topology.workers), got {quorum}",
        )
        _check(
            self.data.name != "text" or self.model.name == "mlp",
            "model.name",
            f"must be mlp with data.name = 'text' (a convolution needs images), "
            f"got {self.model.name!r}",
        )
        sweep = self.sweep
        if sweep is not None:
            _check(
                bool(sweep.parameter) != bool(sweep.parameters),
                "sweep",
                "needs either parameter (one section.key) or parameters (a list of them)",
            )
            _check(bool(sweep.values), "sweep.values", "must list at least one value")
            _check(
                not sweep.parameters
                or all(
                    isinstance(v, list | tuple) and len(v) == len(sweep.parameters)
                    for v in sweep.values
                ),
                "sweep.values",
                f"must each list {len(sweep.parameters)} values, one per sweep.parameters",
            )
            for point in sweep.points():  # every variant must itself be valid
                self.with_values(point)
        if self.tune is not None:
            self._check_tune(self.tune)

    def _check_tune(self, tune: TuneConfig) -> None:
        """Every key of the space names a setting, and every value it may take (a range's
        ends, each choice) makes a valid config: an error names the key."""
        _check(self.sweep is None, "tune", "cannot be combined with [sweep]")
        set_by_tuner = {"train.seed": "the study's seed", "train.baselines": "none"}
        if "cost-aware" in tune.algorithms:
            set_by_tuner |= dict.fromkeys(("train.iterations", "train.worker_seconds"),
                                          "cost-aware's top rung")  # fmt: skip
        for key, spec in tune.space.items():
            _check(
                key.partition(".")[0] not in ("tune", "sweep"),
                f"tune.space.{key}",
                "must name a setting of topology, switch, model, data, optimizer or train",
            )
            _check(
                key not in set_by_tuner,
                f"tune.space.{key}",
                f"is set on every trial by the tuner ({set_by_tuner.get(key)}): it cannot be "
                "searched",
            )
            for value in spec.bounds:
                try:
                    self.with_values({key: value})
                except ConfigError as exc:
                    raise ConfigError(f"tune.space.{key}: {exc}") from None
        _check(
            tune.min_iterations is None or tune.min_iterations < self.train.iterations,
            "tune.min_iterations",
            f"must be below train.iterations ({self.train.iterations})",
        )
        _check(
            self.train.worker_seconds is None or "cost-aware" not in tune.algorithms,
            "train.worker_seconds",
            "is set on every cost-aware trial by the tuner (its top rung): give "
            "tune.trial_worker_seconds instead",
        )
        _check(
            tune.max_iterations is None or tune.max_iterations >= self.train.iterations,
            "tune.max_iterations",
            f"must be at least train.iterations ({self.train.iterations})",
        )
        _check(
            tune.objective != "time_to_target" or self.train.target_accuracy is not None,
            "tune.objective",
            "time_to_target needs train.target_accuracy",
        )
        _check(
            tune.objective == "accuracy" or not tune.prunes,
            "tune.objective",
            "asha and cost-aware prune on accuracy: use objective = 'accuracy' with them",
        )
        if tune.parallel > 1:  # the trials are jobs on one shared switch
            _check(
                self.topology.mode == "mininet" or self.topology.switch_loss == 0,
                "tune.parallel",
                "above 1 on loopback (or auto) needs topology.switch_loss = 0: the shared "
                "loopback switch injects none",
            )
            shared = set(SWITCH_WIDE)
            if self.topology.mode != "loopback":  # the hosts and links of one Mininet star
                shared |= set(HOSTS_AND_LINKS)
            for key in tune.space:
                _check(
                    key not in shared,
                    f"tune.space.{key}",
                    "is the shared switch's or topology's, the same for every trial: it "
                    "cannot be searched with tune.parallel above 1",
                )

    def with_value(self, parameter: str, value: object) -> ExperimentConfig:
        """This config with ``section.key`` set to ``value`` (validated), and no sweep."""
        return self.with_values({parameter: value})

    def with_values(self, changes: dict[str, object]) -> ExperimentConfig:
        """This config with each ``section.key`` set to its value (validated), and neither
        sweep nor tune: one run's config."""
        raw = _table(self)
        raw.pop("sweep", None)
        raw.pop("tune", None)
        sections = {f.name for f in dataclasses.fields(self)} - {"sweep", "tune"}
        for parameter, value in changes.items():
            section, _, key = parameter.partition(".")
            sub = raw.get(section) if section in sections else None
            if not isinstance(sub, dict) or not key:
                raise ConfigError(f"{parameter!r} is not section.key")
            raw[section] = {**sub, key: value}
        return from_dict(raw)

    def variants(self) -> list[tuple[dict[str, str], ExperimentConfig]]:
        """(the swept keys' values as labels, config) per run: one per sweep value, or just
        this one ({})."""
        if self.sweep is None:
            return [({}, self)]
        return [
            ({key: label(value) for key, value in point.items()}, self.with_values(point))
            for point in self.sweep.points()
        ]

    def to_json(self) -> str:
        """The resolved config, every default filled in; ``load`` reads it back."""
        return json.dumps(_plain(self), indent=2) + "\n"


def load(path: str | Path) -> ExperimentConfig:
    """Read and validate a .toml config (or a run's resolved config.json)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def from_dict(raw: dict) -> ExperimentConfig:
    return _build(ExperimentConfig, raw, "")


def _build(cls: type, raw: object, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the config'} must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key '{where}{unknown[0]}' (known: {known})")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(value, hints[name], f"{where}{name}") for name, value in raw.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {exc}") from None


def _coerce(value: object, hint: object, key: str) -> object:
    """``value`` as type ``hint``, or a ConfigError naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        return {name: _coerce(v, args[1], f"{key}.{name}") for name, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item = args[0] if args else object
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is object:
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _plain(obj: object) -> object:
    """Dataclasses as dicts, tuples as lists: what TOML and JSON hold."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {key: _plain(v) for key, v in obj.items()}
    return obj


def _table(obj: object) -> dict[str, object]:
    """A dataclass instance as ``_plain`` lays it out: a dict of its fields."""
    plain = _plain(obj)
    if not isinstance(plain, dict):
        raise TypeError(f"not a dataclass instance: {obj!r}")
    return plain


def label(value: object) -> str:
    """A sweep value as a directory-name-friendly label: lists joined with '-'."""
    if isinstance(value, list | tuple):
        return "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")
