"""Admitting jobs onto a switch: slot ranges, rollback, recovery after a restart.

What a job installs is ``switchreduce.p4runtime.jobs``'s (``job_entries``);
this decides which jobs a switch runs and where in its slot pool, writes
their entries over P4Runtime, and restores them when the switch or the
controller restarts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from google.rpc import code_pb2
from p4.config.v1 import p4info_pb2

from switchreduce import wire
from switchreduce.controller.connection import SwitchConnection
from switchreduce.controller.errors import (
    AdmissionError,
    CapacityError,
    ControllerError,
    UnknownJobError,
    WriteError,
)
from switchreduce.p4runtime.entities import MulticastGroup, TableEntry, Update, UpdateKind
from switchreduce.p4runtime.jobs import (
    JOB_TABLES,
    MAX_REPLICA_JOB_ID,
    Job,
    Member,
    job_entries,
    job_from_entries,
)
from switchreduce.p4runtime.names import (
    JOBS,
    RESULT_REWRITE,
    SLOT_SESSION,
    SR_JOB_ID,
    VALUE,
    WORKERS,
    JobStat,
)
from switchreduce.p4runtime.schema import P4Schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgramSizes:
    """What the compiled program has room for, read from its P4Info.

    Never from constants, which could drift from the P4 source; and known
    before connecting, so a controller can refuse options that cannot fit.
    """

    #: Slots in the pool that jobs' ranges are cut from.
    pool: int
    #: Job ids run 1..max_job_id: the per-job counters' cells, and replica ids' 16 bits.
    max_job_id: int
    #: Entries of the ``jobs`` table: jobs that can run at once.
    max_jobs: int
    #: Elements per packet: the ``value`` register holds K per row, two rows per slot.
    k: int

    @classmethod
    def of(cls, p4info: p4info_pb2.P4Info) -> ProgramSizes:
        schema = P4Schema(p4info)
        pool = schema.size(SLOT_SESSION.name)
        counted = schema.size(JobStat.AGGREGATED.counter)
        return cls(
            pool=pool,
            max_job_id=min(counted - 1, MAX_REPLICA_JOB_ID),
            max_jobs=schema.size(JOBS.name),
            k=schema.size(VALUE.name) // (2 * pool),
        )


def _job_updates(kind: UpdateKind, job: Job) -> list[Update]:
    """An update of ``kind`` for each of the job's table entries, then for its group."""
    entries, group = job_entries(job)
    items: list[TableEntry | MulticastGroup] = [*entries, group]
    return [(kind, item) for item in items]


class SlotPool:
    """First-fit allocation of disjoint slot ranges."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used: dict[int, int] = {}  # base -> count

    def _first_fit(self, count: int) -> int:
        """The base of the first free range of ``count`` slots; CapacityError if none is."""
        base = 0
        for used_base, used_count in sorted(self.used.items()):
            if used_base - base >= count:
                break
            base = max(base, used_base + used_count)
        if base + count > self.size:
            free = self.size - sum(self.used.values())
            raise CapacityError(
                f"slot pool exhausted: {count} slots wanted, {free} of {self.size} free"
                + (" but fragmented" if free >= count else "")
                + "; retry when a job ends"
            )
        return base

    def check(self, count: int) -> None:
        """Raise CapacityError now if ``count`` slots would not fit."""
        self._first_fit(count)

    def allocate(self, count: int) -> int:
        base = self._first_fit(count)
        self.used[base] = count
        return base

    def release(self, base: int) -> None:
        self.used.pop(base, None)


def _key(entry: TableEntry) -> tuple:
    """What names an entry in its table: the table and the match."""
    return entry.table, tuple(sorted(entry.match.items()))


class JobTable:
    """The jobs admitted on one switch, kept in the switch's tables and mirrored here.

    This mirror is the truth the controller restores: after the switch (or
    the connection to it) restarts, ``reinstall`` makes the switch hold
    exactly these jobs again, with their sessions. A job that cannot be
    written back stays here, marked in ``lost`` with why, until it is released.
    """

    def __init__(self, conn: SwitchConnection) -> None:
        self.conn = conn
        self.sizes = ProgramSizes.of(conn.p4info)
        self.pool = SlotPool(self.sizes.pool)
        self.max_job_id = self.sizes.max_job_id
        self.jobs: dict[int, Job] = {}
        #: Jobs held here that the switch does not hold (re-installing failed): job id -> why.
        self.lost: dict[int, str] = {}
        #: A release could not reach the switch: its entries may linger until ``reinstall``.
        self.dirty = False

    def check_capacity(self, slot_count: int) -> None:
        """Raise CapacityError if a job of ``slot_count`` slots could not be admitted now."""
        if len(self.jobs) >= self.sizes.max_jobs:
            raise CapacityError(
                f"too many jobs: the switch's jobs table holds {self.sizes.max_jobs}, all in use; "
                "retry when a job ends"
            )
        self.pool.check(slot_count)

    def admit(
        self, job_id: int, members: list[Member], slot_count: int, quorum: int | None = None
    ) -> Job:
        """Install a job with a fresh session; on any failure nothing of it stays on the switch.
        ``quorum``: contributions that complete a round (None: every rank's)."""
        if job_id in self.jobs:
            raise AdmissionError(f"job {job_id} is already admitted")
        if not 1 <= job_id <= self.max_job_id:
            raise AdmissionError(
                f"job id must be 1..{self.max_job_id} (the switch counts that many), got {job_id}"
            )
        if not 1 <= slot_count <= wire.MAX_SLOTS:
            raise AdmissionError(f"slot count must be 1..{wire.MAX_SLOTS}, got {slot_count}")
        self.check_capacity(slot_count)
        base = self.pool.allocate(slot_count)
        try:
            job = Job(
                job_id, len(members), base, slot_count, wire.new_session(), tuple(members), quorum
            )
        except ValueError as exc:  # not a job the switch can hold (its ranks, its size)
            self.pool.release(base)
            raise AdmissionError(str(exc)) from None
        try:
            self._write_each(_job_updates(UpdateKind.INSERT, job))
        except WriteError as exc:
            self.pool.release(base)
            if any(code == code_pb2.RESOURCE_EXHAUSTED for code, _ in exc.failures):
                raise CapacityError(f"the switch's tables are full: {exc}") from None
            raise
        except BaseException:
            self.pool.release(base)
            raise
        self.jobs[job_id] = job
        return job

    def release(self, job_id: int) -> Job:
        """Remove the job from the switch and from here; returns it.

        A lost job has nothing on the switch to delete. If the deletes fail
        (the switch is unreachable, say), the job is forgotten here all the
        same, so that its id and slots are free, and ``dirty`` set, so that
        the next ``reinstall`` deletes what it left.
        """
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJobError(f"job {job_id} is not admitted")
        if job_id not in self.lost:
            try:
                self.conn.write(_job_updates(UpdateKind.DELETE, job))
            except ControllerError as exc:
                log.warning(
                    "job %d: deleting its entries failed (%s); they go when the switch "
                    "is reconciled",
                    job_id,
                    exc,
                )
                self.dirty = True
        self.pool.release(job.slot_base)
        del self.jobs[job_id]
        self.lost.pop(job_id, None)
        return job

    def _write_each(self, updates: Sequence[Update]) -> None:
        """Write updates one at a time; if one fails (for any reason), delete what this
        call inserted, so nothing is left half-written, and re-raise."""
        done: list[Update] = []
        try:
            for kind, item in updates:
                self.conn.write([(kind, item)])
                done.append((kind, item))
        except BaseException:
            undo: list[Update] = [
                (UpdateKind.DELETE, item)
                for kind, item in reversed(done)
                if kind == UpdateKind.INSERT
            ]
            if undo:
                try:
                    self.conn.write(undo)
                except ControllerError as exc:  # the switch went away mid-write
                    log.warning("could not undo a partial write (%s); reinstall will", exc)
                    self.dirty = True
            raise

    def recover(self) -> None:
        """Adopt the jobs the switch holds (a restarted controller), then repair what is
        incomplete: a job whose ranks cannot all be read back is removed."""
        workers = self.conn.read_table(WORKERS.name)
        rewrites = self.conn.read_table(RESULT_REWRITE.name)
        for entry in self.conn.read_table(JOBS.name):
            job_id = entry.match[SR_JOB_ID.name]
            try:
                job = job_from_entries(entry, workers, rewrites)
            except ValueError as exc:
                log.warning("job %d on the switch is incomplete (%s): removing it", job_id, exc)
                continue
            self.jobs[job_id] = job
            self.pool.used[job.slot_base] = job.slot_count
        self.reinstall()

    def reinstall(self) -> None:
        """Make the switch hold exactly the jobs held here, with their sessions.

        After the switch restarted (empty) this installs every job again; after
        a connection blip (the switch kept its state) it writes nothing. Entries
        of jobs not held here (released while the switch was unreachable) are
        deleted. A job the switch refuses is marked lost, with why; the switch
        becoming unreachable meanwhile raises, to be retried whole.
        """
        installed = {_key(e): e for table in JOB_TABLES for e in self.conn.read_table(table)}
        groups = self.conn.read_multicast_groups()
        wanted: set[tuple] = set()
        plans: dict[int, list[Update]] = {}
        for job in self.jobs.values():
            entries, group = job_entries(job)
            plan: list[Update] = []
            for entry in entries:
                wanted.add(_key(entry))
                have = installed.get(_key(entry))
                if have is None:
                    plan.append((UpdateKind.INSERT, entry))
                elif have != entry:
                    plan.append((UpdateKind.MODIFY, entry))
            if group.group_id not in groups:
                plan.append((UpdateKind.INSERT, group))
            elif sorted(groups[group.group_id]) != sorted(group.replicas):
                plan.append((UpdateKind.MODIFY, group))
            plans[job.job_id] = plan
        stale: list[Update] = [
            (UpdateKind.DELETE, e) for key, e in installed.items() if key not in wanted
        ]
        stale += [
            (UpdateKind.DELETE, MulticastGroup(gid, [])) for gid in groups if gid not in self.jobs
        ]
        if stale:
            try:
                self.conn.write(stale)
            except WriteError as exc:  # they block only their own job ids: say which, go on
                log.warning("could not delete entries of jobs no longer held: %s", exc)
        self.dirty = False
        for job_id, plan in plans.items():
            try:
                self._write_each(plan)
            except WriteError as exc:
                self.lost[job_id] = f"the switch refused to re-install it: {exc}"
                log.error("job %d lost: %s", job_id, self.lost[job_id])
            else:
                self.lost.pop(job_id, None)
