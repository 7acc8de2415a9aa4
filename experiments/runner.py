"""``switchreduce run CONFIG``: replay an experiment into a run directory.

For each variant of the config (one, or one per sweep value) the runner
brings up a cluster (a Mininet star, or processes on loopback), trains
through the switch, then with each baseline (``train.baselines``: gloo's
allreduce, gloo with PyTorch's fp16 or PowerSGD hook) on the same cluster
with the same seed, and writes::

    RUN/config.json          the resolved config: `switchreduce run RUN/config.json` replays it
    RUN/metrics.jsonl        one record per backend and iteration (experiments.report)
    RUN/summary.csv          one row per backend
    RUN/*.png                loss against iterations and wall time, accuracy against
                             wall time and against bytes per iteration
    RUN/logs/                every process's output
    RUN/sweep.csv, sweep.png with a sweep: the table across its values, and
    RUN/tradeoff.png         every sub-run's accuracy against its bytes per iteration
"""

from __future__ import annotations

import abc
import functools
import itertools
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from switchreduce.emulation.errors import EmulationError
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.softswitch.process import LoopbackSwitch
from switchreduce.experiments import report
from switchreduce.experiments.config import ExperimentConfig
from switchreduce.experiments.errors import ExperimentError
from switchreduce.experiments.records import PROGRESS
from switchreduce.launch import CONTROLLER, LISTENING, Child, LaunchError, Starter, cli_command
from switchreduce.ports import free_tcp_port, free_udp_ports

if TYPE_CHECKING:
    from switchreduce.emulation.topo import Emulation

#: Called with (backend, metrics record) as rank 0 reports progress.
Progress = Callable[[str, dict], None]

log = logging.getLogger(__name__)


class Cluster(abc.ABC):
    """Where the ranks of a run live; a context manager that stops what it started."""

    def __init__(self, config: ExperimentConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.logs = run_dir / "logs"

    def __enter__(self) -> Cluster:
        self.logs.mkdir(parents=True, exist_ok=True)
        return self

    @abc.abstractmethod
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    @abc.abstractmethod
    def rendezvous(self) -> tuple[str, int]:
        """MASTER_ADDR and a fresh MASTER_PORT for one training run's gloo bootstrap."""

    @abc.abstractmethod
    def rank_args(self, rank: int) -> list[str]:
        """Where rank ``rank`` binds and finds its switch (``switchreduce train`` options)."""

    @abc.abstractmethod
    def popen(self, rank: int) -> Starter | None:
        """How to start a process where rank ``rank`` lives (None: here)."""

    def train(self, backend: str, config_path: Path, show: Progress) -> None:
        """Run one backend's training to the end, relaying rank 0's progress to ``show``.
        Every rank is ``switchreduce train`` with torchrun's environment, as torchrun would
        start it; whatever fails, none is left running."""
        n = self.config.topology.workers
        master_addr, master_port = self.rendezvous()
        with ExitStack() as stack:
            ranks = []
            for rank in range(n):
                env = dict(
                    os.environ,
                    RANK=str(rank),
                    WORLD_SIZE=str(n),
                    MASTER_ADDR=master_addr,
                    MASTER_PORT=str(master_port),
                )
                cmd = cli_command(
                    "train",
                    str(config_path),
                    "--backend",
                    backend,
                    "--out",
                    str(self.run_dir),
                    *self.rank_args(rank),
                )
                child = Child(cmd, f"{backend} rank {rank}", env=env, popen=self.popen(rank),
                              log=self.logs / f"{backend}-rank{rank}.log")  # fmt: skip
                ranks.append(stack.enter_context(child))
            try:
                for line in ranks[0].lines():
                    if line.startswith(PROGRESS):
                        show(backend, json.loads(line[len(PROGRESS) :]))
                deadline = time.monotonic() + self.config.train.timeout * 4 + 30
                for child in ranks:
                    child.succeed(max(1.0, deadline - time.monotonic()))
            except LaunchError as exc:
                raise ExperimentError(str(exc)) from None


def release_job(url: str, job: int) -> None:
    """End job ``job`` on the controller at ``url`` now (its ranks may have been killed
    mid-run, with no one left to say so), so that nothing of it stays; a job not running
    is fine."""
    request = urllib.request.Request(f"{url}/v1/jobs/{job}", method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=30):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise ExperimentError(f"the controller did not release job {job}: {exc}") from None


class _Jobs:
    """Job ids for runs side by side on one switch: they cycle through the ids the
    program counts, so an id comes back only after many runs, each released when it
    ended."""

    def __init__(self) -> None:
        self._jobs = itertools.count()
        self._lock = threading.Lock()

    def next_job(self) -> int:
        with self._lock:
            return next(self._jobs) % _max_job_id() + 1


class SharedSwitch(_Jobs):
    """One empty soft switch on loopback and a controller that admits jobs onto it: runs
    that use it (``LoopbackCluster(shared=...)``) are jobs side by side on one switch,
    sharing its slot pool, each isolated by its job id and session. A context manager
    that stops both; every job gets ``slots`` slots."""

    def __init__(self, k: int, slots: int, log_dir: Path) -> None:
        super().__init__()
        self.k = k
        self.slots = slots
        self.log_dir = log_dir
        self.url = ""

    def release(self, job: int) -> None:
        release_job(self.url, job)

    def __enter__(self) -> SharedSwitch:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        p4runtime = f"127.0.0.1:{free_tcp_port()}"
        with ExitStack() as stack:
            switch = stack.enter_context(Child(
                cli_command("switch", "--listen", "127.0.0.1:0", "--p4runtime", p4runtime,
                            "--k", str(self.k)),
                "the shared soft switch", log=self.log_dir / "switch.log",
            ))  # fmt: skip
            try:
                data_plane = switch.wait_for(LISTENING)
                controller = stack.enter_context(Child(
                    cli_command("controller", "--p4runtime", p4runtime, "--data-plane",
                                data_plane, "--listen", f"127.0.0.1:{free_tcp_port()}",
                                "--k", str(self.k), "--slots", str(self.slots)),
                    "the controller", log=self.log_dir / "controller.log",
                ))  # fmt: skip
                self.url = controller.wait_for(CONTROLLER)
            except LaunchError as exc:
                raise ExperimentError(str(exc)) from None
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.__exit__(exc_type, exc, tb)


class LoopbackCluster(Cluster):
    """The ranks and a UDP soft switch as processes on this host (any user). With
    ``shared``, the ranks are job ``job`` on that switch instead of one of their own."""

    def __init__(
        self, config: ExperimentConfig, run_dir: Path, shared: SharedSwitch | None = None,
        job: int = 1,
    ) -> None:  # fmt: skip
        super().__init__(config, run_dir)
        self.shared = shared
        self.job = job

    def __enter__(self) -> LoopbackCluster:
        super().__enter__()
        topo, sw = self.config.topology, self.config.switch
        if topo.bw_mbps or topo.delay_ms or topo.loss_pct:
            raise ExperimentError(
                "link bandwidth, delay and loss need topology.mode = 'mininet' (root); "
                "on loopback use topology.switch_loss for loss"
            )
        if sw.backend != "soft":
            raise ExperimentError("the BMv2 switch runs only in Mininet (topology.mode)")
        if sw.controller:
            raise ExperimentError("switch.controller needs topology.mode = 'mininet'")
        if self.shared is not None:
            if (sw.k, sw.slot_count) != (self.shared.k, self.shared.slots):
                raise ExperimentError(
                    f"a run with K={sw.k} and {sw.slot_count} slots cannot be a job on a "
                    f"shared switch that gives each job K={self.shared.k} and "
                    f"{self.shared.slots} slots"
                )
            if topo.switch_loss:
                raise ExperimentError("a shared switch injects no loss (topology.switch_loss)")
            return self
        self.ports = free_udp_ports(topo.workers)
        faults = FaultSpec(loss=topo.switch_loss, seed=self.config.train.seed)
        self.switch = LoopbackSwitch(
            self.ports, sw.k, sw.slot_count, faults, log=self.logs / "switch.log", quorum=sw.quorum
        )
        try:
            self.switch.__enter__()
        except LaunchError as exc:
            raise ExperimentError(str(exc)) from None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.shared is not None:
            self.shared.release(self.job)
            return
        self.switch.__exit__(exc_type, exc, tb)
        if self.switch.report is not None:  # drops by reason, injected faults, CPU time
            (self.logs / "switch.report.json").write_text(json.dumps(self.switch.report) + "\n")

    def rendezvous(self) -> tuple[str, int]:
        return "127.0.0.1", free_tcp_port()

    def rank_args(self, rank: int) -> list[str]:
        if self.shared is not None:
            return ["--bind", "127.0.0.1:0", "--controller", self.shared.url, "--job",
                    str(self.job)]  # fmt: skip
        return ["--bind", f"127.0.0.1:{self.ports[rank]}", "--switch", self.switch.address]

    def popen(self, rank: int) -> Starter | None:
        return None


class SharedMininet(_Jobs):
    """One Mininet star (emulation.topo) shared out to runs side by side: the soft switch,
    the controller on host c0, and ``groups`` groups of ``topology.workers`` hosts. A run
    on it (``MininetCluster(shared=...)``) takes a free group of hosts and is a job
    registered with the controller; the links are the config's. A context manager."""

    def __init__(self, config: ExperimentConfig, groups: int, log_dir: Path) -> None:
        super().__init__()
        self.config = config
        self.log_dir = log_dir
        self.groups = groups
        self._free: queue.Queue[int] = queue.Queue()
        self._ports = itertools.count(29501)

    def __enter__(self) -> SharedMininet:
        from switchreduce.emulation.topo import MAX_HOSTS

        hosts = self.groups * self.config.topology.workers
        if hosts > MAX_HOSTS:
            raise ExperimentError(
                f"tune.parallel ({self.groups}) x topology.workers "
                f"({self.config.topology.workers}) is {hosts} hosts; one star has at most "
                f"{MAX_HOSTS}"
            )
        self.emulation = _emulation(self.config, self.log_dir, hosts, controller=True)
        for group in range(self.groups):
            self._free.put(group)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.emulation.__exit__(exc_type, exc, tb)

    @contextmanager
    def hosts(self) -> Iterator[list]:
        """A free group of hosts, the run's until it ends."""
        try:
            group = self._free.get(timeout=60)
        except queue.Empty:
            raise ExperimentError(
                f"no free group of hosts: {self.groups} runs already hold them"
            ) from None
        workers = self.config.topology.workers
        try:
            yield self.emulation.hosts[group * workers : (group + 1) * workers]
        finally:
            self._free.put(group)

    def next_port(self) -> int:
        """A fresh MASTER_PORT per run: the last one on the same hosts may linger."""
        with self._lock:
            return next(self._ports)

    def release(self, job: int) -> None:
        """``release_job`` from host c0: the controller listens in the emulated network."""
        from switchreduce.emulation.topo import CONTROLLER_HTTP_PORT, CONTROLLER_IP

        c0 = self.emulation.net.get("c0")
        code = "import sys; from switchreduce.experiments.runner import release_job; " \
               "release_job(sys.argv[1], int(sys.argv[2]))"  # fmt: skip
        url = f"http://{CONTROLLER_IP}:{CONTROLLER_HTTP_PORT}"
        process = c0.popen([sys.executable, "-c", code, url, str(job)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise ExperimentError(f"the controller did not release job {job} in 60 s") from None
        if process.returncode != 0:
            raise ExperimentError(
                f"the controller did not release job {job}: {output.decode().strip()}"
            )


def _emulation(
    config: ExperimentConfig, log_dir: Path, workers: int, controller: bool
) -> Emulation:
    """A running Mininet star with the config's switch and links."""
    from switchreduce.emulation.topo import Emulation, TopoOptions

    topo, sw = config.topology, config.switch
    try:
        options = TopoOptions(
            workers=workers,
            switch=sw.backend,
            bw=topo.bw_mbps,
            delay_ms=topo.delay_ms,
            loss_pct=topo.loss_pct,
            switch_loss=topo.switch_loss,
            k=sw.k,
            slots=sw.slots,
            quorum=sw.quorum,
            controller=controller,
            run_dir=log_dir,
        )
    except ValueError as exc:
        raise ExperimentError(str(exc)) from None
    try:
        return Emulation(options).__enter__()
    except (EmulationError, LaunchError) as exc:
        raise ExperimentError(str(exc)) from None


class MininetCluster(Cluster):
    """A Mininet star (emulation.topo) with the switch node; the ranks on its hosts (root).
    With ``shared``, the ranks are job ``job`` on a group of that star's hosts instead."""

    def __init__(
        self, config: ExperimentConfig, run_dir: Path, shared: SharedMininet | None = None,
        job: int = 1,
    ) -> None:  # fmt: skip
        super().__init__(config, run_dir)
        self.shared = shared
        self.job = job
        self._stack = ExitStack()

    def __enter__(self) -> MininetCluster:
        super().__enter__()
        if self.shared is None:
            self.emulation = _emulation(
                self.config, self.logs, self.config.topology.workers, self.config.switch.controller
            )
            self._stack.push(self.emulation)
            self.hosts = self.emulation.hosts
            self._ports = itertools.count(29501)
            return self
        self.emulation = self.shared.emulation
        self.hosts = self._stack.enter_context(self.shared.hosts())
        # on the way out (the ranks are stopped by then), before the hosts go back
        self._stack.callback(self.shared.release, self.job)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.__exit__(exc_type, exc, tb)

    def rendezvous(self) -> tuple[str, int]:
        port = self.shared.next_port() if self.shared else next(self._ports)
        return self.hosts[0].IP(), port

    def rank_args(self, rank: int) -> list[str]:
        from switchreduce.emulation.topo import WORKER_UDP_PORT

        host = self.hosts[rank]
        job = ["--job", str(self.job)] if self.shared else []
        return ["--bind", f"{host.IP()}:{WORKER_UDP_PORT}", *self.emulation.switch_args(),
                *job, "--interface", host.defaultIntf().name]  # fmt: skip

    def popen(self, rank: int) -> Starter:
        return functools.partial(self.emulation.popen, self.hosts[rank])


@functools.cache
def _max_job_id() -> int:
    """The largest job id the committed P4 program (and so the soft switch) counts."""
    from google.protobuf import text_format
    from p4.config.v1 import p4info_pb2

    from switchreduce.controller.jobs import ProgramSizes
    from switchreduce.p4program import P4INFO

    return ProgramSizes.of(text_format.Parse(P4INFO.read_text(), p4info_pb2.P4Info())).max_job_id


def resolve_mode(mode: str) -> str:
    """auto: Mininet where it can run (root, Mininet installed), loopback elsewhere."""
    if mode != "auto":
        return mode
    try:
        import mininet  # noqa: F401
    except ImportError:
        return "loopback"
    return "mininet" if os.geteuid() == 0 and shutil.which("mnexec") else "loopback"


def run_experiment(
    config: ExperimentConfig, run_dir: Path, show: Progress | None = None
) -> list[dict]:
    """Every variant of ``config`` into ``run_dir``; the summary rows of all of them."""
    show = show or report.show_progress
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.to_json())
    rows = []
    sweep = config.sweep
    # The baselines do not depend on the switch's settings: they run once for each setting
    # of the other swept keys (a seed, say), and their rows say "any" for the switch's.
    baselines_ran = set()
    for point, variant in config.variants():
        name = ",".join(f"{key}={value}" for key, value in point.items())
        out = run_dir / name if name else run_dir
        others = tuple((key, value) for key, value in point.items() if not _of_switch(key))
        baselines = () if others in baselines_ran else variant.train.baselines
        baselines_ran.add(others)
        if name:
            log.info("== %s", name)
        for row in run_variant(variant, out, baselines, show):
            swept = {key: "any" if row["backend"] != "switch" and _of_switch(key) else value
                     for key, value in point.items()}  # fmt: skip
            rows.append({**swept, **row})
    if sweep:
        report.write_sweep(run_dir, sweep.keys, rows)
    return rows


def _of_switch(key: str) -> bool:
    """A swept ``section.key`` that only the switch's training uses."""
    return key.startswith("switch.")


def run_variant(
    config: ExperimentConfig, out: Path, baselines: tuple[str, ...], show: Progress
) -> list[dict]:
    """The switch's training, then each baseline's, on one cluster; their summary rows."""
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    config_path.write_text(config.to_json())
    mode = resolve_mode(config.topology.mode)
    cluster_cls = MininetCluster if mode == "mininet" else LoopbackCluster
    backends = ("switch", *baselines)
    with cluster_cls(config, out) as cluster:
        for backend in backends:
            cluster.train(backend, config_path, show)
    records = report.merge_metrics(out, backends, config.topology.workers)
    target = config.train.target_accuracy
    rows = [report.summarize(backend, records, mode, target) for backend in backends]
    report.write_run(out, records, rows)
    return rows


def run(config: ExperimentConfig, runs: Path) -> int:
    """``switchreduce run``: ``config`` into a new run directory under ``runs``, then the
    summary. An ExperimentError says why it could not run to the end."""
    if config.tune is not None:
        raise ExperimentError("the config is a search ([tune]): `switchreduce tune` it")
    run_dir = runs / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    mode = resolve_mode(config.topology.mode)
    log.info("%s", f"{config.name}: {config.description or ''}".rstrip(": "))
    log.info(
        "  %d workers, %s, %s switch (K=%d), %s on %s, %d iterations -> %s",
        config.topology.workers, mode, config.switch.backend, config.switch.k,
        config.model.name, config.data.name, config.train.iterations, run_dir,
    )  # fmt: skip
    rows = run_experiment(config, run_dir)
    report.print_summary(run_dir, config, rows)
    return 0
