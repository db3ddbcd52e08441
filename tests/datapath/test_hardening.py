"""The datapath's guarantees under lost state, floods and audit mode
(docs/how-it-works.md, "Hardening"), checked on the real program with
crafted packets: replies whose session was lost pass, unanswered entries
cannot evict answered ones, denials are aggregated exactly, audit mode
drops nothing it decides, a link takes a session over from one that went
quiet, fragments of both families are followed and freed."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.inet6 import IPv6, fragment6
from scapy.packet import Raw

from microseg.kernel import abi, bpfsys
from microseg.kernel.abi import Direction, EventType, Reason, SessionFlag, State, Verdict
from microseg.kernel.datapath import Datapath
from microseg.kernel.loader import DatapathConfig
from microseg.kernel.records import addr16, session_key
from microseg.policy.model import Rule
from microseg.policy.model import Selector as S

from .harness import Harness, eth, ping, tcp, udp
from .policies import API4, DB4, DB6, ROGUE4, WEB4, WEB6, shop

DNS = Rule.make("dns", S.of_workload("web"), S.of_workload("api"), "allow", "udp", [53])
PING = Rule.make("ping-db", S.of_workload("web"), S.of_workload("db"), "allow", "icmp")


def _table(dp: Harness, name: str) -> int:
    return sum(c for _k, _v, c in dp.dp.maps[name].lookup_batch_raw())


def _handshake(dp: Harness, sport: int = 40000) -> None:
    assert dp.send(tcp(WEB4, DB4, sport, 5432, "S")).passed
    assert dp.send(tcp(DB4, WEB4, 5432, sport, "SA")).passed
    assert dp.send(tcp(WEB4, DB4, sport, 5432, "A")).passed


# -- a session lives in pending_map until it has seen both directions -------

def test_a_session_is_pending_until_its_first_reply(dp: Harness) -> None:
    dp.install(shop(DNS))
    dp.send(udp(WEB4, API4, 3333, 53))
    assert (_table(dp, "pending_map"), _table(dp, "session_map")) == (1, 0)
    dp.send(udp(API4, WEB4, 53, 3333))
    assert (_table(dp, "pending_map"), _table(dp, "session_map")) == (0, 1)
    assert dp.session(WEB4, API4).packets == (1, 1)
    assert dp.dp.read_session_stats().promoted == 1


# -- replies survive lost state ----------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_a_connection_whose_session_was_lost_goes_on_when_the_server_speaks_first(
        dp: Harness, family: int) -> None:
    """Established, then its entry deleted (as an eviction, a sweep racing
    traffic or a daemon started without pins would): the server's next
    segment is judged the other way round, allowed, and picks the session
    up with the client as originator; the client's answer confirms it."""
    web, db = (WEB4, DB4) if family == 4 else (WEB6, DB6)
    dp.install(shop())
    assert dp.send(tcp(web, db, 40000, 5432, "S")).passed
    assert dp.send(tcp(db, web, 5432, 40000, "SA")).passed
    assert dp.send(tcp(web, db, 40000, 5432, "A")).passed
    key = session_key(family, 6, addr16(web), addr16(db), 40000, 5432)
    assert dp.dp.maps["session_map"].delete(key)
    out = dp.send(tcp(db, web, 5432, 40000, "PA", b"response"))
    assert out.passed
    assert (out.verdict.verdict, dp.rule_name(out.verdict.rule_id)) == (Verdict.ALLOWED,
                                                                         "web-to-db")
    s = dp.session(web, db)
    assert (s.src_ip, s.sport, s.dport) == (web, 40000, 5432)
    assert s.flags & SessionFlag.REPLY_PICKUP and s.state == State.ESTABLISHED
    assert s.packets == (0, 1)
    assert dp.send(tcp(web, db, 40000, 5432, "A")).passed
    assert _table(dp, "session_map") == 1 and _table(dp, "pending_map") == 0


def test_a_rst_is_no_answer(dp: Harness) -> None:
    """An ACK nobody listens for gets a RST back: the entry closes and stays
    with the one-way sessions (it must not take room among working ones)."""
    dp.install(shop())
    assert dp.send(tcp(WEB4, DB4, 40060, 5432, "A")).passed
    assert dp.send(tcp(DB4, WEB4, 5432, 40060, "R")).passed
    assert (_table(dp, "pending_map"), _table(dp, "session_map")) == (1, 0)
    assert dp.session(WEB4, DB4).state == State.CLOSED


def test_an_echo_reply_whose_session_was_lost_passes(dp: Harness) -> None:
    dp.install(shop(PING))
    out = dp.send(ping(DB4, WEB4, ident=77, reply=True))
    assert out.passed and dp.rule_name(out.verdict.rule_id) == "ping-db"
    assert dp.session(WEB4, DB4).src_ip == WEB4
    # Neither way allowed: judged (and denied) in its own direction.
    out = dp.send(ping(DB4, "10.203.0.66", ident=78, reply=True))
    assert out.dropped and out.verdict.reason == Reason.DEFAULT


# -- unanswered floods ---------------------------------------------------------

def test_an_unanswered_flood_cannot_evict_answered_sessions() -> None:
    """Capacity 16,384 (pending: 4,096): 20,000 ACKs from an allowed peer,
    each from another source port, fill pending_map five times over. The
    established connection stays in session_map and its packets still take
    the fast path."""
    dp = Datapath(DatapathConfig(pin_dir=None, session_capacity=16384, ringbuf_bytes=1 << 24))
    dp.load()
    try:
        h = Harness(dp)
        h.reset()
        h.install(shop())
        _handshake(h, 40000)
        for i in range(20_000):
            assert dp.test_run(bytes(tcp(WEB4, DB4, 1024 + i, 5432, "A"))).retval == 0
        h.drain(1 << 30)
        assert _table(h, "pending_map") <= 4096
        key = session_key(4, 6, addr16(WEB4), addr16(DB4), 40000, 5432)
        assert dp.maps["session_map"].lookup(key) is not None
        before = h.stats().get((Direction.INGRESS, Verdict.ALLOWED, Reason.SESSION), (0, 0))[0]
        assert h.send(tcp(WEB4, DB4, 40000, 5432, "PA", b"still here")).events == []
        after = h.stats()[(Direction.INGRESS, Verdict.ALLOWED, Reason.SESSION)][0]
        assert after == before + 1
    finally:
        dp.close()


# -- aggregation ---------------------------------------------------------------

WINDOW_NS = 50_000_000  # 50 ms: short, for a test (bursts go in one test run)
LONG_WINDOW_NS = 1_000_000_000


def _counted(events: list, kind: EventType) -> int:
    return sum(e.count for e in events if e.type == kind)


def _flush_all(dp: Harness) -> list[int]:
    return [dp.dp.flush_flow(k) for k, _v in dp.dp.aggregates()]


def test_repeated_denials_of_one_flow_are_one_event_with_an_exact_count(dp: Harness) -> None:
    dp.install(shop())
    dp.dp.write_settings(LONG_WINDOW_NS, 0)
    events = dp.send(tcp(ROGUE4, DB4, 2000, 5432, "S")).events
    # One flow: the source port is not part of it.
    events += dp.send(tcp(ROGUE4, DB4, 2001, 5432, "S"), repeat=299).events
    assert [(e.type, e.count) for e in events] == [(EventType.VERDICT, 1)]
    time.sleep(LONG_WINDOW_NS / 1e9 * 1.2)
    assert _flush_all(dp) == [1]  # FLUSH_REPORTED
    (held,) = dp.drain()
    assert (held.verdict, held.reason, held.count) == (Verdict.DENIED, Reason.DEFAULT, 299)
    assert held.bytes[0] == 299 * len(bytes(tcp(ROGUE4, DB4, 1, 5432, "S")))
    # The next packet after a window reports itself and what it held.
    events = dp.send(tcp(ROGUE4, DB4, 3000, 5432, "S"), repeat=50).events
    assert events == []  # within the window opened by the flush
    time.sleep(LONG_WINDOW_NS / 1e9 * 1.2)
    events = dp.send(tcp(ROGUE4, DB4, 4000, 5432, "S")).events
    assert [e.count for e in events] == [51]
    total = 1 + 299 + 50 + 1
    assert dp.stats()[(Direction.INGRESS, Verdict.DENIED, Reason.DEFAULT)][0] == total
    assert dp.stats()[(Direction.INGRESS, Verdict.DENIED, Reason.DEFAULT)][0] == total


def test_a_quiet_flow_is_flushed_then_retired(dp: Harness) -> None:
    dp.install(shop())
    dp.dp.write_settings(WINDOW_NS, 0)
    dp.send(tcp(ROGUE4, DB4, 2000, 5432, "S"))
    dp.send(tcp(ROGUE4, DB4, 2001, 5432, "S"), repeat=2)  # held (one run: within the window)
    dp.drain()
    time.sleep(WINDOW_NS / 1e9 * 1.2)
    assert _flush_all(dp) == [1]      # reported the 2 held
    assert [e.count for e in dp.drain()] == [2]
    time.sleep(WINDOW_NS / 1e9 * 2.2)
    assert _flush_all(dp) == [3]      # idle two windows: marked
    # A packet now revives the entry and reports itself at once.
    assert [e.count for e in dp.send(tcp(ROGUE4, DB4, 2100, 5432, "S")).events] == [1]
    time.sleep(WINDOW_NS / 1e9 * 2.2)
    assert _flush_all(dp) == [3]
    time.sleep(WINDOW_NS / 1e9 * 1.2)
    assert _flush_all(dp) == [2]      # marked a window ago, untouched: deleted
    assert list(dp.dp.aggregates()) == []
    assert dp.stats()[(Direction.INGRESS, Verdict.DENIED, Reason.DEFAULT)][0] == 4


def test_drops_are_aggregated_and_gso_packets_count_their_segments(dp: Harness) -> None:
    dp.install(shop())
    dp.dp.write_settings(WINDOW_NS, 0)
    xmas = tcp(WEB4, DB4, 40000, 5432, "FSRPAU")  # an impossible flag combination
    events = dp.send(xmas, gso_segs=4).events + dp.send(xmas).events
    assert [(e.type, e.reason, e.count) for e in events] == [(EventType.DROP, Reason.INVALID, 4)]
    time.sleep(WINDOW_NS / 1e9 * 1.2)
    _flush_all(dp)
    assert [e.count for e in dp.drain()] == [1]
    assert dp.stats()[(Direction.INGRESS, Verdict.DROPPED, Reason.INVALID)][0] == 5


def test_denials_have_a_ring_of_their_own(dp: Harness) -> None:
    dp.install(shop())
    dp.send(tcp(ROGUE4, DB4, 2000, 5432, "S"))
    dp.send(tcp(WEB4, DB4, 2001, 5432, "S"))
    stats = {k: v for k, v in dp.dp.read_event_stats().items() if v[0]}
    assert stats == {(abi.Ring.DENIALS, EventType.VERDICT): (1, 0),
                     (abi.Ring.EVENTS, EventType.VERDICT): (1, 0),
                     (abi.Ring.EVENTS, EventType.SESSION): (1, 0)}


# -- audit mode never breaks a connection --------------------------------------

def test_audit_mode_lets_every_drop_it_decides_pass_and_says_so(dp: Harness) -> None:
    dp.install(shop(mode="audit"))
    # A SYN-ACK nobody allowed the SYN of: audit allows (and reports) the
    # SYN's direction, so it is picked up as a reply.
    out = dp.send(tcp(DB4, ROGUE4, 5432, 40000, "SA"))
    assert out.passed and out.verdict.verdict == Verdict.AUDIT
    cases = {
        "an impossible flag combination": tcp(ROGUE4, DB4, 40001, 5432, "FSRPAU"),
        "a later fragment without its first": eth(fragment(
            IP(src=ROGUE4, dst=DB4, id=99) / UDP(sport=1, dport=53) / Raw(b"y" * 3000),
            fragsize=1000)[1]),
    }
    for what, pkt in cases.items():
        out = dp.send(pkt)
        assert out.passed, what
        (e,) = out.events
        assert (e.type, e.verdict, e.flags) == (EventType.DROP, Verdict.AUDIT,
                                                abi.EventFlag.AUDIT), what
    counted = Counter({r: n for (_d, v, r), (n, _b) in dp.stats().items()
                       if v == Verdict.AUDIT})
    assert counted == Counter({Reason.DEFAULT: 1, Reason.INVALID: 1, Reason.FRAGMENT: 1})
    # A frame the kernel would drop anyway still drops: a lying IP header.
    bad = bytearray(bytes(tcp(ROGUE4, DB4, 40002, 5432, "S")))
    bad[14 + 2:14 + 4] = (2000).to_bytes(2, "big")  # total length beyond the frame
    out = dp.send(bytes(bad))
    assert out.dropped and out.verdict.flags == 0


def test_audit_mode_state_errors_in_a_session_pass(dp: Harness) -> None:
    dp.install(shop(mode="audit"))
    _handshake(dp, 40010)
    out = dp.send(tcp(WEB4, DB4, 40010, 5432, "SA"))  # SYN-ACK from the originator
    assert out.passed and out.verdict.reason == Reason.STATE
    assert out.verdict.flags == abi.EventFlag.AUDIT


# -- ownership follows the traffic ---------------------------------------------

@pytest.fixture
def two_links() -> Iterator[tuple[int, int]]:
    names = ("mshov0", "mshov1")
    subprocess.run(["ip", "link", "add", names[0], "type", "veth", "peer", "name", names[1]],
                   check=True)
    try:
        idx = []
        for n in names:
            with open(f"/sys/class/net/{n}/ifindex") as f:
                idx.append(int(f.read()))
        yield idx[0], idx[1]
    finally:
        subprocess.run(["ip", "link", "del", names[0]], check=False)


def test_a_hook_takes_a_direction_over_from_one_that_went_quiet(
        dp: Harness, two_links: tuple[int, int]) -> None:
    a, b = two_links
    dp.install(shop())
    dp.dp.write_settings(0, 100_000)  # no handover while the owner is busy
    dp.send(tcp(WEB4, DB4, 40020, 5432, "S"), ifindex=a)
    dp.send(tcp(DB4, WEB4, 5432, 40020, "SA"), ifindex=a)
    dp.send(tcp(WEB4, DB4, 40020, 5432, "A"), ifindex=a)
    s = dp.session(WEB4, DB4)
    assert s.owner[0] == a << 1 and s.packets == (2, 1)
    # The same packet seen right after at another hook: not counted twice.
    dp.send(tcp(WEB4, DB4, 40020, 5432, "A"), ifindex=a)
    dp.send(tcp(WEB4, DB4, 40020, 5432, "A"), ifindex=b)
    assert dp.session(WEB4, DB4).packets == (3, 1)
    dp.dp.write_settings(0, 1)  # hand over after one tick
    time.sleep(0.05)  # hook a sees nothing more: the route moved
    out = dp.send(tcp(WEB4, DB4, 40020, 5432, "FA"), ifindex=b)
    assert out.states == [(State.CLOSING, State.ESTABLISHED)]
    s = dp.session(WEB4, DB4)
    assert s.owner[0] == b << 1 and s.packets == (4, 1)


# -- TCP simultaneous open -------------------------------------------------------

def test_simultaneous_open(dp: Harness) -> None:
    dp.install(shop())
    assert dp.send(tcp(WEB4, DB4, 40030, 5432, "S")).passed
    assert dp.send(tcp(DB4, WEB4, 5432, 40030, "S")).passed      # the peer's own SYN
    assert dp.send(tcp(WEB4, DB4, 40030, 5432, "SA")).passed
    assert dp.send(tcp(DB4, WEB4, 5432, 40030, "SA")).passed
    out = dp.send(tcp(WEB4, DB4, 40030, 5432, "A"))
    assert out.passed and out.states == [(State.ESTABLISHED, State.NEW)]


# -- fragments, both families ----------------------------------------------------

def _frags(family: int, src: str, dst: str, ident: int) -> list:
    if family == 4:
        return [eth(f) for f in fragment(
            IP(src=src, dst=dst, id=ident) / UDP(sport=3333, dport=53) / Raw(b"z" * 3000),
            fragsize=1000)]
    from scapy.layers.inet6 import IPv6ExtHdrFragment

    pkt = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=ident) / UDP(sport=3333, dport=53) \
        / Raw(b"z" * 3000)
    return [eth(f) for f in fragment6(pkt, 1280)]


@pytest.mark.parametrize("family", [4, 6])
def test_fragments_follow_their_first_and_are_freed_in_any_order(
        dp: Harness, family: int) -> None:
    web, api_or_db = (WEB4, API4) if family == 4 else (WEB6, DB6)
    rule = DNS if family == 4 else Rule.make("dns6", S.of_workload("web"),
                                             S.of_workload("db"), "allow", "udp", [53])
    dp.install(shop(rule))
    first, *rest = _frags(family, web, api_or_db, 4242)
    assert len(rest) >= 2
    assert dp.send(first).passed
    assert _table(dp, "frag_map") == 1
    for f in reversed(rest):  # the last one first
        out = dp.send(f)
        assert out.passed and out.events == []
    assert _table(dp, "frag_map") == 0, "the whole datagram passed: its entry is freed"
    # A denied datagram's later fragments are denied, each counted.
    first, *rest = _frags(family, "10.203.0.66" if family == 4 else "fd00:203::66",
                          api_or_db, 4343)
    assert dp.send(first).dropped
    for f in rest:
        out = dp.send(f)
        assert out.dropped and out.verdict.verdict == Verdict.DENIED


def test_an_rcu_grace_period_is_available() -> None:
    """Datapath.converge() waits for one before rewriting a retired slot."""
    t0 = time.monotonic()
    bpfsys.wait_for_running_programs()
    assert time.monotonic() - t0 < 5


# -- IP inside PPPoE and MPLS is judged, not passed as non-IP --------------------

def _pppoe(inner: bytes, ppp_proto: int) -> bytes:
    from scapy.layers.l2 import Ether

    pppoe = bytes([0x11, 0x00, 0x00, 0x01]) + (len(inner) + 2).to_bytes(2, "big")
    return bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b", type=0x8864)) \
        + pppoe + ppp_proto.to_bytes(2, "big") + inner


def _mpls(inner: bytes, labels: int = 2) -> bytes:
    from scapy.layers.l2 import Ether

    stack = b"".join(((100 + i) << 12 | (1 << 8 if i == labels - 1 else 0) | 64)
                     .to_bytes(4, "big") for i in range(labels))
    return bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b", type=0x8847)) \
        + stack + inner


@pytest.mark.parametrize("wrap", ["pppoe", "mpls"])
def test_ip_inside_pppoe_and_mpls_is_judged(dp: Harness, wrap: str) -> None:
    dp.install(shop())

    def framed(pkt) -> bytes:
        inner = bytes(pkt)[14:]  # the IP packet, without its Ethernet header
        v6 = inner[0] >> 4 == 6
        return _pppoe(inner, 0x0057 if v6 else 0x0021) if wrap == "pppoe" else _mpls(inner)

    for allowed, denied in ((tcp(WEB4, DB4, 40050, 5432), tcp(ROGUE4, DB4, 40051, 5432)),
                            (tcp(WEB6, DB6, 40052, 5432), tcp("fd00:203::66", DB6, 40053,
                                                              5432))):
        assert dp.send(framed(allowed)).passed
        out = dp.send(framed(denied))
        assert out.dropped and out.verdict.verdict == Verdict.DENIED
    # Not IP inside (an MPLS pseudowire's Ethernet, a PPP control protocol): passes.
    assert dp.send(_pppoe(b"\xc0\x21" + bytes(20), 0xC021)).passed
