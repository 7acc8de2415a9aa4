"""The controller's P4Runtime connection against the soft switch's P4Runtime server."""

from __future__ import annotations

import threading

import pytest
from google.rpc import code_pb2
from p4.v1 import p4runtime_pb2

from switchreduce.controller.connection import SwitchConnection
from switchreduce.controller.errors import NotPrimaryError, SwitchUnavailableError, WriteError
from switchreduce.emulation.softswitch.p4runtime_server import serve
from switchreduce.emulation.softswitch.pipeline import SoftSwitch
from switchreduce.p4runtime.entities import MulticastGroup, TableEntry
from switchreduce.ports import free_tcp_port

JOB = TableEntry(
    "SwitchReduceIngress.jobs",
    {"hdr.sr.job_id": 3},
    "SwitchReduceIngress.set_job",
    {"world_size": 2, "quorum": 2, "slot_base": 0, "slot_count": 8, "mcast_grp": 3, "session": 1},
)


def test_entries_and_groups_round_trip_by_p4_name(programmable_switch) -> None:
    soft, address = programmable_switch.switch, programmable_switch.p4runtime
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        conn.write(
            [
                (p4runtime_pb2.Update.INSERT, JOB),
                (p4runtime_pb2.Update.INSERT, MulticastGroup(3, [(0, 96), (0, 97)])),
            ]
        )
        assert conn.read_table("SwitchReduceIngress.jobs") == [JOB]
        assert conn.read_multicast_groups() == {3: [(0, 96), (0, 97)]}
        soft.ingress.drops.count(2, 64)
        assert conn.read_counter("SwitchReduceIngress.drops", 2) == (1, 64)
        conn.delete(JOB)
    assert soft.ingress.jobs.entries == {}


def test_two_connections_drive_two_switches_from_one_process(programmable_switch) -> None:
    soft_a, address_a = programmable_switch.switch, programmable_switch.p4runtime
    soft_b = SoftSwitch(k=256)
    address_b = f"127.0.0.1:{free_tcp_port()}"
    server_b = serve(soft_b, address_b)
    try:
        with SwitchConnection(address_a) as a, SwitchConnection(address_b) as b:
            for conn in (a, b):
                conn.push_pipeline()
            a.insert(JOB)
            b.insert(TableEntry(JOB.table, {"hdr.sr.job_id": 4}, JOB.action, JOB.params))
        assert list(soft_a.ingress.jobs.entries) == [(3,)]
        assert list(soft_b.ingress.jobs.entries) == [(4,)]
    finally:
        server_b.stop(grace=None)


def test_refused_writes_say_why(programmable_switch) -> None:
    address = programmable_switch.p4runtime
    with SwitchConnection(address) as conn:
        conn.push_pipeline()
        conn.insert(JOB)
        with pytest.raises(WriteError, match="ALREADY_EXISTS") as exc:
            conn.insert(JOB)
        assert exc.value.failures[0][0] == code_pb2.ALREADY_EXISTS
        with pytest.raises(KeyError, match="takes"):
            conn.insert(TableEntry(JOB.table, JOB.match, JOB.action, {"world_size": 2}))


def test_a_lower_election_id_is_not_primary(programmable_switch) -> None:
    address = programmable_switch.p4runtime
    with SwitchConnection(address, election_id=10), pytest.raises(NotPrimaryError):
        SwitchConnection(address, election_id=5)


def test_a_switch_that_does_not_answer_is_reported() -> None:
    with pytest.raises(SwitchUnavailableError, match="no P4Runtime server"):
        SwitchConnection(f"127.0.0.1:{free_tcp_port()}", timeout=0.5)


def test_a_reader_reads_beside_the_primary_without_taking_its_place(programmable_switch) -> None:
    address = programmable_switch.p4runtime
    with SwitchConnection(address, election_id=5) as primary:
        primary.push_pipeline()
        primary.insert(JOB)
        with SwitchConnection(address, primary=False) as reader:
            assert reader.read_table("SwitchReduceIngress.jobs") == [JOB]
        primary.delete(JOB)  # still primary


def test_a_switch_that_goes_away_is_noticed_at_once() -> None:
    """The arbitration stream breaks: the controller learns without waiting for a call."""
    address = f"127.0.0.1:{free_tcp_port()}"
    server = serve(SoftSwitch(k=256), address)
    noticed = threading.Event()
    with SwitchConnection(address, on_lost=noticed.set) as conn:
        assert not conn.lost.is_set()
        server.stop(grace=None)
        assert noticed.wait(5) and conn.lost.is_set()
    closed = threading.Event()
    server = serve(SoftSwitch(k=256), address)
    try:
        SwitchConnection(address, on_lost=closed.set).close()
        assert not closed.wait(0.5)  # closing it ourselves is not losing the switch
    finally:
        server.stop(grace=None)
