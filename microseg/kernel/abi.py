"""The datapath ABI: Python's one mirror of ``bpf/microseg.h``.

Enums and struct layouts shared with the C program live here and only here;
every struct format the Python side reads or writes derives from these
layouts (microseg/kernel/records.py decodes, microseg/kernel/maps.py lists
the maps). ``tests/unit/test_abi.py`` parses the header and checks every enum
value and constant, and every layout's size and field offsets against the C
compiler's; ``tests/datapath/test_abi_layout.py`` checks the map structs BCC
compiled. A change on one side without the other fails the tests.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

ABI_VERSION = 5

MAX_RULES = 32768
CLASS_ANY = 0
IDENTITY_WORLD = 0

POLICY_SLOTS = 4
PORT_CLASS_SLOTS = POLICY_SLOTS * 2 * 65536
POLICY_CACHE_BITS = 10
POLICY_CACHE_SLOTS = 1 << POLICY_CACHE_BITS
STAGED_GENERATION = 0x80000000


def policy_slot(generation: int) -> int:
    """The slot a generation lives in, as POLICY_SLOT() in the header:
    active generations use 0 and 1, staged ones (STAGED_GENERATION set) 2
    and 3."""
    return ((generation >> 30) & 2) | (generation & 1)


# The slots staged generations live in (0 and 1 are the active ones').
STAGED_SLOTS = tuple(sorted({policy_slot(STAGED_GENERATION | n) for n in (0, 1)}))


def port_class_index(slot: int, udp: bool, port: int) -> int:
    """Index into port_class_map, as PORT_CLASS_INDEX() in the header."""
    return ((slot * 2 + int(udp)) << 16) | port


class Active(enum.IntEnum):
    """Indexes of active_map: the words a switch writes."""

    POLICY = 0
    STAGED = 1


class Direction(enum.IntEnum):
    INGRESS = 0
    EGRESS = 1


class Verdict(enum.IntEnum):
    ALLOWED = 0
    DENIED = 1
    AUDIT = 2
    DROPPED = 3


class Reason(enum.IntEnum):
    RULE = 0
    DEFAULT = 1
    REVOKED = 2
    SESSION = 3
    RELATED = 4
    FRAGMENT = 5
    NON_IP = 6
    NEIGHBOR = 7
    INVALID = 8
    STATE = 9


class State(enum.IntEnum):
    NONE = 0
    NEW = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    CLOSING = 4
    CLOSED = 5
    EXPIRED = 6

    @property
    def public(self) -> State:
        """The state users see: SYN_RECV is still "new"."""
        return State.NEW if self is State.SYN_RECV else self


class EventType(enum.IntEnum):
    VERDICT = 1
    DROP = 2
    SESSION = 3


EVENT_TYPE_SLOTS = 4  # EVENT_TYPE_MAX: event_stats_map is indexed by type


class Action(enum.IntEnum):
    NONE = 0
    ALLOW = 1
    DENY = 2


class IdentFlag(enum.IntFlag):
    AUDIT = 1


class Space(enum.IntEnum):
    """Selector kinds, each with its own class space."""

    WORKLOAD = 0
    LABELS = 1
    CIDR = 2
    ANY = 3


def combo_bit(src: Space, dst: Space) -> int:
    """Bit of the (src space, dst space) combo in ident_value's masks."""
    return 1 << (src * 4 + dst)


class ConfigFlag(enum.IntFlag):
    AUDIT = 1
    ANY_ANY = 2
    PREFIX4 = 4
    PREFIX6 = 8


class PolicyFlag(enum.IntFlag):
    EXCEPTIONS = 1


class SessionFlag(enum.IntFlag):
    ORIG_LO = 1
    FIN_ORIG = 2
    FIN_REPLY = 4
    AUDIT = 8
    PICKUP = 16
    REPLY_PICKUP = 32
    SIMOPEN = 64


class EventFlag(enum.IntFlag):
    AUDIT = 1
    # A verdict record that stands for the session its packet opened too:
    # expanded into the verdict and the session's "new" event.
    OPENED = 2
    OPENED_REPLY = 4  # ... whose originator is the packet's destination


class Ring(enum.IntEnum):
    """The ring buffers: denied verdicts and drops have their own."""

    EVENTS = 0
    DENIALS = 1


EVENT_STATS_SLOTS = len(Ring) * EVENT_TYPE_SLOTS


class Stage(enum.IntEnum):
    """Slots of stage_map: the programs the entry points tail-call."""

    REPLY = 0
    STAGED = 1


class JudgedFlag(enum.IntFlag):
    """scratch.flags: how a new flow was found, for the staged stage."""

    ALONE = 1
    REUSE = 2


def event_stats_index(ring: int, event_type: int) -> int:
    """Index into event_stats_map, as in bpf/lib/events.h."""
    return ring * EVENT_TYPE_SLOTS + event_type


class TcpFlag(enum.IntFlag):
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


def tcp_flag_names(flags: int) -> list[str]:
    """["SYN", "ACK"] for 0x12, in the order tcpdump prints them."""
    return [f.name for f in TcpFlag if flags & f.value]  # type: ignore[misc]


STATS_SLOTS = len(Direction) * len(Verdict) * len(Reason)
STAGED_STATS_SLOTS = len(Verdict) * 2


def staged_stats_index(verdict: int, differs: bool) -> int:
    """Index into staged_stats_map, as in bpf/lib/policy.h note_staged()."""
    return verdict * 2 + int(differs)


def stats_index(direction: int, verdict: int, reason: int) -> int:
    """Index into stats_map, as STATS_INDEX() in the header."""
    return (direction * len(Verdict) + verdict) * len(Reason) + reason


@dataclass(frozen=True)
class Layout:
    """A C struct as (field, struct-format) pairs; pad fields start with "_"."""

    c_name: str
    fields: tuple[tuple[str, str], ...]
    struct: struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fmt = "<" + "".join(f for _, f in self.fields)
        object.__setattr__(self, "struct", struct.Struct(fmt))

    @property
    def size(self) -> int:
        return self.struct.size

    def pack(self, **values: object) -> bytes:
        """A record from its fields by name: arrays as tuples, any field
        not given zero (for tests, tools and the daemon's own writes)."""
        unknown = set(values) - set(self.names())
        if unknown:
            raise ValueError(f"struct {self.c_name} has no field {', '.join(sorted(unknown))}")
        args: list = []
        for name, fmt in self.fields:
            if name.startswith("_"):
                continue
            count = struct.calcsize("<" + fmt) // struct.calcsize("<" + fmt.lstrip("0123456789"))
            if fmt.endswith("s"):
                args.append(values.get(name, b""))
            elif count > 1:
                args.extend(values.get(name, (0,) * count))  # type: ignore[arg-type]
            else:
                args.append(values.get(name, 0))
        return self.struct.pack(*args)

    def names(self) -> tuple[str, ...]:
        """The fields' names, padding left out."""
        return tuple(name for name, _ in self.fields if not name.startswith("_"))

    def offsets(self) -> dict[str, int]:
        """Field name -> byte offset (no implicit padding: formats are '<')."""
        out: dict[str, int] = {}
        pos = 0
        for name, fmt in self.fields:
            out[name] = pos
            pos += struct.calcsize("<" + fmt)
        return out


SESSION_KEY = Layout("session_key", (
    ("addr_lo", "16s"), ("addr_hi", "16s"), ("port_lo", "H"), ("port_hi", "H"),
    ("proto", "B"), ("family", "B"), ("_pad", "2x"),
))
SESSION_VALUE = Layout("session_value", (
    ("created_ns", "Q"), ("last_seen", "Q"), ("seen", "2Q"), ("packets", "2Q"),
    ("bytes", "2Q"), ("flags", "Q"),
    ("rule_id", "I"), ("generation", "I"), ("owner", "2I"),
    ("src_identity", "I"), ("dst_identity", "I"),
    ("state", "B"), ("verdict", "B"), ("reason", "B"), ("_pad", "5x"),
))
HOST4_KEY = Layout("host4_key", (("slot", "I"), ("addr", "4s")))
HOST6_KEY = Layout("host6_key", (("slot", "I"), ("addr", "16s")))
IDENT4_KEY = Layout("ident4_key", (("prefixlen", "I"), ("slot", "I"), ("addr", "4s")))
IDENT6_KEY = Layout("ident6_key", (("prefixlen", "I"), ("slot", "I"), ("addr", "16s")))
IDENT_VALUE = Layout("ident_value", (
    ("identity", "I"), ("cls", "3I"), ("src_combos", "H"), ("dst_combos", "H"),
    ("flags", "I"),
))
POLICY_KEY = Layout("policy_key", (
    ("slot", "I"), ("src_class", "I"), ("dst_class", "I"), ("proto", "B"), ("_pad", "x"),
    ("port_class", "H"),
))
POLICY_VALUE = Layout("policy_value", (
    ("rule_id", "I"), ("priority", "H"), ("action", "B"), ("flags", "B"),
))
POLICY_CONFIG = Layout("policy_config", (
    ("generation", "I"), ("default_action", "B"), ("flags", "B"), ("_pad", "2x"),
    ("stamp", "Q"),
))
POLICY_CACHE_ENTRY = Layout("policy_cache_entry", (
    ("saddr", "16s"), ("daddr", "16s"), ("stamp", "Q"), ("generation", "I"), ("dport", "H"),
    ("proto", "B"), ("family", "B"), ("rule_id", "I"), ("src_identity", "I"),
    ("dst_identity", "I"), ("verdict", "B"), ("reason", "B"), ("_pad", "2x"),
))
STATS_VALUE = Layout("stats_value", (("packets", "Q"), ("bytes", "Q")))
RULE_STATS = Layout("rule_stats", (("hits", "Q"), ("last_hit_ns", "Q")))
EVENT_STATS = Layout("event_stats", (("submitted", "Q"), ("lost", "Q")))
FRAG_KEY = Layout("frag_key", (
    ("saddr", "16s"), ("daddr", "16s"), ("id", "I"), ("proto", "B"), ("family", "B"),
    ("_pad", "2x"),
))
FRAG_VALUE = Layout("frag_value", (
    ("seen", "Q"), ("rule_id", "I"), ("generation", "I"), ("src_identity", "I"),
    ("dst_identity", "I"), ("received", "I"), ("total", "I"), ("verdict", "B"),
    ("reason", "B"), ("audit", "B"), ("_pad", "5x"),
))
AGG_KEY = Layout("agg_key", (
    ("saddr", "16s"), ("daddr", "16s"), ("hook", "I"), ("generation", "I"), ("dport", "H"),
    ("proto", "B"), ("family", "B"), ("verdict", "B"), ("reason", "B"), ("audit", "B"),
    ("type", "B"),
))
AGG_VALUE = Layout("agg_value", (
    ("window_start", "Q"), ("last_ns", "Q"), ("pending", "Q"), ("pending_bytes", "Q"),
    ("rule_id", "I"), ("src_identity", "I"), ("dst_identity", "I"), ("dead", "I"),
    ("sport", "H"), ("tcp_flags", "B"), ("staged_verdict", "B"), ("staged_rule", "I"),
    ("staged_generation", "I"), ("_pad", "4x"),
))
SETTINGS = Layout("settings", (("event_window_ns", "Q"), ("handover_jiffies", "Q")))
EVENT = Layout("event", (
    ("ts_ns", "Q"), ("created_ns", "Q"), ("packets", "2Q"), ("bytes", "2Q"),
    ("saddr", "16s"), ("daddr", "16s"),
    ("ifindex", "I"), ("rule_id", "I"), ("generation", "I"), ("pkt_len", "I"),
    ("src_identity", "I"), ("dst_identity", "I"),
    ("sport", "H"), ("dport", "H"),
    ("type", "B"), ("verdict", "B"), ("reason", "B"), ("direction", "B"),
    ("family", "B"), ("proto", "B"), ("tcp_flags", "B"), ("state", "B"),
    ("prev_state", "B"), ("flags", "B"), ("staged_verdict", "B"), ("_pad", "x"),
    ("staged_rule", "I"), ("staged_generation", "I"),
))

PACKET = Layout("packet", (
    ("saddr", "16s"), ("daddr", "16s"), ("sport", "H"), ("dport", "H"), ("len", "I"),
    ("segs", "I"), ("frag_id", "I"), ("frag_offset", "I"), ("frag_len", "I"),
    ("frag_more", "B"), ("family", "B"), ("proto", "B"), ("tcp_flags", "B"), ("frag", "B"),
    ("icmp", "B"), ("quote_off", "H"),
))
DECISION = Layout("decision", (
    ("rule_id", "I"), ("generation", "I"), ("src_identity", "I"), ("dst_identity", "I"),
    ("verdict", "B"), ("reason", "B"), ("audit", "B"), ("staged_verdict", "B"),
    ("staged_rule", "I"), ("staged_generation", "I"),
))
SCRATCH = Layout("scratch", (
    ("packet", f"{PACKET.size}s"), ("session", f"{SESSION_VALUE.size}s"),
    ("agg_key", f"{AGG_KEY.size}s"), ("agg", f"{AGG_VALUE.size}s"),
    ("own", f"{DECISION.size}s"), ("opened", "I"), ("direction", "I"), ("generation", "I"),
    ("flags", "I"), ("carried", "I"),
))
CLOCK_SAMPLE = Layout("clock_sample", (("jiffies", "Q"), ("ktime_ns", "Q")))
SESSION_STATS = Layout("session_stats", (("created", "Q"), ("revoked", "Q"), ("reused", "Q"),
                                         ("promoted", "Q"), ("agg_full", "Q")))
DAEMON_STATE = Layout("daemon_state", (("last_seq", "Q"), ("ringbuf_lost_seen", "Q"),
                                       ("sessions_swept", "Q")))

LAYOUTS = (
    SESSION_KEY, SESSION_VALUE, HOST4_KEY, HOST6_KEY, IDENT4_KEY, IDENT6_KEY, IDENT_VALUE,
    POLICY_KEY, POLICY_VALUE, POLICY_CONFIG, POLICY_CACHE_ENTRY, STATS_VALUE, RULE_STATS,
    EVENT_STATS, FRAG_KEY, FRAG_VALUE, AGG_KEY, AGG_VALUE, SETTINGS, EVENT, CLOCK_SAMPLE,
    SESSION_STATS, DAEMON_STATE, PACKET, DECISION, SCRATCH,
)
