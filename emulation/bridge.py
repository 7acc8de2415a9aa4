"""A plain Linux bridge on the switch node's ports: what a cluster has without in-network
aggregation, for the bench's baseline.

The switch node's process (soft switch or BMv2) is stopped and its ports,
with their tc shaping untouched, become ports of one kernel bridge ``br0`` in
the node's namespace: no STP (ports forward at once), no OpenFlow controller,
no br_netfilter (bridged frames do not go through iptables). The kernel has
no netem here, so loss is an nftables rule on the bridge, as the soft switch
drops at its ports: each frame is dropped with probability ``loss`` as it
enters the bridge (prerouting) and again as it leaves through a port
(postrouting), like the soft switch's ingress and egress injectors. Counters
say how many frames came in and how many each rule dropped.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from switchreduce.emulation.errors import EmulationError

BRIDGE = "br0"  # inside the switch node's namespace
TABLE = "switchreduce_loss"
#: numgen draws an integer below this; a frame is dropped when it is below loss x SCALE.
SCALE = 1_000_000
#: The counters of the loss table: frames entering the bridge, and each rule's drops.
COUNTERS = ("frames_in", "dropped_in", "dropped_out")


@functools.cache
def nft_available() -> bool:
    """Whether the nft command (Debian package nftables) is installed."""
    return shutil.which("nft") is not None


def loss_ruleset(loss: float) -> str:
    """The nftables table that drops each bridged frame with probability ``loss`` on the way
    in and again on the way out."""
    if not 0 < loss < 1:
        raise ValueError(f"loss is a probability in (0, 1), got {loss}")
    below = round(loss * SCALE)
    draw = f"numgen random mod {SCALE} < {below}"
    return f"""table bridge {TABLE} {{
    counter frames_in {{}}
    counter dropped_in {{}}
    counter dropped_out {{}}
    chain ingress {{
        type filter hook prerouting priority 0; policy accept;
        counter name "frames_in"
        {draw} counter name "dropped_in" drop
    }}
    chain egress {{
        type filter hook postrouting priority 0; policy accept;
        {draw} counter name "dropped_out" drop
    }}
}}
"""


class LinuxBridge:
    """The bridge made on ``node`` (a Mininet switch node in its own namespace) from its
    ``ports``; :meth:`delete` takes it down again, the ports stay."""

    def __init__(self, node: Any, ports: list[str], loss: float, run_dir: Path) -> None:
        if loss and not nft_available():
            raise EmulationError(
                "loss on the Linux bridge is an nftables rule, and nft is not installed "
                "(Debian package nftables)"
            )
        self.node = node
        self.loss = loss
        self._run(["ip", "link", "add", "name", BRIDGE, "type", "bridge", "stp_state", "0"])
        try:
            # a plain bridge: nothing between its ports but the loss rule
            for family in ("iptables", "ip6tables", "arptables"):
                self._run(["sysctl", "-qw", f"net.bridge.bridge-nf-call-{family}=0"])
            self._run(["sysctl", "-qw", f"net.ipv6.conf.{BRIDGE}.disable_ipv6=1"])
            for port in ports:
                self._run(["ip", "link", "set", "dev", port, "master", BRIDGE])
            self._run(["ip", "link", "set", "dev", BRIDGE, "up"])
            if loss:
                rules = run_dir / f"{node.name}-bridge-loss.nft"
                rules.write_text(loss_ruleset(loss))
                self._run(["nft", "-f", str(rules.resolve())])
        except BaseException:
            self.delete()
            raise

    def counters(self) -> dict[str, int] | None:
        """Frames that entered the bridge and the drops on the way in and out (None without
        loss: then there is no rule, and nothing counts)."""
        if not self.loss:
            return None
        out = self._run(["nft", "-j", "list", "counters", "table", "bridge", TABLE])
        found = {}
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                found[item["counter"]["name"]] = int(item["counter"]["packets"])
        return {name: found[name] for name in COUNTERS}

    def delete(self) -> None:
        """Take the bridge (and its loss table) down; its ports are left as they were."""
        if self.loss and nft_available():
            self.node.pexec(["nft", "delete", "table", "bridge", TABLE])
        self.node.pexec(["ip", "link", "del", "dev", BRIDGE])

    def _run(self, cmd: list[str]) -> str:
        out, err, code = self.node.pexec(cmd)
        if code != 0:
            raise EmulationError(f"{' '.join(cmd)} on {self.node.name} failed: {err.strip()}")
        return str(out)
