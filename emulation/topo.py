"""Mininet emulation: N worker hosts in a star around one programmable switch.

Host ``h{i}`` (i from 1) has 10.0.0.i and MAC 02:00:00:00:00:ii on switch port
i and runs rank i-1; the switch answers as 10.0.0.254 / 02:00:00:00:00:fe.
No controller and no Open vSwitch: the switch node runs the SwitchReduce
pipeline itself. Everything started is stopped by PID and every link made is
deleted on exit, also after a failure or Ctrl-C (Mininet's own ``cleanup()``,
which kills processes by name machine-wide, is never used).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from emulation.errors import EmulationError
from switchreduce import wire

SWITCH_IP = "10.0.0.254"
SWITCH_MAC = "02:00:00:00:00:fe"
WORKER_UDP_PORT = 40000
GLOO_PORT = 29500
MAX_HOSTS = 32  # one rank per host, and ranks are bitmap bits


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


def bmv2_available() -> bool:
    return shutil.which("simple_switch_grpc") is not None and shutil.which("p4c-bm2-ss") is not None


@dataclass(frozen=True)
class TopoOptions:
    """One emulated cluster: its size, its links and its switch."""

    workers: int = 4
    switch: str = "soft"
    bw: float | None = None  # Mbit/s per link (tc htb)
    delay_ms: float | None = None  # per link (tc netem)
    loss_pct: float | None = None  # per link, each direction (tc netem)
    switch_loss: float = 0.0  # drop probability at the soft switch's ports, each direction
    k: int = wire.MAX_K_STANDARD_MTU  # veth MTU is 1500
    slots: int = 64
    job_id: int = 1
    run_dir: Path = field(default_factory=lambda: Path("runs") / "topo")

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_HOSTS:
            raise ValueError(f"workers must be 1..{MAX_HOSTS}, got {self.workers}")
        if self.switch not in ("soft", "bmv2"):
            raise ValueError(f"switch must be soft or bmv2, got {self.switch!r}")
        if self.bw is not None and self.bw <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bw}")
        if self.delay_ms is not None and self.delay_ms < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay_ms}")
        if self.loss_pct is not None and not 0 <= self.loss_pct < 100:
            raise ValueError(f"loss must be in [0, 100), got {self.loss_pct}")
        if not 0 <= self.switch_loss < 1:
            raise ValueError(f"switch loss is a probability in [0, 1), got {self.switch_loss}")
        if self.switch_loss and self.switch != "soft":
            raise ValueError("switch loss is the soft switch's fault injector; BMv2 has none")
        if self.k > wire.MAX_K_STANDARD_MTU:
            raise ValueError(f"K={self.k} does not fit the links' 1500-byte MTU; use K <= 256")

    def link_params(self) -> dict:
        params = {}
        if self.bw is not None:
            params["bw"] = self.bw
        if self.delay_ms is not None:
            params["delay"] = f"{self.delay_ms}ms"
        if self.loss_pct is not None:
            params["loss"] = self.loss_pct
        return params


def _switch_job_args(options: TopoOptions) -> list[str]:
    """The static job and forwarding entries for the star: rank r is host r+1 on port r+1."""
    n = options.workers
    args = [
        "--job",
        str(options.job_id),
        "--world-size",
        str(n),
        "--k",
        str(options.k),
        "--slots",
        str(options.slots),
        "--loss",
        str(options.switch_loss),
    ]
    for rank in range(n):
        i = rank + 1
        args.append(f"--worker={rank}={host_ip(i)}:{WORKER_UDP_PORT}@{i}/{host_mac(i)}")
        args.append(f"--route={host_mac(i)}={i}")
    return args


def _quiet_interface(node, name: str) -> None:
    """Offloads off: a user-space switch must see real checksums and real frame sizes."""
    node.cmd(f"ethtool -K {name} rx off tx off sg off tso off gso off gro off >/dev/null 2>&1")


class Emulation:
    """A running Mininet star; use as a context manager."""

    def __init__(self, options: TopoOptions) -> None:
        self.options = options
        self.net = None

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

        class Star(Topo):
            def build(self) -> None:
                switch = self.addSwitch("s1")
                for i in range(1, options.workers + 1):
                    host = self.addHost(f"h{i}", ip=f"{host_ip(i)}/24", mac=host_mac(i))
                    self.addLink(host, switch, port2=i, **options.link_params())

        switch_cls = _soft_switch_node(options)
        self.net = Mininet(
            topo=Star(),
            switch=switch_cls,
            controller=None,
            link=TCLink,
            autoSetMacs=False,
            autoStaticArp=False,
            build=False,
        )
        try:
            self.net.build()
            for host in self.net.hosts:
                host.cmd("sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
                for intf in host.intfList():
                    _quiet_interface(host, intf.name)
                for other in range(1, options.workers + 1):
                    host.cmd(
                        f"ip neigh replace {host_ip(other)} lladdr {host_mac(other)} "
                        f"dev {host.defaultIntf().name} nud permanent"
                    )
                host.cmd(
                    f"ip neigh replace {SWITCH_IP} lladdr {SWITCH_MAC} "
                    f"dev {host.defaultIntf().name} nud permanent"
                )
            self.net.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.net is not None:
            self.net.stop()
            self.net = None

    @property
    def hosts(self) -> list:
        return self.net.hosts

    def ping_all(self) -> float:
        """Mininet's pingAll: percentage of pings lost between every pair of hosts."""
        return self.net.pingAll(timeout="1")

    def allreduce(
        self,
        elements: int,
        dtype: str = "float32",
        timeout: float = 30.0,
        seed: int = 0,
        backend: str = "switch",
    ) -> list[dict]:
        """Every host runs ``switchreduce worker`` as its rank; their JSON reports.

        ``backend="gloo"`` runs the same tensor through torch.distributed's gloo
        between the same hosts instead: the baseline the switch is measured against.
        """
        options = self.options
        job = ["--job", str(options.job_id), "--world-size", str(options.workers)]
        data = ["--elements", str(elements), "--dtype", dtype, "--seed", str(seed)]
        window = ["--k", str(options.k), "--slots", str(options.slots)]
        procs = []
        for rank, host in enumerate(self.hosts):
            cmd = [
                *(sys.executable, "-m", "switchreduce.cli", "worker", "--backend", backend),
                *("--switch", f"{SWITCH_IP}:{wire.DEFAULT_SWITCH_PORT}"),
                *("--master", f"{host_ip(1)}:{GLOO_PORT}"),
                *("--bind", f"{host_ip(rank + 1)}:{WORKER_UDP_PORT}"),
                *job, "--rank", str(rank), *window, *data,
                *("--timeout", str(timeout), "--wait-for-go"),
            ]  # fmt: skip
            # gloo binds the hostname's address unless told the interface: unreachable here.
            env = dict(os.environ, GLOO_SOCKET_IFNAME=host.defaultIntf().name)
            procs.append(
                host.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
            )  # fmt: skip
        try:
            for proc in procs:
                if proc.stdout.readline().strip() != "ready":
                    raise EmulationError(f"a worker failed to start: {proc.stderr.read()[-2000:]}")
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            reports = []
            for proc in procs:
                out, err = proc.communicate(timeout=timeout * 4 + 60)
                lines = out.strip().splitlines()
                if not lines:
                    raise EmulationError(f"a worker failed: {err[-2000:]}")
                reports.append(json.loads(lines[-1]))
            return reports
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _soft_switch_node(options: TopoOptions):
    """A Mininet switch class running the soft switch in raw mode in its own namespace."""
    from mininet.node import Switch

    class SoftSwitchNode(Switch):
        def __init__(self, name: str, **params) -> None:
            params["inNamespace"] = True
            super().__init__(name, **params)
            self.proc = None
            self.log_path = options.run_dir / f"{name}.log"

        def start(self, controllers) -> None:
            ports = {self.ports[intf]: intf.name for intf in self.intfList() if intf.name != "lo"}
            for name in ports.values():
                _quiet_interface(self, name)
            cmd = [
                sys.executable,
                "-m",
                "switchreduce.cli",
                "switch",
                *(f"--raw={port}={name}" for port, name in sorted(ports.items())),
                *_switch_job_args(options),
            ]
            self.log = self.log_path.open("w")
            self.proc = self.popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 30
            while "serving" not in self.log_path.read_text():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log_path.read_text()[-2000:]
                    raise EmulationError(f"soft switch {self.name} did not start:\n{tail}")
                time.sleep(0.05)

        def stop(self, deleteIntfs: bool = True) -> None:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc is not None:
                self.log.close()
            super().stop(deleteIntfs)

        def report(self) -> dict:
            """The switch's counters, printed as its last line when it stops."""
            lines = self.log_path.read_text().strip().splitlines()
            return json.loads(lines[-1])

    return SoftSwitchNode
