"""``switchreduce``: every part of the system starts from here.

switchreduce switch ...           a soft switch in UDP mode
switchreduce worker ...           one rank of a synthetic allreduce job
switchreduce bench allreduce ...  a switch and N workers, measured
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import time

from switchreduce import wire


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


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
    switch.add_argument("--world-size", type=int, required=True)
    switch.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="RANK=IP:PORT",
        help="bind a rank to its address (once per rank)",
    )
    switch.add_argument("--slot-base", type=int, default=0)
    _add_job_args(switch)
    _add_fault_args(switch)

    worker = sub.add_parser("worker", help="run one rank of a synthetic allreduce")
    worker.add_argument("--switch", type=_address, required=True, help="switch HOST:PORT")
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

    bench = sub.add_parser("bench", help="measure")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    allreduce = bench_sub.add_parser("allreduce", help="N workers allreduce through a switch")
    allreduce.add_argument("--workers", type=int, default=4)
    allreduce.add_argument("--elements", type=int, default=10_000_000)
    allreduce.add_argument("--dtype", choices=("float32", "int32"), default="float32")
    allreduce.add_argument("--timeout", type=float, default=30.0)
    allreduce.add_argument("--json", action="store_true", help="print one JSON object")
    _add_job_args(allreduce)
    _add_fault_args(allreduce)
    return parser


def run_switch(args: argparse.Namespace) -> int:
    from emulation.softswitch.faults import FaultSpec
    from emulation.softswitch.pipeline import SoftSwitch
    from emulation.softswitch.static import StaticJob, WorkerEndpoint, install_static_job
    from emulation.softswitch.udp import UdpSwitch

    switch = SoftSwitch(k=args.k)
    job = StaticJob(
        args.job,
        args.world_size,
        args.slot_base,
        args.slots,
        tuple(WorkerEndpoint.parse(spec) for spec in args.worker),
    )
    install_static_job(switch, job)
    faults = FaultSpec(args.loss, args.duplicate, args.reorder, args.seed)
    server = UdpSwitch(switch, args.listen, faults)
    signal.signal(signal.SIGTERM, lambda *_: server.stop_soon())
    host, port = server.address
    print(f"listening {host}:{port}", flush=True)
    signal.signal(signal.SIGINT, lambda *_: server.stop_soon())
    server.serve_forever()
    print(json.dumps(server.report()), flush=True)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from worker.reference import check, synthetic_tensor
    from worker.shim import JobBinding, SwitchCommunicator, WorkerOptions

    binding = JobBinding(args.job, args.rank, args.world_size, args.slots, args.switch)
    options = WorkerOptions(k=args.k, timeout=args.timeout)
    data = synthetic_tensor(args.seed, args.rank, args.elements, args.dtype)
    with SwitchCommunicator(binding, options, bind=args.bind) as comm:
        if args.wait_for_go:
            print("ready", flush=True)
            sys.stdin.readline()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = comm.allreduce(data)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        usage = resource.getrusage(resource.RUSAGE_SELF)
        stats = comm.stats
    inputs = [
        synthetic_tensor(args.seed, r, args.elements, args.dtype) for r in range(args.world_size)
    ]
    verdict = check(result, inputs, args.k)
    report = {
        "rank": args.rank,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "context_switches": usage.ru_nvcsw + usage.ru_nivcsw,
        "exact": verdict.exact,
        "within_bound": verdict.within_bound,
        "max_abs_error": verdict.max_abs_error,
        **vars(stats),
    }
    print(json.dumps(report), flush=True)
    return 0 if verdict.exact and verdict.within_bound else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "switch":
        return run_switch(args)
    if args.command == "worker":
        return run_worker(args)
    from switchreduce.bench import run_allreduce_bench

    return run_allreduce_bench(args)


if __name__ == "__main__":
    sys.exit(main())
