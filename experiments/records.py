"""What a training rank leaves for the runner and the report: a metrics file and progress lines.

Kept apart from ``train`` so that reading a run's records does not load torch.
"""

from __future__ import annotations

from pathlib import Path

#: A rank prints this, then a JSON object, after every logged step; the runner watches for it.
PROGRESS = "progress "


def metrics_path(out: Path, backend: str, rank: int) -> Path:
    """The JSON-lines file of one rank's per-step metrics in run directory ``out``."""
    return out / f"metrics-{backend}-rank{rank}.jsonl"
