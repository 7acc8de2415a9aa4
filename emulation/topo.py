"""Mininet emulation: N worker hosts in a star around one programmable switch.

Host ``h{i}`` (i from 1) has 10.0.0.i and MAC 02:00:00:00:00:ii on switch port
i and runs rank i-1; the switch answers as 10.0.0.254 / 02:00:00:00:00:fe.
No controller and no Open vSwitch: the switch node runs the SwitchReduce
pipeline itself (or, for a baseline, becomes a plain Linux bridge:
``Emulation.bridge``). Links have a 1500-byte MTU, or ``mtu`` (9000: jumbo
frames). Everything started is stopped by PID and every link made is deleted
on exit, also after a failure or Ctrl-C (Mininet's own ``cleanup()``, which
kills processes by name machine-wide, is never used).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from switchreduce import wire
from switchreduce.emulation.bmv2 import (
    SIMPLE_SWITCH_GRPC,
    CompiledProgram,
    bmv2_available,
    compile_program,
    wait_for_p4runtime,
)
from switchreduce.emulation.bridge import LinuxBridge
from switchreduce.emulation.errors import EmulationError
from switchreduce.emulation.softswitch.engine import ENGINES, EngineName
from switchreduce.launch import (
    CONTROLLER,
    SERVING,
    START_TIMEOUT,
    Child,
    cli_command,
    release,
    reports,
)

if TYPE_CHECKING:
    from mininet.net import Mininet  # imported where used: a Debian package, maybe absent

SWITCH_IP = "10.0.0.254"
SWITCH_MAC = "02:00:00:00:00:fe"
WORKER_UDP_PORT = 40000
GLOO_PORT = 29500
#: With a controller, host c0 runs it on the port after the workers'.
CONTROLLER_IP = "10.0.0.253"
CONTROLLER_MAC = "02:00:00:00:00:fd"
CONTROLLER_HTTP_PORT = 9000
#: The longest path a Unix socket may have on Linux (sun_path, less its NUL).
UNIX_PATH_MAX = 107
MAX_HOSTS = 32  # one rank per host, and ranks are bitmap bits
#: Link MTUs: jumbo frames, and the range a veth takes that carries the smallest K.
JUMBO_MTU = 9000
MIN_MTU = wire.ip_packet_bytes(wire.SUPPORTED_K[0])
MAX_MTU = 65535
#: The window (slots per job) of each kind of switch when none is asked for, wherever a
#: switch is started: topo, bench, experiment configs. BMv2 takes ~2,800 aggregation
#: packets/s here: a larger window only queues in it, and the retransmission timer fires
#: spuriously (1 M elements with 64 slots: 12.2 s, 14,231 retransmissions; with 8: 5.6 s,
#: none).
DEFAULT_SLOTS = {"soft": 64, "bmv2": 8}

log = logging.getLogger(__name__)


def host_ip(index: int) -> str:
    return f"10.0.0.{index}"


def host_mac(index: int) -> str:
    return f"02:00:00:00:00:{index:02x}"


@functools.cache
def netem_available() -> bool:
    """Whether the kernel has tc's netem qdisc, which link loss and delay need (root only)."""
    ns = f"srnetem{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        return False
    try:
        probe = subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem"],
            capture_output=True,
        )
        return probe.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@dataclass(frozen=True)
class TopoOptions:
    """One emulated cluster: its size, its links and its switch."""

    workers: int = 4
    switch: str = "soft"
    #: The soft switch's engine; None: its default (compiled).
    engine: EngineName | None = None
    bw: float | None = None  # Mbit/s per link (tc htb)
    delay_ms: float | None = None  # per link (tc netem)
    loss_pct: float | None = None  # per link, each direction (tc netem)
    switch_loss: float = 0.0  # drop probability at the soft switch's ports, each direction
    k: int = wire.MAX_K_STANDARD_MTU  # the largest that fits the default MTU
    mtu: int = 1500  # of every link, both ends (9000: jumbo frames)
    slots: int | None = None  # None: DEFAULT_SLOTS of the switch kind
    #: The static job's quorum (contributions that complete a round); None: every rank's.
    quorum: int | None = None
    job_id: int = 1
    #: Run the controller on host c0 (workers register with it) instead of a static job.
    #: BMv2 always has it: nothing else programs simple_switch_grpc.
    controller: bool = False
    run_dir: Path = field(default_factory=lambda: Path("runs") / "topo")

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_HOSTS:
            raise ValueError(f"workers must be 1..{MAX_HOSTS}, got {self.workers}")
        if self.switch not in DEFAULT_SLOTS:
            raise ValueError(f"switch must be soft or bmv2, got {self.switch!r}")
        if self.bw is not None and self.bw <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bw}")
        if self.delay_ms is not None and self.delay_ms < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay_ms}")
        if self.loss_pct is not None and not 0 <= self.loss_pct < 100:
            raise ValueError(f"loss must be in [0, 100), got {self.loss_pct}")
        if not 0 <= self.switch_loss < 1:
            raise ValueError(f"switch loss is a probability in [0, 1), got {self.switch_loss}")
        if self.engine is not None and (self.switch != "soft" or self.engine not in ENGINES):
            raise ValueError(f"the soft switch's engine is one of {ENGINES}, got {self.engine!r}")
        if self.switch_loss and self.switch != "soft":
            raise ValueError("switch loss is the soft switch's fault injector; BMv2 has none")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"MTU must be {MIN_MTU}..{MAX_MTU}, got {self.mtu}")
        if wire.ip_packet_bytes(self.k) > self.mtu:
            raise ValueError(
                f"K={self.k} does not fit the links' {self.mtu}-byte MTU; use "
                f"K <= {wire.largest_k(self.mtu)}"
                + (" (or jumbo frames: mtu 9000)" if self.mtu < JUMBO_MTU else "")
            )

    @property
    def slot_count(self) -> int:
        """The window: ``slots``, or the switch kind's default."""
        return DEFAULT_SLOTS[self.switch] if self.slots is None else self.slots

    @property
    def uses_controller(self) -> bool:
        return self.controller or self.switch == "bmv2"

    def link_params(self) -> dict[str, float | str]:
        params: dict[str, float | str] = {}
        if self.bw is not None:
            params["bw"] = self.bw
        if self.delay_ms is not None:
            params["delay"] = f"{self.delay_ms}ms"
        if self.loss_pct is not None:
            params["loss"] = self.loss_pct
        return params


def _stations(options: TopoOptions) -> list[tuple[str, str, str, int]]:
    """(name, IP, MAC, switch port) of every host: the workers, then c0 with a controller."""
    out = [(f"h{i}", host_ip(i), host_mac(i), i) for i in range(1, options.workers + 1)]
    if options.uses_controller:
        out.append(("c0", CONTROLLER_IP, CONTROLLER_MAC, options.workers + 1))
    return out


def p4runtime_address(options: TopoOptions) -> str:
    """The switch node's P4Runtime address: a Unix socket, reachable across namespaces.

    It lives in the temporary directory, named after the run directory: a sweep's run
    directories are often deeper than the 107 bytes a Unix socket's path may have.
    """
    run_dir = str(options.run_dir.resolve()).encode()
    name = f"switchreduce-p4runtime-{hashlib.sha256(run_dir).hexdigest()[:16]}.sock"
    path = os.path.join(tempfile.gettempdir(), name)
    if len(path.encode()) > UNIX_PATH_MAX:
        raise EmulationError(
            f"the switch's P4Runtime socket {path} is longer than the {UNIX_PATH_MAX} bytes "
            "a Unix socket's path may have: set TMPDIR to a shorter directory"
        )
    return f"unix:{path}"


def _switch_args(options: TopoOptions) -> list[str]:
    """Either a P4Runtime socket for the controller (which installs everything), or
    forwarding for every host and the static job (rank r is host r+1 on port r+1)."""
    args = ["--k", str(options.k), "--slots", str(options.slot_count),
            "--loss", str(options.switch_loss)]  # fmt: skip
    if options.engine is not None:
        args += ["--engine", options.engine]
    if options.uses_controller:
        return [*args, "--p4runtime", p4runtime_address(options)]
    for _, _, mac, port in _stations(options):
        args.append(f"--route={mac}={port}")
    args += ["--job", str(options.job_id), "--world-size", str(options.workers)]
    if options.quorum is not None:
        args += ["--quorum", str(options.quorum)]
    for rank in range(options.workers):
        i = rank + 1
        args.append(f"--worker={rank}={host_ip(i)}:{WORKER_UDP_PORT}@{i}/{host_mac(i)}")
    return args


def _set_mtu(node, name: str, mtu: int) -> None:
    _, err, code = node.pexec(["ip", "link", "set", "dev", name, "mtu", str(mtu)])
    if code != 0:
        raise EmulationError(f"cannot set MTU {mtu} on {name}: {err.strip()}")


def _quiet_interface(node, name: str) -> None:
    """Offloads off: a user-space switch must see real checksums and real frame sizes."""
    node.cmd(f"ethtool -K {name} rx off tx off sg off tso off gso off gro off >/dev/null 2>&1")


def _default_offloads(node, name: str, segmentation: bool = True) -> None:
    """Offloads back as the kernel makes a veth (checksums, scatter-gather, TSO and GSO on,
    GRO off): what a host has where no user-space switch needs them off. Without
    ``segmentation``, TSO and GSO stay off: every frame is one MTU's worth, as on a wire."""
    seg = "on" if segmentation else "off"
    node.cmd(f"ethtool -K {name} rx on tx on sg on tso {seg} gso {seg} gro off >/dev/null 2>&1")


class Emulation:
    """A running Mininet star; use as a context manager."""

    def __init__(self, options: TopoOptions) -> None:
        self.options = options
        self._net: Mininet | None = None
        self.controller: Child | None = None
        self.program: CompiledProgram | None = None
        #: Every worker started, stopped at the latest when the emulation stops.
        self._workers = ExitStack()

    def __enter__(self) -> Emulation:
        from mininet.link import TCLink
        from mininet.net import Mininet
        from mininet.topo import Topo

        options = self.options
        if (options.loss_pct or options.delay_ms) and not netem_available():
            raise EmulationError(
                "link loss and delay need tc's netem qdisc, which this kernel lacks "
                "(modprobe sch_netem); the soft switch can drop at its ports instead "
                "(switch_loss / --switch-loss)"
            )
        options.run_dir.mkdir(parents=True, exist_ok=True)
        if options.switch == "bmv2":
            if not bmv2_available():
                raise EmulationError(
                    "the BMv2 switch needs simple_switch_grpc and p4c-bm2-ss on PATH "
                    "(neither comes from a package registry); use the soft switch"
                )
            self.program = compile_program(options.run_dir, options.k)

        class Star(Topo):
            def build(self) -> None:
                switch = self.addSwitch("s1")
                for name, ip, mac, port in _stations(options):
                    host = self.addHost(name, ip=f"{ip}/24", mac=mac)
                    self.addLink(host, switch, port2=port, **options.link_params())

        switch_cls = _switch_node(options)
        self._net = net = Mininet(
            topo=Star(),
            switch=switch_cls,
            controller=None,
            link=TCLink,
            autoSetMacs=False,
            autoStaticArp=False,
            build=False,
        )
        try:
            net.build()
            if options.mtu != 1500:
                for link in net.links:
                    for intf in (link.intf1, link.intf2):
                        _set_mtu(intf.node, intf.name, options.mtu)
            for host in net.hosts:
                host.cmd("sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
                for intf in host.intfList():
                    _quiet_interface(host, intf.name)
                for _, ip, mac, _ in _stations(options):
                    host.cmd(
                        f"ip neigh replace {ip} lladdr {mac} "
                        f"dev {host.defaultIntf().name} nud permanent"
                    )
                host.cmd(
                    f"ip neigh replace {SWITCH_IP} lladdr {SWITCH_MAC} "
                    f"dev {host.defaultIntf().name} nud permanent"
                )
            net.start()
            if options.uses_controller:
                self.controller = self._start_controller()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop everything started: killed at once after a failure, else stopped politely
        (the soft switch says its counters when it stops)."""
        self._workers.__exit__(exc_type, exc, tb)
        if self.controller is not None:
            self.controller.__exit__(exc_type, exc, tb)
            self.controller = None
        if self._net is not None:
            if exc_type is not None:
                for switch in self._net.switches:
                    switch.kill()
            self._net.stop()
            self._net = None
        if self.options.uses_controller:
            Path(p4runtime_address(self.options).removeprefix("unix:")).unlink(missing_ok=True)

    @property
    def net(self) -> Mininet:
        """The running network (inside the ``with`` block)."""
        if self._net is None:
            raise EmulationError("the emulation is not running: enter its with block first")
        return self._net

    @property
    def hosts(self) -> list:
        """The worker hosts h1..hN (not the controller's host)."""
        return [host for host in self.net.hosts if host.name.startswith("h")]

    def _start_controller(self) -> Child:
        options = self.options
        cmd = [*cli_command("controller"),
               "--p4runtime", p4runtime_address(options),
               "--data-plane", f"{SWITCH_IP}:{wire.DEFAULT_SWITCH_PORT}",
               "--listen", f"{CONTROLLER_IP}:{CONTROLLER_HTTP_PORT}",
               "--k", str(options.k), "--slots", str(options.slot_count),
               *(["--device-config", str(self.program.bmv2_json),
                  "--p4info", str(self.program.p4info)] if self.program else []),
               # workers may register; c0 itself only needs forwarding
               *(f"--route={mac}={port}" if name == "c0" else f"--host={ip}={mac}@{port}"
                 for name, ip, mac, port in _stations(options))]  # fmt: skip
        controller = Child(
            cmd,
            "the controller",
            log=options.run_dir / "controller.log",
            popen=self.net.get("c0").popen,
        )
        with controller.killed_on_error():
            controller.wait_for(CONTROLLER)
        return controller

    def bridge(self, loss: float = 0.0) -> LinuxBridge:
        """Stop the switch and join its ports in a plain Linux bridge, for the rest of the
        emulation: the same hosts on the same links, with what a cluster has without
        in-network aggregation in the middle (the bench's baseline). The offloads the
        user-space switch needed off are back at the kernel's defaults, on the hosts and
        the bridge's ports, as on hosts without it. ``loss``: drop each frame with this
        probability entering the bridge and again leaving it (nftables), as the soft
        switch's ``switch_loss`` does at its ports; then TCP segmentation offload stays
        off, so that what the rule drops is a frame, not a 64 KB TSO burst of them."""
        (node,) = self.net.switches
        bridge = node.become_bridge(loss)
        for host in self.net.hosts:
            for intf in host.intfList():
                _default_offloads(host, intf.name, segmentation=not loss)
        return bridge

    def ping_all(self) -> float:
        """Mininet's pingAll: percentage of pings lost between every pair of hosts."""
        return self.net.pingAll(timeout="1")

    def start_workers(
        self,
        elements: int,
        dtype: str = "float32",
        timeout: float = 30.0,
        seed: int = 0,
        backend: str = "switch",
        hosts: list | None = None,
        job_id: int | None = None,
        worker_args: Sequence[str] = (),
    ) -> list[Child]:
        """Start ``switchreduce worker`` on ``hosts`` (default: all) as ranks 0, 1, ...,
        with ``worker_args`` added (e.g. ``--lane-bits 8``).

        They wait at a start line until ``launch.release``; ``launch.reports`` gathers what
        they found. With ``backend="gloo"`` the same tensor goes through torch.distributed's
        gloo between the same hosts instead: the baseline the switch is measured against.
        """
        options = self.options
        hosts = self.hosts if hosts is None else hosts
        job_id = options.job_id if job_id is None else job_id
        workers = []
        for rank, host in enumerate(hosts):
            cmd = [
                *cli_command("worker", "--backend", backend),
                *self.switch_args(),
                *("--master", f"{hosts[0].IP()}:{GLOO_PORT}"),
                *("--bind", f"{host.IP()}:{WORKER_UDP_PORT}"),
                *("--job", str(job_id), "--rank", str(rank), "--world-size", str(len(hosts))),
                *("--k", str(options.k), "--slots", str(options.slot_count)),
                *("--elements", str(elements), "--dtype", dtype, "--seed", str(seed)),
                *("--timeout", str(timeout), "--wait-for-go"),
                *worker_args,
            ]
            worker = Child(cmd, f"worker rank {rank} on {host.name}", stdin=True,
                           popen=functools.partial(self.popen, host))  # fmt: skip
            workers.append(self._workers.enter_context(worker))
        return workers

    def switch_args(self) -> list[str]:
        """How a worker on a host finds its job: the controller, or the static job's switch."""
        if self.options.uses_controller:
            return ["--controller", f"http://{CONTROLLER_IP}:{CONTROLLER_HTTP_PORT}"]
        return ["--switch", f"{SWITCH_IP}:{wire.DEFAULT_SWITCH_PORT}"]

    @staticmethod
    def popen(host, cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start ``cmd`` on ``host`` with gloo bound to the host's interface (it would bind
        the machine's hostname address otherwise, unreachable from the namespace)."""
        env = dict(os.environ if env is None else env, GLOO_SOCKET_IFNAME=host.defaultIntf().name)
        return host.popen(cmd, env=env, **kwargs)

    def allreduce(
        self,
        elements: int,
        dtype: str = "float32",
        timeout: float = 30.0,
        seed: int = 0,
        backend: str = "switch",
        worker_args: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """One job over all worker hosts; every rank's report. Whatever fails, no worker
        is left running."""
        with ExitStack() as stack:
            workers = self.start_workers(
                elements, dtype, timeout, seed, backend, worker_args=worker_args
            )
            for worker in workers:
                stack.enter_context(worker)
            release(workers, START_TIMEOUT + timeout)
            return reports(workers, timeout * 4 + 60)


def auto_switch() -> str:
    """BMv2 where it can run here, else the soft switch; says which and why."""
    if bmv2_available():
        log.info("switch: bmv2 (simple_switch_grpc and p4c-bm2-ss are installed)")
        return "bmv2"
    log.info("switch: soft (simple_switch_grpc or p4c-bm2-ss is not on PATH)")
    return "soft"


def run_topo(options: TopoOptions, elements: int, cli: bool = False) -> int:
    """``switchreduce topo``: ping between every pair of hosts, then one allreduce across
    them (or the Mininet CLI instead); 0 if nothing was lost and the sums were exact."""
    with Emulation(options) as emu:
        lost = emu.ping_all()
        if cli:
            from mininet.cli import CLI

            CLI(emu.net)
            return 0
        results = emu.allreduce(elements)
    seconds = max(r["seconds"] for r in results)
    exact = all(r["exact"] and r["within_bound"] for r in results)
    print(
        f"{options.workers} hosts: ping loss {lost:.0f}%, allreduce of {elements:,} float32 "
        f"in {seconds:.3f} s ({elements / seconds / 1e6:.2f} M elements/s), "
        f"retransmissions {sum(r['retransmissions'] for r in results)}, exact={exact}"
    )
    return 0 if exact and lost == 0 else 1


def _switch_node(options: TopoOptions):
    """The Mininet switch class for ``options.switch``, run in its own namespace.

    Soft: the soft switch in raw mode, with its static job or a P4Runtime
    socket. BMv2: simple_switch_grpc with no program; the controller on c0
    pushes the compiled P4 program and its P4Info over P4Runtime (a Unix
    socket in the run directory), installs forwarding and admits the jobs.
    """
    from mininet.node import Switch

    class SwitchNode(Switch):
        """Starts its process on its ports, waits until it serves, stops it by PID."""

        speaks = True  # a switchreduce command: its stdout is the protocol

        def __init__(self, name: str, **params) -> None:
            params["inNamespace"] = True
            super().__init__(name, **params)
            self.child: Child | None = None
            self.log_path = options.run_dir / f"{name}.log"
            #: The Linux bridge the node has become, if it has (Emulation.bridge).
            self.bridge: LinuxBridge | None = None
            self._stopped = False

        def start(self, controllers) -> None:
            ports = {self.ports[intf]: intf.name for intf in self.intfList() if intf.name != "lo"}
            for name in ports.values():
                _quiet_interface(self, name)
            self.child = Child(self.command(ports), f"switch {self.name}", log=self.log_path,
                               speaks=self.speaks, popen=self.popen)  # fmt: skip
            with self.child.killed_on_error():
                self.wait_until_serving(self.child)

        def become_bridge(self, loss: float) -> LinuxBridge:
            """Stop the switch process (its report stays readable) and bridge its ports."""
            if self.bridge is not None:
                raise EmulationError(f"switch {self.name} is a bridge already")
            if (child := self._running()) is not None:
                child.stop()
                self._stopped = True
            ports = [intf.name for intf in self.intfList() if intf.name != "lo"]
            for name in ports:
                _default_offloads(self, name, segmentation=not loss)
            self.bridge = LinuxBridge(self, ports, loss, options.run_dir)
            return self.bridge

        def _running(self) -> Child | None:
            """The switch process, unless it never started or was stopped already (a stopped
            child's PID is no longer its own to signal)."""
            return None if self._stopped else self.child

        def kill(self) -> None:
            """After a failure: no goodbye."""
            if (child := self._running()) is not None:
                child.kill()

        def stop(self, deleteIntfs: bool = True) -> None:
            if self.bridge is not None:
                self.bridge.delete()
                self.bridge = None
            if (child := self._running()) is not None:
                child.stop()
            super().stop(deleteIntfs)

    class SoftSwitchNode(SwitchNode):
        def command(self, ports: dict[int, str]) -> list[str]:
            return [
                *cli_command("switch"),
                *(f"--raw={port}={name}" for port, name in sorted(ports.items())),
                *_switch_args(options),
            ]

        def wait_until_serving(self, child: Child) -> None:
            child.wait_for(SERVING)

        def report(self) -> dict[str, Any]:
            """The switch's counters, the report it ends with when it stops."""
            if self.child is None:
                raise EmulationError(f"switch {self.name} never started")
            return self.child.report(timeout=0)

    class BMv2SwitchNode(SwitchNode):
        speaks = False  # simple_switch_grpc: everything it says goes to its log

        def command(self, ports: dict[int, str]) -> list[str]:
            address = p4runtime_address(options)
            Path(address.removeprefix("unix:")).unlink(missing_ok=True)  # a previous run's
            interfaces = [f"{port}@{name}" for port, name in sorted(ports.items())]
            return [SIMPLE_SWITCH_GRPC, "--device-id", "0", "--no-p4",
                    *(arg for i in interfaces for arg in ("-i", i)),
                    "--", "--grpc-server-addr", address]  # fmt: skip

        def wait_until_serving(self, child: Child) -> None:
            wait_for_p4runtime(child.proc, p4runtime_address(options), self.log_path)

    return BMv2SwitchNode if options.switch == "bmv2" else SoftSwitchNode
