"""Loss, duplication and reordering on the soft switch's ports (SwitchML's drop simulator).

One injector sits on each direction: ``ingress`` (worker -> switch, before
the parser) and ``egress`` (switch -> worker, after the deparser). It is
seeded, so a run's fault pattern is reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class FaultSpec:
    """Probabilities per packet, applied independently in each direction."""

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} probability must be in [0, 1), got {value}")


@dataclass
class FaultStats:
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0


class FaultInjector(Generic[T]):
    """Decides each packet's fate; a reordered packet is held until the next one passes."""

    def __init__(self, spec: FaultSpec, stream: int) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed * 1_000_003 + stream)
        self.stats = FaultStats()
        self._held: list[T] = []

    def admit(self, item: T) -> list[T]:
        """The packets to deliver now, in order."""
        spec, rng = self.spec, self.rng
        if spec.loss and rng.random() < spec.loss:
            self.stats.dropped += 1
            return []
        out = [item]
        if spec.duplicate and rng.random() < spec.duplicate:
            self.stats.duplicated += 1
            out.append(item)
        if spec.reorder and rng.random() < spec.reorder:
            self.stats.reordered += 1
            self._held.extend(out)
            return []
        out.extend(self._held)  # held packets now arrive after a later one
        self._held.clear()
        return out

    def flush(self) -> list[T]:
        """Release held packets (when the link goes idle)."""
        out, self._held = self._held, []
        return out
