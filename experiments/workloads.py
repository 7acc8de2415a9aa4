"""What is trained: data sets that ship with a package or are generated, and small models.

Every rank builds the same split from the seed and trains on its own shard
(every world_size-th example), as DistributedSampler does, so no data moves
between hosts and nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from switchreduce.experiments.config import DataConfig, ModelConfig, OptimizerConfig


@dataclass(frozen=True)
class Dataset:
    train_x: torch.Tensor  # (N, 1, 8, 8) float32 in [0, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int

    def shard(self, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_x[rank::world_size], self.train_y[rank::world_size]


def load_dataset(config: DataConfig, seed: int) -> Dataset:
    if config.name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)
        y = digits.target.astype(np.int64)
        classes = 10
    else:
        x, y = _synthetic(config, seed)
        classes = config.classes
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = torch.from_numpy(x[order]).unsqueeze(1), torch.from_numpy(y[order])
    n_test = max(1, round(len(y) * config.test_fraction))
    return Dataset(x[n_test:], y[n_test:], x[:n_test], y[:n_test], classes)


def _synthetic(config: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy class prototypes on the digits' 8x8 grid: learnable, not trivially so."""
    rng = np.random.default_rng([seed, 1])
    prototypes = rng.uniform(0, 1, (config.classes, 8, 8))
    y = rng.integers(0, config.classes, config.samples)
    x = prototypes[y] + rng.normal(0, 0.6, (config.samples, 8, 8))
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


def build_model(config: ModelConfig, classes: int) -> nn.Module:
    """A small MLP or CNN for 1x8x8 inputs (the seed is set by the caller)."""
    h = config.hidden
    if config.name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, h),
            nn.ReLU(),
            nn.Linear(h, h),
            nn.ReLU(),
            nn.Linear(h, classes),
        )
    return nn.Sequential(
        nn.Conv2d(1, h, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(h, 2 * h, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * h * 16, 128),
        nn.ReLU(),
        nn.Linear(128, classes),
    )


def build_optimizer(config: OptimizerConfig, params) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(params, lr=config.lr)
