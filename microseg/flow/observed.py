"""The flows observed: a bounded aggregate of `verdict` events (docs/events.md)
that `policy suggest` learns a policy from and `policy diff` replays.

A flow is (source, destination, protocol, destination port): each side is its
workload's name, or its address when no workload owns it; the port only for
tcp and udp (ICMP has none, and other protocols are one flow per pair). One
record per flow, in the shape GET /v1/flows serves:

    {"src": {"workload": str|null, "ip": str}, "dst": {...},
     "protocol": "tcp"|"udp"|"icmp"|"icmpv6"|int, "port": int|null,
     "sessions": int, "first_seen": RFC3339, "last_seen": RFC3339,
     "verdicts": {"allowed": n, "audit": n, "denied": n},
     "rules": {"<rule>" | "(default)" | "(unknown)": n}}

`ip` is the address seen last on that side. `sessions` counts what the flow
stood for: each allowed or audited verdict is a session, a denied one counts
its `count` attempts (denials are aggregated per window). `rules` says what
decided them: a rule, the policy's default, or "(unknown)" for events judged
under a generation the daemon could not name (docs/events.md, "Events judged
by an earlier daemon"). Revocations (reason `revoked`) and drops are not flows:
a revocation re-judges a session already counted, a drop is not the policy's.

Eviction: the aggregate holds at most `capacity` flows. When a new flow finds
it full, a batch of capacity/16 flows with the MOST sessions is evicted (ties:
the oldest first) and counted. Frequent flows recur and are learned again at
once; the rare ones — a nightly backup, a failover path — are exactly the ones
a policy written from a short memory would forget, so they are kept.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Iterable, Iterator

from microseg.policy.model import PROTOCOL_NAMES, PROTOCOLS

DEFAULT_CAPACITY = 1 << 16
EVICT_SHARE = 16  # a full aggregate evicts capacity // EVICT_SHARE flows at once
VERDICTS = ("allowed", "audit", "denied")
_PORTED = ("tcp", "udp")
_NAMED = frozenset(("tcp", "udp", "icmp", "icmpv6"))
DEFAULT_RULE = "(default)"
UNKNOWN_RULE = "(unknown)"

# A record in memory: a list, indexed by these (cheaper than attributes).
_SESSIONS, _ALLOWED, _AUDIT, _DENIED, _FIRST, _LAST, _SIP, _DIP, _RULES = range(9)
_COUNT_AT = {"allowed": _ALLOWED, "audit": _AUDIT, "denied": _DENIED}

# (src workload, src ip if no workload, dst workload, dst ip if no workload,
#  protocol, port): a name and an address never collide even when a workload
#  is named like an address (`10.0.0.1` is a valid name).
Key = tuple[str | None, str | None, str | None, str | None, str | int, int | None]


class FlowAggregate:
    """Observed flows, bounded; `add` is on the daemon's event path."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.evicted = 0           # flows evicted
        self.evicted_sessions = 0  # the sessions they stood for
        self._flows: dict[Key, list] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def add(self, e: dict) -> None:
        """Count one event; anything but a `verdict` judged by a rule or the
        default is ignored. The event is trusted (the daemon's own, or one
        `check_event` passed)."""
        if e["type"] == "verdict":
            t = e["time"]
            self._add_run((e["src"], e["dst"], e["protocol"], e["verdict"], e["rule"],
                           e["reason"]), e["count"], t, t)

    def add_many(self, events: Iterable[dict]) -> None:
        """`add` each event, in order: the daemon's batches. A run of
        verdicts alike but for time and count (a flow's packets, a flood)
        is counted at once, as add() would count each in turn: nothing else
        is counted, nor evicted, in between. Cheap to compare: the
        enricher's events share their strings and endpoint dicts."""
        run = None
        n = 0
        first = last = ""
        for e in events:
            if e["type"] != "verdict":
                continue
            t = e["time"]
            alike = (e["src"], e["dst"], e["protocol"], e["verdict"], e["rule"], e["reason"])
            if alike == run:
                n += e["count"]
                if t > last:
                    last = t
                elif t < first:
                    first = t
                continue
            if run is not None:
                self._add_run(run, n, first, last)
            run, n, first, last = alike, e["count"], t, t
        if run is not None:
            self._add_run(run, n, first, last)

    def _add_run(self, alike: tuple, n: int, first: str, last: str) -> None:
        """n events of (src, dst, protocol, verdict, rule, reason) seen from
        `first` to `last` (a record's first_seen <= last_seen: each bound
        moves on its own)."""
        src, dst, proto, verdict, rule, reason = alike
        if reason == "revoked":
            return
        sw = src["workload"]
        dw = dst["workload"]
        key = (sw, src["ip"] if sw is None else None, dw, dst["ip"] if dw is None else None,
               proto, dst["port"] if proto == "tcp" or proto == "udp" else None)
        rec = self._flows.get(key)
        if rec is None:
            if len(self._flows) >= self.capacity:
                self._evict()
            rec = self._flows[key] = [0, 0, 0, 0, first, last, src["ip"], dst["ip"], {}]
        else:
            if last > rec[_LAST]:  # RFC 3339 of one format: text order is time order
                rec[_LAST] = last
                rec[_SIP] = src["ip"]
                rec[_DIP] = dst["ip"]
            if first < rec[_FIRST]:
                rec[_FIRST] = first
        rec[_SESSIONS] += n
        rec[_COUNT_AT[verdict]] += n
        if rule is None:
            rule = DEFAULT_RULE if reason == "default" else UNKNOWN_RULE
        rules = rec[_RULES]
        rules[rule] = rules.get(rule, 0) + n

    def _evict(self) -> None:
        batch = max(1, self.capacity // EVICT_SHARE)
        # nlargest is stable: among equal counts the flows inserted first go.
        for key, rec in heapq.nlargest(batch, self._flows.items(), key=_by_sessions):
            del self._flows[key]
            self.evicted += 1
            self.evicted_sessions += rec[_SESSIONS]

    def stats(self) -> dict:
        return {"flows": len(self._flows), "capacity": self.capacity, "evicted": self.evicted,
                "evicted_sessions": self.evicted_sessions}

    def records(self) -> Iterator[dict]:
        """Every flow as its record, in the order first seen. A snapshot:
        adding while a consumer iterates is safe."""
        for (sw, sip, dw, dip, proto, port), rec in list(self._flows.items()):
            yield {"src": {"workload": sw, "ip": rec[_SIP] if sip is None else sip},
                   "dst": {"workload": dw, "ip": rec[_DIP] if dip is None else dip},
                   "protocol": proto, "port": port, "sessions": rec[_SESSIONS],
                   "first_seen": rec[_FIRST], "last_seen": rec[_LAST],
                   "verdicts": {"allowed": rec[_ALLOWED], "audit": rec[_AUDIT],
                                "denied": rec[_DENIED]},
                   "rules": dict(sorted(rec[_RULES].items()))}

    def add_record(self, r: dict) -> None:
        """Merge one record (checked by `check_record`) into the aggregate."""
        src, dst = r["src"], r["dst"]
        sw, dw = src["workload"], dst["workload"]
        key = (sw, src["ip"] if sw is None else None, dw, dst["ip"] if dw is None else None,
               r["protocol"], r["port"])
        v = r["verdicts"]
        rec = self._flows.get(key)
        if rec is None:
            if len(self._flows) >= self.capacity:
                self._evict()
            rec = self._flows[key] = [0, 0, 0, 0, r["first_seen"], r["last_seen"], src["ip"],
                                      dst["ip"], {}]
        else:
            if r["last_seen"] > rec[_LAST]:
                rec[_LAST], rec[_SIP], rec[_DIP] = r["last_seen"], src["ip"], dst["ip"]
            rec[_FIRST] = min(rec[_FIRST], r["first_seen"])
        rec[_SESSIONS] += r["sessions"]
        rec[_ALLOWED] += v["allowed"]
        rec[_AUDIT] += v["audit"]
        rec[_DENIED] += v["denied"]
        rules = rec[_RULES]
        for name, n in r["rules"].items():
            rules[name] = rules.get(name, 0) + n

    @classmethod
    def from_records(cls, records: Iterable[dict], capacity: int | None = None
                     ) -> FlowAggregate:
        """An aggregate holding these records (e.g. fetched from a daemon).
        ValueError names the first malformed one."""
        records = list(records)
        agg = cls(capacity if capacity is not None else max(DEFAULT_CAPACITY, len(records)))
        for i, r in enumerate(records):
            problem = check_record(r)
            if problem is not None:
                raise ValueError(f"flow record {i + 1}: {problem}")
            agg.add_record(r)
        return agg


def _by_sessions(item: tuple[Key, list]) -> int:
    return item[1][_SESSIONS]


# -- checks for what comes from outside: flow log lines, API answers ----------

_ip_versions: dict[str, int] = {}
_IP_MEMO = 1 << 16


def ip_version(text: object) -> int | None:
    """4 or 6 for an address in canonical form, else None (memoised: the same
    few thousand addresses recur in every line of a log)."""
    if type(text) is not str:
        return None
    v = _ip_versions.get(text)
    if v is None:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return None
        if str(addr) != text:  # the form events use (docs/events.md, Endpoints)
            return None
        if len(_ip_versions) >= _IP_MEMO:
            _ip_versions.clear()
        v = _ip_versions[text] = addr.version
    return v


def _endpoint_problem(side: object, what: str) -> str | None:
    if type(side) is not dict:
        return f"{what} is not an object"
    w = side.get("workload")
    if w is not None and (type(w) is not str or not w):
        return f"{what}.workload is not a name or null"
    if ip_version(side.get("ip")) is None:
        return f"{what}.ip is not an IP address"
    return None


def _protocol(p: object) -> str | int | None:
    """The protocol as events write it: a name, else its number."""
    if type(p) is str:
        return p if p in _NAMED else None
    if type(p) is int and 0 <= p <= 255:
        return PROTOCOL_NAMES.get(p, p)
    return None


def check_event(e: dict) -> str | None:
    """None when `e` (type verdict) is fit for FlowAggregate.add, else what is
    wrong with it. A protocol written as the number of a named one is
    rewritten as its name."""
    if type(e.get("time")) is not str:
        return "no time"
    if e.get("verdict") not in _COUNT_AT:
        return "unknown verdict"
    reason = e.get("reason")
    if reason not in ("rule", "default", "revoked"):
        return "unknown reason"
    rule = e.get("rule")
    if rule is not None and type(rule) is not str:
        return "rule is not a name or null"
    count = e.get("count")
    if type(count) is not int or count < 1:
        return "count is not a positive integer"
    proto = _protocol(e.get("protocol"))
    if proto is None:
        return "unknown protocol"
    e["protocol"] = proto
    for what in ("src", "dst"):
        problem = _endpoint_problem(e.get(what), what)
        if problem:
            return problem
    if ip_version(e["src"]["ip"]) != ip_version(e["dst"]["ip"]):
        return "src and dst are of different IP versions"
    if proto in _PORTED:
        port = e["dst"].get("port")
        if type(port) is not int or not 0 <= port <= 0xFFFF:
            return "dst.port is not a port"
    return None


def _count(x: object) -> bool:
    return type(x) is int and x >= 0


def check_record(r: object) -> str | None:
    """None when `r` is a well-formed flow record, else what is wrong with it.
    A protocol number of a named protocol is rewritten as its name."""
    if type(r) is not dict:
        return "not an object"
    for what in ("src", "dst"):
        problem = _endpoint_problem(r.get(what), what)
        if problem:
            return problem
    if ip_version(r["src"]["ip"]) != ip_version(r["dst"]["ip"]):
        return "src and dst are of different IP versions"
    proto = _protocol(r.get("protocol"))
    if proto is None:
        return "unknown protocol"
    r["protocol"] = proto
    port = r.get("port")
    if proto in _PORTED:
        if type(port) is not int or not 0 <= port <= 0xFFFF:
            return "port is not a port"
    elif port is not None:
        return f"port of a {proto} flow is not null"
    if not _count(r.get("sessions")):
        return "sessions is not a count"
    if type(r.get("first_seen")) is not str or type(r.get("last_seen")) is not str:
        return "first_seen/last_seen are not times"
    v = r.get("verdicts")
    if type(v) is not dict or not all(_count(v.get(k)) for k in VERDICTS):
        return "verdicts is not {allowed, audit, denied} counts"
    rules = r.get("rules")
    if type(rules) is not dict or not all(type(k) is str and _count(n)
                                          for k, n in rules.items()):
        return "rules is not {name: count}"
    return None


def protocol_number(proto: str | int) -> int:
    """A record's protocol as its IP protocol number."""
    return proto if type(proto) is int else PROTOCOLS[proto]


__all__ = ["DEFAULT_CAPACITY", "DEFAULT_RULE", "UNKNOWN_RULE", "VERDICTS", "FlowAggregate",
           "check_event", "check_record", "ip_version", "protocol_number"]
