"""Where the P4 program and its committed P4Info are: package data, in a checkout or a wheel.

``p4src/`` ships inside the package as ``switchreduce.p4src``; p4c needs the sources as
files (the program includes ``include/*.p4``), so an installation that is not on a
file system (a zip) is refused with a clear error rather than half-read.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _source_dir() -> Path:
    root = resources.files("switchreduce.p4src")
    if not isinstance(root, Path):
        raise RuntimeError(
            f"switchreduce.p4src is not on a file system ({root!r}): install switchreduce "
            "as a directory (pip install), not as a zip"
        )
    return root


SOURCE_DIR = _source_dir()
#: The program p4c compiles for BMv2 (``-DK=...`` sets the elements per packet).
P4_SOURCE = SOURCE_DIR / "switchreduce.p4"
#: p4c's own P4Info for the default K; the controller and the soft switch's server read it.
P4INFO = SOURCE_DIR / "switchreduce.p4info.txtpb"
