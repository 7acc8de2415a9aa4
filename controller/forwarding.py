"""Plain forwarding for everything that is not aggregation traffic (ARP, ping, TCP).

One ``forward`` entry per attached station: destination MAC -> switch port.
The controller installs them for every host it is told about, so a switch
it programs (BMv2 or the soft switch) forwards like a learning switch that
already learned; the soft switch's static mode applies the same entries.
"""

from __future__ import annotations

from p4.v1 import p4runtime_pb2

from switchreduce.controller.connection import SwitchConnection, TableEntry

FORWARD_TABLE = "SwitchReduceIngress.forward"


def parse_mac(text: str) -> int:
    """``02:00:00:00:00:01`` -> its 48-bit integer."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return int("".join(parts), 16)


def forward_entry(mac: int, port: int) -> TableEntry:
    return TableEntry(
        FORWARD_TABLE,
        {"hdr.ethernet.dst_addr": mac},
        "SwitchReduceIngress.set_egress_port",
        {"port": port},
    )


def install_routes(conn: SwitchConnection, routes: dict[int, int]) -> None:
    """Make the forward table hold ``routes`` (MAC -> port), keeping what already matches:
    a restarted controller finds its routes installed and writes nothing."""
    installed = {e.match["hdr.ethernet.dst_addr"]: e for e in conn.read_table(FORWARD_TABLE)}
    updates = []
    for mac, port in routes.items():
        entry = forward_entry(mac, port)
        if mac not in installed:
            updates.append((p4runtime_pb2.Update.INSERT, entry))
        elif installed[mac] != entry:
            updates.append((p4runtime_pb2.Update.MODIFY, entry))
    if updates:
        conn.write(updates)
