"""``switchreduce bench allreduce``: a soft switch and N workers as separate processes.

Each part runs through its own command (``switchreduce switch``,
``switchreduce worker``), exactly as on several machines. Workers are held at
a start line until all are ready, so the time measured is the allreduce alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

from switchreduce import wire
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.softswitch.process import LoopbackSwitch
from switchreduce.launch import cli_command, piped
from switchreduce.ports import free_udp_ports


def run_allreduce_bench(args: argparse.Namespace) -> int:
    if args.topo == "mininet":
        return run_mininet_bench(args)
    if args.k is None:
        args.k = wire.DEFAULT_K
    if args.slots is None:
        from switchreduce.emulation.topo import DEFAULT_SLOTS

        args.slots = DEFAULT_SLOTS["soft"]
    n = args.workers
    ports = free_udp_ports(n)
    common = ["--k", str(args.k), "--slots", str(args.slots)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    faults = FaultSpec(args.loss, args.duplicate, args.reorder, args.seed)
    with LoopbackSwitch(ports, args.k, args.slots, faults) as switch:
        workers = [
            subprocess.Popen(
                cli_command(
                    "worker",
                    "--switch",
                    switch.address,
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--rank",
                    str(rank),
                    "--world-size",
                    str(n),
                    *common,
                    "--elements",
                    str(args.elements),
                    "--dtype",
                    args.dtype,
                    "--seed",
                    str(args.seed),
                    "--timeout",
                    str(args.timeout),
                    "--wait-for-go",
                ),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for rank, port in enumerate(ports)
        ]
        for w in workers:
            if piped(w.stdout).readline().strip() != "ready":
                raise RuntimeError("a worker failed to start")
        for w in workers:
            stdin = piped(w.stdin)
            stdin.write("go\n")
            stdin.flush()
        reports = []
        for w in workers:
            out, _ = w.communicate()
            lines = out.strip().splitlines()
            if not lines:
                raise RuntimeError(f"a worker exited with {w.returncode} and no report")
            reports.append(json.loads(lines[-1]))
    seconds = max(r["seconds"] for r in reports)
    summary = {
        "workers": n,
        "elements": args.elements,
        "dtype": args.dtype,
        "k": args.k,
        "slots": args.slots,
        "loss": args.loss,
        "seconds": round(seconds, 4),
        "worker_cpu_seconds": round(sum(r["cpu_seconds"] for r in reports), 3),
        "elements_per_s": round(args.elements / seconds),
        "packets": sum(r["packets_sent"] + r["packets_received"] for r in reports),
        "retransmissions": sum(r["retransmissions"] for r in reports),
        "max_abs_error": max(r["max_abs_error"] for r in reports),
        "exact": all(r["exact"] for r in reports),
        "within_bound": all(r["within_bound"] for r in reports),
        "switch": switch.report,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0 if summary["exact"] and summary["within_bound"] else 1


def run_mininet_bench(args: argparse.Namespace) -> int:
    """The same tensor through the switch, then through gloo, between the same Mininet hosts."""
    from switchreduce.emulation.errors import EmulationError
    from switchreduce.emulation.topo import DEFAULT_SLOTS, Emulation, TopoOptions

    n = args.workers
    if args.slots is None:
        args.slots = DEFAULT_SLOTS[args.switch]
    try:
        options = TopoOptions(
            workers=n,
            switch=args.switch,
            bw=args.bw,
            switch_loss=args.loss,
            k=args.k or wire.MAX_K_STANDARD_MTU,
            slots=args.slots,
        )
        with Emulation(options) as emu:
            through_switch = emu.allreduce(args.elements, args.dtype, args.timeout, args.seed)
            through_gloo = emu.allreduce(
                args.elements, args.dtype, args.timeout, args.seed, backend="gloo"
            )
    except (EmulationError, ValueError) as exc:
        raise SystemExit(f"switchreduce bench: {exc}") from None
    switch_seconds = max(r["seconds"] for r in through_switch)
    gloo_seconds = max(r["seconds"] for r in through_gloo)
    summary = {
        "topo": "mininet",
        "switch": args.switch,
        "workers": n,
        "elements": args.elements,
        "dtype": args.dtype,
        "k": options.k,
        "slots": options.slots,
        "bw_mbps": args.bw,
        "loss": args.loss,
        "switch_seconds": round(switch_seconds, 4),
        "gloo_seconds": round(gloo_seconds, 4),
        "ratio": round(switch_seconds / gloo_seconds, 4),
        "ring_bound_ratio": round(n / (2 * (n - 1)), 4) if n > 1 else None,
        "elements_per_s": round(args.elements / switch_seconds),
        "retransmissions": sum(r["retransmissions"] for r in through_switch),
        "max_abs_error": max(r["max_abs_error"] for r in through_switch),
        "gloo_max_abs_error": max(r["max_abs_error"] for r in through_gloo),
        "exact": all(r["exact"] for r in through_switch),
        "within_bound": all(r["within_bound"] for r in through_switch),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{n} Mininet hosts, {args.elements:,} {args.dtype}, links "
            f"{args.bw or 'unshaped'} Mbit/s, K={options.k}"
        )
        print(
            f"  through the {args.switch} switch  {switch_seconds:.3f} s  "
            f"exact={summary['exact']}  retransmissions {summary['retransmissions']}"
        )
        print(f"  gloo allreduce        {gloo_seconds:.3f} s")
        print(
            f"  ratio                 {summary['ratio']:.3f}  (bandwidth bound for a ring: "
            f"{summary['ring_bound_ratio']})"
        )
    return 0 if summary["exact"] and summary["within_bound"] else 1


def _print_summary(s: dict) -> None:
    drops = {k: v for k, v in s["switch"]["drops"].items() if v}
    faults = s["switch"]["faults"]
    print(
        f"{s['workers']} workers allreduced {s['elements']:,} {s['dtype']} elements "
        f"through the soft switch (K={s['k']}, {s['slots']} slots, loss {s['loss']:.1%})"
    )
    print(f"  time            {s['seconds']:.3f} s  ({s['elements_per_s'] / 1e6:.2f} M elements/s)")
    print(f"  packets         {s['packets']:,} sent+received by workers")
    print(f"  retransmissions {s['retransmissions']:,}")
    print(
        f"  injected loss   {faults['ingress']['dropped']:,} to switch, "
        f"{faults['egress']['dropped']:,} from switch"
    )
    print(f"  switch drops    {drops or 'none'}")
    print(
        f"  check           exact={s['exact']} within_bound={s['within_bound']} "
        f"max_abs_error={s['max_abs_error']:.3g} (vs float64 sum)"
    )
