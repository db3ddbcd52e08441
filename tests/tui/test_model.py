"""`microseg top`'s model (aggregation, no widgets) and its `/` filter language."""

from __future__ import annotations

import orjson
import pytest

from microseg.tui.filterexpr import FilterError, FilterExpr
from microseg.tui.model import HISTORY, WORLD, Model

# -- helpers ----------------------------------------------------------------------


def stats(*, allowed: int = 0, denied: int = 0, audit: int = 0, dropped: int = 0,
          counters: list[dict] | None = None, published: dict[str, int] | None = None,
          ringbuf: int = 0, subscriber: int = 0, entries: int = 0, capacity: int = 0,
          by_state: dict[str, int] | None = None) -> dict:
    """A /v1/stats answer, shaped as the daemon sends it."""
    return {"packets": {"allowed": allowed, "denied": denied, "audit": audit,
                        "dropped": dropped},
            "counters": counters or [],
            "sessions": {"entries": entries, "capacity": capacity, "by_state": by_state or {}},
            "events": {"published": published or {},
                       "lost": {"ringbuf": ringbuf, "subscriber": subscriber}}}


def counter(verdict: str, reason: str, packets: int, direction: str = "ingress") -> dict:
    return {"direction": direction, "verdict": verdict, "reason": reason, "packets": packets,
            "bytes": packets * 100}


def feed(m: Model, events) -> None:
    """Events as the daemon streams them: JSON lines."""
    m.on_lines([orjson.dumps(e) for e in events])


def ep(ip: str, workload: str | None = None, port: int | None = None) -> dict:
    out: dict = {"ip": ip, "port": port}
    if workload is not None:
        out["workload"] = workload
    return out


def event(seq: int, *, type: str = "verdict", verdict: str | None = "allowed",
          src: dict | None = None, dst: dict | None = None, protocol: str = "tcp",
          rule: str | None = "r1") -> dict:
    e = {"time": f"2026-11-27T09:00:{seq % 60:02d}.000000Z", "seq": seq, "type": type,
         "protocol": protocol, "rule": rule,
         "src": src or ep("10.0.0.1", "web", 40000 + seq),
         "dst": dst or ep("10.0.0.2", "db", 5432)}
    if verdict is not None:
        e["verdict"] = verdict
    return e


def session(src: dict, dst: dict, *, protocol: str = "tcp", packets: tuple[int, int] = (1, 1),
            bytes_: tuple[int, int] = (100, 100), rule: str | None = "r1",
            verdict: str = "allowed", state: str = "established") -> dict:
    return {"family": "ipv4", "protocol": protocol, "state": state, "src": src, "dst": dst,
            "packets": {"orig": packets[0], "reply": packets[1]},
            "bytes": {"orig": bytes_[0], "reply": bytes_[1]},
            "age_s": 1.0, "idle_s": 0.0, "rule": rule, "verdict": verdict}


# -- stats: rates --------------------------------------------------------------------


def test_first_stats_sets_no_rates_second_gives_pps_per_verdict() -> None:
    m = Model()
    m.on_stats(stats(allowed=100, denied=10, audit=0, dropped=5), now=10.0)
    assert m.header.pps == {"allowed": 0.0, "denied": 0.0, "audit": 0.0, "dropped": 0.0}
    assert list(m.history["allowed"]) == [0.0] * HISTORY
    m.on_stats(stats(allowed=300, denied=50, audit=4, dropped=5), now=12.0)
    assert m.header.pps == {"allowed": 100.0, "denied": 20.0, "audit": 2.0, "dropped": 0.0}
    assert m.history["allowed"][-1] == 100.0 and m.history["denied"][-1] == 20.0
    assert len(m.history["allowed"]) == HISTORY


def test_rates_use_time_between_polls_not_per_call() -> None:
    m = Model()
    m.on_stats(stats(allowed=0), now=0.0)
    m.on_stats(stats(allowed=50), now=0.5)
    assert m.header.pps["allowed"] == 100.0
    m.on_stats(stats(allowed=350), now=3.5)
    assert m.header.pps["allowed"] == 100.0


def test_counter_reset_gives_zero_not_negative_rate() -> None:
    m = Model()
    m.on_stats(stats(allowed=1000, published={"verdict": 500}), now=0.0)
    m.on_stats(stats(allowed=10, published={"verdict": 3}), now=1.0)
    assert m.header.pps["allowed"] == 0.0
    assert m.header.events_ps == 0.0


def test_new_sessions_count_allowed_and_audit_by_rule_or_default() -> None:
    m = Model()
    before = [counter("allowed", "rule", 10), counter("audit", "default", 0),
              counter("allowed", "default", 2, "egress"), counter("allowed", "session", 1000),
              counter("denied", "rule", 7), counter("dropped", "invalid", 3),
              counter("audit", "related", 1)]
    after = [counter("allowed", "rule", 30), counter("audit", "default", 10),
             counter("allowed", "default", 4, "egress"), counter("allowed", "session", 5000),
             counter("denied", "rule", 70), counter("dropped", "invalid", 300),
             counter("audit", "related", 101)]
    m.on_stats(stats(counters=before), now=0.0)
    assert m.header.new_sessions_ps == 0.0
    m.on_stats(stats(counters=after), now=2.0)
    # (20 + 10 + 2) new sessions in 2 s; packets of established sessions, denials,
    # drops and related packets are not new sessions
    assert m.header.new_sessions_ps == 16.0
    assert m.history["new_sessions"][-1] == 16.0


def test_events_per_second_sums_every_published_type() -> None:
    m = Model()
    m.on_stats(stats(published={"verdict": 100, "session": 20, "drop": 0}), now=0.0)
    m.on_stats(stats(published={"verdict": 300, "session": 60, "drop": 40}), now=2.0)
    assert m.header.events_ps == 140.0


def test_lost_is_ringbuf_plus_subscriber_as_a_total() -> None:
    m = Model()
    m.on_stats(stats(ringbuf=3, subscriber=4), now=0.0)
    assert m.header.lost == 7
    m.on_stats(stats(ringbuf=5, subscriber=4), now=1.0)
    assert m.header.lost == 9


def test_stats_session_census() -> None:
    m = Model()
    m.on_stats(stats(entries=42, capacity=1024, by_state={"tcp/established": 40, "udp/new": 2}),
               now=0.0)
    assert (m.header.sessions, m.header.capacity) == (42, 1024)
    assert m.by_state == {"tcp/established": 40, "udp/new": 2}


def test_status_fills_the_header() -> None:
    m = Model()
    m.on_status({"pid": 7, "uptime_s": 3725.0,
                 "policy": {"generation": 4, "mode": "audit", "default": "allow",
                            "last_reload": {"result": "rejected",
                                            "errors": ["p.yaml:3:1: bad", "more"]}}})
    h = m.header
    assert h.daemon == "pid 7, up 62m"
    assert (h.generation, h.mode, h.default) == (4, "audit", "allow")
    assert h.last_reload == "rejected: p.yaml:3:1: bad"


def test_set_connected() -> None:
    m = Model()
    m.set_connected(False, "connection refused")
    assert (m.header.connected, m.header.error) == (False, "connection refused")
    m.set_connected(True)
    assert (m.header.connected, m.header.error) == (True, "")


# -- the event stream: tail, matrix, lost --------------------------------------------


def test_verdict_and_drop_events_go_to_tail_and_matrix() -> None:
    m = Model()
    web, db = ep("10.0.0.1", "web", 40000), ep("10.0.0.2", "db", 5432)
    outside = ep("192.0.2.9", None, 5555)
    evs = [event(1, verdict="allowed", src=web, dst=db),
           event(2, verdict="denied", src=web, dst=db),
           event(3, verdict="audit", src=web, dst=db),
           event(4, type="drop", verdict=None, src=outside, dst=db, rule=None),
           event(5, verdict="denied", src=db, dst=outside),
           {"time": "t", "seq": 6, "type": "session", "state": "established",
            "prev_state": "new", "src": web, "dst": db, "protocol": "tcp"},
           {"time": "t", "seq": 7, "type": "policy", "result": "applied", "generation": 2}]
    feed(m, evs)
    assert [e["seq"] for e in m.tail_events()] == [1, 2, 3, 4, 5]
    assert [e["seq"] for e in m.recent_events()] == [1, 2, 3, 4, 5, 6]
    assert m.matrix == {("web", "db"): {"allowed": 1, "denied": 1, "audit": 1},
                        (WORLD, "db"): {"dropped": 1},
                        ("db", WORLD): {"denied": 1}}
    assert m.events_seen == 7
    assert m.lost_seen == 0


def test_matrix_counts_accumulate_over_calls() -> None:
    m = Model()
    feed(m, [event(1, verdict="allowed"), event(2, verdict="allowed")])
    feed(m, iter([event(3, verdict="allowed"), event(4, verdict="denied")]))
    assert m.matrix[("web", "db")] == {"allowed": 3, "denied": 1}
    assert m.events_seen == 4


def test_matrix_counts_the_packets_an_aggregated_denial_stands_for() -> None:
    m = Model()
    feed(m, [event(1, verdict="allowed"), {**event(2, verdict="denied"), "count": 250}])
    assert m.matrix[("web", "db")] == {"allowed": 1, "denied": 250}


def test_matrix_uses_workload_never_address() -> None:
    m = Model()
    feed(m, [event(1, src=ep("10.0.0.7"), dst=ep("10.0.0.8", "db", 1))])
    assert list(m.matrix) == [(WORLD, "db")]


def test_lost_events_add_to_lost_seen_only() -> None:
    m = Model()
    feed(m, [{"time": "t", "seq": 1, "type": "lost", "count": 3, "source": "ringbuf"},
                 {"time": "t", "seq": 2, "type": "lost", "count": 5, "source": "subscriber"}])
    assert m.lost_seen == 8
    assert not m.tail and not m.recent and not m.matrix


# -- sessions: flows -------------------------------------------------------------------


def test_flows_group_by_src_label_dst_label_protocol_and_dst_port() -> None:
    m = Model()
    web1, web2 = ep("10.0.0.1", "web", 40001), ep("10.0.0.11", "web", 40002)
    db = ep("10.0.0.2", "db", 5432)
    rows = [
        session(web1, db, packets=(10, 5), bytes_=(1000, 500)),
        session(web2, db, packets=(3, 2), bytes_=(300, 200)),   # same workload, other IP
        session(web1, ep("10.0.0.2", "db", 6379)),              # other port
        session(web1, db, protocol="udp"),                      # other protocol
        session(db, web1 | {"port": 5432}),                     # other direction
        session(ep("192.0.2.1", None, 1), db, packets=(7, 0)),  # no workload: its address
        session(ep("192.0.2.2", None, 1), db, packets=(9, 0)),
    ]
    m.on_sessions(rows, now=0.0)
    assert sorted(m.flows) == sorted([
        "web>db/tcp/5432", "web>db/tcp/6379", "web>db/udp/5432", "db>web/tcp/5432",
        "192.0.2.1>db/tcp/5432", "192.0.2.2>db/tcp/5432"])
    f = m.flows["web>db/tcp/5432"]
    assert (f.sessions, f.packets, f.bytes) == (2, 20, 2000)
    assert (f.protocol, f.port, f.rule, f.verdict) == ("tcp", 5432, "r1", "allowed")
    assert f.src["workload"] == "web" and f.dst == {"ip": "10.0.0.2", "workload": "db",
                                                    "port": 5432}
    assert m.flows["192.0.2.1>db/tcp/5432"].packets == 7
    assert m.sessions == rows


def test_flow_rates_sum_the_session_deltas_of_two_polls() -> None:
    m = Model()
    web, db = ep("10.0.0.1", "web", 40001), ep("10.0.0.2", "db", 5432)
    m.on_sessions([session(web, db, packets=(10, 10), bytes_=(1000, 1000))], now=5.0)
    f = m.flows["web>db/tcp/5432"]
    assert (f.pps, f.bps) == (0.0, 0.0)  # one poll: no rate yet
    web2, api = ep("10.0.0.1", "web", 40003), ep("10.0.0.3", "api", 40002)
    m.on_sessions([session(web, db, packets=(30, 20), bytes_=(3000, 2000)),
                   session(web2, db, packets=(4, 6), bytes_=(10, 10)),
                   session(api, db, packets=(100, 100))], now=7.0)
    f = m.flows["web>db/tcp/5432"]
    assert (f.sessions, f.packets, f.bytes) == (2, 60, 5020)
    # the old session's delta plus the whole of the one born since
    assert f.pps == (30 + 10) / 2 and f.bps == (3000 + 20) / 2
    assert m.flows["api>db/tcp/5432"].pps == 200 / 2


def test_sessions_that_close_do_not_hide_the_traffic_of_the_rest() -> None:
    m = Model()
    db = ep("10.0.0.2", "db", 5432)
    a, b, c = (ep("10.0.0.1", "web", p) for p in (40001, 40002, 40003))
    m.on_sessions([session(a, db, packets=(50, 50)), session(b, db, packets=(50, 50))],
                  now=0.0)
    # b closed; a sent 10 more; c came and sent 4: the flow shrank, its rate did not
    m.on_sessions([session(a, db, packets=(60, 50)), session(c, db, packets=(2, 2))], now=1.0)
    assert m.flows["web>db/tcp/5432"].packets < 200
    assert m.flows["web>db/tcp/5432"].pps == 14.0


def test_a_reused_five_tuple_counts_as_a_new_session() -> None:
    m = Model()
    web, db = ep("10.0.0.1", "web", 40001), ep("10.0.0.2", "db", 5432)
    m.on_sessions([session(web, db, packets=(50, 50))], now=0.0)
    m.on_sessions([session(web, db, packets=(3, 3))], now=2.0)
    assert m.flows["web>db/tcp/5432"].pps == 3.0


def test_flows_that_end_go_away() -> None:
    m = Model()
    web, db = ep("10.0.0.1", "web", 40001), ep("10.0.0.2", "db", 5432)
    m.on_sessions([session(web, db)], now=0.0)
    m.on_sessions([], now=1.0)
    assert m.flows == {} and m.sessions == []


# -- policy: rules ----------------------------------------------------------------------


def policy(hits: dict[str, int]) -> dict:
    return {"generation": 1, "workloads": [{"name": "web"}, {"name": "db"}],
            "rules": [{"name": n, "action": "deny" if n == "no-ssh" else "allow",
                       "protocol": "tcp", "hits": h,
                       "last_hit": "2026-11-27T09:00:00Z" if h else None}
                      for n, h in hits.items()]}


def test_rule_hit_rates_from_two_policy_polls() -> None:
    m = Model()
    m.on_policy(policy({"web": 10, "no-ssh": 0}), now=100.0)
    assert m.workloads == ["web", "db"]
    assert {n: (r.hits, r.rate) for n, r in m.rules.items()} == {"web": (10, 0.0),
                                                                 "no-ssh": (0, 0.0)}
    m.on_policy(policy({"web": 40, "no-ssh": 4, "new": 50}), now=102.0)
    assert {n: (r.hits, r.rate) for n, r in m.rules.items()} == {
        "web": (40, 15.0), "no-ssh": (4, 2.0), "new": (50, 0.0)}
    r = m.rules["no-ssh"]
    assert (r.action, r.protocol, r.last_hit) == ("deny", "tcp", "2026-11-27T09:00:00Z")


def test_rule_hits_reset_by_a_reload_give_zero_rate() -> None:
    m = Model()
    m.on_policy(policy({"web": 40}), now=0.0)
    m.on_policy(policy({"web": 3}), now=1.0)
    assert m.rules["web"].rate == 0.0


def test_removed_rules_go_away() -> None:
    m = Model()
    m.on_policy(policy({"web": 1, "old": 1}), now=0.0)
    m.on_policy(policy({"web": 2}), now=1.0)
    assert list(m.rules) == ["web"]


# -- drilling in ------------------------------------------------------------------------


def test_events_of_flow_are_that_flows_only() -> None:
    m = Model()
    web, db = ep("10.0.0.1", "web", 40001), ep("10.0.0.2", "db", 5432)
    m.on_sessions([session(web, db)], now=0.0)
    flow = m.flows["web>db/tcp/5432"]
    mine = [event(1, src=ep("10.0.0.1", "web", 40001), dst=ep("10.0.0.2", "db", 5432)),
            event(2, verdict="denied", src=ep("10.0.0.99", "web", 3), dst=db),
            {"time": "t", "seq": 3, "type": "session", "state": "new", "protocol": "tcp",
             "src": ep("10.0.0.1", "web", 40001), "dst": ep("10.0.0.2", "db", 5432)}]
    others = [event(10, src=db, dst=web),                                 # reversed
              event(11, src=web, dst=ep("10.0.0.2", "db", 6379)),         # other port
              event(12, src=web, dst=db, protocol="udp"),                 # other protocol
              event(13, src=ep("10.0.0.1", "api", 1), dst=db),            # other workload
              event(14, src=web, dst=ep("10.0.0.3", "cache", 5432))]
    feed(m, [others[0], mine[0], others[1], others[2], mine[1], others[3], mine[2],
                 others[4]])
    assert [e["seq"] for e in m.events_of_flow(flow)] == [1, 2, 3]
    assert [e["seq"] for e in m.events_of_flow(flow, limit=2)] == [2, 3]


def test_events_of_flow_without_workloads_match_by_address() -> None:
    m = Model()
    a, b = ep("192.0.2.1", None, 1000), ep("192.0.2.2", None, 53)
    m.on_sessions([session(a, b, protocol="udp")], now=0.0)
    flow = m.flows["192.0.2.1>192.0.2.2/udp/53"]
    feed(m, [event(1, src=a, dst=b, protocol="udp"),
                 event(2, src=ep("192.0.2.3", None, 1000), dst=b, protocol="udp")])
    assert [e["seq"] for e in m.events_of_flow(flow)] == [1]


def test_events_of_rule() -> None:
    m = Model()
    feed(m, [event(i, rule="a" if i % 3 else "b") for i in range(1, 10)]
                + [event(20, rule=None)])
    assert [e["seq"] for e in m.events_of_rule("b")] == [3, 6, 9]
    assert [e["seq"] for e in m.events_of_rule("a", limit=2)] == [7, 8]
    assert m.events_of_rule("nope") == []


# -- the `/` filter ---------------------------------------------------------------------

V = {"time": "2026-11-27T07:51:44.595443Z", "seq": 1, "type": "verdict", "verdict": "denied",
     "reason": "rule", "rule": "no-ssh", "protocol": "tcp", "state": None,
     "src": {"ip": "10.0.0.66", "port": 40000, "workload": "rogue"},
     "dst": {"ip": "10.0.1.30", "port": 22, "workload": "db"}}
S = {"protocol": "udp", "state": "established", "rule": "dns", "verdict": "allowed",
     "src": {"ip": "10.0.0.1", "port": 3333, "workload": "web"},
     "dst": {"ip": "10.0.0.2", "port": 53, "workload": "dns"}}


@pytest.mark.parametrize(("text", "row", "match"), [
    ("", V, True),
    ("type=verdict", V, True), ("type=session", V, False),
    ("verdict=denied", V, True), ("verdict=allowed", V, False),
    ("ip=10.0.0.0/24", V, True), ("ip=10.0.1.30", V, True), ("ip=192.168.0.0/16", V, False),
    ("from-ip=10.0.0.66", V, True), ("from-ip=10.0.1.30", V, False),
    ("from_ip=10.0.0.66", V, True),
    ("to-ip=10.0.1.0/24", V, True), ("to-ip=10.0.0.66", V, False),
    ("port=22", V, True), ("port=40000", V, True), ("port=80", V, False),
    ("protocol=tcp", V, True), ("protocol=6", V, True), ("protocol=udp", V, False),
    ("workload=db", V, True), ("workload=rogue", V, True), ("workload=web", V, False),
    ("rule=no-ssh", V, True), ("rule=dns", V, False),
    ("state=established", S, True), ("state=new", S, False),
    ("verdict=denied port=22 workload=rogue", V, True),  # all terms must hold
    ("verdict=denied port=23", V, False),
])
def test_filter_keys(text: str, row: dict, match: bool) -> None:
    assert FilterExpr.parse(text).matches(row) is match


@pytest.mark.parametrize(("text", "match"), [
    ("!verdict=denied", False), ("!verdict=allowed", True),
    ("!protocol=udp", True), ("!workload=db", False),
    ("verdict=denied !port=22", False), ("verdict=denied !port=80", True),
    ("!rogue", False), ("!web", True),
])
def test_filter_negation(text: str, match: bool) -> None:
    assert FilterExpr.parse(text).matches(V) is match


@pytest.mark.parametrize(("word", "match"), [
    ("rogue", True), ("db", True), ("10.0.0.66", True), ("10.0.1", True),  # addresses
    ("no-ssh", True), ("ssh", True), ("tcp", True),                        # rule, protocol
    ("web", False), ("udp", False), ("denied", False), ("40000", False),   # not searched
])
def test_filter_bare_words(word: str, match: bool) -> None:
    assert FilterExpr.parse(word).matches(V) is match


def test_filter_keeps_its_text_and_knows_when_empty() -> None:
    f = FilterExpr.parse("  verdict=denied   !web ")
    assert f.text == "verdict=denied   !web"
    assert not f.empty and len(f.terms) == 2
    assert f.terms[1].negated and f.terms[1].word == "web"
    assert FilterExpr.parse("   ").empty and FilterExpr().empty


@pytest.mark.parametrize(("text", "message"), [
    ("colour=red", "unknown key 'colour'"),
    ("from_ipx=1.2.3.4", "unknown key 'from_ipx'"),
    ("verdict=", "'verdict=' needs a value"),
    ("web !", "'!' needs a term after it"),
    ("!", "'!' needs a term after it"),
    ("verdict=ok", "verdict 'ok': one of allowed, denied, audit, dropped"),
    ("type=flow", "type 'flow'"),
    ("ip=nope", "ip 'nope': not an address or CIDR"),
    ("from-ip=10.0.0.300", "from-ip '10.0.0.300': not an address"),
    ("to-ip=x", "to-ip 'x': not an address"),
    ("port=70000", "port '70000': a number 0-65535"),
    ("port=http", "port 'http'"),
    ("protocol=sctpx", "protocol 'sctpx'"),
    ("state=sleepy", "state 'sleepy'"),
])
def test_filter_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(FilterError) as info:
        FilterExpr.parse(text)
    assert message in str(info.value)


def test_unknown_key_error_lists_keys_with_dashes() -> None:
    with pytest.raises(FilterError) as info:
        FilterExpr.parse("colour=red")
    assert "from-ip" in str(info.value) and "to-ip" in str(info.value)
    assert "state" in str(info.value)


def test_keys_restriction_ignores_terms_a_row_cannot_answer() -> None:
    rule_row = {"type": "verdict", "rule": "no-ssh", "protocol": "tcp"}
    rule_keys = frozenset({"rule", "protocol"})
    f = FilterExpr.parse("verdict=denied workload=web rule=no-ssh")
    # without the restriction the row has no verdict nor workload: no match
    assert not f.matches(rule_row)
    assert f.matches(rule_row, rule_keys)
    # the terms it can answer still count, negated or not
    assert not FilterExpr.parse("verdict=denied rule=dns").matches(rule_row, rule_keys)
    assert not FilterExpr.parse("verdict=denied !protocol=tcp").matches(rule_row, rule_keys)
    # a negated term it cannot answer is ignored too
    assert FilterExpr.parse("!verdict=allowed !workload=x").matches(rule_row, rule_keys)
    # bare words are always applied
    assert not FilterExpr.parse("verdict=denied web").matches(rule_row, rule_keys)
    assert FilterExpr.parse("verdict=denied ssh").matches(rule_row, rule_keys)


def test_flow_and_rule_rows_answer_their_keys() -> None:
    m = Model()
    m.on_sessions([session(ep("10.0.0.1", "web", 40001), ep("10.0.0.2", "db", 5432),
                           rule="web-db", verdict="allowed")], now=0.0)
    m.on_policy(policy({"no-ssh": 3}), now=0.0)
    flow = m.flows["web>db/tcp/5432"].as_filter_row()
    rule = m.rules["no-ssh"].as_filter_row()
    assert FilterExpr.parse("port=5432 workload=db to-ip=10.0.0.2 rule=web-db").matches(flow)
    assert not FilterExpr.parse("verdict=denied").matches(flow)
    assert FilterExpr.parse("rule=no-ssh protocol=tcp").matches(rule)
    assert not FilterExpr.parse("rule=web").matches(rule)
