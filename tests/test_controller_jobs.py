"""Admitting jobs onto a live soft switch over P4Runtime, and the jobs running through it."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from p4.v1 import p4runtime_pb2

from switchreduce import wire
from switchreduce.controller.connection import SwitchConnection
from switchreduce.controller.errors import AdmissionError, CapacityError, WriteError
from switchreduce.controller.jobs import JobTable
from switchreduce.emulation.softswitch.pipeline import DropReason
from switchreduce.p4runtime.entities import TableEntry
from switchreduce.p4runtime.jobs import JOB_TABLES, Member, job_entries, replica_id
from switchreduce.p4runtime.names import JobStat
from switchreduce.worker.reference import check, synthetic_tensor
from switchreduce.worker.shim import JobBinding, SwitchCommunicator, WorkerOptions
from tests.helpers.net import bound_udp_sockets

K = 256


def _members(socks: list[socket.socket]) -> list[Member]:
    return [Member(r, "127.0.0.1", s.getsockname()[1]) for r, s in enumerate(socks)]


def _run_jobs(
    socks: dict, inputs: dict, jobs: JobTable, data_address, hold: threading.Event | None = None
) -> tuple[list, dict]:
    """Start every rank of every job in a thread; returns (threads, results by (job, rank)).
    With ``hold``, each job's last rank waits for it before it sends: no job can finish."""
    results: dict[tuple[int, int], np.ndarray] = {}

    def run(job_id: int, rank: int) -> None:
        session = jobs.jobs[job_id].session
        binding = JobBinding(job_id, rank, len(socks[job_id]), 32, data_address, session)
        comm = SwitchCommunicator(binding, WorkerOptions(k=K, timeout=20), socks[job_id][rank])
        if hold is not None and rank == len(socks[job_id]) - 1:
            assert hold.wait(20)
        results[job_id, rank] = comm.allreduce(inputs[job_id][rank])

    threads = [
        threading.Thread(target=run, args=(j, r)) for j, s in socks.items() for r in range(len(s))
    ]
    for t in threads:
        t.start()
    return threads, results


def test_two_concurrent_jobs_are_exact_and_disjoint(programmable_switch) -> None:
    address, data_address = programmable_switch.p4runtime, programmable_switch.data_plane
    socks = {3: bound_udp_sockets(3), 4: bound_udp_sockets(4)}
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        jobs = JobTable(conn)
        admitted = {job_id: jobs.admit(job_id, _members(s), 32) for job_id, s in socks.items()}
    a, b = admitted[3], admitted[4]
    assert a.slot_base + a.slot_count <= b.slot_base or b.slot_base + b.slot_count <= a.slot_base
    inputs = {
        job_id: [synthetic_tensor(job_id, r, 100_000, "float32") for r in range(len(s))]
        for job_id, s in socks.items()
    }
    threads, results = _run_jobs(socks, inputs, jobs, data_address)
    for t in threads:
        t.join()
    for (job_id, _), result in results.items():
        verdict = check(result, inputs[job_id], K)
        assert verdict.exact and verdict.within_bound
    assert len(results) == 7


def test_release_removes_every_entry_it_installed(programmable_switch) -> None:
    soft, address = programmable_switch.switch, programmable_switch.p4runtime
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        jobs = JobTable(conn)
        jobs.admit(5, _members(bound_udp_sockets(2)), 16)
        assert soft.pre.groups
        jobs.release(5)
    assert all(not table.entries for table in soft.tables().values())
    assert soft.pre.groups == {}


@pytest.mark.parametrize(
    ("members", "slots", "message"),
    [
        ([Member(0, "127.0.0.1", 1), Member(0, "127.0.0.1", 2)], 8, "ranks 0..1 once each"),
        ([Member(r, "127.0.0.1", 1000 + r) for r in range(33)], 8, "above the 32-bit"),
        ([Member(0, "127.0.0.1", 1)], 5000, "slot pool exhausted"),
        ([Member(0, "127.0.0.1", 1)], 0, "slot count"),
    ],
)
def test_bad_requests_are_refused_and_leave_nothing(
    programmable_switch, members, slots, message
) -> None:
    soft, address = programmable_switch.switch, programmable_switch.p4runtime
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        jobs = JobTable(conn)
        with pytest.raises(AdmissionError, match=message):
            jobs.admit(1, members, slots)
        assert jobs.pool.used == {}
    assert all(not table.entries for table in soft.tables().values())


def test_a_refused_write_rolls_back_what_went_in(programmable_switch) -> None:
    soft, address = programmable_switch.switch, programmable_switch.p4runtime
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        # Someone else holds the replica id rank 1 of job 2 needs: the admission must fail.
        squatter = TableEntry(
            "SwitchReduceEgress.result_rewrite",
            {"standard_metadata.egress_rid": replica_id(2, 1)},
            "SwitchReduceEgress.rewrite_destination",
            {"mac": 0, "ip": 1, "udp_port": 1},
        )
        conn.insert(squatter)
        jobs = JobTable(conn)
        with pytest.raises(WriteError, match="ALREADY_EXISTS"):
            jobs.admit(2, _members(bound_udp_sockets(2)), 8)
        assert 2 not in jobs.jobs
        assert conn.read_table("SwitchReduceEgress.result_rewrite") == [squatter]
        with pytest.raises(AdmissionError, match="not admitted"):
            jobs.release(2)
    assert not soft.ingress.jobs.entries and not soft.ingress.workers.entries


def test_any_failure_mid_admission_leaves_nothing(programmable_switch) -> None:
    """Not only a refusal by the switch: here the jobs entry is written, then a port that
    cannot be encoded fails the workers entry in this process."""
    soft, address = programmable_switch.switch, programmable_switch.p4runtime
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        jobs = JobTable(conn)
        with pytest.raises(ValueError, match="does not fit within 16 bits"):
            jobs.admit(2, [Member(0, "127.0.0.1", -1)], 8)
        assert jobs.jobs == {} and jobs.pool.used == {}
        assert all(not table.entries for table in soft.tables().values())
        jobs.admit(2, [Member(0, "127.0.0.1", 40000)], 8)  # the id is not blocked


def test_full_switch_tables_are_a_capacity_refusal(programmable_switch) -> None:
    soft, address = programmable_switch.switch, programmable_switch.p4runtime
    soft.ingress.workers.size = 2  # a smaller switch: room for two ranks
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        jobs = JobTable(conn)
        jobs.admit(1, _members(bound_udp_sockets(1)), 8)
        with pytest.raises(CapacityError, match="tables are full"):
            jobs.admit(2, _members(bound_udp_sockets(2)), 8)
        assert list(jobs.jobs) == [1] and list(soft.ingress.jobs.entries) == [(1,)]


def _installed(conn: SwitchConnection) -> tuple:
    return (
        *(sorted(map(repr, conn.read_table(t))) for t in JOB_TABLES),
        conn.read_multicast_groups(),
    )


def test_reinstall_repairs_the_switch_and_removes_what_no_job_holds(programmable_switch) -> None:
    address = programmable_switch.p4runtime
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        jobs = JobTable(conn)
        job = jobs.admit(5, _members(bound_udp_sockets(2)), 8)
        expected = _installed(conn)
        entries, group = job_entries(job)
        conn.write([(p4runtime_pb2.Update.DELETE, item) for item in (entries[1], group)])
        stray = TableEntry(
            entries[0].table,
            {"hdr.sr.job_id": 9},
            entries[0].action,
            {**entries[0].params, "mcast_grp": 9},
        )
        conn.insert(stray)
        jobs.reinstall()
        assert _installed(conn) == expected and jobs.lost == {}
        jobs.reinstall()  # nothing to do: nothing written
        assert _installed(conn) == expected


def test_a_job_the_switch_refuses_to_reinstall_is_lost_and_leaves_nothing(
    programmable_switch,
) -> None:
    soft, address = programmable_switch.switch, programmable_switch.p4runtime
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        jobs = JobTable(conn)
        jobs.admit(5, _members(bound_udp_sockets(1)), 8)
        jobs.admit(6, _members(bound_udp_sockets(2)), 8)
        for table in soft.tables().values():  # the switch restarted, smaller
            table.entries.clear()
        soft.pre.groups.clear()
        soft.ingress.workers.size = 2
        jobs.reinstall()
        assert list(jobs.lost) == [6] and "RESOURCE_EXHAUSTED" in jobs.lost[6]
        assert list(soft.ingress.jobs.entries) == [(5,)]  # job 6: nothing half-written
        jobs.release(6)  # nothing to delete on the switch
        assert jobs.lost == {} and sorted(jobs.jobs) == [5]


def test_a_restarted_controller_recovers_the_jobs_and_carries_on(programmable_switch) -> None:
    address = programmable_switch.p4runtime
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        before = JobTable(conn)
        first = before.admit(7, _members(bound_udp_sockets(3)), 64)
    with SwitchConnection(address, election_id=2) as conn:  # a new controller process
        after = JobTable(conn)
        after.recover()
        assert after.jobs == {7: first}
        second = after.admit(8, _members(bound_udp_sockets(2)), 64)
    assert second.slot_base >= first.slot_base + first.slot_count
    assert second.session != first.session  # each admission its own


def test_jobs_survive_a_controller_restart_and_a_spoofer_mid_transfer(programmable_switch) -> None:
    """Two jobs run while the controller is replaced and a host forges one job's packets."""
    soft, address = programmable_switch.switch, programmable_switch.p4runtime
    data_address = programmable_switch.data_plane
    socks = {3: bound_udp_sockets(3), 4: bound_udp_sockets(4)}
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        jobs = JobTable(conn)
        for job_id, s in socks.items():
            jobs.admit(job_id, _members(s), 32)
    inputs = {
        job_id: [synthetic_tensor(job_id, r, 400_000, "int32") for r in range(len(s))]
        for job_id, s in socks.items()
    }
    hold = threading.Event()
    threads, results = _run_jobs(socks, inputs, jobs, data_address, hold)
    aggregated = soft.ingress.job_stats[JobStat.AGGREGATED].packets
    deadline = time.monotonic() + 10
    while not (aggregated[3] and aggregated[4]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert aggregated[3] and aggregated[4], "the jobs never started"
    spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forged = wire.encode(
        wire.Header(wire.MsgType.DATA, 3, 0, 0, 1, 0, 1, 0, K), np.full(K, 10**6, dtype=np.int32)
    )  # job 3, rank 0, from elsewhere
    for _ in range(200):
        spoofer.sendto(forged, data_address)
    with SwitchConnection(address, election_id=2) as conn:  # the new controller takes over
        replacement = JobTable(conn)
        replacement.recover()
        assert sorted(replacement.jobs) == [3, 4]
        assert not results  # mid-transfer: every job waits for its held rank
    hold.set()
    for t in threads:
        t.join()
    for (job_id, _), result in results.items():
        expected = np.sum(inputs[job_id], axis=0, dtype=np.int64).astype(np.int32)
        assert np.array_equal(result, expected)
    assert len(results) == 7
    assert soft.ingress.drops.packets[DropReason.UNBOUND_WORKER] == 200


def test_the_pool_and_job_ids_are_the_programs_own(programmable_switch) -> None:
    """Sizes come from the P4Info, not from constants that could drift from the P4 source."""
    soft = programmable_switch.switch
    with SwitchConnection(programmable_switch.p4runtime) as conn:
        conn.push_pipeline()
        jobs = JobTable(conn)
        assert jobs.pool.size == soft.ingress.pool_size
        assert jobs.max_job_id == soft.ingress.job_stats[JobStat.AGGREGATED].size - 1
        with pytest.raises(AdmissionError, match=f"job id must be 1..{jobs.max_job_id}"):
            jobs.admit(jobs.max_job_id + 1, _members(bound_udp_sockets(1)), 8)
        assert jobs.pool.used == {}
