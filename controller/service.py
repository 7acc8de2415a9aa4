"""``switchreduce controller``: the registration API and the hold on one switch, as a process.

It reads the program's P4Info (the committed one, or what p4c emitted),
refuses options the program cannot hold before connecting, takes the switch
(recovering the jobs a previous controller left on it), says where its API
listens (``controller http://HOST:PORT``) and serves until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from switchreduce import wire
from switchreduce.controller.api import Registry, make_server
from switchreduce.controller.errors import ControllerError
from switchreduce.controller.jobs import ProgramSizes
from switchreduce.controller.supervisor import SwitchSupervisor
from switchreduce.launch import CONTROLLER, announce
from switchreduce.p4runtime.schema import load_p4info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerOptions:
    """The switch to hold, where workers send and register, and what jobs get."""

    #: The switch's P4Runtime server: HOST:PORT, or unix:PATH.
    p4runtime: str
    #: Where workers send their packets (the switch's data plane), HOST:PORT.
    data_plane: tuple[str, int]
    #: The registration API.
    listen: tuple[str, int] = ("127.0.0.1", 9000)
    #: Raw mode: worker host IP -> (MAC, switch port); only these hosts may register.
    hosts: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Other stations to forward to: MAC -> switch port (the hosts get theirs).
    routes: dict[int, int] = field(default_factory=dict)
    device_id: int = 0
    election_id: int = 1
    #: BMv2's JSON to push with the P4Info (None: the switch has its program).
    device_config: Path | None = None
    #: The P4Info p4c emitted with the program (None: the committed one, K=256).
    p4info: Path | None = None
    #: Seconds a job's ranks have to all register.
    register_timeout: float = 60.0
    #: Seconds a job lives without a renewal from its ranks (they renew every third).
    lease: float = 30.0
    #: Elements per packet, if it must be checked against the program's (None: the P4Info's).
    k: int | None = None
    #: Slots each job gets.
    slots: int = 64

    def __post_init__(self) -> None:
        if not self.lease > 0:
            raise ValueError(f"--lease must be positive seconds, got {self.lease}")
        if not self.register_timeout > 0:
            raise ValueError(
                f"--register-timeout must be positive seconds, got {self.register_timeout}"
            )


def serve(options: ControllerOptions) -> int:
    """Hold the switch and answer registrations until SIGTERM or SIGINT. A ControllerError
    says why it could not start."""
    try:
        p4info = load_p4info(options.p4info) if options.p4info else load_p4info()
        sizes = ProgramSizes.of(p4info)
        config = options.device_config.read_bytes() if options.device_config else b""
    except (OSError, KeyError, ValueError) as exc:  # ParseError is a ValueError
        raise ControllerError(f"cannot use the program's files: {exc}") from None
    most_slots = min(sizes.pool, wire.MAX_SLOTS)
    if not 1 <= options.slots <= most_slots:
        raise ControllerError(
            f"--slots must be 1..{most_slots} (the program's slot pool has "
            f"{sizes.pool}), got {options.slots}"
        )
    if options.k not in (None, sizes.k):
        raise ControllerError(f"--k {options.k}, but the P4Info is compiled for K={sizes.k}")
    supervisor = SwitchSupervisor(
        options.p4runtime,
        p4info,
        device_id=options.device_id,
        election_id=options.election_id,
        device_config=config,
        routes={**options.routes, **dict(options.hosts.values())},
    )
    recovered = supervisor.start()
    if recovered:  # a restarted controller: the switch kept running its jobs
        log.info("recovered jobs %s from the switch; their leases start now", recovered)
    data_host, data_port = options.data_plane
    registry = Registry(
        supervisor,
        sizes.k,
        options.slots,
        f"{data_host}:{data_port}",
        lease=options.lease,
        timeout=options.register_timeout,
        attachments=options.hosts or None,
    )
    try:
        server = make_server(registry, options.listen)
    except OSError as exc:
        host, port = options.listen
        raise ControllerError(f"cannot listen on {host}:{port}: {exc}") from None
    stop = threading.Event()
    threading.Thread(target=supervisor.watch, args=(stop,), daemon=True).start()
    threading.Thread(target=registry.run_reaper, args=(stop,), daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.shutdown).start())
    host, port = server.socket.getsockname()[:2]
    announce(CONTROLLER, f"http://{host}:{port}")
    server.serve_forever()
    stop.set()
    server.server_close()
    supervisor.jobs.conn.close()
    return 0
