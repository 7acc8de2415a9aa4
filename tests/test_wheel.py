"""The built wheel works outside the checkout: one ``switchreduce`` namespace, P4 as package data.

The wheel is built from the checkout and installed into a fresh venv in a temporary
directory. That venv reaches the project's dependencies (numpy, grpc, torch: large, and
already installed) through a path entry to the dev venv's site-packages, whose own
``.pth`` files, among them the editable install of the checkout, are not run; so every
``switchreduce`` module, and ``p4src/`` with the committed P4Info, come from the wheel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers.readme import ROOT, Shell

#: The wheel holds the package and its P4 program, and nothing at the top level but it.
PACKAGE_DATA = [
    "switchreduce/p4src/switchreduce.p4",
    "switchreduce/p4src/include/ingress.p4",
    "switchreduce/p4src/switchreduce.p4info.txtpb",
]


def _tracked_copy(dest: Path) -> Path:
    """The checkout's tracked files, symlinks kept: what a clone builds from (no untracked
    leftovers, and setuptools' build/ lands in the copy, not in the checkout)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Shell:
    """A fresh venv holding the wheel: its ``switchreduce``, run from outside the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    source = _tracked_copy(work / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(work / "dist"), str(source)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = (work / "dist").glob("switchreduce-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert packages == {"switchreduce"}, packages
    assert all(path in names for path in PACKAGE_DATA), names
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         str(wheel)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    outside = work / "elsewhere"
    outside.mkdir()
    return Shell(bin_dir=venv / "bin", cwd=outside)


def test_the_package_and_its_p4_program_come_from_the_wheel(installed: Shell) -> None:
    probe = (
        "import json, switchreduce.worker.shim as shim, switchreduce.p4program as p;"
        "print(json.dumps([shim.__file__, str(p.P4INFO), p.P4INFO.is_file()]))"
    )
    result = subprocess.run(
        [installed.bin_dir / "python", "-c", probe],
        cwd=installed.cwd,
        env=installed.environment(),
        check=True,
        capture_output=True,
        text=True,
    )
    shim_file, p4info, exists = json.loads(result.stdout)
    venv = str(installed.bin_dir.parent)
    assert shim_file.startswith(venv) and p4info.startswith(venv) and exists, result.stdout


def test_the_installed_bench_runs_outside_the_checkout(installed: Shell) -> None:
    (out,) = installed.run_together(
        ["switchreduce bench allreduce --workers 2 --elements 100000 --json"]
    )
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["exact"] and summary["workers"] == 2, summary


def test_the_installed_controller_pushes_the_packaged_pipeline(installed: Shell) -> None:
    """The README's controller commands with the wheel's switchreduce: the controller reads the
    P4Info from package data and pushes it; the job's sums are exact, twice."""
    with installed.controller_job():
        pass


def test_the_installed_static_job_runs_exactly(installed: Shell) -> None:
    installed.run_static_job()


@pytest.mark.requires_p4c
@pytest.mark.skipif(shutil.which("p4c-bm2-ss") is None, reason="p4c-bm2-ss not on PATH")
def test_p4c_compiles_the_packaged_program(installed: Shell, tmp_path: Path) -> None:
    probe = (
        "import sys; from pathlib import Path;"
        "from switchreduce.emulation.bmv2 import compile_program;"
        "print(compile_program(Path(sys.argv[1]), 64).bmv2_json)"
    )
    result = subprocess.run(
        [installed.bin_dir / "python", "-c", probe, str(tmp_path)],
        cwd=installed.cwd,
        env=installed.environment(),
        check=True,
        capture_output=True,
        text=True,
    )
    assert Path(result.stdout.strip()).is_file()
