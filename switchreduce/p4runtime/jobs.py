"""What the switch holds for a job: its table entries and its multicast group.

A job owns a disjoint range of the switch's slot pool, a multicast group
with one replica per rank, and per rank a ``workers`` binding (job, rank,
ingress port, source address) and a ``result_rewrite`` entry for its
replica. ``job_entries`` is the single description of that state and
``job_from_entries`` reads a job back from it: the controller writes and
reads them over P4Runtime, the soft switch's command-line jobs apply them
to its tables directly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from switchreduce import wire
from switchreduce.p4runtime.entities import MulticastGroup, TableEntry
from switchreduce.p4runtime.names import (
    ADMIT_WORKER,
    EGRESS_RID,
    INGRESS_PORT,
    IP,
    IPV4_SRC_ADDR,
    JOBS,
    MAC,
    MCAST_GRP,
    QUORUM,
    RESULT_REWRITE,
    REWRITE_DESTINATION,
    SESSION,
    SET_JOB,
    SLOT_BASE,
    SLOT_COUNT,
    SR_JOB_ID,
    SR_RANK,
    UDP_PORT,
    UDP_SRC_PORT,
    WORKERS,
    WORLD_SIZE,
)

#: The largest job id whose replica ids (job * MAX_WORKERS + rank) fit egress_rid's 16 bits.
MAX_REPLICA_JOB_ID = (0xFFFF - (wire.MAX_WORKERS - 1)) // wire.MAX_WORKERS

#: The tables whose entries belong to jobs (the ``forward`` table belongs to the hosts).
JOB_TABLES = (JOBS.name, WORKERS.name, RESULT_REWRITE.name)


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
    """A job as the switch holds it; ValueError if it is not one the switch could hold."""

    job_id: int
    world_size: int
    slot_base: int
    slot_count: int
    #: The run's session (wire.new_session): every packet carries it, the switch matches it.
    session: int
    members: tuple[Member, ...]
    #: Contributions that complete a round: None for all of them (synchronous), else 1..world
    #: size; the rest of a round's ranks are late, and get its sums without theirs.
    quorum: int | None = None

    @property
    def contributors(self) -> int:
        """How many contributions complete a round: the jobs entry's ``quorum``."""
        return self.world_size if self.quorum is None else self.quorum

    def __post_init__(self) -> None:
        if not 1 <= self.job_id <= MAX_REPLICA_JOB_ID:
            raise ValueError(f"job id must be 1..{MAX_REPLICA_JOB_ID}, got {self.job_id}")
        if self.world_size < 1:
            raise ValueError(f"job {self.job_id} has no workers")
        if self.world_size > wire.MAX_WORKERS:
            raise ValueError(
                f"world size {self.world_size} is above the {wire.MAX_WORKERS}-bit worker bitmap"
            )
        ranks = sorted(m.rank for m in self.members)
        if ranks != list(range(self.world_size)):
            raise ValueError(
                f"job {self.job_id} needs ranks 0..{self.world_size - 1} once each, got {ranks}"
            )
        if self.quorum is not None and not 1 <= self.quorum <= self.world_size:
            raise ValueError(
                f"job {self.job_id}'s quorum must be 1..{self.world_size} (its world size), "
                f"got {self.quorum}"
            )
        if self.quorum == self.world_size:  # every rank: one way to say it, so jobs compare
            object.__setattr__(self, "quorum", None)


def replica_id(job_id: int, rank: int) -> int:
    """The multicast replica id (egress_rid) naming one rank of one job; never 0."""
    return job_id * wire.MAX_WORKERS + rank


def job_entries(job: Job) -> tuple[list[TableEntry], MulticastGroup]:
    """The table entries (the ``jobs`` entry first) and the multicast group that admit ``job``."""
    entries = [
        TableEntry(
            JOBS.name,
            {SR_JOB_ID.name: job.job_id},
            SET_JOB.name,
            {
                WORLD_SIZE.name: job.world_size,
                QUORUM.name: job.contributors,
                SLOT_BASE.name: job.slot_base,
                SLOT_COUNT.name: job.slot_count,
                MCAST_GRP.name: job.job_id,
                SESSION.name: job.session,
            },
        )
    ]
    replicas = []
    for m in sorted(job.members, key=lambda m: m.rank):
        ip = int(ipaddress.IPv4Address(m.ip))
        entries.append(
            TableEntry(
                WORKERS.name,
                {
                    SR_JOB_ID.name: job.job_id,
                    SR_RANK.name: m.rank,
                    INGRESS_PORT.name: m.port,
                    IPV4_SRC_ADDR.name: ip,
                    UDP_SRC_PORT.name: m.udp_port,
                },
                ADMIT_WORKER.name,
                {},
            )
        )
        rid = replica_id(job.job_id, m.rank)
        entries.append(
            TableEntry(
                RESULT_REWRITE.name,
                {EGRESS_RID.name: rid},
                REWRITE_DESTINATION.name,
                {MAC.name: m.mac, IP.name: ip, UDP_PORT.name: m.udp_port},
            )
        )
        replicas.append((m.port, rid))
    return entries, MulticastGroup(job.job_id, replicas)


def job_from_entries(
    entry: TableEntry, workers: Iterable[TableEntry], rewrites: Iterable[TableEntry]
) -> Job:
    """The job whose ``jobs`` entry is ``entry``, its ranks from the ``workers`` and
    ``result_rewrite`` entries among those given: ``job_entries`` read back (a rank's MAC
    is 0 without its rewrite). ValueError if they do not make a whole job."""
    job_id = entry.match[SR_JOB_ID.name]
    macs = {e.match[EGRESS_RID.name]: e.params[MAC.name] for e in rewrites}
    members = []
    for w in workers:
        if w.match[SR_JOB_ID.name] != job_id:
            continue
        rank = w.match[SR_RANK.name]
        members.append(
            Member(
                rank,
                str(ipaddress.IPv4Address(w.match[IPV4_SRC_ADDR.name])),
                w.match[UDP_SRC_PORT.name],
                macs.get(replica_id(job_id, rank), 0),
                w.match[INGRESS_PORT.name],
            )
        )
    p = entry.params
    return Job(
        job_id,
        p[WORLD_SIZE.name],
        p[SLOT_BASE.name],
        p[SLOT_COUNT.name],
        p[SESSION.name],
        tuple(members),
        p[QUORUM.name],  # the world size's is None again (Job.__post_init__)
    )
