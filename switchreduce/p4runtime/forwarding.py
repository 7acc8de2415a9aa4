"""Plain forwarding for everything that is not aggregation traffic (ARP, ping, TCP).

One ``forward`` entry per attached station: destination MAC -> switch port,
so a switch forwards like a learning switch that already learned. The
controller writes these entries for the hosts it is told about; the soft
switch's static mode applies the same ones.
"""

from __future__ import annotations

from switchreduce.p4runtime.entities import TableEntry
from switchreduce.p4runtime.names import ETHERNET_DST_ADDR, FORWARD, PORT, SET_EGRESS_PORT


def parse_mac(text: str) -> int:
    """``02:00:00:00:00:01`` -> its 48-bit integer."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return int("".join(parts), 16)


def forward_entry(mac: int, port: int) -> TableEntry:
    return TableEntry(
        FORWARD.name, {ETHERNET_DST_ADDR.name: mac}, SET_EGRESS_PORT.name, {PORT.name: port}
    )
