"""``switchreduce bench allreduce``: a switch and N workers as separate processes, measured.

Each part runs through its own command (``switchreduce switch``,
``switchreduce worker``), exactly as on several machines. Workers are held at
a start line until all are ready, so the time measured is the allreduce alone.

Every run also times the baseline a user already has: torch.distributed's
gloo allreduce (a ring) of the same tensor between the same ranks. On
loopback the switch is a soft switch process, and gloo runs between the same
number of processes on loopback. In Mininet (root) gloo runs twice between
the same hosts on the same links: through the switch node's forwarding, and
over a plain Linux bridge that replaces the switch (what a cluster has
without in-network aggregation), with the same loss as the switch's ports.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from switchreduce import wire
from switchreduce.emulation.bridge import nft_available
from switchreduce.emulation.softswitch.engine import ENGINES, EngineName
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.softswitch.process import LoopbackSwitch
from switchreduce.emulation.topo import DEFAULT_SLOTS, Emulation, TopoOptions
from switchreduce.launch import START_TIMEOUT, Child, cli_command, release, reports
from switchreduce.ports import free_tcp_port, free_udp_ports
from switchreduce.worker.engine import EngineName as WorkerEngineName
from switchreduce.worker.engine import check_engine
from switchreduce.worker.quantize import ROUNDINGS


@dataclass(frozen=True)
class BenchOptions:
    """What is summed, where, and how the result is shown."""

    workers: int = 4
    elements: int = 10_000_000
    dtype: str = "float32"
    #: Each worker's: seconds without progress before it gives up.
    timeout: float = 30.0
    topo: str = "loopback"  # processes on loopback, or mininet (root)
    switch: str = "soft"  # Mininet's switch node; on loopback always the soft switch
    #: The soft switch's engine (on loopback, or Mininet's switch node); None: its default
    #: (compiled).
    engine: EngineName | None = None
    #: The loopback workers' window (worker/engine.py); None: their default (compiled).
    worker_engine: WorkerEngineName | None = None
    #: How the switch's float elements travel (worker.quantize): lanes and rounding.
    lane_bits: int = 32
    rounding: str = "nearest"
    bw: float | None = None  # Mininet's links, Mbit/s
    mtu: int | None = None  # Mininet's links; None: 1500
    #: None: wire.DEFAULT_K on loopback, the largest that fits the links' MTU in Mininet.
    k: int | None = None
    slots: int | None = None  # None: DEFAULT_SLOTS of the switch kind
    #: At the switch's ports; in Mininet only the loss (TopoOptions.switch_loss).
    faults: FaultSpec = field(default_factory=FaultSpec)
    as_json: bool = False

    def __post_init__(self) -> None:
        if self.topo not in ("loopback", "mininet"):
            raise ValueError(f"topo must be loopback or mininet, got {self.topo!r}")
        if self.topo == "loopback" and (self.mtu is not None or self.bw is not None):
            raise ValueError("link MTU and bandwidth are Mininet's (--topo mininet)")
        if self.engine is not None and self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.worker_engine is not None:
            check_engine(self.worker_engine)
        if self.topo == "mininet" and self.worker_engine is not None:
            raise ValueError("the worker engine is chosen on loopback; Mininet's run the default")
        wire.check_lanes(self.lane_bits)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.engine is not None and self.switch != "soft":
            raise ValueError("the engine is the soft switch's (--switch soft)")
        if self.topo == "mininet" and self.faults.loss and not nft_available():
            raise ValueError(
                "loss in Mininet drops on the Linux bridge baseline too, with an nftables "
                "rule, and nft is not installed (Debian package nftables)"
            )

    @property
    def quantizer_args(self) -> tuple[str, ...]:
        """The switch's workers' options for it (``switchreduce worker``)."""
        return ("--lane-bits", str(self.lane_bits), "--rounding", self.rounding)

    def topology(self) -> TopoOptions:
        """The Mininet star this bench runs on."""
        mtu = self.mtu or TopoOptions.mtu
        return TopoOptions(
            workers=self.workers,
            switch=self.switch,
            bw=self.bw,
            switch_loss=self.faults.loss,
            k=self.k or wire.largest_k(mtu),
            mtu=mtu,
            slots=self.slots,
            engine=self.engine,
        )


def run_bench(options: BenchOptions) -> int:
    """Measure, print the summary (or one JSON object); 0 if every sum was exact."""
    summary = _mininet(options) if options.topo == "mininet" else _loopback(options)
    if options.as_json:
        print(json.dumps(summary))
    elif options.topo == "mininet":
        _print_mininet_summary(summary)
    else:
        _print_summary(summary)
    return 0 if summary["exact"] and summary["within_bound"] else 1


def _loopback(options: BenchOptions) -> dict[str, Any]:
    n, k = options.workers, options.k or wire.DEFAULT_K
    slots = options.slots or DEFAULT_SLOTS["soft"]
    ports = free_udp_ports(n)
    worker_engine = ("--engine", options.worker_engine) if options.worker_engine else ()
    switch_process = (
        LoopbackSwitch(ports, k, slots, options.faults)
        if options.engine is None
        else LoopbackSwitch(ports, k, slots, options.faults, engine=options.engine)
    )
    with switch_process as switch, ExitStack() as stack:
        workers = [
            stack.enter_context(
                Child(
                    cli_command(
                        "worker", "--switch", switch.address, "--bind", f"127.0.0.1:{port}",
                        "--rank", str(rank), "--world-size", str(n),
                        "--k", str(k), "--slots", str(slots),
                        "--elements", str(options.elements), "--dtype", options.dtype,
                        "--seed", str(options.faults.seed), "--timeout", str(options.timeout),
                        "--wait-for-go", *worker_engine, *options.quantizer_args,
                    ),
                    f"worker rank {rank}",
                    stdin=True,
                )
            )
            for rank, port in enumerate(ports)
        ]  # fmt: skip
        release(workers, START_TIMEOUT + options.timeout)
        results = reports(workers, options.timeout * 4 + 60)
    gloo = _loopback_gloo(options)
    seconds = max(r["seconds"] for r in results)
    gloo_seconds = max(r["seconds"] for r in gloo)
    return {
        "workers": n,
        "elements": options.elements,
        "dtype": options.dtype,
        "k": k,
        "slots": slots,
        "loss": options.faults.loss,
        "worker_engine": results[0]["engine"],  # what the workers say they ran
        "lane_bits": options.lane_bits,
        "rounding": options.rounding,
        "seconds": round(seconds, 4),
        "worker_cpu_seconds": round(sum(r["cpu_seconds"] for r in results), 3),
        "elements_per_s": round(options.elements / seconds),
        "packets": sum(r["packets_sent"] + r["packets_received"] for r in results),
        "bytes_sent": sum(r["bytes_sent"] for r in results),
        "retransmissions": sum(r["retransmissions"] for r in results),
        "max_abs_error": max(r["max_abs_error"] for r in results),
        "exact": all(r["exact"] for r in results),
        "within_bound": all(r["within_bound"] for r in results),
        "switch": switch.report,
        # the same tensor, the same number of ranks: gloo's ring on loopback, without loss
        "gloo_seconds": round(gloo_seconds, 4),
        "gloo_elements_per_s": round(options.elements / gloo_seconds),
        "gloo_max_abs_error": max(r["max_abs_error"] for r in gloo),
        "ratio_gloo": round(seconds / gloo_seconds, 4),
    }


def _loopback_gloo(options: BenchOptions) -> list[dict[str, Any]]:
    """The same tensor through torch.distributed's gloo between as many processes on
    loopback: every rank's report."""
    n, master = options.workers, f"127.0.0.1:{free_tcp_port()}"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")  # not the hostname's address
    with ExitStack() as stack:
        workers = [
            stack.enter_context(
                Child(
                    cli_command(
                        "worker", "--backend", "gloo", "--master", master,
                        "--rank", str(rank), "--world-size", str(n),
                        "--elements", str(options.elements), "--dtype", options.dtype,
                        "--seed", str(options.faults.seed), "--timeout", str(options.timeout),
                        "--wait-for-go",
                    ),
                    f"gloo rank {rank}",
                    stdin=True,
                    env=env,
                )
            )
            for rank in range(n)
        ]  # fmt: skip
        release(workers, START_TIMEOUT + options.timeout)
        return reports(workers, options.timeout * 4 + 60)


def _mininet(options: BenchOptions) -> dict[str, Any]:
    """The same tensor between the same Mininet hosts: through the switch, through gloo
    forwarded by the switch, then through gloo over a Linux bridge in the switch's place."""
    n, topology = options.workers, options.topology()
    run = (options.elements, options.dtype, options.timeout, options.faults.seed)
    with Emulation(topology) as emu:
        through_switch = emu.allreduce(*run, worker_args=options.quantizer_args)
        switch_gloo = emu.allreduce(*run, backend="gloo")
        bridge = emu.bridge(loss=options.faults.loss)
        bridge_gloo = emu.allreduce(*run, backend="gloo")
        bridge_counters = bridge.counters()
        (node,) = emu.net.switches
        switch_report = node.report() if hasattr(node, "report") else None
    switch_seconds = max(r["seconds"] for r in through_switch)
    switch_gloo_seconds = max(r["seconds"] for r in switch_gloo)
    bridge_gloo_seconds = max(r["seconds"] for r in bridge_gloo)
    return {
        "topo": "mininet",
        "switch": options.switch,
        "workers": n,
        "elements": options.elements,
        "dtype": options.dtype,
        "k": topology.k,
        "slots": topology.slot_count,
        "bw_mbps": options.bw,
        "mtu": topology.mtu,
        "loss": options.faults.loss,
        "lane_bits": options.lane_bits,
        "rounding": options.rounding,
        "switch_seconds": round(switch_seconds, 4),
        # gloo's ring between the same hosts: its TCP forwarded by the switch node...
        "switch_gloo_seconds": round(switch_gloo_seconds, 4),
        # ...and over a Linux bridge in the switch's place, the same links and loss
        "bridge_gloo_seconds": round(bridge_gloo_seconds, 4),
        "ratio_bridge_gloo": round(switch_seconds / bridge_gloo_seconds, 4),
        "ratio_switch_gloo": round(switch_seconds / switch_gloo_seconds, 4),
        "ring_bound_ratio": round(n / (2 * (n - 1)), 4) if n > 1 else None,
        "elements_per_s": round(options.elements / switch_seconds),
        "retransmissions": sum(r["retransmissions"] for r in through_switch),
        "bytes_sent": sum(r["bytes_sent"] for r in through_switch),
        "max_abs_error": max(r["max_abs_error"] for r in through_switch),
        "gloo_max_abs_error": max(r["max_abs_error"] for r in switch_gloo + bridge_gloo),
        "exact": all(r["exact"] for r in through_switch),
        "within_bound": all(r["within_bound"] for r in through_switch),
        # the soft switch's counters over both of its runs (its own and gloo's), and the
        # bridge's frames and drops (None without loss: no rule, nothing counted)
        "switch_report": switch_report,
        "bridge": bridge_counters,
    }


def _print_mininet_summary(s: dict[str, Any]) -> None:
    print(
        f"{s['workers']} Mininet hosts, {s['elements']:,} {s['dtype']}, links "
        f"{s['bw_mbps'] or 'unshaped'} Mbit/s, MTU {s['mtu']}, K={s['k']}, "
        f"loss {s['loss']:.1%}"
    )
    print(
        f"  through the {s['switch']} switch     {s['switch_seconds']:8.3f} s  "
        f"exact={s['exact']}  retransmissions {s['retransmissions']:,}"
    )
    print(_wire_line(s, 27))
    print(f"  gloo through the switch    {s['switch_gloo_seconds']:8.3f} s")
    print(f"  gloo over a Linux bridge   {s['bridge_gloo_seconds']:8.3f} s")
    print(
        f"  switch / bridge-gloo       {s['ratio_bridge_gloo']:8.3f}  "
        f"(bandwidth bound for a ring: {s['ring_bound_ratio']})"
    )
    print(f"  switch / switch-gloo       {s['ratio_switch_gloo']:8.3f}")
    if s["loss"] and (report := s["switch_report"]) is not None:
        faults = report["faults"]
        print(
            f"  dropped at the switch      {faults['ingress']['dropped']:,} in, "
            f"{faults['egress']['dropped']:,} out (both runs through it)"
        )
    if (bridge := s["bridge"]) is not None:
        print(
            f"  dropped at the bridge      {bridge['dropped_in']:,} in, "
            f"{bridge['dropped_out']:,} out, of {bridge['frames_in']:,} frames in"
        )


def _print_summary(s: dict[str, Any]) -> None:
    drops = {k: v for k, v in s["switch"]["drops"].items() if v}
    faults = s["switch"]["faults"]
    print(
        f"{s['workers']} workers allreduced {s['elements']:,} {s['dtype']} elements "
        f"through the soft switch (K={s['k']}, {s['slots']} slots, loss {s['loss']:.1%}, "
        f"{s['switch'].get('engine', 'python')} switch engine, {s['worker_engine']} worker engine)"
    )
    print(f"  time            {s['seconds']:.3f} s  ({s['elements_per_s'] / 1e6:.2f} M elements/s)")
    print(f"  packets         {s['packets']:,} sent+received by workers")
    print(_wire_line(s, 16))
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
    print(
        f"  gloo, loopback  {s['gloo_seconds']:.3f} s  "
        f"({s['gloo_elements_per_s'] / 1e6:.2f} M elements/s, no loss)"
    )
    print(f"  switch / gloo   {s['ratio_gloo']:.2f}")


def _wire_line(s: dict[str, Any], width: int) -> str:
    """The switch's workers' bytes, and how their floats travelled."""
    return (
        f"  {'on the wire':<{width}}{s['bytes_sent']:,} bytes sent by workers "
        f"({s['lane_bits']}-bit lanes, rounding to {s['rounding']})"
    )
