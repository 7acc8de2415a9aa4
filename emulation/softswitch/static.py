"""Jobs installed from the command line, into the tables the controller writes.

Until a controller programs the switch over P4Runtime, ``switchreduce
switch`` takes one job's membership from its command line and applies the
very entries the controller would write (``controller.jobs.job_entries``)
straight to the soft switch's tables.
"""

from __future__ import annotations

import ipaddress

from controller.connection import TableEntry
from controller.forwarding import forward_entry, parse_mac
from controller.jobs import Job, Member, job_entries
from emulation.softswitch.pipeline import JobStat, SoftSwitch
from emulation.softswitch.tables import ActionCall


def parse_member(spec: str) -> Member:
    """``RANK=IP:UDP_PORT`` (UDP mode) or ``RANK=IP:UDP_PORT@SWITCH_PORT/MAC`` (raw mode)."""
    try:
        rank, address = spec.split("=", 1)
        address, _, attachment = address.partition("@")
        ip, udp_port = address.rsplit(":", 1)
        ipaddress.IPv4Address(ip)
        port, mac = 0, 0
        if attachment:
            port_text, mac_text = attachment.split("/", 1)
            port, mac = int(port_text), parse_mac(mac_text)
        return Member(int(rank), ip, int(udp_port), mac=mac, port=port)
    except ValueError as exc:
        raise ValueError(
            f"worker must be RANK=IP:PORT or RANK=IP:PORT@SWITCH_PORT/MAC, got {spec!r} ({exc})"
        ) from None


def apply_entry(switch: SoftSwitch, entry: TableEntry) -> None:
    """Insert a controller-side table entry into the soft switch's table of that name."""
    table = switch.tables()[entry.table]
    key = tuple(entry.match[field] for field in table.key_fields)
    params = table.action(entry.action).params
    table.insert(key, ActionCall(entry.action, tuple(entry.params[p] for p in params)))


def install_static_job(switch: SoftSwitch, job: Job) -> None:
    counted = switch.ingress.job_stats[JobStat.AGGREGATED].size
    if job.job_id >= counted:
        raise ValueError(f"job id must be 1..{counted - 1} (the switch counts that many)")
    if job.slot_base + job.slot_count > switch.ingress.pool_size:
        raise ValueError(
            f"slots {job.slot_base}..{job.slot_base + job.slot_count - 1} exceed the pool "
            f"of {switch.ingress.pool_size}"
        )
    entries, (group_id, replicas) = job_entries(job)
    for entry in entries:
        apply_entry(switch, entry)
    switch.pre.groups[group_id] = tuple(replicas)


def install_forwarding(switch: SoftSwitch, routes: dict[int, int]) -> None:
    """One ``forward`` entry per host: destination MAC -> switch port."""
    for mac, port in routes.items():
        apply_entry(switch, forward_entry(mac, port))
