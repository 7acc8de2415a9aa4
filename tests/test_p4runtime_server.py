"""The soft switch's P4Runtime server, driven by unmodified p4runtime-shell and raw gRPC.

p4runtime-shell keeps one global client per process, so each scenario runs
in a subprocess of its own against a server in this process. The raw gRPC
tests check what BMv2 cannot be compared on: the soft switch's data plane,
and the answers where it follows the P4Runtime spec rather than PI (the
answers both give are in test_p4runtime_conformance.py).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from switchreduce.emulation.softswitch.pipeline import SoftSwitch
from switchreduce.emulation.softswitch.static import install_static_job
from switchreduce.emulation.softswitch.tables import ActionCall, Register
from switchreduce.p4program import P4INFO
from switchreduce.p4runtime.jobs import Job, Member
from tests.test_p4runtime_conformance import (
    NO_ACTION,
    SET_JOB,
    Client,
    Set,
    Target,
    Update,
    primary,
    soft_switch,
    texts,
    update,
)


def _shell(
    address: str, tmp_path: Path, body: str, push: bool = True
) -> subprocess.CompletedProcess:
    """Run ``body`` in p4runtime-shell; ``push`` a new pipeline first (which empties the switch,
    as on BMv2) or use the one the switch runs."""
    device_config = tmp_path / "device_config.json"
    device_config.write_text("{}")  # the soft switch has no device config to load
    config = f"sh.FwdPipeConfig({str(P4INFO)!r}, {str(device_config)!r})" if push else "None"
    script = (
        textwrap.dedent(f"""
        import p4runtime_sh.shell as sh
        from p4runtime_sh.p4runtime import P4RuntimeWriteException
        sh.setup(device_id=0, grpc_addr={address!r}, election_id=(0, 1), verbose=False,
                 config={config})
        try:
    """)
        + textwrap.indent(textwrap.dedent(body), "    ")
        + "\nfinally:\n    sh.teardown()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )


def test_shell_inserts_reads_and_deletes_table_entries(programmable_switch, tmp_path) -> None:
    switch, address = programmable_switch.switch, programmable_switch.p4runtime
    done = _shell(
        address,
        tmp_path,
        """
        te = sh.TableEntry("SwitchReduceIngress.jobs")(action="SwitchReduceIngress.set_job")
        te.match["hdr.sr.job_id"] = "7"
        for name, value in (("world_size", 4), ("quorum", 3), ("slot_base", 128),
                            ("slot_count", 64), ("mcast_grp", 7), ("session", 3)):
            te.action[name] = str(value)
        te.insert()
        read = list(sh.TableEntry("SwitchReduceIngress.jobs").read())
        print("read", len(read), read[0].action["world_size"], read[0].match["hdr.sr.job_id"])
        try:
            te.insert()
        except P4RuntimeWriteException as exc:
            print("again", "ALREADY_EXISTS" in str(exc))
    """,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "read 1" in done.stdout and "again True" in done.stdout, done.stdout
    assert switch.ingress.jobs.entries[(7,)].args == (4, 3, 128, 64, 7, 3)
    done = _shell(
        address,
        tmp_path,
        """
        te = sh.TableEntry("SwitchReduceIngress.jobs")
        te.match["hdr.sr.job_id"] = "7"
        te.delete()
    """,
        push=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert switch.ingress.jobs.entries == {}


def test_shell_writes_and_reads_multicast_groups_and_counters(
    programmable_switch, tmp_path
) -> None:
    switch, address = programmable_switch.switch, programmable_switch.p4runtime
    done = _shell(
        address,
        tmp_path,
        """
        group = sh.MulticastGroupEntry(5).add(1, 161).add(2, 162)
        group.insert()
        read = list(sh.MulticastGroupEntry(5).read())
        print("replicas", sorted((r.egress_port, r.instance) for r in read[0].replicas))
    """,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replicas [(1, 161), (2, 162)]" in done.stdout, done.stdout
    switch.ingress.drops.count(3, 100)  # after the push: a new pipeline starts at zero
    done = _shell(
        address,
        tmp_path,
        """
        for entry in sh.CounterEntry("SwitchReduceIngress.drops").read():
            if entry.index == 3:
                print("drops", entry.packet_count, entry.byte_count)
        sh.MulticastGroupEntry(5).delete()
    """,
        push=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "drops 1 100" in done.stdout, done.stdout
    assert switch.pre.groups == {}


def _soft(target: Target) -> SoftSwitch:
    """The soft switch behind a ``soft_switch()`` target (which always has one)."""
    assert target.switch is not None
    return target.switch


@contextmanager
def _session(target: Target) -> Iterator[Client]:
    """A client that is primary (election id 1) and has pushed the program."""
    client = Client(target)
    try:
        primary(client)
        yield client
    finally:
        client.close()


def test_a_bad_batch_reports_one_error_per_update() -> None:
    with soft_switch() as target, _session(target) as c:
        group, missing = c.group(9, (1, 1)), c.group(8)
        assert c.write(update(Update.INSERT, group), update(Update.DELETE, missing)) == (
            "UNKNOWN [OK, NOT_FOUND]"
        )


def test_a_p4info_for_another_k_is_refused() -> None:
    with soft_switch() as target, _session(target) as c:
        request = Set(device_id=0, action=Set.VERIFY_AND_COMMIT)
        request.election_id.low = 1
        request.config.p4info.CopyFrom(target.p4info)
        for register in request.config.p4info.registers:
            if register.preamble.name == "SwitchReduceIngress.value":
                register.size = 2 * _soft(target).ingress.pool_size * 64
        with pytest.raises(grpc.RpcError) as refused:
            c.stub.SetForwardingPipelineConfig(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details()
    assert "compiled for K=64" in details and "runs K=256" in details


def test_an_unknown_device_id_is_not_found() -> None:
    """The spec's answer. PI takes any device id for a device without a pipeline: BMv2
    answers FAILED_PRECONDITION to Read and Get, PERMISSION_DENIED to Write, and takes the
    stream."""
    with soft_switch() as target, _session(target) as c:
        assert c.read(c.jobs(), device_id=3) == ("NOT_FOUND", [])
        assert c.get_pipeline(device_id=3) == "NOT_FOUND"
        assert c.write(update(Update.INSERT, c.job(7)), device_id=3) == "NOT_FOUND"
        assert c.push(device_id=3) == "NOT_FOUND"
        assert c.stream(2, device_id=3).next() == "ended NOT_FOUND"
        assert c.read(c.jobs()) == ("OK", [])  # device 0 is untouched


def _registers(switch: SoftSwitch) -> list[Register]:
    return [r for r in vars(switch.ingress).values() if isinstance(r, Register)]


def test_a_pushed_pipeline_starts_the_data_plane_empty() -> None:
    """Whatever the switch held, installed or counted, a VERIFY_AND_COMMIT starts it as the
    program was built, as BMv2 loading a program does: registers at zero too."""
    with soft_switch() as target, _session(target) as c:
        switch = _soft(target)
        set_job = c.default(
            SET_JOB, world_size=3, quorum=3, slot_base=0, slot_count=8, mcast_grp=1, session=1
        )
        assert c.write(update(Update.INSERT, c.job(7)), update(Update.MODIFY, set_job)) == "OK"
        install_static_job(switch, Job(2, 1, 0, 8, 5, (Member(0, "127.0.0.1", 40000),)))
        switch.ingress.drops.count(3, 100)
        for register in _registers(switch):
            register.cells[0] = 1
        assert c.push() == "OK"
        assert all(not t.entries for t in switch.tables().values())
        assert switch.ingress.jobs.default_action == ActionCall(NO_ACTION)
        assert switch.pre.groups == {} and switch.ingress.drops.packets[3] == 0
        assert not any(np.any(register.cells) for register in _registers(switch))


def test_a_default_entry_reset_reaches_the_data_plane() -> None:
    with soft_switch() as target, _session(target) as c:
        set_job = c.default(
            SET_JOB, world_size=3, quorum=3, slot_base=0, slot_count=8, mcast_grp=1, session=1
        )
        assert c.write(update(Update.MODIFY, set_job)) == "OK"
        jobs = _soft(target).ingress.jobs
        assert jobs.default_action == ActionCall(SET_JOB, (3, 3, 0, 8, 1, 1))
        assert c.write(update(Update.MODIFY, c.default())) == "OK"
        assert jobs.default_action == ActionCall(NO_ACTION)


def test_a_saved_pipeline_reaches_the_data_plane_only_on_commit() -> None:
    """Packets meet the running state until COMMIT (BMv2 swaps a loaded program in then).
    COMMIT answers as the spec says: NOT_FOUND with nothing saved, INVALID_ARGUMENT with a
    config; BMv2 answers UNKNOWN to the first and ignores the config."""
    with soft_switch() as target, _session(target) as c:
        jobs = _soft(target).ingress.jobs
        assert c.write(update(Update.INSERT, c.job(7))) == "OK"
        assert c.push(Set.VERIFY_AND_SAVE) == "OK"
        assert c.write(update(Update.INSERT, c.job(8))) == "OK"
        assert list(jobs.entries) == [(7,)]
        assert c.push(Set.COMMIT, config=True) == "INVALID_ARGUMENT"
        assert c.push(Set.COMMIT, config=False) == "OK"
        assert list(jobs.entries) == [(8,)]
        assert c.push(Set.COMMIT, config=False) == "NOT_FOUND"


def test_reconcile_keeps_the_state() -> None:
    """RECONCILE_AND_COMMIT as the spec says. PI replays what it read as INSERTs, counters
    included, which it refuses: BMv2 answers UNKNOWN for this program."""
    with soft_switch() as target, _session(target) as c:
        kept = [c.job(7, controller_metadata=3), c.group(5, (1, 1)), c.clone(5, (1, 1))]
        assert c.write(*(update(Update.INSERT, e) for e in kept)) == "OK"
        assert c.push(Set.RECONCILE_AND_COMMIT) == "OK"
        assert c.read(c.jobs(), c.group(0), c.clone(0)) == ("OK", texts(*kept))
        assert list(_soft(target).ingress.jobs.entries) == [(7,)]


def test_a_full_table_is_resource_exhausted() -> None:
    """The spec's answer, which the controller reads as a capacity refusal; BMv2 answers
    UNKNOWN."""
    with soft_switch() as target, _session(target) as c:
        _soft(target).ingress.jobs.size = 1
        assert c.write(update(Update.INSERT, c.job(7)), update(Update.INSERT, c.job(8))) == (
            "UNKNOWN [OK, RESOURCE_EXHAUSTED]"
        )
