"""Kernel records -> events (docs/events.md).

Pure and fast: ring-buffer runs and session-map records become dicts with
names filled in — interfaces, workloads, rules of the generation that
judged them — through caches that make the common case a few dict lookups.
Events leave here with `seq` 0 in second place; the hub numbers them.

Each loop unpacks the fields it names in the tuples above it, with a
struct derived from the record's layout (microseg/kernel/records.py).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import struct
from collections.abc import Callable, Iterable

from microseg.kernel import abi
from microseg.kernel.clock import ClockSample
from microseg.kernel.records import ORIG_LO, RING_HEADER, fields_struct
from microseg.policy.compile import CompiledPolicy
from microseg.policy.model import PROTOCOL_NAMES

VERDICT_NAMES = {abi.Verdict.ALLOWED: "allowed", abi.Verdict.DENIED: "denied",
                 abi.Verdict.AUDIT: "audit", abi.Verdict.DROPPED: "dropped"}
REASON_NAMES = {r.value: r.name.lower() for r in abi.Reason}
STATE_NAMES = {abi.State.NONE: None, abi.State.NEW: "new", abi.State.SYN_RECV: "new",
               abi.State.ESTABLISHED: "established", abi.State.CLOSING: "closing",
               abi.State.CLOSED: "closed", abi.State.EXPIRED: "expired"}
DIRECTIONS = ("ingress", "egress")
FAMILIES = {4: "ipv4", 6: "ipv6"}
_ICMP = (1, 58)
_FLAG_LISTS = [abi.tcp_flag_names(i) for i in range(256)]
_TYPE_VERDICT, _TYPE_DROP, _TYPE_SESSION = (int(abi.EventType.VERDICT),
                                             int(abi.EventType.DROP),
                                             int(abi.EventType.SESSION))
_CLOSED = int(abi.State.CLOSED)
_AUDIT = int(abi.EventFlag.AUDIT)
_OPENED = int(abi.EventFlag.OPENED)
_OPENED_REPLY = int(abi.EventFlag.OPENED_REPLY)
# Byte-indexed tables for the hot loop (a u8 field indexes them directly).
_STATES = tuple(STATE_NAMES.get(i) for i in range(256))
_VERDICTS = tuple(VERDICT_NAMES.get(i) for i in range(256))
_REASONS = tuple(REASON_NAMES.get(i) for i in range(256))
_DIRS = tuple(DIRECTIONS[i] if i < 2 else None for i in range(256))
_FAMS = tuple(FAMILIES.get(i) for i in range(256))
_PROTOS = tuple(PROTOCOL_NAMES.get(i, i) for i in range(256))
_MICROS = tuple(f"{i:03d}Z" for i in range(1000))  # an event time's last digits

# What Enricher.events() unpacks from each ring-buffer record, in this order:
# the fields that differ between the records of one flow (its time and
# counters), then the rest as two blobs, "head" and "tail" (pkt_len, which
# no event shows, between them). A batch's records with the same blobs make
# the same event but for time and counters: the blobs are the key of its
# templates (Enricher.events), and unpacked only for the first of them.
EVENT_VARYING = ("ts_ns", "created_ns", "packets", "bytes")
EVENT_HEAD = ("saddr", "daddr", "ifindex", "rule_id", "generation")
EVENT_TAIL = ("src_identity", "dst_identity", "sport", "dport", "type", "verdict", "reason",
              "direction", "family", "proto", "tcp_flags", "state", "prev_state", "flags",
              "staged_verdict", "staged_rule", "staged_generation")


def _split_event() -> tuple[struct.Struct, struct.Struct, struct.Struct]:
    """Structs for a ring record's varying fields and blobs, and for each
    blob's fields; a layout these do not fit fails at import."""
    names = [name for name, _ in abi.EVENT.fields]
    h0, h1 = names.index(EVENT_HEAD[0]), names.index(EVENT_HEAD[-1]) + 1
    t0 = names.index(EVENT_TAIL[0])
    if tuple(names[:h0]) != EVENT_VARYING or names[h1:t0] != ["pkt_len"]:
        raise ValueError("struct event: the varying fields, the head, pkt_len and the tail "
                         "are no longer in that order")
    head = abi.Layout("event_head", abi.EVENT.fields[h0:h1])
    tail = abi.Layout("event_tail", abi.EVENT.fields[t0:])
    split = abi.Layout("event_split", (*abi.EVENT.fields[:h0], ("head", f"{head.size}s"),
                                       *abi.EVENT.fields[h1:t0], ("tail", f"{tail.size}s")))
    assert split.size == abi.EVENT.size
    return (fields_struct(split, (*EVENT_VARYING, "head", "tail"), skip=RING_HEADER),
            fields_struct(head, EVENT_HEAD), fields_struct(tail, EVENT_TAIL))


_EVENT, _EVENT_HEAD, _EVENT_TAIL = _split_event()
# What expired() and session_rows() unpack from session_map entries.
SESSION_KEY_FIELDS = ("addr_lo", "addr_hi", "port_lo", "port_hi", "proto", "family")
SESSION_VALUE_FIELDS = ("created_ns", "last_seen", "packets", "bytes", "flags", "rule_id",
                        "generation", "owner", "src_identity", "dst_identity", "state",
                        "verdict")
_SESSION_KEY = fields_struct(abi.SESSION_KEY, SESSION_KEY_FIELDS)
_SESSION_VALUE = fields_struct(abi.SESSION_VALUE, SESSION_VALUE_FIELDS)


def protocol_name(proto: int) -> str | int:
    return PROTOCOL_NAMES.get(proto, proto)


class TimeFormatter:
    """CLOCK_MONOTONIC ns -> RFC 3339 UTC with microseconds; the date part
    is formatted once per second."""

    def __init__(self, wall_offset_ns: int) -> None:
        self.offset = wall_offset_ns
        # The last second formatted and its text: hot loops read them to
        # format in place (a call per event costs as much as the event).
        self.second = -1
        self.prefix = ""

    def __call__(self, mono_ns: int) -> str:
        unix_us = (mono_ns + self.offset) // 1000
        sec, us = divmod(unix_us, 1_000_000)
        if sec != self.second:
            self.second = sec
            self.prefix = dt.datetime.fromtimestamp(sec, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self.prefix}.{us:06d}Z"


class Names:
    """Names for what kernel records carry as numbers."""

    def __init__(self, compiled_for: Callable[[int], CompiledPolicy | None],
                 interface_name: Callable[[int], str | None],
                 current: Callable[[], CompiledPolicy | None] = lambda: None) -> None:
        # generation -> its compiled policy (None: unknown generation)
        self.compiled_for = compiled_for
        self._current = current
        self._interface_name = interface_name
        self._ip: dict[bytes, str] = {}
        self._ip_workload: dict[tuple[int, int, bytes], str | None] = {}
        # ifindex -> name, filled by interface(): hot loops read it directly.
        self.interfaces: dict[int, str | None] = {}

    def ip(self, family: int, raw: bytes) -> str:
        # Keyed by the address's own bytes: 10.0.0.1 and a00:1:: share the
        # 16-byte field, not the key.
        key = raw[:4] if family == 4 else raw
        s = self._ip.get(key)
        if s is None:
            s = str(ipaddress.IPv4Address(key) if family == 4 else ipaddress.IPv6Address(raw))
            if len(self._ip) > 200_000:
                self._ip.clear()
            self._ip[key] = s
        return s

    def interface(self, ifindex: int) -> str | None:
        try:
            return self.interfaces[ifindex]
        except KeyError:
            name = self.interfaces[ifindex] = self._interface_name(ifindex)
            return name

    def forget_interfaces(self) -> None:
        self.interfaces.clear()

    def workload(self, generation: int, identity: int, family: int, raw: bytes) -> str | None:
        compiled = self.compiled_for(generation)
        if compiled is None:
            # A generation we cannot name (an earlier daemon's): its identity
            # numbers mean nothing here, but addresses do, in today's policy.
            compiled, identity = self._current(), 0
            if compiled is None:
                return None
        if identity:
            return compiled.workload_of_identity.get(identity)
        # No identity in the record (a drop before the policy lookup, or an
        # address no prefix covers): find it by address, cached per policy.
        key = (compiled.serial, family, raw)
        try:
            return self._ip_workload[key]
        except KeyError:
            pass
        from microseg.policy.compile import lookup_identity

        e = lookup_identity(compiled, self.ip(family, raw))
        name = e.workload if e is not None else None
        if len(self._ip_workload) > 100_000:
            self._ip_workload.clear()
        self._ip_workload[key] = name
        return name

    def rule(self, generation: int, rule_id: int) -> str | None:
        if not rule_id:
            return None
        compiled = self.compiled_for(generation)
        return compiled.rule_names.get(rule_id) if compiled else None


class Enricher:
    """Raw ring-buffer tuples (records.EVENT_IN_RING's field order) -> dicts.

    Published events are never modified, so the parts many events share —
    an endpoint `{ip, port, workload}`, a generation's name tables — are
    built once and shared (a flood of one flow costs one endpoint dict)."""

    _ENDPOINT_CACHE = 65536

    def __init__(self, names: Names, time_format: TimeFormatter,
                 active_generation: Callable[[], int]) -> None:
        self.names = names
        self.time = time_format
        self.active_generation = active_generation
        self._endpoints: dict[tuple, dict] = {}

    def _endpoint(self, gen: int, family: int, raw: bytes, port: int | None,
                  identity: int) -> dict:
        key = (gen, family, raw, port, identity)
        ep = self._endpoints.get(key)
        if ep is None:
            if len(self._endpoints) >= self._ENDPOINT_CACHE:
                self._endpoints.clear()
            n = self.names
            ep = self._endpoints[key] = {"ip": n.ip(family, raw), "port": port,
                                         "workload": n.workload(gen, identity, family, raw)}
        return ep

    def events(self, runs: Iterable[bytes]) -> list[dict]:
        """Ring-buffer runs (records with their headers, back to back) as
        events, in order."""
        # The hot loop of the pipeline: everything it calls per event is
        # inlined into local lookups (a method call costs as much as a
        # dict built).
        n = self.names
        endpoints = self._endpoints
        new_endpoint = self._endpoint
        tf = self.time
        offset, last_sec, prefix = tf.offset, tf.second, tf.prefix
        last_us = last_ms = -1
        ms_prefix = when = ""
        ifnames = n.interfaces
        compiled_for = n.compiled_for
        rule_gen, rule_names = -1, {}
        active = None
        # A verdict or drop event, by its record's blobs: the next records
        # with the same blobs (a flow's packets, a flood) are this event but
        # for time and counters — a dict copy, not a decode and naming of
        # every field. Kept for this call only: names may change between
        # batches (a policy, a link), never during one.
        templates: dict[tuple[bytes, bytes], dict] = {}
        template = templates.get
        head_of, tail_of = _EVENT_HEAD.unpack, _EVENT_TAIL.unpack
        unpack = _EVENT.iter_unpack
        out = []
        append = out.append
        for run in runs:
            for ts, created, p0, p1, b0, b1, head, tail in unpack(run):
                us = (ts + offset) // 1000
                if us != last_us:  # a flood has several records per microsecond
                    last_us = us
                    ms = us // 1000
                    if ms != last_ms:
                        last_ms = ms
                        sec = ms // 1000
                        if sec != last_sec:
                            tf(ts)  # formats and caches the new second
                            last_sec, prefix = tf.second, tf.prefix
                        ms_prefix = f"{prefix}.{ms - sec * 1000:03d}"
                    # A concatenation: a third of what formatting costs.
                    when = ms_prefix + _MICROS[us - ms * 1000]
                key = (head, tail)
                event = template(key)
                if event is not None:
                    # Templates are this call's own events: not numbered
                    # yet (seq 0), and the same keys in the same order.
                    event = event.copy()
                    event["time"] = when
                    event["bytes"] = b0
                    event["count"] = p0
                    append(event)
                    continue
                saddr, daddr, ifindex, rule_id, gen = head_of(head)
                (sid, did, sport, dport, etype, verdict, reason, direction, family, proto,
                 tcp_flags, state, prev_state, eflags, staged, staged_rule,
                 staged_gen) = tail_of(tail)
                if not gen:
                    if active is None:
                        active = self.active_generation()
                    gen = active
                if proto in _ICMP:
                    sport = dport = None
                src = endpoints.get((gen, family, saddr, sport, sid)) \
                    or new_endpoint(gen, family, saddr, sport, sid)
                dst = endpoints.get((gen, family, daddr, dport, did)) \
                    or new_endpoint(gen, family, daddr, dport, did)
                if rule_id:
                    if gen != rule_gen:
                        compiled = compiled_for(gen)
                        rule_gen, rule_names = gen, compiled.rule_names if compiled else {}
                    rule = rule_names.get(rule_id)
                else:
                    rule = None
                iface = ifnames.get(ifindex) if ifindex in ifnames else n.interface(ifindex)
                if etype == _TYPE_SESSION:
                    final = state == _CLOSED
                    append({"time": when, "seq": 0, "type": "session", "state": _STATES[state],
                            "prev_state": _STATES[prev_state], "rule": rule,
                            "policy_generation": gen, "direction": _DIRS[direction],
                            "interface": iface, "family": _FAMS[family],
                            "protocol": _PROTOS[proto], "src": src, "dst": dst,
                            "packets": {"orig": p0, "reply": p1} if final else None,
                            "bytes": {"orig": b0, "reply": b1} if final else None,
                            "duration_s": round((ts - created) / 1e9, 6) if final else None})
                elif etype == _TYPE_DROP:
                    event = templates[key] = {
                        "time": when, "seq": 0, "type": "drop",
                        "verdict": _VERDICTS[verdict], "reason": _REASONS[reason],
                        "rule": rule, "policy_generation": gen,
                        "direction": _DIRS[direction], "interface": iface,
                        "family": _FAMS[family], "protocol": _PROTOS[proto],
                        "src": src, "dst": dst,
                        "tcp_flags": _FLAG_LISTS[tcp_flags] if proto == 6 else [],
                        "bytes": b0, "count": p0, "audit": eflags & _AUDIT == _AUDIT}
                    append(event)
                else:
                    event = {"time": when, "seq": 0, "type": "verdict",
                             "verdict": _VERDICTS[verdict], "reason": _REASONS[reason],
                             "rule": rule, "policy_generation": gen,
                             "direction": _DIRS[direction], "interface": iface,
                             "family": _FAMS[family], "protocol": _PROTOS[proto],
                             "src": src, "dst": dst,
                             "tcp_flags": _FLAG_LISTS[tcp_flags] if proto == 6 else [],
                             "bytes": b0, "count": p0, "staged": None}
                    # Judged by a staged candidate too, which would decide
                    # otherwise (docs/events.md): what it would say.
                    if staged and staged - 1 != verdict:
                        event["staged"] = self._staged(staged - 1, staged_rule, staged_gen)
                    append(event)
                    if eflags & _OPENED:
                        # The record stands for the session the packet
                        # opened too: its "new" event, as records.py's
                        # opened_session() decodes it.
                        append(self._opened(event, eflags, state, p0, b0))
                    else:
                        templates[key] = event
        return out

    def _opened(self, verdict: dict, eflags: int, state: int, count: int,
                nbytes: int) -> dict:
        """The "new" session event of a verdict record flagged OPENED: the
        verdict's fields, endpoints in the session's original direction."""
        gen = verdict["policy_generation"]
        if eflags & _OPENED_REPLY:  # the packet's ends (and identities), turned round
            src, dst = verdict["dst"], verdict["src"]
            p, b = (0, count), (0, nbytes)
        else:
            src, dst = verdict["src"], verdict["dst"]
            p, b = (count, 0), (nbytes, 0)
        final = state == _CLOSED  # never for a new session; as session records
        return {"time": verdict["time"], "seq": 0, "type": "session", "state": _STATES[state],
                "prev_state": None, "rule": verdict["rule"], "policy_generation": gen,
                "direction": verdict["direction"], "interface": verdict["interface"],
                "family": verdict["family"], "protocol": verdict["protocol"],
                "src": src, "dst": dst,
                "packets": {"orig": p[0], "reply": p[1]} if final else None,
                "bytes": {"orig": b[0], "reply": b[1]} if final else None,
                "duration_s": 0.0 if final else None}

    def _staged(self, verdict: int, rule_id: int, generation: int) -> dict:
        rule = None
        if rule_id:
            compiled = self.names.compiled_for(generation)
            rule = compiled.rule_names.get(rule_id) if compiled else None
        return {"verdict": _VERDICTS[verdict], "rule": rule}

    def expired(self, records: Iterable[tuple[bytes, bytes]], now_mono_ns: int,
                interface_of: Callable[[int], str | None]) -> list[dict]:
        """Sessions the sweeper removed — raw (key, value) records of
        session_map — as their `expired` events. interface_of(ifindex)."""
        names = self.names
        endpoints = self._endpoints
        new_endpoint = self._endpoint
        when = self.time(now_mono_ns)
        rule_gen, rule_names = -1, {}
        ifnames: dict[int, str | None] = {}
        key_of, value_of = _SESSION_KEY.unpack, _SESSION_VALUE.unpack
        out = []
        append = out.append
        for key, value in records:
            addr_lo, addr_hi, port_lo, port_hi, proto, family = key_of(key)
            (created, _, p0, p1, b0, b1, flags, rule_id, gen, owner, _, sid, did, state,
             _) = value_of(value)
            if flags & ORIG_LO:
                src, sport, dst, dport = addr_lo, port_lo, addr_hi, port_hi
            else:
                src, sport, dst, dport = addr_hi, port_hi, addr_lo, port_lo
            if proto in _ICMP:
                sport = dport = None
            if rule_id:
                if gen != rule_gen:
                    compiled = names.compiled_for(gen)
                    rule_gen, rule_names = gen, compiled.rule_names if compiled else {}
                rule = rule_names.get(rule_id)
            else:
                rule = None
            ifindex = owner >> 1
            if ifindex in ifnames:
                iface = ifnames[ifindex]
            else:
                iface = ifnames[ifindex] = interface_of(ifindex)
            append({"time": when, "seq": 0, "type": "session", "state": "expired",
                    "prev_state": _STATES[state], "rule": rule, "policy_generation": gen,
                    "direction": None, "interface": iface, "family": _FAMS[family],
                    "protocol": _PROTOS[proto],
                    "src": endpoints.get((gen, family, src, sport, sid))
                    or new_endpoint(gen, family, src, sport, sid),
                    "dst": endpoints.get((gen, family, dst, dport, did))
                    or new_endpoint(gen, family, dst, dport, did),
                    "packets": {"orig": p0, "reply": p1}, "bytes": {"orig": b0, "reply": b1},
                    "duration_s": round((now_mono_ns - created) / 1e9, 6)})
        return out


def session_rows(keys: bytes, values: bytes, names: Names, ref: ClockSample,
                 hz: float, timeout_of: Callable[[int, int], float],
                 interface_of: Callable[[int], str | None], *,
                 replied: bool = True) -> list[dict]:
    """Session table entries — the flat key and value buffers of a batch
    lookup — as `sessions` rows (conntrack -L, as JSON). replied: the
    entries have seen both directions (session_map, not pending_map).
    timeout_of(proto, state) in seconds."""
    now_j, now_ns = ref.jiffies, ref.ktime_ns
    ip, workload, rule_of = names.ip, names.workload, names.rule
    ifnames: dict[int, str | None] = {}
    timeouts: dict[tuple[int, int], float] = {}
    out = []
    append = out.append
    for ((addr_lo, addr_hi, port_lo, port_hi, proto, family),
         (created, last_seen, p0, p1, b0, b1, flags, rule_id, gen, owner, _, sid, did,
          state, verdict)) in zip(_SESSION_KEY.iter_unpack(keys),
                                         _SESSION_VALUE.iter_unpack(values), strict=True):
        if flags & ORIG_LO:
            src, sport, dst, dport = addr_lo, port_lo, addr_hi, port_hi
        else:
            src, sport, dst, dport = addr_hi, port_hi, addr_lo, port_lo
        if proto in _ICMP:
            sport = dport = None
        ifindex = owner >> 1
        if ifindex in ifnames:
            iface = ifnames[ifindex]
        else:
            iface = ifnames[ifindex] = interface_of(ifindex)
        try:
            timeout = timeouts[proto, state]
        except KeyError:
            timeout = timeouts[proto, state] = timeout_of(proto, state)
        idle_s = max(0.0, (now_j - last_seen) / hz)
        append({
            "family": _FAMS[family], "protocol": _PROTOS[proto], "state": _STATES[state],
            "src": {"ip": ip(family, src), "port": sport,
                    "workload": workload(gen, sid, family, src)},
            "dst": {"ip": ip(family, dst), "port": dport,
                    "workload": workload(gen, did, family, dst)},
            "packets": {"orig": p0, "reply": p1}, "bytes": {"orig": b0, "reply": b1},
            "age_s": round(max(0, now_ns - created) / 1e9, 3),
            "idle_s": round(idle_s, 3),
            "expires_in_s": round(max(0.0, timeout - idle_s), 3),
            "rule": rule_of(gen, rule_id) if rule_id else None,
            "verdict": _VERDICTS[verdict],
            "policy_generation": gen,
            "interface": iface,
            "replied": replied,
        })
    return out
