"""The flow aggregate (microseg/flow/observed.py): what a flow is, what it
counts, what it evicts when full, and its records surviving a round trip."""

from __future__ import annotations

import time

import orjson
import pytest

from microseg.flow.observed import FlowAggregate, check_event, check_record
from tests.schema import validate_event

_seq = iter(range(1, 1 << 62))


def endpoint(ip: str, workload: str | None, port: int | None) -> dict:
    return {"ip": ip, "port": port, "workload": workload}


def verdict_event(src: str, src_w: str | None, dst: str, dst_w: str | None,
                  protocol: str | int = "tcp", port: int | None = 80, *,
                  verdict: str = "allowed", rule: str | None = "r", reason: str | None = None,
                  time: str = "2026-11-27T09:14:03.512907Z", count: int = 1,
                  sport: int = 40000) -> dict:
    """A `verdict` event as the daemon writes it (docs/events.md)."""
    icmp = protocol in ("icmp", "icmpv6")
    ported = protocol in ("tcp", "udp")
    return {"time": time, "seq": next(_seq), "type": "verdict", "verdict": verdict,
            "reason": reason or ("rule" if rule else "default"), "rule": rule,
            "policy_generation": 3, "direction": "ingress", "interface": "msd-x",
            "family": "ipv6" if ":" in src else "ipv4", "protocol": protocol,
            "src": endpoint(src, src_w, None if icmp else sport if ported else 0),
            "dst": endpoint(dst, dst_w, None if icmp else port if ported else 0),
            "tcp_flags": ["SYN"] if protocol == "tcp" else [], "bytes": 74 * count,
            "count": count, "staged": None}


def test_the_helper_writes_events_of_the_schema() -> None:
    for e in (verdict_event("10.0.0.1", "a", "10.0.0.2", None),
              verdict_event("fd00::1", None, "fd00::2", "b", "icmpv6", None, verdict="denied",
                            rule=None, count=5),
              verdict_event("10.0.0.1", "a", "10.0.0.2", None, 47, None, verdict="audit")):
        validate_event(e)


def _by_key(agg: FlowAggregate) -> dict[tuple, dict]:
    return {(r["src"]["workload"] or r["src"]["ip"], r["dst"]["workload"] or r["dst"]["ip"],
             r["protocol"], r["port"]): r for r in agg.records()}


def test_a_flow_is_its_workloads_protocol_and_destination_port() -> None:
    agg = FlowAggregate()
    # One workload on two addresses, many source ports: one flow, the last address shown.
    agg.add(verdict_event("10.0.0.1", "web", "10.0.0.9", "db", port=5432, sport=1000,
                          time="2026-01-01T00:00:01.000000Z"))
    agg.add(verdict_event("10.0.0.2", "web", "10.0.0.9", "db", port=5432, sport=2000,
                          time="2026-01-01T00:00:03.000000Z"))
    agg.add(verdict_event("10.0.0.3", "web", "10.0.0.9", "db", port=5432,
                          time="2026-01-01T00:00:02.000000Z"))
    # Another port, udp, icmp (no port), GRE (no port): flows of their own.
    agg.add(verdict_event("10.0.0.1", "web", "10.0.0.9", "db", port=6432))
    agg.add(verdict_event("10.0.0.1", "web", "10.0.0.9", "db", "udp", 5432))
    agg.add(verdict_event("10.0.0.1", "web", "10.0.0.9", "db", "icmp", None))
    agg.add(verdict_event("10.0.0.1", "web", "10.0.0.9", "db", 47, None))
    agg.add(verdict_event("10.0.0.1", "web", "10.0.0.9", "db", 47, None))
    # An address no workload owns is its own endpoint, and does not meet a
    # workload named like it (a valid name).
    agg.add(verdict_event("192.0.2.1", None, "10.0.0.9", "db", port=5432))
    agg.add(verdict_event("192.0.2.2", None, "10.0.0.9", "db", port=5432))
    agg.add(verdict_event("192.0.2.1", "192.0.2.1", "10.0.0.9", "db", port=5432))
    flows = list(agg.records())
    assert len(flows) == 8 == agg.stats()["flows"]
    web = flows[0]
    assert web["src"] == {"workload": "web", "ip": "10.0.0.2"}  # the address seen last
    assert (web["sessions"], web["first_seen"], web["last_seen"]) == (
        3, "2026-01-01T00:00:01.000000Z", "2026-01-01T00:00:03.000000Z")
    keys = [(f["src"]["workload"], f["src"]["ip"] if not f["src"]["workload"] else None,
             f["protocol"], f["port"]) for f in flows]
    assert keys == [("web", None, "tcp", 5432), ("web", None, "tcp", 6432),
                    ("web", None, "udp", 5432), ("web", None, "icmp", None),
                    ("web", None, 47, None), (None, "192.0.2.1", "tcp", 5432),
                    (None, "192.0.2.2", "tcp", 5432), ("192.0.2.1", None, "tcp", 5432)]
    assert flows[4]["sessions"] == 2


def test_counts_by_verdict_and_rule_denials_by_attempts() -> None:
    agg = FlowAggregate()
    a = ("10.0.0.1", "web", "10.0.0.9", "db")
    agg.add(verdict_event(*a, rule="web-db"))
    agg.add(verdict_event(*a, rule="web-db"))
    agg.add(verdict_event(*a, verdict="audit", rule=None))
    agg.add(verdict_event(*a, verdict="denied", rule="no-web", count=40))
    agg.add(verdict_event(*a, verdict="denied", rule=None, reason="rule"))  # unknown generation
    # Not flows: a revocation re-judges a session counted already; drops
    # and sessions are not the policy's verdicts.
    agg.add(verdict_event(*a, verdict="denied", rule="no-web", reason="revoked", count=9))
    drop = verdict_event(*a, verdict="dropped", rule=None)
    agg.add({**drop, "type": "drop", "reason": "state", "audit": False})
    agg.add({**verdict_event(*a), "type": "session"})
    (r,) = agg.records()
    assert r["verdicts"] == {"allowed": 2, "audit": 1, "denied": 41}
    assert r["sessions"] == 44
    assert r["rules"] == {"(default)": 1, "(unknown)": 1, "no-web": 40, "web-db": 2}


def test_a_full_aggregate_evicts_the_most_frequent_and_keeps_the_rare() -> None:
    agg = FlowAggregate(capacity=32)  # evicts in batches of 2
    for i in range(16):  # rare: one session each
        agg.add(verdict_event(f"10.0.1.{i}", None, "10.0.0.9", "db", port=1000 + i))
    for i in range(16):  # frequent
        agg.add(verdict_event(f"10.0.2.{i}", None, "10.0.0.9", "db", port=2000 + i,
                              count=100 + i, verdict="denied"))
    assert len(agg) == 32 and agg.evicted == 0
    for i in range(8):  # newcomers
        agg.add(verdict_event(f"10.0.3.{i}", None, "10.0.0.9", "db", port=3000 + i))
    ports = {r["port"] for r in agg.records()}
    assert set(range(1000, 1016)) <= ports  # every rare flow kept
    assert set(range(3000, 3008)) <= ports
    # The 8 most frequent went: counts 108..115.
    assert ports & set(range(2000, 2016)) == set(range(2000, 2008))
    assert agg.stats() == {"flows": 32, "capacity": 32, "evicted": 8,
                           "evicted_sessions": sum(range(108, 116))}
    # An evicted flow that recurs is learned again at once.
    agg.add(verdict_event("10.0.2.15", None, "10.0.0.9", "db", port=2015))
    assert 2015 in {r["port"] for r in agg.records()}


def test_records_survive_json_and_load_back() -> None:
    agg = FlowAggregate()
    agg.add(verdict_event("10.0.0.1", "web", "10.0.0.9", "db", rule="x"))
    agg.add(verdict_event("fd00::1", None, "fd00::9", "db6", "icmpv6", None, verdict="denied",
                          rule=None, count=3))
    agg.add(verdict_event("10.0.0.1", "web", "10.0.0.9", "db", 132, None, verdict="audit"))
    records = list(agg.records())
    wire = orjson.loads(orjson.dumps(records))  # what GET /v1/flows serves
    back = FlowAggregate.from_records(wire)
    assert list(back.records()) == records
    # Records of one flow from two sources add up.
    twice = FlowAggregate.from_records(records + records)
    (first, *_rest) = twice.records()
    assert first["sessions"] == 2 and first["rules"] == {"x": 2}


@pytest.mark.parametrize("change, problem", [
    ({"protocol": "sctp"}, "unknown protocol"),
    ({"port": None}, "port is not a port"),
    ({"sessions": -1}, "sessions is not a count"),
    ({"verdicts": {"allowed": 1}}, "verdicts"),
    ({"rules": {"x": "1"}}, "rules"),
    ({"src": {"workload": None, "ip": "10.0.0.300"}}, "src.ip"),
    ({"dst": {"workload": None, "ip": "fd00::1"}}, "different IP versions"),
    ({"first_seen": 5}, "first_seen"),
])
def test_malformed_records_are_refused(change: dict, problem: str) -> None:
    agg = FlowAggregate()
    agg.add(verdict_event("10.0.0.1", "web", "10.0.0.9", "db"))
    (r,) = agg.records()
    assert check_record(r) is None
    r.update(change)
    found = check_record(r)
    assert found is not None and problem in found
    with pytest.raises(ValueError, match="flow record 1"):
        FlowAggregate.from_records([r])


def test_check_event_refuses_what_add_cannot_count() -> None:
    good = verdict_event("10.0.0.1", "web", "10.0.0.9", "db")
    assert check_event(dict(good)) is None
    numbered = {**good, "protocol": 6}
    assert check_event(numbered) is None and numbered["protocol"] == "tcp"
    for bad in ({"count": 0}, {"verdict": "maybe"}, {"src": {"ip": "x", "workload": None}},
                {"dst": {"ip": "10.0.0.9", "workload": "db", "port": 70000}},
                {"protocol": "gre"}, {"time": None}):
        assert check_event({**good, **bad}) is not None, bad


def test_add_is_cheap() -> None:
    """The daemon calls add for every verdict event (docs/performance.md). A
    loose bound that only a gross regression breaks; bench/lifecycle.py
    reports the figure."""
    events = [verdict_event(f"10.0.{i % 50}.1", f"w{i % 50}", f"10.1.{i % 70}.1", f"d{i % 70}",
                            port=80 + i % 3) for i in range(50_000)]
    agg = FlowAggregate()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter_ns()
        for e in events:
            agg.add(e)
        best = min(best, (time.perf_counter_ns() - t) / len(events))
    assert best < 10_000, f"{best:.0f} ns per add"
