"""``switchreduce``: every part of the system starts from here.

switchreduce switch ...           a soft switch in UDP mode
switchreduce controller ...       admit jobs onto a switch over P4Runtime
switchreduce worker ...           one rank of a synthetic allreduce job
switchreduce train CONFIG ...     one rank of a training job (under torchrun or the runner)
switchreduce run CONFIG           replay an experiment: switch vs gloo, metrics and plots
switchreduce topo ...             a Mininet star around a switch (root)
switchreduce bench allreduce ...  a switch and N workers, measured
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import threading
import time
from pathlib import Path

from switchreduce import wire
from switchreduce.worker.backends import BACKENDS


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
    parser.add_argument("--slots", type=int, default=64, help="slots per job (window)")


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
        "--p4runtime",
        type=_grpc_address,
        metavar="HOST:PORT|unix:PATH",
        help="serve P4Runtime here for a controller, as simple_switch_grpc",
    )
    switch.add_argument("--device-id", type=int, default=0, help="P4Runtime device id")
    switch.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="RANK=IP:PORT[@SWITCH_PORT/MAC]",
        help="bind a rank to its address (once per rank); raw mode adds its port and MAC",
    )
    switch.add_argument(
        "--raw",
        action="append",
        default=[],
        metavar="PORT=IFNAME",
        help="raw mode (root): serve switch port PORT on interface IFNAME, once per port",
    )
    switch.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="MAC=PORT",
        help="raw mode: forward other traffic for MAC out of PORT",
    )
    switch.add_argument("--slot-base", type=int, default=0)
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
        "--wait-for-go",
        action="store_true",
        help="print 'ready' and start when a line arrives on stdin",
    )
    _add_job_args(worker)

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
        action="append",
        default=[],
        metavar="IP=MAC@PORT",
        help="where a worker host is attached (raw mode); only these hosts may register",
    )
    ctl.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="MAC=PORT",
        help="forward other traffic for MAC out of PORT (hosts given by --host get theirs)",
    )
    ctl.add_argument("--device-id", type=int, default=0)
    ctl.add_argument("--election-id", type=int, default=1)
    ctl.add_argument("--device-config", help="BMv2 JSON to push with the P4Info")
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
    topo.set_defaults(k=wire.MAX_K_STANDARD_MTU, slots=None)  # slots: per switch node

    run = sub.add_parser(
        "run",
        help="replay an experiment config: train through the switch "
        "and with gloo, write metrics, a summary and plots",
    )
    run.add_argument("config", type=Path, help="experiments/configs/*.toml, or a run's config.json")
    run.add_argument("--runs", type=Path, default=Path("runs"), help="where run directories go")

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
    _add_job_args(allreduce)
    _add_fault_args(allreduce)
    # K: loopback's default, or the largest for MTU 1500 in Mininet; slots: per switch node
    allreduce.set_defaults(k=None, slots=None)
    return parser


def run_switch(args: argparse.Namespace) -> int:
    from switchreduce.emulation.softswitch.faults import FaultSpec
    from switchreduce.emulation.softswitch.pipeline import SoftSwitch
    from switchreduce.emulation.softswitch.raw import RawSwitch
    from switchreduce.emulation.softswitch.runtime import SwitchRuntime
    from switchreduce.emulation.softswitch.static import StaticJob, install_forwarding, parse_member
    from switchreduce.emulation.softswitch.udp import UdpSwitch
    from switchreduce.p4runtime.forwarding import parse_mac
    from switchreduce.p4runtime.jobs import Job

    if args.world_size is None and args.p4runtime is None:
        raise SystemExit(
            "switchreduce switch: give a static job (--world-size, --worker) "
            "or --p4runtime HOST:PORT for a controller to program the switch"
        )
    switch = SoftSwitch(k=args.k)
    static_jobs = []
    if args.world_size is not None:
        members = tuple(parse_member(spec) for spec in args.worker)
        job = Job(args.job, args.world_size, args.slot_base, args.slots, 0, members)
        static_jobs.append(StaticJob(switch, job))
    if args.p4runtime is not None:
        from switchreduce.emulation.softswitch.p4runtime_server import serve

        grpc_server = serve(switch, args.p4runtime, args.device_id)
        print(f"p4runtime {args.p4runtime}", flush=True)
    faults = FaultSpec(args.loss, args.duplicate, args.reorder, args.seed)
    server: SwitchRuntime
    if args.raw:
        routes = dict(_pair(spec, parse_mac, int) for spec in args.route)
        install_forwarding(switch, routes)
        interfaces = dict(_pair(spec, int, str) for spec in args.raw)
        server = RawSwitch(switch, interfaces, faults)
        print(f"serving {' '.join(f'{p}={i}' for p, i in interfaces.items())}", flush=True)
    else:
        server = UdpSwitch(switch, args.listen, faults)
        host, port = server.address
        print(f"listening {host}:{port}", flush=True)
    server.static_jobs = static_jobs
    signal.signal(signal.SIGTERM, lambda *_: server.stop_soon())
    signal.signal(signal.SIGINT, lambda *_: server.stop_soon())
    server.serve_forever()
    if args.p4runtime is not None:
        grpc_server.stop(grace=None)
    print(json.dumps(server.report()), flush=True)
    return 0


def run_controller(args: argparse.Namespace) -> int:
    import logging

    from switchreduce.controller.api import Registry, make_server
    from switchreduce.controller.errors import ControllerError
    from switchreduce.controller.jobs import ProgramSizes
    from switchreduce.controller.supervisor import SwitchSupervisor
    from switchreduce.p4runtime.forwarding import parse_mac
    from switchreduce.p4runtime.schema import load_p4info

    def refuse(problem: str) -> SystemExit:
        return SystemExit(f"switchreduce controller: {problem}")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        p4info = load_p4info(args.p4info) if args.p4info else load_p4info()
        sizes = ProgramSizes.of(p4info)
        config = Path(args.device_config).read_bytes() if args.device_config else b""
    except (OSError, KeyError, ValueError) as exc:  # ParseError is a ValueError
        raise refuse(f"cannot use the program's files: {exc}") from None
    most_slots = min(sizes.pool, wire.MAX_SLOTS)
    if not 1 <= args.slots <= most_slots:
        raise refuse(
            f"--slots must be 1..{most_slots} (the program's slot pool has "
            f"{sizes.pool}), got {args.slots}"
        )
    if args.k is None:
        args.k = sizes.k
    elif args.k != sizes.k:
        raise refuse(f"--k {args.k}, but the P4Info is compiled for K={sizes.k}")
    if not args.lease > 0:
        raise refuse(f"--lease must be positive seconds, got {args.lease}")
    if not args.register_timeout > 0:
        raise refuse(f"--register-timeout must be positive seconds, got {args.register_timeout}")
    data_host, data_port = args.data_plane
    attachments = dict(_pair(spec, str, _attachment) for spec in args.host) or None
    routes = dict(_pair(spec, parse_mac, int) for spec in args.route)
    routes.update((attachments or {}).values())
    supervisor = SwitchSupervisor(
        args.p4runtime,
        p4info,
        device_id=args.device_id,
        election_id=args.election_id,
        device_config=config,
        routes=routes,
    )
    try:
        recovered = supervisor.start()
    except ControllerError as exc:
        raise refuse(str(exc)) from None
    if recovered:  # a restarted controller: the switch kept running its jobs
        logging.info("recovered jobs %s from the switch; their leases start now", recovered)
    registry = Registry(
        supervisor,
        args.k,
        args.slots,
        f"{data_host}:{data_port}",
        lease=args.lease,
        timeout=args.register_timeout,
        attachments=attachments,
    )
    try:
        server = make_server(registry, args.listen)
    except OSError as exc:
        raise refuse(f"cannot listen on {args.listen[0]}:{args.listen[1]}: {exc}") from None
    stop = threading.Event()
    threading.Thread(target=supervisor.watch, args=(stop,), daemon=True).start()
    threading.Thread(target=registry.run_reaper, args=(stop,), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    host, port = server.socket.getsockname()[:2]
    print(f"controller http://{host}:{port}", flush=True)
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    stop.set()
    server.server_close()
    supervisor.jobs.conn.close()
    return 0


def run_topo(args: argparse.Namespace) -> int:
    from switchreduce.emulation.bmv2 import bmv2_available
    from switchreduce.emulation.errors import EmulationError
    from switchreduce.emulation.topo import DEFAULT_SLOTS, Emulation, TopoOptions

    if args.switch is None:
        if bmv2_available():
            args.switch = "bmv2"
            print("switch: bmv2 (simple_switch_grpc and p4c-bm2-ss are installed)", flush=True)
        else:
            args.switch = "soft"
            print("switch: soft (simple_switch_grpc or p4c-bm2-ss is not on PATH)", flush=True)
    if args.slots is None:
        args.slots = DEFAULT_SLOTS[args.switch]
    try:
        options = TopoOptions(
            workers=args.workers,
            switch=args.switch,
            bw=args.bw,
            delay_ms=args.delay,
            loss_pct=args.loss,
            switch_loss=args.switch_loss,
            k=args.k,
            slots=args.slots,
            run_dir=args.run_dir,
        )
        with Emulation(options) as emu:
            lost = emu.ping_all()
            if args.cli:
                from mininet.cli import CLI

                CLI(emu.net)
                return 0
            reports = emu.allreduce(args.elements)
    except (EmulationError, ValueError) as exc:
        raise SystemExit(f"switchreduce topo: {exc}") from None
    seconds = max(r["seconds"] for r in reports)
    exact = all(r["exact"] and r["within_bound"] for r in reports)
    print(
        f"{args.workers} hosts: ping loss {lost:.0f}%, allreduce of {args.elements:,} float32 "
        f"in {seconds:.3f} s ({args.elements / seconds / 1e6:.2f} M elements/s), "
        f"retransmissions {sum(r['retransmissions'] for r in reports)}, exact={exact}"
    )
    return 0 if exact and lost == 0 else 1


def _attachment(text: str) -> tuple[int, int]:
    """``MAC@PORT`` -> (MAC as an integer, switch port)."""
    from switchreduce.p4runtime.forwarding import parse_mac

    mac, _, port = text.partition("@")
    return parse_mac(mac), int(port)


def _pair(spec: str, parse_key, parse_value) -> tuple:
    """``KEY=VALUE`` from the command line, each side parsed; a clear error otherwise."""
    key, sep, value = spec.partition("=")
    try:
        if not sep:
            raise ValueError("missing '='")
        return parse_key(key), parse_value(value)
    except ValueError as exc:
        raise SystemExit(f"switchreduce switch: bad KEY=VALUE {spec!r}: {exc}") from None


def run_worker(args: argparse.Namespace) -> int:
    from switchreduce.worker.backends import GroupOptions, open_backend
    from switchreduce.worker.errors import WorkerError
    from switchreduce.worker.reference import check, synthetic_tensor

    if args.backend == "gloo" and args.master is None:
        raise SystemExit("switchreduce worker: --master HOST:PORT is required with gloo")
    data = synthetic_tensor(args.seed, args.rank, args.elements, args.dtype)
    options = GroupOptions(
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
    )
    try:
        backend = open_backend(args.backend, options)
    except WorkerError as exc:
        raise SystemExit(f"switchreduce worker: {exc}") from None
    with backend:
        if args.wait_for_go:
            print("ready", flush=True)
            sys.stdin.readline()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = backend.allreduce(data)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        usage = resource.getrusage(resource.RUSAGE_SELF)
        stats = backend.stats()
    inputs = [
        synthetic_tensor(args.seed, r, args.elements, args.dtype) for r in range(args.world_size)
    ]
    verdict = check(result, inputs, args.k)
    through_switch = args.backend == "switch"
    report = {
        "rank": args.rank,
        "backend": args.backend,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "context_switches": usage.ru_nvcsw + usage.ru_nivcsw,
        # gloo sums float32 in float32: neither the fixed-point reference nor its bound apply
        "exact": verdict.exact if through_switch else None,
        "within_bound": verdict.within_bound if through_switch else None,
        "max_abs_error": verdict.max_abs_error,
        **stats,
    }
    print(json.dumps(report), flush=True)
    return 0 if not through_switch or (verdict.exact and verdict.within_bound) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "switch":
        return run_switch(args)
    if args.command == "worker":
        return run_worker(args)
    if args.command == "topo":
        return run_topo(args)
    if args.command == "controller":
        return run_controller(args)
    if args.command in ("train", "run"):
        from switchreduce.experiments import runner, train
        from switchreduce.experiments.config import load
        from switchreduce.experiments.errors import ConfigError

        try:
            config = load(args.config)
        except ConfigError as exc:
            raise SystemExit(f"switchreduce {args.command}: {exc}") from None
        return (train if args.command == "train" else runner).main(args, config)
    from switchreduce.experiments.bench import run_allreduce_bench

    return run_allreduce_bench(args)


if __name__ == "__main__":
    sys.exit(main())
