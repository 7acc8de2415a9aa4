"""The wire format: header round trips, and scapy decoding what the switch and workers emit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from switchreduce import wire

pytestmark = pytest.mark.fast

headers = st.builds(
    wire.Header,
    msg_type=st.sampled_from(list(wire.MsgType)),
    job_id=st.integers(0, 0xFFFF),
    rank=st.integers(0, 0xFF),
    slot=st.integers(0, wire.MAX_SLOTS - 1),
    version=st.integers(0, 1),
    exponent=st.integers(0, 0xFF),
    round=st.integers(0, 0xFFFF),
    chunk=st.integers(0, 0xFFFFFFFF),
    count=st.integers(0, 0xFFFF),
    format=st.integers(0, 0xFF),
    length=st.integers(0, wire.MAX_LENGTH),
    session=st.integers(0, (1 << 64) - 1),
)


@given(headers)
def test_header_round_trips(header: wire.Header) -> None:
    packed = header.pack()
    assert len(packed) == wire.HEADER_BYTES
    assert wire.unpack_header(packed) == header


def test_version_is_the_top_bit_of_the_slot_field() -> None:
    packed = wire.Header(
        wire.MsgType.DATA, 1, 2, slot=5, version=1, exponent=0, round=0, chunk=0, count=0
    ).pack()
    assert packed[4:6] == (0x8000 | 5).to_bytes(2, "big")


def test_truncated_header_is_rejected() -> None:
    with pytest.raises(wire.WireError, match="truncated"):
        wire.unpack_header(b"\x01" * (wire.HEADER_BYTES - 1))


@pytest.mark.parametrize("k", [0, 100, 2048])
def test_unsupported_k_is_rejected(k: int) -> None:
    with pytest.raises(ValueError, match="elements per packet"):
        wire.check_k(k)


def test_elements_are_big_endian_int32() -> None:
    elements = np.array([1, -1, 2**31 - 1, -(2**31)] + [0] * 60, dtype=np.int32)
    header = wire.Header(wire.MsgType.DATA, 1, 0, 0, 0, 0, 0, 0, 4)
    packet = wire.encode(header, elements)
    assert packet[wire.HEADER_BYTES : wire.HEADER_BYTES + 4] == b"\x00\x00\x00\x01"
    assert packet[wire.HEADER_BYTES + 4 : wire.HEADER_BYTES + 8] == b"\xff\xff\xff\xff"
    assert np.array_equal(wire.decode_elements(packet, 64), elements)


def test_scapy_decodes_a_captured_packet(tmp_path) -> None:
    """rdpcap() of a capture shows the header fields and the elements."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap, wrpcap

    layer = wire.scapy_layer()
    header = wire.Header(
        wire.MsgType.RESULT,
        job_id=7,
        rank=3,
        slot=1234,
        version=1,
        exponent=130,
        round=9,
        chunk=70000,
        count=64,
    )
    elements = np.arange(-32, 32, dtype=np.int32)
    frame = (
        Ether()
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / UDP(sport=wire.DEFAULT_SWITCH_PORT, dport=40000)
        / wire.encode(header, elements)
    )
    path = tmp_path / "capture.pcap"
    wrpcap(str(path), [frame])
    decoded = rdpcap(str(path))[0]
    agg = decoded[layer]
    for name, _ in wire.HEADER_FIELDS:
        if name != "reserved":
            assert getattr(agg, name) == getattr(header, name), name
    assert agg.elements == elements.tolist()


def test_every_32_bit_format_byte_is_unchanged_and_lanes_have_their_own() -> None:
    """Old bytes keep their meaning; a lane width makes another byte, named by describe_format."""
    for code, dtype in enumerate(wire.FORMAT_DTYPES):
        for bits in range(1, 33):
            assert wire.encode_format(dtype, bits) == code << 5 | (bits - 1)
    narrow = {
        wire.encode_format(dtype, 32, lanes): (dtype, lanes)
        for dtype in wire.FORMAT_DTYPES[1:]
        for lanes in (16, 8)
    }
    assert len(narrow) == 6 and not set(narrow) & {
        wire.encode_format(d, b) for d in wire.FORMAT_DTYPES for b in range(1, 33)
    }
    for byte, (dtype, lanes) in narrow.items():
        assert wire.describe_format(byte) == f"{dtype} in {lanes}-bit lanes"
    assert wire.describe_format(wire.encode_format("float32", 12)) == "float32 at 12 bits"
    with pytest.raises(ValueError, match="int32"):
        wire.encode_format("int32", 32, 8)
    with pytest.raises(ValueError, match="lane width"):
        wire.encode_format("float32", 32, 4)


@pytest.mark.parametrize("lane_bits", [16, 8])
def test_lanes_fill_each_word_least_significant_first(lane_bits: int) -> None:
    per_word = 32 // lane_bits
    lanes = np.arange(1, 3 * per_word, dtype=np.uint32)  # the last word is one lane short
    payload = wire.encode_lanes(lanes, lane_bits, 4)
    words = np.frombuffer(payload, dtype=">u4")
    assert words[0] == sum(int(v) << (i * lane_bits) for i, v in enumerate(lanes[:per_word]))
    assert words[3] == 0
    header = wire.Header(wire.MsgType.DATA, 0, 0, 0, 0, 0, 0, 0, 3).pack()
    decoded = wire.decode_lanes(header + payload, lane_bits, 4)
    assert decoded[: lanes.size].tolist() == lanes.tolist()
    assert not decoded[lanes.size :].any()
