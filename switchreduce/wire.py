"""The SwitchReduce wire format: the one module that knows offsets and constants.

A packet is Ethernet / IPv4 / UDP / aggregation header / K 32-bit
big-endian words. A word holds one signed element (32-bit lanes), or
32 / L unsigned lanes of L = 16 or 8 bits: lane i of word w is element
``w * 32 / L + i``, least significant lane first, so the switch's 32-bit
add of two words sums every lane at once (:func:`encode_lanes`).
The ``count`` of a packet is the words it fills (at most K, which the
switch checks); a rank knows the elements from ``length`` and the chunk.
``round`` counts the uses of a slot (mod 2**16) and its low bit is
``version``, the shadow copy the packet belongs to; see docs/protocol.md.
Every part of the system (worker, soft switch, controller, tests, the scapy
decoder) imports its layout from here; the P4 headers in ``p4src/`` mirror
:data:`HEADER_FIELDS` field for field.

Header (28 bytes, network byte order)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +---------------+---------------+-------------------------------+
    |   msg_type    |     rank      |            job_id             |
    +-+-------------+---------------+---------------+---------------+
    |v|         slot (15)           |   exponent    |    format     |
    +-+-----------------------------+---------------+---------------+
    |            round              |            count              |
    +-------------------------------+-------------------------------+
    |                            chunk                              |
    +---------------------------------------------------------------+
    |                            length                             |
    +---------------------------------------------------------------+
    |                        session (64)                           |
    +                                                               +
    |                                                               |
    +---------------------------------------------------------------+

``session`` names one run of a job and is its secret: the switch takes a
packet only if it carries the session its ``jobs`` entry holds. ``format``
and ``length`` say what the sender sums; every contribution to a round must
carry the same, or the switch refuses the round. In a RESULT or WAITING,
``length`` is the row's bitmap instead: bit r is set if rank r's
contribution is in the sums (a quorum of a job's ranks may complete a round).
"""

from __future__ import annotations

import secrets
import struct
from enum import IntEnum
from typing import NamedTuple

import numpy as np

#: UDP destination ports that carry aggregation traffic (SwitchML uses the same range).
UDP_PORT_MIN = 0xBEE0
UDP_PORT_MAX = 0xBEEF
#: The port a switch listens on by default (UDP mode) and results come from.
DEFAULT_SWITCH_PORT = UDP_PORT_MIN

#: Elements per packet. 64 is SwitchML's 256-byte payload; up to 256 (1 KiB) fits a
#: 1500-byte MTU; 512 and 1024 need jumbo frames (loopback has a 64 KiB MTU).
SUPPORTED_K = (64, 128, 256, 512, 1024)
#: The largest K whose frames fit a standard 1500-byte Ethernet MTU.
MAX_K_STANDARD_MTU = 256
#: Per-packet cost dominates in software, so the largest K runs fastest (README, Performance).
DEFAULT_K = 1024

#: Worker bitmaps are 32 bits wide, so a job has at most 32 ranks.
MAX_WORKERS = 32
#: Slot indices are 15 bits; the 16th bit of the field is the shadow-copy version.
MAX_SLOTS = 1 << 15

#: Exponent byte meaning "this worker has no data for the block" (neutral under max).
EXPONENT_NONE = 0
#: Bias of the exponent byte: byte = e + EXPONENT_BIAS for blocks with max|x| < 2**e.
EXPONENT_BIAS = 127
#: -126, float32's smallest normal exponent; the largest, 128 (max|x| < 2**128), is byte 255.
EXPONENT_MIN = 1 - EXPONENT_BIAS

#: The tensor types a ``format`` byte names: bits 7..5 index this tuple, bits 4..0 hold
#: the fixed-point precision minus one (32 for int32, which is summed exactly).
FORMAT_DTYPES = ("int32", "float32", "bfloat16", "float16")
#: Lane widths (bits per element on the wire); 32 is one element per word.
LANE_BITS = (32, 16, 8)
#: Bits 7..5 of a narrow-lane format: its lane width (the lane sets the grid, so bits 4..0
#: hold the tensor's dtype code instead of a precision). Every 32-bit format byte is unchanged.
_LANE_CODES = {16: 4, 8: 5}
#: ``length`` is 32 bits: the most elements one allreduce call sums.
MAX_LENGTH = (1 << 32) - 1


def check_lanes(lane_bits: int) -> int:
    """Validate a lane width."""
    if lane_bits not in LANE_BITS:
        raise ValueError(f"lane width must be one of {LANE_BITS} bits, got {lane_bits}")
    return lane_bits


def encode_format(dtype: str, bits: int, lane_bits: int = 32) -> int:
    """The ``format`` byte of a tensor of ``dtype`` quantized to ``bits`` (1..32) in 32-bit
    lanes, or to its ``lane_bits`` lanes (16 or 8; float tensors only)."""
    if check_lanes(lane_bits) != 32:
        if dtype == "int32":
            raise ValueError("int32 tensors are summed exactly, in 32-bit lanes only")
        return _LANE_CODES[lane_bits] << 5 | FORMAT_DTYPES.index(dtype)
    if not 1 <= bits <= 32:
        raise ValueError(f"precision must be 1..32 bits, got {bits}")
    return FORMAT_DTYPES.index(dtype) << 5 | (bits - 1)


def describe_format(byte: int) -> str:
    """'float32 at 16 bits' or 'float32 in 8-bit lanes' for a ``format`` byte (names an
    unknown code as such)."""
    code, low = byte >> 5, byte & 0x1F
    lanes = {code: lane for lane, code in _LANE_CODES.items()}
    if code in lanes:
        dtype = FORMAT_DTYPES[low] if low < len(FORMAT_DTYPES) else f"dtype code {low}"
        return f"{dtype} in {lanes[code]}-bit lanes"
    dtype = FORMAT_DTYPES[code] if code < len(FORMAT_DTYPES) else f"dtype code {code}"
    return f"{dtype} at {low + 1} bits"


def new_session() -> int:
    """A fresh session: 64 random bits, never 0 (a ``jobs`` entry's "no session yet").

    Random rather than counted so that no restart of any process can make one
    repeat (the chance that two sessions agree is 2**-64), and so that a host
    that cannot see a job's packets cannot guess it.
    """
    return secrets.randbits(64) or 1


ELEMENT_DTYPE = np.dtype(">i4")
ELEMENT_BYTES = ELEMENT_DTYPE.itemsize

#: (name, width in bits) of every header field, in wire order; the P4 header has the same.
HEADER_FIELDS: tuple[tuple[str, int], ...] = (
    ("msg_type", 8),
    ("rank", 8),
    ("job_id", 16),
    ("version", 1),
    ("slot", 15),
    ("exponent", 8),
    ("format", 8),
    ("round", 16),
    ("count", 16),
    ("chunk", 32),
    ("length", 32),
    ("session", 64),
)
_HEADER = struct.Struct("!BBHHBBHHIIQ")
HEADER_BYTES = _HEADER.size
assert sum(width for _, width in HEADER_FIELDS) == HEADER_BYTES * 8

#: Ethernet (14) + IPv4 without options (20) + UDP (8).
ETH_BYTES = 14
IPV4_BYTES = 20
UDP_BYTES = 8
L2_L4_BYTES = ETH_BYTES + IPV4_BYTES + UDP_BYTES
ETHERTYPE_IPV4 = 0x0800
IP_PROTO_UDP = 17


class MsgType(IntEnum):
    """What a packet is (docs/protocol.md, Messages)."""

    DATA = 1  # worker -> switch: a contribution to a round
    RESULT = 2  # switch -> workers: the round's sums; ``length``: the ranks in them
    JOIN = 3  # worker -> switch: ask a static job for a session (soft switch only)
    JOINED = 4  # switch -> worker: the session every rank of the static job now uses
    STALE = 5  # switch -> worker: the packet's session is not the job's
    REFUSED = 6  # switch -> workers: ranks disagree on what the round sums
    WAITING = 7  # switch -> worker: its resent contribution is in; ``length``: the ranks in
    RELEASE = 8  # worker -> switch: it holds the result of the slot's round (a quorum job's)
    RESEND = 9  # worker -> switch: a DATA packet sent again (answered even when late)


class DropReason(IntEnum):
    """Why a switch dropped a packet: the index of its ``drops`` counter (P4: DROP_*)."""

    BAD_HEADER = 0
    UNKNOWN_JOB = 1
    RANK_OUT_OF_RANGE = 2
    SLOT_OUT_OF_RANGE = 3
    UNBOUND_WORKER = 4
    DUPLICATE = 5  # the contribution is in its round already (answered WAITING if incomplete)
    STALE = 6
    NO_ROUTE = 7
    BAD_SESSION = 8
    MISMATCH = 9
    LATE = 10  # a quorum completed the round without the sender (a RESEND gets the RESULT)
    AHEAD = 11  # a new round, before every rank has the sums its row holds (register seen)


#: The ``arrivals`` value of a row whose round was refused (a count is always < MAX_WORKERS).
ROW_REFUSED = 0xFF


class WireError(ValueError):
    """A buffer is not a well-formed SwitchReduce packet."""


class Header(NamedTuple):
    """The aggregation header of one packet (immutable; ``_replace`` derives another)."""

    msg_type: int
    job_id: int
    rank: int
    slot: int
    version: int
    exponent: int
    round: int
    chunk: int
    count: int  # type: ignore[assignment]  # the protocol's name; hides tuple.count, unused
    format: int = 0
    length: int = 0
    session: int = 0

    def pack(self) -> bytes:
        return _HEADER.pack(
            self.msg_type,
            self.rank,
            self.job_id,
            (self.version << 15) | self.slot,
            self.exponent,
            self.format,
            self.round,
            self.count,
            self.chunk,
            self.length,
            self.session,
        )


def unpack_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    """Decode the header at ``offset``; raises WireError if the buffer is too short."""
    if len(buf) - offset < HEADER_BYTES:
        raise WireError(f"truncated header: {len(buf) - offset} < {HEADER_BYTES} bytes")
    (msg_type, rank, job_id, vslot, exponent, format_, round_, count, chunk, length, session) = (
        _HEADER.unpack_from(buf, offset)
    )
    return Header(
        msg_type,
        job_id,
        rank,
        vslot & 0x7FFF,
        vslot >> 15,
        exponent,
        round_,
        chunk,
        count,
        format_,
        length,
        session,
    )


def datagram_bytes(k: int) -> int:
    """Size of a UDP payload (header + K elements) for K elements per packet."""
    return HEADER_BYTES + k * ELEMENT_BYTES


def check_k(k: int) -> int:
    """Validate an elements-per-packet choice."""
    if k not in SUPPORTED_K:
        raise ValueError(f"elements per packet must be one of {SUPPORTED_K}, got {k}")
    return k


def ip_packet_bytes(k: int) -> int:
    """Size of the IPv4 packet (what an MTU limits) carrying K elements."""
    return IPV4_BYTES + UDP_BYTES + datagram_bytes(k)


def largest_k(mtu: int) -> int:
    """The largest supported K whose IPv4 packets fit an MTU of ``mtu`` bytes."""
    fitting = [k for k in SUPPORTED_K if ip_packet_bytes(k) <= mtu]
    if not fitting:
        raise ValueError(
            f"no supported K fits a {mtu}-byte MTU (K={SUPPORTED_K[0]} needs "
            f"{ip_packet_bytes(SUPPORTED_K[0])} bytes)"
        )
    return max(fitting)


def encode(header: Header, elements: np.ndarray) -> bytes:
    """Header followed by the elements as big-endian int32 (exactly K of them)."""
    return header.pack() + np.asarray(elements, dtype=ELEMENT_DTYPE).tobytes()


def decode_elements(buf: bytes | bytearray | memoryview, k: int, offset: int = 0) -> np.ndarray:
    """The K elements after the header at ``offset``, as a read-only big-endian view."""
    return np.frombuffer(buf, dtype=ELEMENT_DTYPE, count=k, offset=offset + HEADER_BYTES)


def lanes_per_word(lane_bits: int) -> int:
    return 32 // check_lanes(lane_bits)


def encode_lanes(lanes: np.ndarray, lane_bits: int, k: int) -> bytes:
    """K words holding ``lanes`` (unsigned, each < 2**lane_bits), least significant lane
    first; the lanes of words past the last element are zero."""
    per_word = lanes_per_word(lane_bits)
    padded = np.zeros(k * per_word, dtype=np.uint32)
    padded[: lanes.size] = lanes
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(lane_bits)
    words = np.bitwise_or.reduce(padded.reshape(k, per_word) << shifts, axis=1)
    return words.astype(">u4").tobytes()


def decode_lanes(
    buf: bytes | bytearray | memoryview, lane_bits: int, k: int, offset: int = 0
) -> np.ndarray:
    """The K * 32 / lane_bits lanes of the K words after the header at ``offset`` (uint32)."""
    per_word = lanes_per_word(lane_bits)
    words = np.frombuffer(buf, dtype=">u4", count=k, offset=offset + HEADER_BYTES)
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(lane_bits)
    mask = np.uint32((1 << lane_bits) - 1)
    return ((words.astype(np.uint32)[:, None] >> shifts) & mask).reshape(-1)


def scapy_layer():
    """The scapy ``Packet`` class for the header, bound to the UDP port range.

    Built on first use because importing scapy costs most of a second, which
    the data path never needs; ``rdpcap()`` of a capture then shows decoded
    headers and elements.
    """
    global _SCAPY_LAYER
    if _SCAPY_LAYER is None:
        _SCAPY_LAYER = _build_scapy_layer()
    return _SCAPY_LAYER


_SCAPY_LAYER = None


def _build_scapy_layer():
    from scapy.fields import BitField, FieldListField, SignedIntField
    from scapy.layers.inet import UDP
    from scapy.packet import Packet, bind_layers

    class SwitchReduce(Packet):
        name = "SwitchReduce"
        fields_desc = [BitField(name, 0, width) for name, width in HEADER_FIELDS] + [
            FieldListField(
                "elements",
                [],
                SignedIntField("", 0),
                length_from=lambda pkt: None,
            )
        ]

        def extract_padding(self, s):
            return b"", None

    for port in range(UDP_PORT_MIN, UDP_PORT_MAX + 1):
        bind_layers(UDP, SwitchReduce, dport=port)
        bind_layers(UDP, SwitchReduce, sport=port)
    return SwitchReduce
