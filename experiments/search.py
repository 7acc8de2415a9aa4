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
  cost and the cheap ones are evaluated further for the same budget.

docs/tuning.md describes the algorithm and how it is compared.
"""

from __future__ import annotations

import optuna

from switchreduce.experiments.config import ExperimentConfig, ParamSpec, TuneConfig

#: The study user attribute in which the cost-aware study keeps its first rung: what the
#: first of its trials to get that far spent on its first ``min_iterations`` (worker-ms).
FIRST_RUNG_MS = "first_rung_worker_ms"


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
        first_ms = None if tune.min_worker_seconds is None else tune.min_worker_seconds * 1000
        return CostAwareHalving(tune.reduction_factor, first_ms)
    return optuna.pruners.NopPruner()


def first_rung_iterations(config: ExperimentConfig) -> int:
    """asha's first rung, and the iterations over which cost-aware measures its own."""
    assert config.tune is not None
    return config.tune.min_iterations or config.train.eval_every


def step(algorithm: str, iteration: int, worker_seconds: float) -> int:
    """What a trial's intermediate values are indexed by: worker-milliseconds spent for
    cost-aware, iterations for every other algorithm."""
    return round(worker_seconds * 1000) if algorithm == "cost-aware" else iteration


class CostAwareHalving(optuna.pruners.BasePruner):
    """Asynchronous successive halving over a trial's measured cost (its steps are
    worker-milliseconds: ``step``). The first rung is ``first_ms``, or, when not given,
    what the study's first trial to get that far spent on its first rung of iterations
    (``FIRST_RUNG_MS``, which the tuner records), so that the rungs scale with the cluster
    and the workload without a number to guess; until that is known, nothing is pruned."""

    def __init__(self, reduction_factor: int, first_ms: float | None) -> None:
        self.reduction_factor = reduction_factor
        self.first_ms = first_ms
        self._halving: tuple[int, optuna.pruners.SuccessiveHalvingPruner] | None = None

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        first = self.first_ms or study.user_attrs.get(FIRST_RUNG_MS)
        if first is None:
            return False
        first = max(1, round(first))
        if self._halving is None or self._halving[0] != first:
            halving = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=first, reduction_factor=self.reduction_factor
            )
            self._halving = (first, halving)
        return self._halving[1].prune(study, trial)
