"""The P4 program and the soft switch describe one pipeline: same constants, layout and names.

The source checks run everywhere; compiling needs p4c (``requires_p4c``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from switchreduce import wire
from switchreduce.emulation.bmv2 import compile_program
from switchreduce.emulation.softswitch.pipeline import MAX_JOBS, POOL_SIZE, DropReason, SoftSwitch
from switchreduce.p4program import SOURCE_DIR

P4SRC = SOURCE_DIR
SOURCES = {path.name: path.read_text() for path in (P4SRC / "include").glob("*.p4")}


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
    assert defines["MSG_DATA"] == wire.MsgType.DATA
    assert defines["MSG_RESULT"] == wire.MsgType.RESULT
    assert defines["MSG_STALE"] == wire.MsgType.STALE
    assert defines["MSG_REFUSED"] == wire.MsgType.REFUSED
    assert defines["ROW_REFUSED"] == wire.ROW_REFUSED
    assert defines["SR_HEADER_BYTES"] == wire.HEADER_BYTES
    assert defines["K"] in wire.SUPPORTED_K


@pytest.mark.fast
def test_aggregation_header_matches_the_wire_format() -> None:
    body = re.search(r"header switchreduce_h \{(.*?)\}", SOURCES["headers.p4"], re.S).group(1)
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
            signature = re.search(rf"action {short}\((.*?)\)", text, re.S).group(1)
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


@pytest.mark.requires_p4c
def test_default_k_256_compiles_to_the_committed_p4info(tmp_path: Path) -> None:
    p4info = compile_program(tmp_path, 256).p4info
    assert p4info.read_text() == (P4SRC / "switchreduce.p4info.txtpb").read_text()


@pytest.mark.requires_p4c
def test_k_64_compiles(tmp_path: Path) -> None:
    program = compile_program(tmp_path, 64)
    assert "SwitchReduceIngress.value" in program.p4info.read_text()
    assert program.bmv2_json.stat().st_size > 0
