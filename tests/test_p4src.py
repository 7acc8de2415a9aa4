"""The P4 program and the soft switch describe one pipeline: same constants, layout and names.

The source and P4Info checks run everywhere; compiling needs p4c
(``requires_p4c``), which also checks that the committed P4Info is the
source's.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from switchreduce import wire
from switchreduce.emulation.bmv2 import compile_program
from switchreduce.emulation.softswitch.pipeline import (
    MAX_JOBS,
    POOL_SIZE,
    DropReason,
    SoftSwitch,
    SwitchReduceEgress,
    SwitchReduceIngress,
)
from switchreduce.p4program import SOURCE_DIR
from switchreduce.p4runtime import names
from switchreduce.p4runtime.schema import P4Schema

P4SRC = SOURCE_DIR
SOURCES = {path.name: path.read_text() for path in (P4SRC / "include").glob("*.p4")}
#: The committed P4Info is p4c's for this K.
P4INFO_K = 256


def _defines() -> dict[str, int]:
    found = re.findall(r"^#define (\w+) (0x[0-9A-Fa-f]+|\d+)\b", SOURCES["constants.p4"], re.M)
    return {name: int(value, 0) for name, value in found}


def _control(name: str) -> str:
    text = SOURCES["ingress.p4" if "Ingress" in name else "egress.p4"]
    return text[text.index(f"control {name}") :]


@pytest.mark.fast
def test_constants_match_the_python_side() -> None:
    defines = _defines()
    for reason in DropReason:
        assert defines[f"DROP_{reason.name}"] == reason.value, reason
    assert defines["NUM_DROP_REASONS"] == len(DropReason)
    assert defines["POOL_SIZE"] == POOL_SIZE
    assert defines["MAX_JOBS"] == MAX_JOBS
    assert defines["UDP_PORT_MIN"] == wire.UDP_PORT_MIN
    assert defines["UDP_PORT_MAX"] == wire.UDP_PORT_MAX
    for kind in ("DATA", "RESULT", "STALE", "REFUSED", "WAITING", "RELEASE", "RESEND"):
        assert defines[f"MSG_{kind}"] == wire.MsgType[kind], kind
    assert defines["ROW_REFUSED"] == wire.ROW_REFUSED
    assert defines["SR_HEADER_BYTES"] == wire.HEADER_BYTES
    assert defines["K"] in wire.SUPPORTED_K


@pytest.mark.fast
def test_aggregation_header_matches_the_wire_format() -> None:
    header = re.search(r"header switchreduce_h \{(.*?)\}", SOURCES["headers.p4"], re.S)
    assert header is not None
    body = header.group(1)
    fields = [(name, int(width)) for width, name in re.findall(r"bit<(\d+)>\s+(\w+);", body)]
    assert fields == list(wire.HEADER_FIELDS)


@pytest.mark.fast
def test_tables_keys_and_actions_match_the_soft_switch() -> None:
    switch = SoftSwitch(k=64)
    for full_name, table in switch.tables().items():
        control, name = full_name.split(".")
        text = _control(control)
        block = re.search(rf"table {name} \{{(.*?)\n    \}}", text, re.S)
        assert block, f"{full_name} missing from the P4 program"
        keys = re.findall(r"([\w.]+): exact;", block.group(1))
        assert tuple(keys) == table.key_fields, full_name
        for action in table.spec.actions:
            if action.name == "NoAction":
                continue
            short = action.name.split(".")[1]
            declared = re.search(rf"action {short}\((.*?)\)", text, re.S)
            assert declared is not None
            signature = declared.group(1)
            params = tuple(re.findall(r"bit<\d+> (\w+)", signature))
            assert params == action.param_names, action.name


@pytest.mark.fast
def test_registers_and_counters_match_the_soft_switch() -> None:
    switch = SoftSwitch(k=64)
    ingress = _control("SwitchReduceIngress")
    p4_registers = set(re.findall(r"register<bit<\d+>>\([^)]*\) (\w+);", ingress))
    assert p4_registers == {name.split(".")[1] for name in switch.registers()}
    p4_counters = set(re.findall(r"counter\([^)]*\) (\w+);", ingress))
    assert p4_counters == {name.split(".")[1] for name in switch.counters()}


def _compiled(schema: P4Schema) -> dict[str, dict]:
    """The tables, registers and counters of a P4Info with what must match the soft switch:
    sizes, and the names and widths of keys and action parameters, in order."""
    return {
        "tables": {
            t.name: {
                "size": t.size,
                "keys": [(f.name, f.bitwidth) for f in t.match_fields],
                "actions": {
                    a.name: [(p.name, p.bitwidth) for p in a.params]
                    for a in (schema.actions[i] for i in t.action_ids)
                },
            }
            for t in schema.tables
        },
        "registers": {r.name: {"size": r.size, "bitwidth": r.bitwidth} for r in schema.registers},
        "counters": {c.name: {"size": c.size} for c in schema.counters},
    }


def _modelled(switch: SoftSwitch) -> dict[str, dict]:
    """The same for the soft switch's Python tables, registers and counters."""
    return {
        "tables": {
            name: {
                "size": t.size,
                "keys": [(f.name, f.bitwidth) for f in t.spec.keys],
                "actions": {
                    a.name: [(p.name, p.bitwidth) for p in a.params] for a in t.spec.actions
                },
            }
            for name, t in switch.tables().items()
        },
        "registers": {
            name: {"size": r.size, "bitwidth": r.spec.bitwidth}
            for name, r in switch.registers().items()
        },
        "counters": {name: {"size": c.size} for name, c in switch.counters().items()},
    }


@pytest.mark.fast
def test_the_soft_switch_has_the_committed_p4infos_sizes_and_widths() -> None:
    assert _modelled(SoftSwitch(k=P4INFO_K)) == _compiled(P4Schema.load())


@pytest.mark.fast
@pytest.mark.parametrize("change", ["key width", "parameter width", "register width", "size"])
def test_a_soft_switch_one_bit_or_entry_off_fails_the_comparison(change: str) -> None:
    """The comparison above can fail: the soft switch's widths and sizes are what it compares."""
    switch = SoftSwitch(k=P4INFO_K)
    ingress = switch.ingress
    if change == "key width":
        rank = replace(names.SR_RANK, bitwidth=16)
        keys = tuple(rank if key == names.SR_RANK else key for key in names.WORKERS.keys)
        ingress.workers.spec = replace(names.WORKERS, keys=keys)
    elif change == "parameter width":
        params = (*names.SET_JOB.params[:-1], replace(names.SESSION, bitwidth=32))
        set_job = replace(names.SET_JOB, params=params)
        ingress.jobs.spec = replace(names.JOBS, actions=(set_job, names.NO_ACTION))
    elif change == "register width":
        ingress.round.spec = replace(names.ROUND, bitwidth=32)
    else:
        ingress.jobs.size += 1
    assert _modelled(switch) != _compiled(P4Schema.load())


@pytest.mark.fast
def test_every_declared_name_is_one_the_soft_switch_is_built_from() -> None:
    """So the comparison with the P4Info checks every declaration in ``names``."""
    declared = list(vars(names).values())
    switch = SoftSwitch(k=P4INFO_K)
    tables = {t.spec for t in switch.tables().values()}
    assert {d for d in declared if isinstance(d, names.TableSpec)} == tables
    assert {d for d in declared if isinstance(d, names.ActionSpec)} == {
        a for t in tables for a in t.actions
    }
    assert {d for d in declared if isinstance(d, names.FieldSpec)} == {
        field for t in tables for field in (*t.keys, *(p for a in t.actions for p in a.params))
    }
    registers = {d for d in declared if isinstance(d, names.RegisterSpec)}
    assert registers == {r.spec for r in switch.registers().values()}
    assert {names.DROPS, *(stat.counter for stat in names.JobStat)} == set(switch.counters())
    assert (
        SwitchReduceIngress.__name__,
        SwitchReduceEgress.__name__,
    ) == (names.INGRESS, names.EGRESS)


@pytest.mark.requires_p4c
def test_default_k_256_compiles_to_the_committed_p4info(tmp_path: Path) -> None:
    p4info = compile_program(tmp_path, P4INFO_K).p4info
    assert p4info.read_text() == (P4SRC / "switchreduce.p4info.txtpb").read_text()


@pytest.mark.requires_p4c
def test_k_64_compiles_into_a_sweep_runs_directory(tmp_path: Path) -> None:
    """A sweep over two parameters names its runs with a comma, which p4c's list of P4Runtime
    files would split at."""
    program = compile_program(tmp_path / "topology.slowdown=1-1-1-4,switch.quorum=3", 64)
    assert "SwitchReduceIngress.value" in program.p4info.read_text()
    assert program.bmv2_json.stat().st_size > 0
