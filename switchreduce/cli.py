"""``switchreduce``: every part of the system starts from here.

switchreduce switch ...           a soft switch in UDP mode
switchreduce controller ...       admit jobs onto a switch over P4Runtime
switchreduce worker ...           one rank of a synthetic allreduce job
switchreduce train CONFIG ...     one rank of a training job (under torchrun or the runner)
switchreduce run CONFIG           replay an experiment: switch vs gloo, metrics and plots
switchreduce tune CONFIG          search its [tune] space on the emulated cluster (Optuna)
switchreduce topo ...             a Mininet star around a switch (root)
switchreduce bench allreduce ...  a switch and N workers, measured
switchreduce bench switch ...     a switch's own packet rate: soft (both engines), BMv2
"""

# This module parses and dispatches, nothing else: argparse types check every value
# (KEY=VALUE ones included), each command's arguments become its frozen options dataclass
# here, and the command runs where it lives. Logging (stderr) is configured here, once;
# stdout carries what a command produces: the lines of switchreduce.launch, and reports.

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from switchreduce import wire
from switchreduce.emulation.topo import DEFAULT_SLOTS, TopoOptions
from switchreduce.worker.backends import BACKENDS

if TYPE_CHECKING:
    from switchreduce.p4runtime.jobs import Member

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _grpc_address(text: str) -> str:
    """A gRPC target: HOST:PORT, or unix:PATH (which crosses network namespaces)."""
    if text.startswith("unix:"):
        return text
    host, port = _address(text)
    return f"{host}:{port}"


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text}")
    return value


def _mac(text: str) -> int:
    from switchreduce.p4runtime.forwarding import parse_mac

    return parse_mac(text)


def _attachment(text: str) -> tuple[int, int]:
    """``MAC@PORT`` -> (MAC as an integer, switch port)."""
    mac, _, port = text.partition("@")
    return _mac(mac), int(port)


def _key_value(
    parse_key: Callable[[str], K], parse_value: Callable[[str], V]
) -> Callable[[str], tuple[K, V]]:
    """An argparse type for ``KEY=VALUE``, each side parsed; its error names the option."""

    def parse(spec: str) -> tuple[K, V]:
        key, sep, value = spec.partition("=")
        try:
            if not sep:
                raise ValueError("missing '='")
            return parse_key(key), parse_value(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad KEY=VALUE {spec!r}: {exc}") from None

    return parse


def _member(spec: str) -> Member:
    """``RANK=IP:PORT[@SWITCH_PORT/MAC]``: a rank of the switch's static job."""
    from switchreduce.emulation.softswitch.static import parse_member

    try:
        return parse_member(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_fault_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loss", type=_probability, default=0.0, help="drop probability per packet, each direction"
    )
    parser.add_argument(
        "--duplicate",
        type=_probability,
        default=0.0,
        help="duplication probability per packet, each direction",
    )
    parser.add_argument(
        "--reorder",
        type=_probability,
        default=0.0,
        help="reordering probability per packet, each direction",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data and faults")


def _add_job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--k",
        type=int,
        default=wire.DEFAULT_K,
        choices=wire.SUPPORTED_K,
        help="elements per packet",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=DEFAULT_SLOTS["soft"],
        help="slots per job (window); default: the soft switch's",
    )


def _add_quantizer_args(parser: argparse.ArgumentParser) -> None:
    """How float elements travel: every rank of a job must give the same."""
    parser.add_argument(
        "--lane-bits",
        type=int,
        choices=wire.LANE_BITS,
        default=32,
        help="bits per float element on the wire (16 and 8 pack 2 and 4 into a word)",
    )
    parser.add_argument(
        "--rounding",
        choices=("nearest", "stochastic"),
        default="nearest",
        help="how float elements meet the fixed-point grid",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchreduce",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    switch = sub.add_parser("switch", help="run a soft switch in UDP mode")
    switch.add_argument(
        "--listen", type=_address, default=("127.0.0.1", wire.DEFAULT_SWITCH_PORT), help="HOST:PORT"
    )
    switch.add_argument("--job", type=int, default=1, help="job id")
    switch.add_argument(
        "--world-size", type=int, help="install a static job of this size (else a controller does)"
    )
    switch.add_argument(
        "--quorum",
        type=int,
        help="the static job's rounds complete with this many ranks' packets (default: all)",
    )
    switch.add_argument(
        "--p4runtime",
        type=_grpc_address,
        metavar="HOST:PORT|unix:PATH",
        help="serve P4Runtime here for a controller, as simple_switch_grpc",
    )
    switch.add_argument("--device-id", type=int, default=0, help="P4Runtime device id")
    switch.add_argument(
        "--worker",
        type=_member,
        action="append",
        default=[],
        metavar="RANK=IP:PORT[@SWITCH_PORT/MAC]",
        help="bind a rank to its address (once per rank); raw mode adds its port and MAC",
    )
    switch.add_argument(
        "--raw",
        type=_key_value(int, str),
        action="append",
        default=[],
        metavar="PORT=IFNAME",
        help="raw mode (root): serve switch port PORT on interface IFNAME, once per port",
    )
    switch.add_argument(
        "--route",
        type=_key_value(_mac, int),
        action="append",
        default=[],
        metavar="MAC=PORT",
        help="raw mode: forward other traffic for MAC out of PORT",
    )
    switch.add_argument("--slot-base", type=int, default=0)
    switch.add_argument(
        "--engine",
        choices=("compiled", "python"),
        default=None,
        help="the pipeline in C (the default) or in Python (the reference)",
    )
    _add_job_args(switch)
    _add_fault_args(switch)

    worker = sub.add_parser("worker", help="run one rank of a synthetic allreduce")
    worker.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default="switch",
        help="sum through the switch, or with torch.distributed's gloo (baseline)",
    )
    worker.add_argument("--switch", type=_address, help="switch HOST:PORT")
    worker.add_argument(
        "--controller",
        help="register with this controller URL instead of "
        "naming the switch and slots (http://HOST:PORT)",
    )
    worker.add_argument(
        "--master", type=_address, help="gloo: rank 0's HOST:PORT for the rendezvous"
    )
    worker.add_argument("--bind", type=_address, default=("0.0.0.0", 0), help="local HOST:PORT")
    worker.add_argument("--job", type=int, default=1)
    worker.add_argument("--rank", type=int, required=True)
    worker.add_argument("--world-size", type=int, required=True)
    worker.add_argument("--elements", type=int, default=1_000_000)
    worker.add_argument("--dtype", choices=("float32", "int32"), default="float32")
    worker.add_argument(
        "--timeout", type=float, default=10.0, help="seconds without progress before giving up"
    )
    worker.add_argument("--seed", type=int, default=0)
    worker.add_argument(
        "--engine",
        choices=("compiled", "python"),
        default="compiled",
        help="the switch backend's window and socket loop in C (default) or in Python (the "
        "reference)",
    )
    worker.add_argument(
        "--wait-for-go",
        action="store_true",
        help="say 'ready', then start when a line ('go') arrives on stdin",
    )
    _add_job_args(worker)
    _add_quantizer_args(worker)

    ctl = sub.add_parser("controller", help="admit jobs onto a switch over P4Runtime")
    ctl.add_argument(
        "--p4runtime",
        type=_grpc_address,
        required=True,
        help="the switch's P4Runtime server, HOST:PORT or unix:PATH",
    )
    ctl.add_argument(
        "--data-plane",
        type=_address,
        required=True,
        help="where workers send their packets, HOST:PORT",
    )
    ctl.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 9000),
        help="the registration API, HOST:PORT",
    )
    ctl.add_argument(
        "--host",
        type=_key_value(str, _attachment),
        action="append",
        default=[],
        metavar="IP=MAC@PORT",
        help="where a worker host is attached (raw mode); only these hosts may register",
    )
    ctl.add_argument(
        "--route",
        type=_key_value(_mac, int),
        action="append",
        default=[],
        metavar="MAC=PORT",
        help="forward other traffic for MAC out of PORT (hosts given by --host get theirs)",
    )
    ctl.add_argument("--device-id", type=int, default=0)
    ctl.add_argument("--election-id", type=int, default=1)
    ctl.add_argument("--device-config", type=Path, help="BMv2 JSON to push with the P4Info")
    ctl.add_argument(
        "--p4info",
        type=Path,
        help="the P4Info p4c emitted with the program (default: the committed one, K=256)",
    )
    ctl.add_argument(
        "--register-timeout",
        type=float,
        default=60.0,
        help="seconds a job's ranks have to all register",
    )
    ctl.add_argument(
        "--lease",
        type=float,
        default=30.0,
        help="seconds a job lives without a renewal from its ranks (they renew every third)",
    )
    _add_job_args(ctl)
    ctl.set_defaults(k=None)  # the P4Info's

    topo = sub.add_parser("topo", help="a Mininet star of worker hosts around a switch (root)")
    topo.add_argument("--workers", type=int, default=4)
    topo.add_argument(
        "--switch",
        choices=("bmv2", "soft"),
        default=None,
        help="default: bmv2 where simple_switch_grpc and p4c are installed",
    )
    topo.add_argument("--bw", type=float, default=None, help="link bandwidth, Mbit/s")
    topo.add_argument(
        "--mtu", type=int, default=TopoOptions.mtu, help="link MTU (9000: jumbo frames)"
    )
    topo.add_argument("--delay", type=float, default=None, help="link delay, ms")
    topo.add_argument("--loss", type=float, default=None, help="link loss, percent")
    topo.add_argument(
        "--switch-loss",
        type=_probability,
        default=0.0,
        help="drop probability at the soft switch's ports",
    )
    topo.add_argument(
        "--elements", type=int, default=1_000_000, help="size of the allreduce run across the hosts"
    )
    topo.add_argument("--cli", action="store_true", help="open the Mininet CLI instead")
    topo.add_argument("--run-dir", type=Path, default=Path("runs/topo"), help="where logs go")
    _add_job_args(topo)
    # K: the largest that fits the MTU; slots: DEFAULT_SLOTS of the switch kind
    topo.set_defaults(k=None, slots=None)

    run = sub.add_parser(
        "run",
        help="replay an experiment config: train through the switch "
        "and with gloo, write metrics, a summary and plots",
    )
    run.add_argument("config", type=Path, help="experiments/configs/*.toml, or a run's config.json")
    run.add_argument("--runs", type=Path, default=Path("runs"), help="where run directories go")

    tune = sub.add_parser(
        "tune",
        help="search a config's [tune] space: each algorithm and seed one Optuna study, "
        "trials trained through the switch",
    )
    tune.add_argument("config", type=Path, help="a config with a [tune] section")
    tune.add_argument("--runs", type=Path, default=Path("runs"), help="where run directories go")
    tune.add_argument("--run-dir", type=Path, help="use (or resume) this run directory")
    tune.add_argument(
        "--storage", help="Optuna storage URL, e.g. postgresql://... (default RUN/studies.db)"
    )
    tune.add_argument("--study", help="prefix of the studies' names (default: the config's name)")
    tune.add_argument(
        "--algorithm", action="append", default=[], help="only this of tune.algorithms (repeat)"
    )
    tune.add_argument(
        "--seed", type=int, action="append", default=[], help="only this of tune.seeds (repeat)"
    )

    train = sub.add_parser("train", help="one rank of a training run (torchrun sets RANK etc.)")
    train.add_argument("config", type=Path)
    train.add_argument("--backend", choices=sorted(BACKENDS), default="switch")
    train.add_argument("--switch", type=_address, help="switch HOST:PORT (a static job)")
    train.add_argument("--controller", help="register with this controller URL instead")
    train.add_argument("--bind", type=_address, default=("0.0.0.0", 0), help="local HOST:PORT")
    train.add_argument("--job", type=int, default=1)
    train.add_argument("--interface", help="count the bytes this interface sends (Mininet host)")
    train.add_argument("--out", type=Path, default=Path("."), help="where metrics go")

    bench = sub.add_parser("bench", help="measure")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    allreduce = bench_sub.add_parser("allreduce", help="N workers allreduce through a switch")
    allreduce.add_argument("--workers", type=int, default=4)
    allreduce.add_argument("--elements", type=int, default=10_000_000)
    allreduce.add_argument("--dtype", choices=("float32", "int32"), default="float32")
    allreduce.add_argument("--timeout", type=float, default=30.0)
    allreduce.add_argument("--json", action="store_true", help="print one JSON object")
    allreduce.add_argument(
        "--topo",
        choices=("loopback", "mininet"),
        default="loopback",
        help="processes on loopback, or Mininet hosts (root) against gloo",
    )
    allreduce.add_argument(
        "--switch",
        choices=("soft", "bmv2"),
        default="soft",
        help="with --topo mininet: the switch node",
    )
    allreduce.add_argument(
        "--bw", type=float, default=None, help="with --topo mininet: link bandwidth, Mbit/s"
    )
    allreduce.add_argument(
        "--engine",
        choices=("compiled", "python"),
        default=None,
        help="the soft switch's engine, on loopback or Mininet's switch node (default: compiled)",
    )
    allreduce.add_argument(
        "--worker-engine",
        choices=("compiled", "python"),
        default=None,
        help="the workers' window and socket loop, on loopback (default: compiled)",
    )
    allreduce.add_argument(
        "--mtu",
        type=int,
        default=None,
        help="with --topo mininet: link MTU (default 1500; 9000: jumbo frames, K up to 1024)",
    )
    _add_job_args(allreduce)
    _add_quantizer_args(allreduce)
    _add_fault_args(allreduce)
    # K: loopback's default, or the largest for the links' MTU in Mininet; slots: per switch kind
    allreduce.set_defaults(k=None, slots=None)
    switch_bench = bench_sub.add_parser(
        "switch", help="a switch's own packet rate under a load generator, against BMv2"
    )
    switch_bench.add_argument(
        "--switch",
        choices=("soft", "bmv2"),
        action="append",
        default=[],
        help="measure this switch (repeat for both; default: soft, and bmv2 where it runs)",
    )
    switch_bench.add_argument(
        "--engine",
        choices=("compiled", "python"),
        action="append",
        default=[],
        help="the soft switch's engine (repeat for both; default: both)",
    )
    switch_bench.add_argument(
        "--mode",
        choices=("udp", "raw"),
        action="append",
        default=[],
        help="the soft switch's: a UDP socket on loopback, or frames on veth pairs (root); "
        "repeat for both (default: both where root)",
    )
    switch_bench.add_argument("--workers", type=int, default=4, help="ranks the load stands for")
    switch_bench.add_argument(
        "--k", type=int, default=wire.MAX_K_STANDARD_MTU, choices=wire.SUPPORTED_K
    )
    switch_bench.add_argument(
        "--slots", type=int, default=None, help="slots of the job (default: per switch)"
    )
    switch_bench.add_argument(
        "--packets",
        type=int,
        default=None,
        help="contributions per run of every switch (default: per switch; BMv2 takes a few "
        "hundred a second)",
    )
    switch_bench.add_argument("--repeat", type=int, default=1, help="runs per switch; medians")
    switch_bench.add_argument(
        "--timeout", type=float, default=10.0, help="seconds without a result before failing"
    )
    switch_bench.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _options(args: argparse.Namespace, make: Callable[[], T]) -> T:
    """A command's options from its arguments; values they refuse end it in one line."""
    try:
        return make()
    except ValueError as exc:
        raise SystemExit(f"switchreduce {args.command}: {exc}") from None


def _switch(args: argparse.Namespace) -> int:
    from switchreduce.emulation.softswitch.faults import FaultSpec
    from switchreduce.emulation.softswitch.serve import SwitchOptions, serve
    from switchreduce.p4runtime.jobs import Job

    def job() -> Job | None:
        if args.world_size is None:
            if args.quorum is not None:
                raise ValueError("--quorum belongs to a static job: give --world-size too")
            return None
        return Job(
            args.job,
            args.world_size,
            args.slot_base,
            args.slots,
            0,
            tuple(args.worker),
            args.quorum,
        )

    options = _options(
        args,
        lambda: SwitchOptions(
            k=args.k,
            listen=args.listen,
            raw=dict(args.raw),
            routes=dict(args.route),
            job=job(),
            p4runtime=args.p4runtime,
            device_id=args.device_id,
            faults=FaultSpec(args.loss, args.duplicate, args.reorder, args.seed),
            engine=args.engine,
        ),
    )
    return serve(options)


def _controller(args: argparse.Namespace) -> int:
    from switchreduce.controller.service import ControllerOptions, serve

    options = _options(
        args,
        lambda: ControllerOptions(
            p4runtime=args.p4runtime,
            data_plane=args.data_plane,
            listen=args.listen,
            hosts=dict(args.host),
            routes=dict(args.route),
            device_id=args.device_id,
            election_id=args.election_id,
            device_config=args.device_config,
            p4info=args.p4info,
            register_timeout=args.register_timeout,
            lease=args.lease,
            k=args.k,
            slots=args.slots,
        ),
    )
    return serve(options)


def _worker(args: argparse.Namespace) -> int:
    from switchreduce.worker.backends import GroupOptions
    from switchreduce.worker.errors import WorkerError
    from switchreduce.worker.synthetic import SyntheticOptions, run

    group = GroupOptions(
        rank=args.rank,
        world_size=args.world_size,
        timeout=args.timeout,
        job_id=args.job,
        k=args.k,
        slots=args.slots,
        switch=args.switch,
        controller=args.controller,
        bind=args.bind,
        master=args.master,
        engine=args.engine,
        lane_bits=args.lane_bits,
        rounding=args.rounding,
        rounding_seed=args.seed,
    )
    options = _options(
        args,
        lambda: SyntheticOptions(
            group,
            backend=args.backend,
            elements=args.elements,
            dtype=args.dtype,
            seed=args.seed,
            wait_for_go=args.wait_for_go,
        ),
    )
    try:
        return run(options)
    except WorkerError as exc:  # the README names these errors by their class
        raise SystemExit(f"switchreduce worker: {type(exc).__name__}: {exc}") from None


def _topo(args: argparse.Namespace) -> int:
    from switchreduce.emulation.topo import auto_switch, run_topo

    options = _options(
        args,
        lambda: TopoOptions(
            workers=args.workers,
            switch=args.switch or auto_switch(),
            bw=args.bw,
            delay_ms=args.delay,
            loss_pct=args.loss,
            switch_loss=args.switch_loss,
            k=args.k or wire.largest_k(args.mtu),
            mtu=args.mtu,
            slots=args.slots,
            run_dir=args.run_dir,
        ),
    )
    return run_topo(options, args.elements, cli=args.cli)


def _bench(args: argparse.Namespace) -> int:
    if args.bench == "switch":
        return _bench_switch(args)
    from switchreduce.emulation.softswitch.faults import FaultSpec
    from switchreduce.experiments.bench import BenchOptions, run_bench

    options = _options(
        args,
        lambda: BenchOptions(
            workers=args.workers,
            elements=args.elements,
            dtype=args.dtype,
            timeout=args.timeout,
            topo=args.topo,
            switch=args.switch,
            engine=args.engine,
            worker_engine=args.worker_engine,
            lane_bits=args.lane_bits,
            rounding=args.rounding,
            bw=args.bw,
            mtu=args.mtu,
            k=args.k,
            slots=args.slots,
            faults=FaultSpec(args.loss, args.duplicate, args.reorder, args.seed),
            as_json=args.json,
        ),
    )
    return run_bench(options)


def _bench_switch(args: argparse.Namespace) -> int:
    from switchreduce.experiments.switchbench import SwitchBenchOptions, run_switch_bench

    options = _options(
        args,
        lambda: SwitchBenchOptions(
            switches=tuple(dict.fromkeys(args.switch)),
            engines=tuple(dict.fromkeys(args.engine)) or SwitchBenchOptions.engines,
            modes=tuple(dict.fromkeys(args.mode)),
            workers=args.workers,
            k=args.k,
            slots=args.slots,
            packets=args.packets,
            repeat=args.repeat,
            timeout=args.timeout,
            as_json=args.json,
        ),
    )
    return run_switch_bench(options)


def _train(args: argparse.Namespace) -> int:
    from switchreduce.experiments import train
    from switchreduce.experiments.config import load

    options = _options(
        args,
        lambda: train.RankOptions(
            backend=args.backend,
            out=args.out,
            switch=args.switch,
            controller=args.controller,
            bind=args.bind,
            interface=args.interface,
            job_id=args.job,
        ),
    )
    return train.run(load(args.config), options)


def _run(args: argparse.Namespace) -> int:
    from switchreduce.experiments import runner
    from switchreduce.experiments.config import load
    from switchreduce.launch import terminate_as_interrupt

    with terminate_as_interrupt():
        return runner.run(load(args.config), args.runs)


def _tune(args: argparse.Namespace) -> int:
    from switchreduce.experiments import tune
    from switchreduce.experiments.config import load
    from switchreduce.launch import terminate_as_interrupt

    options = tune.TuneOptions(
        runs=args.runs,
        run_dir=args.run_dir,
        storage=args.storage,
        study=args.study,
        algorithms=tuple(dict.fromkeys(args.algorithm)),
        seeds=tuple(dict.fromkeys(args.seed)),
    )
    with terminate_as_interrupt():
        tune.tune(load(args.config), options)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "switch": _switch,
    "controller": _controller,
    "worker": _worker,
    "train": _train,
    "run": _run,
    "tune": _tune,
    "topo": _topo,
    "bench": _bench,
}


def _log_to_stderr() -> None:
    """The project's loggers (switchreduce.*) at INFO on stderr. Other libraries' are left
    as they are: Mininet, say, prints through a handler of its own."""
    project = logging.getLogger("switchreduce")
    if not project.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        project.addHandler(handler)
    project.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    from switchreduce.controller.errors import ControllerError
    from switchreduce.emulation.errors import EmulationError
    from switchreduce.experiments.errors import ExperimentError
    from switchreduce.launch import LaunchError, die_with_parent

    args = build_parser().parse_args(argv)
    _log_to_stderr()
    if argv is None:  # a process of its own: it ends with the parent that started it
        die_with_parent()
    try:
        return COMMANDS[args.command](args)
    except (ControllerError, EmulationError, ExperimentError, LaunchError) as exc:  # in a line
        raise SystemExit(f"switchreduce {args.command}: {exc}") from None
    except KeyboardInterrupt:
        print(
            f"switchreduce {args.command}: interrupted; everything started was stopped",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
