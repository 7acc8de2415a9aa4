"""Jobs installed from the command line, into the tables the controller writes.

Until a controller programs the switch over P4Runtime, ``switchreduce
switch`` takes one job's membership from its command line and applies the
very entries the controller would write (``p4runtime.jobs.job_entries``)
straight to the soft switch's tables.

With no controller to admit each run of such a job, its ranks ask the
switch for a session (JOIN) and :class:`StaticJob`, the job's control plane
inside the switch process, hands one out when every rank has asked: a
switch's CPU answering packets punted to it, as a P4 switch's controller
answers packet-ins (docs/protocol.md, Sessions).
"""

from __future__ import annotations

import dataclasses
import ipaddress

from switchreduce import wire
from switchreduce.emulation.softswitch.pipeline import Packet, SoftSwitch, swap_addresses
from switchreduce.emulation.softswitch.tables import ActionCall
from switchreduce.p4runtime.entities import TableEntry
from switchreduce.p4runtime.forwarding import forward_entry, parse_mac
from switchreduce.p4runtime.jobs import Job, Member, job_entries
from switchreduce.p4runtime.names import JobStat


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
    """Insert (or modify) a table entry in the soft switch's table of that name."""
    table = switch.tables()[entry.table]
    key = tuple(entry.match[field] for field in table.key_fields)
    params = table.action(entry.action).param_names
    call = ActionCall(entry.action, tuple(entry.params[p] for p in params))
    if table.lookup(key)[0]:
        table.modify(key, call)
    else:
        table.insert(key, call)


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


def answer(switch: SoftSwitch, static_jobs: list[StaticJob], pkt: Packet) -> list[Packet]:
    """What the switch sends for ``pkt``: a static job's JOIN is its CPU's to answer, every
    other packet goes through the pipeline."""
    cpu = next((job for job in static_jobs if job.handles(pkt)), None)
    return cpu.join(pkt) if cpu else switch.process(pkt)


class StaticJob:
    """The control plane of one job installed from the command line: it hands out sessions.

    Each communicator JOINs with a random nonce of its own (in the header's
    session field). When every rank has joined, the job gets a fresh session
    (``wire.new_session``), written to its ``jobs`` entry, and every rank is
    told it (JOINED, multicast). A JOIN with a nonce this rank has not used
    starts a new run: the ``jobs`` entry loses its session at once, so the
    previous run's ranks are answered STALE instead of mixing with the new
    one. A repeated JOIN is answered again (its JOINED was lost) or waits.
    """

    def __init__(self, switch: SoftSwitch, job: Job) -> None:
        self.switch = switch
        self.job = dataclasses.replace(job, session=0)  # no session until every rank joins
        install_static_job(switch, self.job)
        self.nonces: dict[int, int] = {}  # rank -> nonce of its latest communicator
        self.complete = False

    def handles(self, pkt: Packet) -> bool:
        hdr = pkt.header
        return (
            hdr is not None and hdr.msg_type == wire.MsgType.JOIN and hdr.job_id == self.job.job_id
        )

    def join(self, pkt: Packet) -> list[Packet]:
        """The packets a JOIN makes the switch send (after the pipeline's admission checks)."""
        admitted = self.switch.ingress.admit(pkt, wire.MsgType.JOIN)
        if admitted is None:
            return []
        hdr = admitted[0]
        if self.nonces.get(hdr.rank) == hdr.session:  # this communicator asked before
            return [self._joined(pkt, hdr)] if self.complete else []
        if self.complete or hdr.rank in self.nonces:  # a new run of the job begins
            self._set_session(0)
            self.nonces, self.complete = {}, False
        self.nonces[hdr.rank] = hdr.session
        if len(self.nonces) < self.job.world_size:
            return []
        self.complete = True
        self._set_session(wire.new_session())
        return self.switch.multicast(self._joined(pkt, hdr), self.job.job_id)

    def _set_session(self, session: int) -> None:
        self.job = dataclasses.replace(self.job, session=session)
        entries, _ = job_entries(self.job)
        apply_entry(self.switch, entries[0])  # the jobs entry comes first

    def _joined(self, pkt: Packet, hdr: wire.Header) -> Packet:
        """JOINED for the sender: the session, the job's slot count, world size and quorum."""
        swap_addresses(pkt)
        pkt.header = hdr._replace(
            msg_type=wire.MsgType.JOINED,
            session=self.job.session,
            chunk=self.job.slot_count,
            length=self.job.world_size,
            count=self.job.contributors,
        )
        pkt.egress_port = pkt.ingress_port
        return pkt
