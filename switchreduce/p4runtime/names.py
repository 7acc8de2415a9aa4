"""The P4 program's names, declared once: tables, actions, registers and counters.

Each is spelled as the P4Info spells it (the control's name, a dot, the
object's), so the controller addresses BMv2 and the soft switch with these,
and the soft switch's Python tables and registers are built from them. A
table is declared with its key fields and actions, an action with its
parameters (match fields and parameters are constants too, since entries
name them), both in the P4 program's order and with their bit widths, which
the soft switch models; sizes are not declared here, they are the program's
constants (the P4Info, or the soft switch's options). tests/test_p4src.py
checks every declaration against the committed P4Info.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

#: The controls that hold tables, registers and counters (the soft switch has classes so named).
INGRESS = "SwitchReduceIngress"
EGRESS = "SwitchReduceEgress"


@dataclass(frozen=True)
class FieldSpec:
    """A table's match field or an action's parameter: its P4Info name and width in bits."""

    name: str
    bitwidth: int


@dataclass(frozen=True)
class ActionSpec:
    name: str
    params: tuple[FieldSpec, ...] = ()

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


@dataclass(frozen=True)
class TableSpec:
    """An exact-match table: its key fields in match order, and the actions its entries and
    its default entry may invoke."""

    name: str
    keys: tuple[FieldSpec, ...]
    actions: tuple[ActionSpec, ...]

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys)


@dataclass(frozen=True)
class RegisterSpec:
    name: str
    bitwidth: int


# -- match fields: the header and metadata fields tables match on -------------------------

SR_JOB_ID = FieldSpec("hdr.sr.job_id", 16)
SR_RANK = FieldSpec("hdr.sr.rank", 8)
INGRESS_PORT = FieldSpec("standard_metadata.ingress_port", 9)
IPV4_SRC_ADDR = FieldSpec("hdr.ipv4.src_addr", 32)
UDP_SRC_PORT = FieldSpec("hdr.udp.src_port", 16)
ETHERNET_DST_ADDR = FieldSpec("hdr.ethernet.dst_addr", 48)
EGRESS_RID = FieldSpec("standard_metadata.egress_rid", 16)

# -- actions, each after its parameters ---------------------------------------------------

#: core.p4's action, every table's default: a miss does nothing.
NO_ACTION = ActionSpec("NoAction")

WORLD_SIZE = FieldSpec("world_size", 8)
QUORUM = FieldSpec("quorum", 8)
SLOT_BASE = FieldSpec("slot_base", 16)
SLOT_COUNT = FieldSpec("slot_count", 16)
MCAST_GRP = FieldSpec("mcast_grp", 16)
SESSION = FieldSpec("session", 64)
SET_JOB = ActionSpec(
    f"{INGRESS}.set_job", (WORLD_SIZE, QUORUM, SLOT_BASE, SLOT_COUNT, MCAST_GRP, SESSION)
)

ADMIT_WORKER = ActionSpec(f"{INGRESS}.admit_worker")

PORT = FieldSpec("port", 9)
SET_EGRESS_PORT = ActionSpec(f"{INGRESS}.set_egress_port", (PORT,))

MAC = FieldSpec("mac", 48)
IP = FieldSpec("ip", 32)
UDP_PORT = FieldSpec("udp_port", 16)
REWRITE_DESTINATION = ActionSpec(f"{EGRESS}.rewrite_destination", (MAC, IP, UDP_PORT))

# -- tables -------------------------------------------------------------------------------

#: Job id -> the job's size, quorum, slot range, multicast group and session.
JOBS = TableSpec(f"{INGRESS}.jobs", (SR_JOB_ID,), (SET_JOB, NO_ACTION))
#: Which (job, rank) may send from which port and address.
WORKERS = TableSpec(
    f"{INGRESS}.workers",
    (SR_JOB_ID, SR_RANK, INGRESS_PORT, IPV4_SRC_ADDR, UDP_SRC_PORT),
    (ADMIT_WORKER, NO_ACTION),
)
#: Plain forwarding: destination MAC -> port.
FORWARD = TableSpec(f"{INGRESS}.forward", (ETHERNET_DST_ADDR,), (SET_EGRESS_PORT, NO_ACTION))
#: Multicast replica id -> the rank's addresses, for each copy of a result.
RESULT_REWRITE = TableSpec(
    f"{EGRESS}.result_rewrite", (EGRESS_RID,), (REWRITE_DESTINATION, NO_ACTION)
)

# -- registers: per slot (slot_session) or per row, two rows (versions) a slot ------------

SLOT_SESSION = RegisterSpec(f"{INGRESS}.slot_session", 64)
ROUND = RegisterSpec(f"{INGRESS}.round", 16)
BITMAP = RegisterSpec(f"{INGRESS}.bitmap", 32)
ARRIVALS = RegisterSpec(f"{INGRESS}.arrivals", 8)
EXPONENT = RegisterSpec(f"{INGRESS}.exponent", 8)
#: K cells a row: cell row * K + i sums element i.
VALUE = RegisterSpec(f"{INGRESS}.value", 32)
ROW_FORMAT = RegisterSpec(f"{INGRESS}.row_format", 8)
ROW_LENGTH = RegisterSpec(f"{INGRESS}.row_length", 32)
#: The chunk of the tensor the row's round sums: ranks whose round counters disagree differ here.
ROW_CHUNK = RegisterSpec(f"{INGRESS}.row_chunk", 32)
#: The ranks known to have the row's sums (they sent a later round, or a RELEASE): a new round
#: may overwrite the row only once every rank has them (a rank late for a quorum may ask).
SEEN = RegisterSpec(f"{INGRESS}.seen", 32)

# -- counters -----------------------------------------------------------------------------

#: Dropped packets, indexed by wire.DropReason.
DROPS = f"{INGRESS}.drops"


class JobStat(IntEnum):
    """Per-job counters, each a counter array indexed by job id."""

    AGGREGATED = 0
    RESULTS = 1
    RETRANSMIT_REPLIES = 2

    @property
    def alias(self) -> str:
        """The counter's short name (as the P4Info's alias), which reports use."""
        return self.name.lower()

    @property
    def counter(self) -> str:
        """The counter's P4 name."""
        return f"{INGRESS}.{self.alias}"
