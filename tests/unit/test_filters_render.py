"""Filters as `watch` and `sessions` apply them, and the compact lines."""

from __future__ import annotations

import pytest

from microseg.control.render import duration, event_line, human_bytes, session_line
from microseg.flow.filters import SESSION_KEYS, Filter, FilterError

V = {"time": "2026-11-27T07:51:44.595443Z", "seq": 1, "type": "verdict", "verdict": "denied",
     "reason": "rule", "rule": "no-ssh", "policy_generation": 3, "direction": "ingress",
     "interface": "msd-rogue", "family": "ipv6", "protocol": "tcp",
     "src": {"ip": "fd00::66", "port": 40000, "workload": "rogue"},
     "dst": {"ip": "fd00::30", "port": 22, "workload": "db"}, "tcp_flags": ["SYN"], "bytes": 74}
LOST = {"time": "t", "seq": 9, "type": "lost", "count": 3, "source": "ringbuf"}


@pytest.mark.parametrize(("params", "match"), [
    ({}, True),
    ({"type": "verdict"}, True), ({"type": "session"}, False),
    ({"verdict": "denied"}, True), ({"verdict": "allowed"}, False),
    ({"ip": "fd00::/64"}, True), ({"ip": "fd00::30"}, True), ({"ip": "10.0.0.0/8"}, False),
    ({"from_ip": "fd00::66/128"}, True), ({"from_ip": "fd00::30"}, False),
    ({"to_ip": "fd00::30"}, True),
    ({"port": "22"}, True), ({"port": "40000"}, True), ({"port": "80"}, False),
    ({"protocol": "tcp"}, True), ({"protocol": "6"}, True), ({"protocol": "udp"}, False),
    ({"workload": "db"}, True), ({"workload": "web"}, False),
    ({"rule": "no-ssh"}, True), ({"rule": "other"}, False),
    ({"verdict": "denied", "port": "22", "workload": "rogue"}, True),
    ({"verdict": "denied", "port": "23"}, False),
])
def test_event_filters(params: dict, match: bool) -> None:
    assert Filter.parse(params).matches(V) is match


def test_lost_events_pass_every_filter_but_type() -> None:
    assert Filter.parse({"verdict": "denied", "ip": "10.0.0.0/8"}).matches(LOST)
    assert not Filter.parse({"type": "verdict"}).matches(LOST)


@pytest.mark.parametrize(("params", "message"), [
    ({"type": "flow"}, "type 'flow'"), ({"verdict": "ok"}, "verdict 'ok'"),
    ({"ip": "nope"}, "not an address"), ({"port": "70000"}, "port '70000'"),
    ({"protocol": "sctpx"}, "protocol 'sctpx'"), ({"colour": "x"}, "unknown filter"),
])
def test_bad_filters(params: dict, message: str) -> None:
    with pytest.raises(FilterError, match=message):
        Filter.parse(params)


def test_session_filters() -> None:
    row = {"protocol": "udp", "state": "established", "src": {"ip": "10.0.0.1"},
           "dst": {"ip": "10.0.0.2", "workload": "dns"}}
    assert Filter.parse({"state": "established", "workload": "dns"}, SESSION_KEYS).matches(row)
    assert not Filter.parse({"state": "new"}, SESSION_KEYS).matches(row)
    with pytest.raises(FilterError):
        Filter.parse({"rule": "x"}, SESSION_KEYS)


def test_compact_lines() -> None:
    line = event_line(V)
    assert line == ("07:51:44.595443 DENIED   tcp [fd00::66]:40000 (rogue) -> [fd00::30]:22 (db)"
                    " [SYN] rule=no-ssh ingress msd-rogue")
    assert "\033[31m" in event_line(V, colour=True) and "\033" not in line
    assert event_line(LOST).endswith("LOST     3 events (ringbuf)")
    closed = {**V, "type": "session", "state": "closed", "prev_state": "closing",
              "packets": {"orig": 5, "reply": 4}, "bytes": {"orig": 2048, "reply": 100},
              "duration_s": 75.5}
    assert "closing->closed" in event_line(closed) and "2.0K/100B 1m15s" in event_line(closed)
    rejected = {"time": "t" * 27, "type": "policy", "result": "rejected", "generation": 4,
                "errors": ["p.yaml:3:1: bad"]}
    assert "rejected (1 errors), generation 4 stays: p.yaml:3:1: bad" in event_line(rejected)


def test_session_line_and_units() -> None:
    row = {"protocol": "tcp", "state": "established", "src": V["src"], "dst": V["dst"],
           "packets": {"orig": 10, "reply": 8}, "bytes": {"orig": 1500, "reply": 3 * 2**20},
           "age_s": 3700, "idle_s": 1.2, "expires_in_s": 431_998, "rule": "web"}
    assert session_line(row) == (
        "tcp    ESTABLISHED [fd00::66]:40000 (rogue) -> [fd00::30]:22 (db)  pkts 10/8 bytes "
        "1.5K/3.0M  age 1h01m idle 1.2s expires 4d23h  rule web")
    assert human_bytes(512) == "512B" and duration(None) == "-" and duration(59) == "59s"
