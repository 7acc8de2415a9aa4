"""The controller against BMv2 itself: simple_switch_grpc running the compiled P4 program.

Everything is observed over P4Runtime, the way the controller sees any switch
(BMv2 cannot read registers over P4Runtime, and nothing here needs to).
"""

from __future__ import annotations

import pytest

from switchreduce import wire
from switchreduce.controller.connection import SwitchConnection
from switchreduce.controller.errors import AdmissionError, WriteError
from switchreduce.controller.forwarding import install_routes
from switchreduce.controller.jobs import JobTable
from switchreduce.emulation.bmv2 import compile_program
from switchreduce.p4runtime.entities import TableEntry
from switchreduce.p4runtime.jobs import Member, job_entries, replica_id
from switchreduce.p4runtime.names import FORWARD
from switchreduce.p4runtime.schema import load_p4info
from tests.helpers.bmv2 import simple_switch_grpc

pytestmark = [pytest.mark.requires_bmv2, pytest.mark.requires_p4c]

K = 256
JOB_TABLES = (
    "SwitchReduceIngress.jobs",
    "SwitchReduceIngress.workers",
    "SwitchReduceEgress.result_rewrite",
)


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return compile_program(tmp_path_factory.mktemp("p4"), K)


@pytest.fixture
def bmv2(program, tmp_path):
    """A fresh simple_switch_grpc with no program yet; yields its P4Runtime address."""
    with simple_switch_grpc(tmp_path / "bmv2.log") as address:
        yield address


def _connect(address: str, program, election_id: int = 1) -> SwitchConnection:
    return SwitchConnection(address, election_id=election_id, p4info=load_p4info(program.p4info))


def _members(count: int, base_port: int = 40000) -> list[Member]:
    return [
        Member(r, f"10.0.0.{r + 1}", base_port, mac=0x020000000001 + r, port=r + 1)
        for r in range(count)
    ]


def _installed(conn: SwitchConnection) -> dict:
    return {
        **{table: sorted(map(repr, conn.read_table(table))) for table in JOB_TABLES},
        "groups": conn.read_multicast_groups(),
    }


def test_jobs_are_installed_read_back_and_removed(bmv2, program) -> None:
    with _connect(bmv2, program) as conn:
        conn.push_pipeline(program.bmv2_json.read_bytes())
        empty = _installed(conn)
        jobs = JobTable(conn)
        a = jobs.admit(3, _members(3), 16)
        b = jobs.admit(4, _members(4, 41000), 16)
        assert a.slot_base + a.slot_count <= b.slot_base
        installed = _installed(conn)
        for job in (a, b):
            entries, (group, replicas) = job_entries(job)
            for entry in entries:
                assert repr(entry) in installed[entry.table]
            assert sorted(installed["groups"][group]) == sorted(replicas)
        assert conn.read_counter("SwitchReduceIngress.drops", wire.DropReason.UNKNOWN_JOB) == (0, 0)
        jobs.release(3)
        jobs.release(4)
        assert _installed(conn) == empty


def test_a_restarted_controller_recovers_the_jobs_from_bmv2(bmv2, program) -> None:
    with _connect(bmv2, program) as conn:
        conn.push_pipeline(program.bmv2_json.read_bytes())
        first = JobTable(conn).admit(7, _members(2), 32)
    with _connect(bmv2, program, election_id=2) as conn:  # a new controller process
        assert conn.installed_p4info() == conn.p4info
        after = JobTable(conn)
        after.recover()
        assert after.jobs == {7: first}
        second = after.admit(8, _members(2, 41000), 32)
    assert second.slot_base >= first.slot_base + first.slot_count
    assert second.session != first.session  # a new admission, a new session


def test_bad_requests_and_refused_writes_leave_nothing_on_bmv2(bmv2, program) -> None:
    with _connect(bmv2, program) as conn:
        conn.push_pipeline(program.bmv2_json.read_bytes())
        jobs = JobTable(conn)
        with pytest.raises(AdmissionError, match="slot pool exhausted"):
            jobs.admit(1, _members(2), 5000)
        squatter = TableEntry(
            "SwitchReduceEgress.result_rewrite",
            {"standard_metadata.egress_rid": replica_id(2, 1)},
            "SwitchReduceEgress.rewrite_destination",
            {"mac": 0, "ip": 1, "udp_port": 1},
        )
        conn.insert(squatter)
        with pytest.raises(WriteError, match="ALREADY_EXISTS"):
            jobs.admit(2, _members(2), 8)
        assert conn.read_table("SwitchReduceEgress.result_rewrite") == [squatter]
        assert conn.read_table("SwitchReduceIngress.workers") == []
        assert conn.read_multicast_groups() == {}


def test_forwarding_routes_are_installed_once(bmv2, program) -> None:
    routes = {0x020000000001: 1, 0x020000000002: 2}
    with _connect(bmv2, program) as conn:
        conn.push_pipeline(program.bmv2_json.read_bytes())
        install_routes(conn, routes)
        install_routes(conn, {**routes, 0x020000000002: 3})  # a host moved: modified
        got = {
            e.match["hdr.ethernet.dst_addr"]: e.params["port"]
            for e in conn.read_table(FORWARD.name)
        }
    assert got == {0x020000000001: 1, 0x020000000002: 3}
