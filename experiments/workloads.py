"""What is trained: data sets that ship with a package or are generated, and small models.

Every rank builds the same split from the seed and trains on its own shard
(every world_size-th example), as DistributedSampler does, so no data moves
between hosts and nothing is downloaded.

``text`` is where gradient precision shows: a character-level language model
(embeddings, then the MLP) trained with Adam on the data set descriptions that
scikit-learn ships (about 85,000 characters of English). Rare characters'
embedding rows share a block exponent with frequent ones, so coarse lanes
rounded to nearest zero their gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from switchreduce.experiments.config import DataConfig, ModelConfig, OptimizerConfig

#: Width of a character's embedding in the text model.
EMBEDDING = 16


@dataclass(frozen=True)
class Dataset:
    train_x: torch.Tensor  # (N, 1, 8, 8) float32 in [0, 1]; text: (N, context) int64
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int  # text: the characters (the model's input and output vocabulary)

    @property
    def tokens(self) -> int | None:
        """Characters per example for text (the model embeds them), None for images."""
        return self.train_x.shape[1] if self.train_x.dtype == torch.int64 else None

    def shard(self, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_x[rank::world_size], self.train_y[rank::world_size]


def load_dataset(config: DataConfig, seed: int) -> Dataset:
    if config.name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[:, None]
        y = digits.target.astype(np.int64)
        classes = 10
    elif config.name == "text":
        x, y, classes = _next_characters(config.context)
    else:
        x, y = _synthetic(config, seed)
        x = x[:, None]
        classes = config.classes
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    n_test = max(1, round(len(y) * config.test_fraction))
    return Dataset(x[n_test:], y[n_test:], x[:n_test], y[:n_test], classes)


def _synthetic(config: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy class prototypes on the digits' 8x8 grid: learnable, not trivially so."""
    rng = np.random.default_rng([seed, 1])
    prototypes = rng.uniform(0, 1, (config.classes, 8, 8))
    y = rng.integers(0, config.classes, config.samples)
    x = prototypes[y] + rng.normal(0, 0.6, (config.samples, 8, 8))
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


def _next_characters(context: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every ``context`` characters of the corpus (as ids) and the character after them."""
    import sklearn.datasets

    descriptions = Path(sklearn.datasets.__file__).parent / "descr"
    text = "".join(path.read_text() for path in sorted(descriptions.glob("*.rst")))
    alphabet = sorted(set(text))
    ids = np.searchsorted(alphabet, list(text)).astype(np.int64)
    x = np.lib.stride_tricks.sliding_window_view(ids[:-1], context).copy()
    return x, ids[context:], len(alphabet)


def build_model(config: ModelConfig, classes: int, tokens: int | None = None) -> nn.Module:
    """A small MLP or CNN for 1x8x8 inputs, or with ``tokens`` an MLP over that many
    embedded characters of ``classes`` (the seed is set by the caller)."""
    h = config.hidden
    if config.name == "mlp":
        if tokens is None:
            inputs: list[nn.Module] = [nn.Flatten()]
            width = 64
        else:
            inputs, width = [nn.Embedding(classes, EMBEDDING), nn.Flatten()], EMBEDDING * tokens
        return nn.Sequential(
            *inputs,
            nn.Linear(width, h),
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
