"""The soft switch's P4Runtime server, driven by unmodified p4runtime-shell and raw gRPC.

p4runtime-shell keeps one global client per process, so each scenario runs
in a subprocess of its own against a server in this process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from threading import Event

import grpc
import pytest
from google.rpc import code_pb2, status_pb2
from p4.config.v1 import p4info_pb2
from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

P4INFO = Path(__file__).resolve().parent.parent / "p4src" / "switchreduce.p4info.txtpb"


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
        for name, value in (("world_size", 4), ("slot_base", 128), ("slot_count", 64),
                            ("mcast_grp", 7), ("session", 3)):
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
    assert switch.ingress.jobs.entries[(7,)].args == (4, 128, 64, 7, 3)
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


def _stub(address: str):
    return p4runtime_pb2_grpc.P4RuntimeStub(grpc.insecure_channel(address))


@dataclass
class _Session:
    """An open StreamChannel: the arbitration reply, kept open until ``close`` is set."""

    stream: object
    reply: p4runtime_pb2.StreamMessageResponse
    close: Event


def _arbitrate(stub, election_low: int) -> _Session:
    """Claim primaryship with ``election_low``; the stream must stay referenced to stay open."""
    request = p4runtime_pb2.StreamMessageRequest()
    request.arbitration.device_id = 0
    request.arbitration.election_id.low = election_low
    close = Event()

    def requests():
        yield request
        close.wait()

    stream = stub.StreamChannel(requests())
    return _Session(stream, next(stream), close)


def _pipeline_request(
    election_low: int, p4info: p4info_pb2.P4Info | None = None
) -> p4runtime_pb2.SetForwardingPipelineConfigRequest:
    request = p4runtime_pb2.SetForwardingPipelineConfigRequest(
        device_id=0, action=p4runtime_pb2.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT
    )
    request.election_id.low = election_low
    request.config.p4info.CopyFrom(p4info or _p4info())
    return request


def _p4info() -> p4info_pb2.P4Info:
    from google.protobuf import text_format

    return text_format.Parse(P4INFO.read_text(), p4info_pb2.P4Info())


def test_only_the_primary_may_write(programmable_switch) -> None:
    address = programmable_switch.p4runtime
    primary, backup = _stub(address), _stub(address)
    first = _arbitrate(primary, election_low=10)
    assert first.reply.arbitration.status.code == code_pb2.OK
    second = _arbitrate(backup, election_low=5)
    assert second.reply.arbitration.status.code == code_pb2.ALREADY_EXISTS
    try:
        with pytest.raises(grpc.RpcError) as denied:
            backup.SetForwardingPipelineConfig(_pipeline_request(election_low=5))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        primary.SetForwardingPipelineConfig(_pipeline_request(election_low=10))
    finally:
        first.close.set()
        second.close.set()


def test_a_bad_batch_reports_one_error_per_update(programmable_switch) -> None:
    address = programmable_switch.p4runtime
    stub = _stub(address)
    session = _arbitrate(stub, election_low=1)
    try:
        stub.SetForwardingPipelineConfig(_pipeline_request(election_low=1))
        group = p4runtime_pb2.Update(type=p4runtime_pb2.Update.INSERT)
        group.entity.packet_replication_engine_entry.multicast_group_entry.multicast_group_id = 9
        missing = p4runtime_pb2.Update(type=p4runtime_pb2.Update.DELETE)
        missing.entity.packet_replication_engine_entry.multicast_group_entry.multicast_group_id = 8
        write = p4runtime_pb2.WriteRequest(device_id=0, updates=[group, missing])
        write.election_id.low = 1
        with pytest.raises(grpc.RpcError) as failed:
            stub.Write(write)
        assert failed.value.code() == grpc.StatusCode.UNKNOWN
        trailer = dict(failed.value.trailing_metadata())["grpc-status-details-bin"]
        status = status_pb2.Status.FromString(trailer)
        errors = []
        for detail in status.details:
            error = p4runtime_pb2.Error()
            detail.Unpack(error)
            errors.append(error.canonical_code)
        assert errors == [code_pb2.OK, code_pb2.NOT_FOUND]
    finally:
        session.close.set()


def test_a_p4info_for_another_k_is_refused(programmable_switch) -> None:
    switch, address = programmable_switch.switch, programmable_switch.p4runtime
    stub = _stub(address)
    session = _arbitrate(stub, election_low=1)
    try:
        info = _p4info()
        for register in info.registers:
            if register.preamble.name == "SwitchReduceIngress.value":
                register.size = 2 * switch.ingress.pool_size * 64
        with pytest.raises(grpc.RpcError) as refused:
            stub.SetForwardingPipelineConfig(_pipeline_request(election_low=1, p4info=info))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = refused.value.details()
        assert "compiled for K=64" in details and "runs K=256" in details
    finally:
        session.close.set()
