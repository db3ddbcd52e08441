"""Decode kernel records — ring-buffer events and session-map entries.

One decoder per record, and every struct format derived from the layouts in
microseg/kernel/abi.py (the mirror of bpf/microseg.h): `fields_struct()`
picks the named fields of a record and skips the rest, so a consumer's hot
loop unpacks plain tuples in an order it declares by name next to the loop.
A field moved or renamed in the layout fails at import, never shifts every
value after it. Pure functions over bytes; no kernel needed.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from microseg.kernel import abi

RING_HEADER = 8  # u32 len (busy, discard bits) + u32 pg_off before each record


def fields_struct(layout: abi.Layout, names: Sequence[str], *, skip: int = 0) -> struct.Struct:
    """A struct that unpacks only `names` of a `layout` record, in that order.

    The names must follow the layout's order (a struct cannot reorder); an
    array field gives one value per element; every other byte is skipped,
    `skip` bytes before the record too (a ring-buffer record header).
    """
    order = {name: i for i, (name, _) in enumerate(layout.fields)}
    missing = [n for n in names if n not in order]
    if missing:
        raise ValueError(f"struct {layout.c_name} has no field {', '.join(missing)}")
    positions = [order[n] for n in names]
    if positions != sorted(set(positions)):
        raise ValueError(f"fields of struct {layout.c_name} must be named once, in the "
                         f"struct's order: {', '.join(names)}")
    wanted = set(names)
    fmt = "<" + (f"{skip}x" if skip else "")
    for name, f in layout.fields:
        fmt += f if name in wanted else f"{struct.calcsize('<' + f)}x"
    return struct.Struct(fmt)


def ip_text(family: int, raw: bytes) -> str:
    """Text form of a 16-byte address field (IPv4 in its first 4 bytes)."""
    if family == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def addr16(ip: str) -> bytes:
    """A 16-byte address field: IPv4 in the first 4 bytes, then zeros."""
    packed = ipaddress.ip_address(ip).packed
    return packed + bytes(16 - len(packed))


# -- struct event ---------------------------------------------------------------

EVENT_FIELDS = abi.EVENT.names()
# Every field of every record of a ring-buffer run (records with their header).
EVENT_IN_RING = fields_struct(abi.EVENT, EVENT_FIELDS, skip=RING_HEADER)


class RawEvent(NamedTuple):
    """struct event, field for field (arrays as tuples): for tests and tools;
    the daemon's pipeline unpacks plain tuples (microseg/flow/enrich.py)."""

    ts_ns: int
    created_ns: int
    packets: tuple[int, int]
    bytes: tuple[int, int]
    saddr: bytes
    daddr: bytes
    ifindex: int
    rule_id: int
    generation: int
    pkt_len: int
    src_identity: int
    dst_identity: int
    sport: int
    dport: int
    type: int
    verdict: int
    reason: int
    direction: int
    family: int
    proto: int
    tcp_flags: int
    state: int
    prev_state: int
    flags: int
    staged_verdict: int
    staged_rule: int
    staged_generation: int

    @property
    def count(self) -> int:
        """Verdict and drop events: the packets the event stands for."""
        return self.packets[0]

    @property
    def src_ip(self) -> str:
        return ip_text(self.family, self.saddr)

    @property
    def dst_ip(self) -> str:
        return ip_text(self.family, self.daddr)


def _grouped(layout: abi.Layout, flat: Sequence) -> list:
    """A flat unpack of every field, arrays gathered into tuples."""
    out, i = [], 0
    for name, f in layout.fields:
        if name.startswith("_"):
            continue
        n = len(struct.unpack("<" + f, bytes(struct.calcsize("<" + f))))
        out.append(tuple(flat[i:i + n]) if n > 1 else flat[i])
        i += n
    return out


assert RawEvent._fields == EVENT_FIELDS, "RawEvent must follow struct event"



_OPENED = int(abi.EventFlag.OPENED)
_OPENED_REPLY = int(abi.EventFlag.OPENED_REPLY)


def opened_session(e: RawEvent) -> tuple[RawEvent, RawEvent]:
    """A verdict record flagged OPENED as the two events it stands for: the
    verdict, then the "new" event of the session its packet opened — each
    as the datapath wrote it when they were two records (bpf/lib/verdict.h).
    The session's endpoints are in its original direction; its counters are
    the packet's, on its side."""
    verdict = e._replace(flags=e.flags & ~(_OPENED | _OPENED_REPLY), state=0)
    n, b = e.packets[0], e.bytes[0]
    if e.flags & _OPENED_REPLY:
        ends = {"saddr": e.daddr, "daddr": e.saddr, "sport": e.dport, "dport": e.sport,
                "src_identity": e.dst_identity, "dst_identity": e.src_identity}
        packets, nbytes = (0, n), (0, b)
    else:
        ends, packets, nbytes = {}, (n, 0), (b, 0)
    session = e._replace(type=int(abi.EventType.SESSION), created_ns=e.ts_ns,
                         packets=packets, bytes=nbytes, flags=0, prev_state=0,
                         staged_verdict=0, staged_rule=0, staged_generation=0, **ends)
    return verdict, session


def decode_events(runs: Iterable[bytes]) -> Iterator[RawEvent]:
    """Events from ring-buffer runs (records with headers, back to back); a
    record that stands for two events gives both."""
    for run in runs:
        for t in EVENT_IN_RING.iter_unpack(run):
            e = RawEvent(*_grouped(abi.EVENT, t))
            if e.flags & _OPENED:
                yield from opened_session(e)
            else:
                yield e


def decode_event(record: bytes) -> RawEvent:
    """One bare struct event (no ring header), as the datapath wrote it."""
    return RawEvent(*_grouped(abi.EVENT, abi.EVENT.struct.unpack(record)))


# -- session_map entries ------------------------------------------------------

class SessionEntry(NamedTuple):
    """A session_map entry, oriented: src is the original direction's source."""

    family: int
    proto: int
    src: bytes
    sport: int
    dst: bytes
    dport: int
    created_ns: int           # CLOCK_MONOTONIC
    last_seen: int            # jiffies (see microseg.kernel.clock.SessionClock)
    seen: tuple[int, int]     # jiffies, per direction, at its owner hook
    packets: tuple[int, int]  # original, reply
    bytes: tuple[int, int]
    flags: int
    rule_id: int
    generation: int
    owner: tuple[int, int]
    src_identity: int
    dst_identity: int
    state: int
    verdict: int
    reason: int

    @property
    def src_ip(self) -> str:
        return ip_text(self.family, self.src)

    @property
    def dst_ip(self) -> str:
        return ip_text(self.family, self.dst)


assert SessionEntry._fields[6:] == abi.SESSION_VALUE.names(), \
    "SessionEntry must follow struct session_value"

ORIG_LO = int(abi.SessionFlag.ORIG_LO)  # a plain int: enum & costs a microsecond


def decode_session(key: bytes, value: bytes) -> SessionEntry:
    """One entry, oriented by its ORIG_LO flag."""
    k = _grouped(abi.SESSION_KEY, abi.SESSION_KEY.struct.unpack(key))
    v = _grouped(abi.SESSION_VALUE, abi.SESSION_VALUE.struct.unpack(value))
    addr_lo, addr_hi, port_lo, port_hi, proto, family = k
    fields = dict(zip(abi.SESSION_VALUE.names(), v, strict=True))
    if fields["flags"] & ORIG_LO:
        src, sport, dst, dport = addr_lo, port_lo, addr_hi, port_hi
    else:
        src, sport, dst, dport = addr_hi, port_hi, addr_lo, port_lo
    return SessionEntry(family, proto, src, sport, dst, dport, **fields)


def decode_sessions(batches: Iterable[tuple[bytes, bytes, int]]) -> Iterator[SessionEntry]:
    """Sessions from (keys, values, count) flat buffers of a batch lookup."""
    ks, vs = abi.SESSION_KEY.size, abi.SESSION_VALUE.size
    for keys, values, count in batches:
        for i in range(count):
            yield decode_session(keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs])


# Only the fields a sweep needs, straight from batch buffers.
SESSION_KEY_PROTO = fields_struct(abi.SESSION_KEY, ("proto",))
SESSION_VALUE_IDLE = fields_struct(abi.SESSION_VALUE, ("last_seen", "state"))
_PROTO_AT = abi.SESSION_KEY.offsets()["proto"]
_STATE_AT = abi.SESSION_VALUE.offsets()["state"]
_PUBLIC_STATE = tuple(abi.State(s).public.value if s in abi.State._value2member_map_ else s
                      for s in range(256))


def session_census(batches: Iterable[tuple[bytes, bytes, int]]) -> dict[tuple[int, int], int]:
    """(protocol, public state) -> sessions. Strided slices of the batch
    buffers pick the two bytes out in C: a million entries in ~0.1 s."""
    raw: Counter[tuple[int, int]] = Counter()
    ks, vs = abi.SESSION_KEY.size, abi.SESSION_VALUE.size
    for keys, values, _ in batches:
        raw.update(zip(keys[_PROTO_AT::ks], values[_STATE_AT::vs], strict=True))
    out: dict[tuple[int, int], int] = {}
    for (proto, state), n in raw.items():
        key = (proto, _PUBLIC_STATE[state])
        out[key] = out.get(key, 0) + n
    return out


_U64X2 = struct.Struct("<QQ")


def session_key(family: int, proto: int, saddr: bytes, daddr: bytes, sport: int,
                dport: int) -> bytes:
    """The canonical session_map key of a flow, as make_session_key() builds
    it in bpf/lib/session.h (addresses as 16-byte fields, compared as two
    little-endian u64 words, then ports)."""
    lo = (*_U64X2.unpack(saddr), sport) <= (*_U64X2.unpack(daddr), dport)
    a, b, pa, pb = (saddr, daddr, sport, dport) if lo else (daddr, saddr, dport, sport)
    return abi.SESSION_KEY.struct.pack(a, b, pa, pb, proto, family)
