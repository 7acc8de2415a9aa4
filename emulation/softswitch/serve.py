"""``switchreduce switch``: the soft switch as a process, until SIGTERM or Ctrl-C.

It serves a UDP socket (``listening HOST:PORT``) or, in raw mode, one
interface per switch port (``serving PORT=IFNAME ...``), with a static job
from its command line, a P4Runtime server for a controller to program it
(``p4runtime ADDRESS``), or both; when it stops it reports its counters
(drops by reason, injected faults, packets, CPU time) as its last line.
Either mode runs the compiled engine unless told ``--engine python``.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from switchreduce import wire
from switchreduce.emulation.softswitch.engine import ENGINES, EngineName
from switchreduce.emulation.softswitch.faults import FaultSpec
from switchreduce.emulation.softswitch.pipeline import SoftSwitch
from switchreduce.emulation.softswitch.raw import raw_switch
from switchreduce.emulation.softswitch.runtime import SwitchRuntime
from switchreduce.emulation.softswitch.static import StaticJob, install_forwarding
from switchreduce.emulation.softswitch.udp import udp_switch
from switchreduce.launch import LISTENING, P4RUNTIME, SERVING, announce, print_report
from switchreduce.p4runtime.jobs import Job


@dataclass(frozen=True)
class SwitchOptions:
    """What the switch runs, where it serves, and who programs it."""

    k: int = wire.DEFAULT_K
    #: UDP mode: where workers send (port 0: any free one, said in the LISTENING line).
    listen: tuple[str, int] = ("127.0.0.1", wire.DEFAULT_SWITCH_PORT)
    #: Raw mode (root): switch port -> interface; other traffic forwarded by MAC -> port.
    raw: dict[int, str] = field(default_factory=dict)
    routes: dict[int, int] = field(default_factory=dict)
    #: A job installed from the command line (its session comes from its ranks' JOIN).
    job: Job | None = None
    #: Serve P4Runtime here (HOST:PORT or unix:PATH), as simple_switch_grpc does.
    p4runtime: str | None = None
    device_id: int = 0
    faults: FaultSpec = field(default_factory=FaultSpec)
    #: Which engine runs the pipeline; None: the compiled one.
    engine: EngineName | None = None

    def __post_init__(self) -> None:
        if self.job is None and self.p4runtime is None:
            raise ValueError(
                "give a static job (--world-size, --worker) "
                "or --p4runtime HOST:PORT for a controller to program the switch"
            )
        if self.engine is not None and self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")

    @property
    def engine_name(self) -> EngineName:
        """The engine this switch runs."""
        return self.engine or "compiled"


def serve(options: SwitchOptions) -> int:
    """Run the switch until SIGTERM or SIGINT, then report."""
    switch = SoftSwitch(k=options.k)
    static_jobs = [] if options.job is None else [StaticJob(switch, options.job)]
    grpc_server = None
    if options.p4runtime is not None:
        from switchreduce.emulation.softswitch.p4runtime_server import serve as serve_p4runtime

        grpc_server = serve_p4runtime(switch, options.p4runtime, options.device_id)
        announce(P4RUNTIME, options.p4runtime)
    server: SwitchRuntime
    if options.raw:
        install_forwarding(switch, options.routes)
        server = raw_switch(switch, options.raw, options.faults, options.engine_name)
        up = [SERVING, *(f"{port}={name}" for port, name in options.raw.items())]
    else:
        udp = udp_switch(switch, options.listen, options.faults, options.engine_name)
        server, (host, port) = udp, udp.address
        up = [LISTENING, f"{host}:{port}"]
    server.static_jobs = static_jobs
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop_soon())
    announce(*up)  # once a SIGTERM would end it with its report
    server.serve_forever()
    if grpc_server is not None:
        grpc_server.stop(grace=None)
    print_report(server.report())
    return 0
