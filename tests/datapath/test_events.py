"""Ring-buffer events checked field by field against the packet that made
them, and counters that always agree with the events."""

from __future__ import annotations

import time
from collections import Counter

from microseg.flow.enrich import Enricher, Names, TimeFormatter
from microseg.kernel import abi
from microseg.kernel.abi import Direction, EventType, Reason, Ring, State, TcpFlag, Verdict
from microseg.kernel.datapath import Datapath, DatapathConfig
from microseg.kernel.records import addr16, decode_event, decode_events
from microseg.kernel.ringbuf import RingBuffer
from microseg.policy.compile import compile_policy
from microseg.policy.model import Policy, Rule
from microseg.policy.model import Selector as S

from .harness import Harness, ping, tcp, udp
from .policies import API4, DB4, DB6, ROGUE4, ROGUE6, WEB4, WEB6, WORKLOADS, shop


def test_verdict_event_fields_match_the_packet(dp: Harness) -> None:
    dp.install(shop())
    pkt = tcp(WEB6, DB6, 41234, 5432, "S", b"payload")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    out = dp.send(pkt, Direction.EGRESS)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    e = out.verdict
    assert e.type == EventType.VERDICT
    assert before <= e.ts_ns <= after
    assert (e.family, e.proto) == (6, 6)
    assert (e.src_ip, e.sport, e.dst_ip, e.dport) == (WEB6, 41234, DB6, 5432)
    assert e.direction == Direction.EGRESS
    assert e.ifindex == 1  # BPF_PROG_TEST_RUN runs on the loopback device
    assert e.pkt_len == len(bytes(pkt))
    assert TcpFlag(e.tcp_flags) == TcpFlag.SYN
    assert (e.verdict, e.reason) == (Verdict.ALLOWED, Reason.RULE)
    assert dp.rule_name(e.rule_id) == "web-to-db"
    assert e.generation == dp.generation
    assert dp.compiled is not None
    names = dp.compiled.workload_of_identity
    assert (names[e.src_identity], names[e.dst_identity]) == ("web", "db")


def test_session_event_fields(dp: Harness) -> None:
    dp.install(shop())
    dp.send(tcp(WEB4, DB4, 1000, 5432, "S"))
    dp.send(tcp(DB4, WEB4, 5432, 1000, "SA"))
    out = dp.send(tcp(WEB4, DB4, 1000, 5432, "A"))
    (e,) = out.of_type(EventType.SESSION)
    s = dp.session(WEB4, DB4)
    assert (State(e.state), State(e.prev_state)) == (State.ESTABLISHED, State.NEW)
    assert (e.src_ip, e.sport, e.dst_ip, e.dport, e.proto) == (WEB4, 1000, DB4, 5432, 6)
    assert e.created_ns == s.created_ns
    assert e.packets == (2, 1)
    assert dp.rule_name(e.rule_id) == "web-to-db"


def test_session_event_of_a_reply_packet_keeps_original_direction(dp: Harness) -> None:
    dp.install(shop())
    dp.send(tcp(WEB4, DB4, 1000, 5432, "S"))
    out = dp.send(tcp(DB4, WEB4, 5432, 1000, "R"))
    (e,) = out.of_type(EventType.SESSION)
    assert (e.src_ip, e.dst_ip, e.dport, State(e.state)) == (WEB4, DB4, 5432, State.CLOSED)


def test_drop_event_fields(dp: Harness) -> None:
    dp.install(shop())
    pkt = tcp(ROGUE4, DB4, 1, 22, "SF")
    e = dp.send(pkt).verdict
    assert (e.type, e.verdict, e.reason) == (EventType.DROP, Verdict.DROPPED, Reason.INVALID)
    assert (e.src_ip, e.dst_ip, e.dport) == (ROGUE4, DB4, 22)
    assert TcpFlag(e.tcp_flags) == TcpFlag.SYN | TcpFlag.FIN
    assert e.pkt_len == len(bytes(pkt))


def test_counters_agree_with_events(dp: Harness) -> None:
    """Whatever the mix, every verdict/drop event has its counted packet and
    every counted decision its event; submitted = received, nothing lost."""
    dp.install(shop())
    traffic = [
        tcp(WEB4, DB4, 1, 5432, "S"), tcp(DB4, WEB4, 5432, 1, "SA"), tcp(WEB4, DB4, 1, 5432, "A"),
        tcp(ROGUE4, DB4, 2, 5432, "S"), tcp(ROGUE4, DB4, 2, 5432, "S"),
        tcp(WEB4, DB4, 3, 22, "S"), udp(ROGUE6, DB6, 4, 53), ping(WEB4, API4),
        tcp(WEB4, DB4, 5, 5432, "SF"), tcp(DB4, WEB4, 5432, 9, "SA"),
        tcp(WEB4, DB4, 1, 5432, "FA"), tcp(DB4, WEB4, 5432, 1, "FA"), tcp(WEB4, DB4, 1, 5432, "A"),
    ] * 3
    events = []
    shots = 0
    for i, p in enumerate(traffic):
        out = dp.send(p, Direction(i % 2))
        events += out.events
        shots += out.dropped
    decided = Counter((Direction(e.direction), Verdict(e.verdict), Reason(e.reason))
                      for e in events if e.type in (EventType.VERDICT, EventType.DROP))
    stats = dp.stats()
    for key, n in decided.items():
        assert stats[key][0] == n, key
    for key, (pkts, _bytes) in stats.items():
        if key[2] in (Reason.RULE, Reason.DEFAULT, Reason.REVOKED, Reason.INVALID,
                      Reason.STATE, Reason.FRAGMENT):
            assert decided[key] == pkts, key
    dropped = sum(p for (_d, v, _r), (p, _b) in stats.items()
                  if v in (Verdict.DENIED, Verdict.DROPPED))
    assert dropped == shots
    per_type = Counter(EventType(e.type) for e in events)
    ev_stats: Counter = Counter()
    for (_ring, t), (submitted, lost) in dp.dp.read_event_stats().items():
        assert lost == 0
        ev_stats[t] += submitted
    assert ev_stats == per_type
    rule_hits = dp.dp.read_rule_stats()
    by_rule = Counter(e.rule_id for e in events
                      if e.type == EventType.VERDICT and e.rule_id)
    assert {r: h for r, (h, _t) in rule_hits.items()} == dict(by_rule)


def test_ring_overflow_is_counted_exactly() -> None:
    """A full ring loses events; the kernel counts each one lost, so
    submitted + lost = produced, exactly."""
    dp = Datapath(DatapathConfig(pin_dir=None, session_capacity=1024, ringbuf_bytes=4096))
    dp.load()
    try:
        dp.apply_policy(compile_policy(shop()))
        ring = RingBuffer(dp.maps["denials"].fd, 128)  # denied verdicts' own ring
        sent = 500
        for i in range(sent):
            dp.test_run(bytes(tcp(ROGUE4, DB4, 1000 + i, 5432, "S")))
        submitted, lost = dp.read_event_stats()[(Ring.DENIALS, EventType.VERDICT)]
        assert submitted + lost == sent
        assert lost > 0 and submitted > 0
        received = list(decode_events(ring.drain(1 << 20).runs))
        assert len(received) == submitted
        assert [e.sport for e in received] == list(range(1000, 1000 + submitted))
        # Space is free again once drained.
        dp.test_run(bytes(tcp(ROGUE4, DB4, 9, 5432, "S")))
        assert len(list(decode_events(ring.drain().runs))) == 1
        ring.close()
    finally:
        dp.close()


def _as_ring_run(events: list) -> bytes:
    """Records as the ring holds them (8-byte header each), one per event."""
    return b"".join(bytes(8) + abi.EVENT.pack(**e._asdict()) for e in events)


def test_a_new_session_rides_on_its_verdict_record(dp: Harness) -> None:
    """A packet that opens a session writes one ring record (docs/events.md
    numbers its two events): decoded, it is the verdict and the session's
    "new" event exactly as two records were; enriched, the same two events
    as those two records give."""
    compiled = dp.install(shop(Rule.make("ping-db", S.of_workload("web"), S.of_workload("db"),
                                         "allow", "icmp")))
    flows = [  # (packet, direction, the session's originator is its source)
        (tcp(WEB4, DB4, 1000, 5432, "S"), Direction.INGRESS, True),
        (tcp(WEB6, DB6, 1001, 5432, "S"), Direction.EGRESS, True),
        # A reply whose session was lost: the session's originator is its
        # destination (the reply stage opens it).
        (tcp(DB4, WEB4, 5432, 1002, "A"), Direction.INGRESS, False),
        (ping(WEB4, DB4), Direction.INGRESS, True),
    ]
    for pkt, direction, forward in flows:
        assert dp.dp.test_run(bytes(pkt), direction).retval == 0
        ring = dp.rings[Ring.EVENTS]
        runs = ring.drain(1 << 20).runs
        raw = [decode_event(r[8:]) for run in runs
               for r in (run[i:i + ring.stride] for i in range(0, len(run), ring.stride))]
        assert len(raw) == 1 and raw[0].flags & abi.EventFlag.OPENED, raw
        verdict, session = decode_events(runs)
        assert (verdict.type, session.type) == (EventType.VERDICT, EventType.SESSION)
        assert (verdict.flags, verdict.state, verdict.created_ns) == (0, 0, 0)
        assert (session.state, session.prev_state) == (raw[0].state, State.NONE)
        assert session.created_ns == session.ts_ns == verdict.ts_ns
        assert (session.rule_id, session.generation) == (verdict.rule_id, verdict.generation)
        ends = (verdict.saddr, verdict.sport, verdict.daddr, verdict.dport)
        if forward:
            assert (session.saddr, session.sport, session.daddr, session.dport) == ends
            assert session.packets == (1, 0) and session.bytes == (verdict.pkt_len, 0)
        else:
            assert (session.daddr, session.dport, session.saddr, session.sport) == ends
            assert session.packets == (0, 1) and session.bytes == (0, verdict.pkt_len)
        names = Names(lambda g: compiled, lambda i: "lo", lambda: compiled)
        combined = Enricher(names, TimeFormatter(0), lambda: dp.generation).events(runs)
        two = Enricher(names, TimeFormatter(0), lambda: dp.generation).events(
            [_as_ring_run([verdict, session])])
        assert combined == two
        assert [e["type"] for e in combined] == ["verdict", "session"]


def test_a_lost_sessions_reply_names_its_own_endpoints(dp: Harness) -> None:
    """A reply whose session was lost is judged the other way round (the
    reply stage): its verdict event still names the packet's own source and
    destination — the workloads at those addresses, not each other's."""
    compiled = dp.install(shop())
    assert dp.dp.test_run(bytes(tcp(DB4, WEB4, 5432, 1003, "A")), Direction.INGRESS).retval == 0
    ring = dp.rings[Ring.EVENTS]
    runs = ring.drain(1 << 20).runs
    names = Names(lambda g: compiled, lambda i: "lo", lambda: compiled)
    events = Enricher(names, TimeFormatter(0), lambda: dp.generation).events(runs)
    verdict = next(e for e in events if e["type"] == "verdict")
    assert (verdict["src"]["ip"], verdict["dst"]["ip"]) == (DB4, WEB4)
    assert (verdict["src"]["workload"], verdict["dst"]["workload"]) == ("db", "web")
    session = next(e for e in events if e["type"] == "session")
    assert (session["src"]["workload"], session["dst"]["workload"]) == ("web", "db")


def test_a_revocation_by_a_reply_names_its_own_endpoints(dp: Harness) -> None:
    """A session revoked by a packet of its reply direction (judged in the
    session's original direction): the revoking packet's verdict event
    names the workloads at its own addresses."""
    compiled = dp.install(shop())
    assert dp.send(tcp(WEB4, DB4, 1004, 5432, "S")).passed
    assert dp.send(tcp(DB4, WEB4, 5432, 1004, "SA")).passed
    dp.drain()
    compiled = dp.install(Policy(default="deny", mode="enforce", workloads=WORKLOADS, rules=()))
    out = dp.send(tcp(DB4, WEB4, 5432, 1004, "A"))
    assert out.dropped
    v = out.verdict
    assert (v.reason, v.saddr, v.daddr) == (Reason.REVOKED, addr16(DB4), addr16(WEB4))
    names = compiled.workload_of_identity
    assert (names[v.src_identity], names[v.dst_identity]) == ("db", "web")


def test_records_carry_no_stale_bytes() -> None:
    """Records are written field by field, not zeroed first (bpf/lib/events.h):
    in a ring that wraps, a record written where one of another kind was
    has zeros in every field its kind leaves empty."""
    dp = Datapath(DatapathConfig(pin_dir=None, session_capacity=1024, ringbuf_bytes=4096))
    dp.load()
    try:
        dp.apply_policy(compile_policy(shop()))
        # A candidate that decides otherwise: verdicts carry staged fields.
        dp.stage_policy(compile_policy(shop(default="allow")))
        rings = {r: RingBuffer(dp.maps[name].fd, abi.EVENT.size)
                 for r, name in ((Ring.EVENTS, "events"), (Ring.DENIALS, "denials"))}
        pad_at = abi.EVENT.offsets()["_pad"]
        seen: Counter = Counter()
        for i in range(60):  # each ring (30 records) wraps twice
            sport = 2000 + i
            for pkt in (tcp(WEB4, DB4, sport, 5432, "S"), tcp(DB4, WEB4, 5432, sport, "SA"),
                        tcp(WEB4, DB4, sport, 5432, "A"), tcp(WEB4, DB4, sport, 5432, "R"),
                        tcp(WEB4, DB4, sport + 1000, 5432, "R"),  # allowed, opens nothing
                        tcp(ROGUE4, DB4, sport, 5432, "S"), tcp(ROGUE4, DB4, 1, 22, "SF")):
                dp.test_run(bytes(pkt))
            for ring, rb in rings.items():
                for run in rb.drain(1 << 20).runs:
                    for off in range(0, len(run), rb.stride):
                        raw = run[off + 8:off + 8 + abi.EVENT.size]
                        e = decode_event(raw)
                        kind = EventType(e.type)
                        seen[ring, kind] += 1
                        assert raw[pad_at] == 0, e
                        if kind == EventType.SESSION:
                            assert (e.flags, e.staged_verdict, e.staged_rule,
                                    e.staged_generation) == (0, 0, 0, 0), e
                        elif not e.flags & abi.EventFlag.OPENED:
                            assert (e.created_ns, e.packets[1], e.bytes[1], e.state,
                                    e.prev_state) == (0, 0, 0, 0, 0), e
        assert all(seen[k] >= 60 for k in ((Ring.EVENTS, EventType.VERDICT),
                                           (Ring.EVENTS, EventType.SESSION),
                                           (Ring.DENIALS, EventType.VERDICT),
                                           (Ring.DENIALS, EventType.DROP))), seen
        for rb in rings.values():
            rb.close()
    finally:
        dp.close()
