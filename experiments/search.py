"""The search algorithms of ``switchreduce tune``: a search space's values for a trial, and
each algorithm as an Optuna sampler and pruner.

grid, random and tpe run every trial to its end. asha and cost-aware both sample at
random and prune by asynchronous successive halving (ASHA, Li et al., MLSys'20): a trial
that reaches a rung goes on only if its accuracy there is in the best 1/eta of the trials
that reached that rung. They differ only in what a rung measures:

- asha: iterations, as Optuna's SuccessiveHalvingPruner is usually fed;
- cost-aware (this project's): the cluster time the trial has spent, in worker-seconds
  of training with its communication (``CostAwareHalving``). A configuration that is
  cheap per iteration (narrow lanes, a small model, a large batch on a slow link) has run
  more iterations when it meets a rung than a dear one, so trials are compared at equal
  cost. Its top rung is a cost too: a trial ends once it has spent that much, so a cheap
  configuration that survives trains further for the same spend.

docs/tuning.md describes the algorithm and how it is compared.
"""

from __future__ import annotations

import optuna

from switchreduce.experiments.config import ExperimentConfig, ParamSpec, TuneConfig

#: The study user attribute in which a cost-aware study keeps its top rung when
#: tune.trial_worker_seconds does not give it: what the first of its trials to get that
#: far spent on train.iterations (worker-ms).
TOP_RUNG_MS = "top_rung_worker_ms"


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec]) -> dict[str, object]:
    """The trial's value of each ``section.key`` of the space."""
    values: dict[str, object] = {}
    for key, spec in space.items():
        if spec.kind == "choices":
            values[key] = spec.choices[_choice(trial, key, spec)]
            continue
        low, high = spec.bounds
        if spec.kind == "integer":
            values[key] = trial.suggest_int(key, int(low), int(high), log=spec.log)
        else:
            values[key] = trial.suggest_float(key, low, high, log=spec.kind == "log_uniform")
    return values


def _choice(trial: optuna.Trial, key: str, spec: ParamSpec) -> int:
    """The index of a choice. Choices are suggested by index so that any value (a list of
    slowdowns, say) can be one, and grid search sees the same."""
    return trial.suggest_categorical(key, list(range(len(spec.choices))))


def grid(space: dict[str, ParamSpec], points: int) -> dict[str, list]:
    """Grid search's space: each key's values, choices by index (as ``suggest`` asks)."""
    return {
        key: list(range(len(spec.choices))) if spec.kind == "choices" else spec.grid(points)
        for key, spec in space.items()
    }


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler, which stops the study it drives through ``Study.optimize``
    once its grid is done; the tuner asks and tells instead, and asks ``is_exhausted``."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def sampler(algorithm: str, tune: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    if algorithm == "grid":
        return GridSampler(grid(tune.space, tune.grid_points), seed=seed)
    if algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def pruner(algorithm: str, config: ExperimentConfig) -> optuna.pruners.BasePruner:
    tune = config.tune
    assert tune is not None
    if algorithm == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=first_rung_iterations(config), reduction_factor=tune.reduction_factor
        )
    if algorithm == "cost-aware":
        return CostAwareHalving(config)
    return optuna.pruners.NopPruner()


def first_rung_iterations(config: ExperimentConfig) -> int:
    """asha's first rung, and the iterations over which cost-aware measures its own."""
    assert config.tune is not None
    return config.tune.min_iterations or config.train.eval_every


def step(algorithm: str, iteration: int, worker_seconds: float) -> int:
    """What a trial's intermediate values are indexed by: worker-milliseconds spent for
    cost-aware, iterations for every other algorithm."""
    return round(worker_seconds * 1000) if algorithm == "cost-aware" else iteration


def cost_rungs(
    config: ExperimentConfig, measured_top_ms: float | None
) -> tuple[float, float] | None:
    """cost-aware's first and top rungs in worker-ms, or None while the top is not known
    (tune.trial_worker_seconds unset, and no trial of the study has reached
    train.iterations yet: ``measured_top_ms`` is what the first one spent)."""
    tune = config.tune
    assert tune is not None
    top = measured_top_ms if tune.trial_worker_seconds is None else tune.trial_worker_seconds * 1000
    if top is None:
        return None
    if tune.min_worker_seconds is not None:
        return tune.min_worker_seconds * 1000, top
    return top * first_rung_iterations(config) / config.train.iterations, top


class CostAwareHalving(optuna.pruners.BasePruner):
    """Asynchronous successive halving over a trial's measured cost (its steps are
    worker-milliseconds: ``step``), from the first rung of ``cost_rungs``. The rungs
    scale with the cluster and the workload without a number to guess; until the top is
    known, nothing is pruned."""

    def __init__(self, config: ExperimentConfig) -> None:
        assert config.tune is not None
        self.config = config
        self.reduction_factor = config.tune.reduction_factor
        self._halving: tuple[int, optuna.pruners.SuccessiveHalvingPruner] | None = None

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        rungs = cost_rungs(self.config, study.user_attrs.get(TOP_RUNG_MS))
        if rungs is None:
            return False
        first = max(1, round(rungs[0]))
        if self._halving is None or self._halving[0] != first:
            halving = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=first, reduction_factor=self.reduction_factor
            )
            self._halving = (first, halving)
        return self._halving[1].prune(study, trial)
