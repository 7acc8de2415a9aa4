"""Plain forwarding for the hosts: the controller keeps one ``forward`` entry per host.

What the entries are is ``switchreduce.p4runtime.forwarding``'s; this writes
them over P4Runtime for every host the controller is told about.
"""

from __future__ import annotations

from switchreduce.controller.connection import SwitchConnection
from switchreduce.p4runtime.entities import Update, UpdateKind
from switchreduce.p4runtime.forwarding import forward_entry
from switchreduce.p4runtime.names import ETHERNET_DST_ADDR, FORWARD


def install_routes(conn: SwitchConnection, routes: dict[int, int]) -> None:
    """Make the forward table hold ``routes`` (MAC -> port), keeping what already matches:
    a restarted controller finds its routes installed and writes nothing."""
    installed = {e.match[ETHERNET_DST_ADDR.name]: e for e in conn.read_table(FORWARD.name)}
    updates: list[Update] = []
    for mac, port in routes.items():
        entry = forward_entry(mac, port)
        if mac not in installed:
            updates.append((UpdateKind.INSERT, entry))
        elif installed[mac] != entry:
            updates.append((UpdateKind.MODIFY, entry))
    if updates:
        conn.write(updates)
