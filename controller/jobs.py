"""Jobs -> tables: what the switch must hold for a job, and admitting jobs onto a switch.

A job owns a disjoint range of the switch's slot pool, a multicast group
with one replica per rank, and per rank a ``workers`` binding (job, rank,
ingress port, source address) and a ``result_rewrite`` entry for its
replica. ``job_entries`` is the single description of that state; the
controller writes it over P4Runtime, and the soft switch's command-line
jobs apply it directly.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from p4.v1 import p4runtime_pb2

from controller.connection import SwitchConnection, TableEntry
from controller.errors import AdmissionError, WriteError
from switchreduce import wire

#: The largest job id whose replica ids (job * MAX_WORKERS + rank) fit egress_rid's 16 bits.
MAX_REPLICA_JOB_ID = (0xFFFF - (wire.MAX_WORKERS - 1)) // wire.MAX_WORKERS


@dataclass(frozen=True)
class Member:
    """Where one rank sends from and receives results; port 0 for the soft switch's UDP mode."""

    rank: int
    ip: str
    udp_port: int
    mac: int = 0
    port: int = 0


@dataclass(frozen=True)
class Job:
    job_id: int
    world_size: int
    slot_base: int
    slot_count: int
    #: The run's session (wire.new_session): every packet carries it, the switch matches it.
    session: int
    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.job_id <= MAX_REPLICA_JOB_ID:
            raise AdmissionError(f"job id must be 1..{MAX_REPLICA_JOB_ID}, got {self.job_id}")
        if self.world_size < 1:
            raise AdmissionError(f"job {self.job_id} has no workers")
        if self.world_size > wire.MAX_WORKERS:
            raise AdmissionError(
                f"world size {self.world_size} is above the {wire.MAX_WORKERS}-bit worker bitmap"
            )
        ranks = sorted(m.rank for m in self.members)
        if ranks != list(range(self.world_size)):
            raise AdmissionError(
                f"job {self.job_id} needs ranks 0..{self.world_size - 1} once each, got {ranks}"
            )


def replica_id(job_id: int, rank: int) -> int:
    """The multicast replica id (egress_rid) naming one rank of one job; never 0."""
    return job_id * wire.MAX_WORKERS + rank


def job_entries(job: Job) -> tuple[list[TableEntry], tuple[int, list[tuple[int, int]]]]:
    """The table entries and the multicast group (id, replicas) that admit ``job``."""
    entries = [
        TableEntry(
            "SwitchReduceIngress.jobs",
            {"hdr.sr.job_id": job.job_id},
            "SwitchReduceIngress.set_job",
            {"world_size": job.world_size, "slot_base": job.slot_base,
             "slot_count": job.slot_count, "mcast_grp": job.job_id,
             "session": job.session},
        )
    ]  # fmt: skip
    replicas = []
    for m in sorted(job.members, key=lambda m: m.rank):
        ip = int(ipaddress.IPv4Address(m.ip))
        entries.append(
            TableEntry(
                "SwitchReduceIngress.workers",
                {"hdr.sr.job_id": job.job_id, "hdr.sr.rank": m.rank,
                 "standard_metadata.ingress_port": m.port, "hdr.ipv4.src_addr": ip,
                 "hdr.udp.src_port": m.udp_port},
                "SwitchReduceIngress.admit_worker",
                {},
            )
        )  # fmt: skip
        rid = replica_id(job.job_id, m.rank)
        entries.append(
            TableEntry(
                "SwitchReduceEgress.result_rewrite",
                {"standard_metadata.egress_rid": rid},
                "SwitchReduceEgress.rewrite_destination",
                {"mac": m.mac, "ip": ip, "udp_port": m.udp_port},
            )
        )
        replicas.append((m.port, rid))
    return entries, (job.job_id, replicas)


class SlotPool:
    """First-fit allocation of disjoint slot ranges."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used: dict[int, int] = {}  # base -> count

    def allocate(self, count: int) -> int:
        base = 0
        for used_base, used_count in sorted(self.used.items()):
            if used_base - base >= count:
                break
            base = max(base, used_base + used_count)
        if base + count > self.size:
            free = self.size - sum(self.used.values())
            raise AdmissionError(
                f"slot pool exhausted: {count} slots wanted, {free} of {self.size} free"
                + (" but fragmented" if free >= count else "")
            )
        self.used[base] = count
        return base

    def release(self, base: int) -> None:
        self.used.pop(base, None)


class JobTable:
    """The jobs admitted on one switch, kept in the switch's tables and mirrored here."""

    def __init__(self, conn: SwitchConnection) -> None:
        self.conn = conn
        # The program's sizes, from its P4Info: slots in the pool, and job ids it counts.
        self.pool = SlotPool(conn.size_of("SwitchReduceIngress.slot_session"))
        self.max_job_id = conn.size_of("SwitchReduceIngress.aggregated") - 1
        self.jobs: dict[int, Job] = {}

    def admit(self, job_id: int, members: list[Member], slot_count: int) -> Job:
        """Install a job; on any refusal nothing of it stays on the switch."""
        if job_id in self.jobs:
            raise AdmissionError(f"job {job_id} is already admitted")
        if not 1 <= job_id <= self.max_job_id:
            raise AdmissionError(
                f"job id must be 1..{self.max_job_id} (the switch counts that many), got {job_id}"
            )
        if not 1 <= slot_count <= wire.MAX_SLOTS:
            raise AdmissionError(f"slot count must be 1..{wire.MAX_SLOTS}, got {slot_count}")
        world_size = len(members)
        base = self.pool.allocate(slot_count)
        try:
            job = Job(job_id, world_size, base, slot_count, wire.new_session(), tuple(members))
            entries, group = job_entries(job)
            self._write_all(p4runtime_pb2.Update.INSERT, entries, group)
        except BaseException:
            self.pool.release(base)
            raise
        self.jobs[job_id] = job
        return job

    def release(self, job_id: int) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            raise AdmissionError(f"job {job_id} is not admitted")
        entries, group = job_entries(job)
        self.conn.write([(p4runtime_pb2.Update.DELETE, item) for item in [*entries, group]])
        self.pool.release(job.slot_base)
        del self.jobs[job_id]

    def _write_all(self, kind: int, entries: list[TableEntry], group) -> None:
        """Write the job's state one update at a time, undoing what went in if one fails."""
        done = []
        try:
            for item in [*entries, group]:
                self.conn.write([(kind, item)])
                done.append(item)
        except WriteError:
            self.conn.write([(p4runtime_pb2.Update.DELETE, item) for item in reversed(done)])
            raise

    def recover(self) -> None:
        """Rebuild this table from what the switch holds (a restarted controller)."""
        workers = self.conn.read_table("SwitchReduceIngress.workers")
        rewrites = {
            e.match["standard_metadata.egress_rid"]: e
            for e in self.conn.read_table("SwitchReduceEgress.result_rewrite")
        }
        for entry in self.conn.read_table("SwitchReduceIngress.jobs"):
            job_id = entry.match["hdr.sr.job_id"]
            members = []
            for w in workers:
                if w.match["hdr.sr.job_id"] != job_id:
                    continue
                rank = w.match["hdr.sr.rank"]
                members.append(
                    Member(
                        rank,
                        str(ipaddress.IPv4Address(w.match["hdr.ipv4.src_addr"])),
                        w.match["hdr.udp.src_port"],
                        rewrites[replica_id(job_id, rank)].params["mac"],
                        w.match["standard_metadata.ingress_port"],
                    )
                )
            p = entry.params
            job = Job(job_id, p["world_size"], p["slot_base"], p["slot_count"], p["session"],
                      tuple(members))  # fmt: skip
            self.jobs[job_id] = job
            self.pool.used[job.slot_base] = job.slot_count
