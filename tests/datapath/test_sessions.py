"""Session tracking: the TCP state machine from handshake to close, RST,
out-of-state packets, mid-stream pickup; UDP and ICMP echo pseudo-sessions;
ICMP errors related to a session; per-direction counters; two hooks."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDPerror
from scapy.layers.inet import IPerror as IPErr
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.packet import Raw

from microseg.kernel.abi import Direction, EventType, Reason, SessionFlag, State, Verdict
from microseg.policy.model import Rule
from microseg.policy.model import Selector as S

from .harness import Harness, eth, ping, tcp, udp
from .policies import API4, DB4, DB6, OUTSIDE4, ROGUE4, WEB4, WEB6, shop

N, E, C, X = State.NEW, State.ESTABLISHED, State.CLOSING, State.CLOSED
NONE = State.NONE


def c2s(flags: str, payload: bytes = b"") -> object:
    return tcp(WEB4, DB4, 40000, 5432, flags, payload)


def s2c(flags: str, payload: bytes = b"") -> object:
    return tcp(DB4, WEB4, 5432, 40000, flags, payload)


def handshake(dp: Harness) -> None:
    assert dp.send(c2s("S")).states == [(N, NONE)]
    assert dp.send(s2c("SA")).states == []  # SYN_RECV is still "new" to users
    assert dp.send(c2s("A")).states == [(E, N)]


class TestTcp:
    def test_handshake_data_and_graceful_close(self, dp: Harness) -> None:
        dp.install(shop())
        handshake(dp)
        assert dp.send(c2s("PA", b"hello")).passed
        assert dp.send(s2c("PA", b"world!")).passed
        assert dp.send(c2s("FA")).states == [(C, E)]
        assert dp.send(s2c("A")).states == []
        assert dp.send(s2c("FA")).states == []
        out = dp.send(c2s("A"))  # the final ACK
        assert out.states == [(X, C)]
        closed = out.of_type(EventType.SESSION)[0]
        assert (closed.src_ip, closed.sport, closed.dst_ip, closed.dport) == (WEB4, 40000, DB4,
                                                                              5432)
        assert closed.packets == (5, 4)
        s = dp.session(WEB4, DB4)
        assert s.packets == (5, 4) and State(s.state) == X
        assert s.bytes[0] == sum(len(c2s(f, p)) for f, p in
                                 [("S", b""), ("A", b""), ("PA", b"hello"), ("FA", b""),
                                  ("A", b"")])
        assert closed.created_ns == s.created_ns and closed.ts_ns >= s.created_ns

    def test_server_closes_first(self, dp: Harness) -> None:
        dp.install(shop())
        handshake(dp)
        assert dp.send(s2c("FA")).states == [(C, E)]
        assert dp.send(c2s("FA")).states == []
        assert dp.send(s2c("A")).states == [(X, C)]

    def test_rst_refused_connection(self, dp: Harness) -> None:
        dp.install(shop())
        dp.send(c2s("S"))
        assert dp.send(s2c("RA")).states == [(X, N)]

    def test_rst_mid_connection(self, dp: Harness) -> None:
        dp.install(shop())
        handshake(dp)
        assert dp.send(c2s("R")).states == [(X, E)]

    def test_syn_ack_from_originator_is_dropped(self, dp: Harness) -> None:
        dp.install(shop())
        dp.send(c2s("S"))
        out = dp.send(c2s("SA"))
        assert out.dropped
        assert (out.verdict.type, out.verdict.reason) == (EventType.DROP, Reason.STATE)
        assert dp.send(s2c("SA")).passed  # the session itself is unharmed
        assert dp.send(c2s("A")).states == [(E, N)]
        out = dp.send(c2s("SA"))  # still invalid once established
        assert out.dropped and out.verdict.reason == Reason.STATE

    def test_ack_before_syn_ack_is_dropped(self, dp: Harness) -> None:
        dp.install(shop())
        dp.send(c2s("S"))
        out = dp.send(c2s("A"))
        assert out.dropped and out.verdict.reason == Reason.STATE

    def test_syn_from_responder_is_dropped(self, dp: Harness) -> None:
        dp.install(shop())
        handshake(dp)
        out = dp.send(s2c("S"))
        assert out.dropped and out.verdict.reason == Reason.STATE

    def test_syn_ack_whose_syn_was_allowed_is_picked_up_as_a_reply(self, dp: Harness) -> None:
        """The session of an allowed handshake was lost (evicted, swept, a
        start without pins) after the SYN: the server's SYN-ACK carries on."""
        dp.install(shop())
        out = dp.send(s2c("SA"))
        assert out.passed and dp.rule_name(out.verdict.rule_id) == "web-to-db"
        s = dp.session(WEB4, DB4)
        assert (s.src_ip, s.dst_ip) == (WEB4, DB4), "the client is the originator"
        assert s.state == State.SYN_RECV and s.packets == (0, 1)
        assert s.flags & SessionFlag.REPLY_PICKUP
        assert dp.send(c2s("A")).states == [(E, N)]
        assert dp.session(WEB4, DB4).packets == (1, 1)

    def test_syn_ack_nobody_allowed_the_syn_of_is_dropped(self, dp: Harness) -> None:
        dp.install(shop())
        out = dp.send(tcp(DB4, ROGUE4, 5432, 40000, "SA"))
        assert out.dropped and out.verdict.reason == Reason.STATE
        assert dp.sessions() == []

    def test_retransmitted_syn_passes_quietly(self, dp: Harness) -> None:
        dp.install(shop())
        dp.send(c2s("S"))
        out = dp.send(c2s("S"))
        assert out.passed and out.events == []
        assert dp.session(WEB4, DB4).packets == (2, 0)

    def test_midstream_pickup_allowed(self, dp: Harness) -> None:
        dp.install(shop())
        out = dp.send(c2s("PA", b"data"))
        assert out.passed
        assert out.verdict.verdict == Verdict.ALLOWED
        assert out.states == [(E, NONE)]
        s = dp.session(WEB4, DB4)
        assert s.flags & SessionFlag.PICKUP and State(s.state) == E
        assert dp.send(s2c("A")).passed

    def test_midstream_pickup_denied(self, dp: Harness) -> None:
        dp.install(shop())
        out = dp.send(tcp(OUTSIDE4, DB4, 40000, 5432, "A"))
        assert out.dropped and out.verdict.verdict == Verdict.DENIED
        assert dp.sessions() == []

    def test_new_syn_after_close_opens_a_new_session(self, dp: Harness) -> None:
        dp.install(shop())
        handshake(dp)
        dp.send(c2s("R"))
        out = dp.send(c2s("S"))
        assert out.passed
        assert out.verdict.verdict == Verdict.ALLOWED
        assert out.states == [(N, NONE)]
        assert dp.session(WEB4, DB4).packets == (1, 0)

    def test_late_ack_after_close_passes(self, dp: Harness) -> None:
        dp.install(shop())
        handshake(dp)
        dp.send(c2s("R"))
        out = dp.send(s2c("A"))
        assert out.passed and out.events == []

    def test_counters_per_direction(self, dp: Harness) -> None:
        dp.install(shop())
        handshake(dp)
        for _ in range(4):
            dp.send(c2s("PA", b"x" * 100))
        dp.send(s2c("PA", b"y" * 10))
        s = dp.session(WEB4, DB4)
        assert s.packets == (6, 2)
        assert s.bytes == (len(c2s("S")) * 2 + 4 * len(c2s("PA", b"x" * 100)),
                           len(s2c("SA")) + len(s2c("PA", b"y" * 10)))
        # last_seen is in jiffies: the latest packet's tick.
        now = dp.dp.clock_sample()
        assert now.jiffies - 50 <= s.last_seen <= now.jiffies
        assert s.created_ns <= now.ktime_ns

    def test_second_hook_passes_without_counting_again(self, dp: Harness) -> None:
        """A packet crossing two attached hooks (one workload's veth ingress,
        another's egress) is judged and accounted once."""
        dp.install(shop())
        assert dp.send(c2s("S"), Direction.INGRESS).verdict.verdict == Verdict.ALLOWED
        out = dp.send(c2s("S"), Direction.EGRESS)
        assert out.passed and out.events == []
        assert dp.session(WEB4, DB4).packets == (1, 0)
        assert (Direction.EGRESS, Verdict.ALLOWED, Reason.SESSION) not in dp.stats()

    def test_ipv6_session(self, dp: Harness) -> None:
        dp.install(shop())
        assert dp.send(tcp(WEB6, DB6, 1000, 5432, "S")).states == [(N, NONE)]
        dp.send(tcp(DB6, WEB6, 5432, 1000, "SA"))
        assert dp.send(tcp(WEB6, DB6, 1000, 5432, "A")).states == [(E, N)]
        assert dp.session(WEB6, DB6).family == 6


class TestUdpAndIcmp:
    def _dns(self) -> Rule:
        return Rule.make("dns", S.of_workload("web"), S.of_workload("api"), "allow", "udp", [53])

    def test_udp_new_then_established_on_reply(self, dp: Harness) -> None:
        dp.install(shop(self._dns()))
        out = dp.send(udp(WEB4, API4, 3333, 53))
        assert out.passed and out.states == [(N, NONE)]
        assert dp.send(udp(WEB4, API4, 3333, 53)).events == []
        assert dp.send(udp(API4, WEB4, 53, 3333)).states == [(E, N)]
        assert dp.session(WEB4, API4).packets == (2, 1)

    def test_udp_reply_direction_needs_no_rule(self, dp: Harness) -> None:
        dp.install(shop(self._dns()))
        dp.send(udp(WEB4, API4, 3333, 53))
        assert dp.send(udp(API4, WEB4, 53, 3333)).passed
        # No rule allows api -> web, nor web -> api:54: dropped.
        assert dp.send(udp(API4, WEB4, 54, 3333)).dropped

    def test_udp_reply_whose_session_was_lost_is_picked_up(self, dp: Harness) -> None:
        """A server's answer with no session (evicted, swept, a daemon
        started without pins) passes when the request direction is allowed,
        as a session the client originated."""
        dp.install(shop(self._dns()))
        out = dp.send(udp(API4, WEB4, 53, 3333))
        assert out.passed and dp.rule_name(out.verdict.rule_id) == "dns"
        s = dp.session(WEB4, API4)
        assert (s.src_ip, s.sport, s.dst_ip, s.dport) == (WEB4, 3333, API4, 53)
        assert s.packets == (0, 1) and s.flags & SessionFlag.REPLY_PICKUP

    def test_ping_session_v4_and_v6(self, dp: Harness) -> None:
        icmp = Rule.make("ping-db", S.of_workload("web"), S.of_workload("db"), "allow", "icmp")
        icmp6 = Rule.make("ping6-db", S.of_workload("web"), S.of_workload("db"), "allow",
                          "icmpv6")
        dp.install(shop(icmp, icmp6))
        out = dp.send(ping(WEB4, DB4, ident=9))
        assert out.passed and out.states == [(N, NONE)]
        assert dp.rule_name(out.verdict.rule_id) == "ping-db"
        assert dp.send(ping(DB4, WEB4, ident=9, reply=True)).states == [(E, N)]
        out = dp.send(ping(WEB6, DB6, ident=9))
        assert out.passed and dp.rule_name(out.verdict.rule_id) == "ping6-db"
        assert dp.send(ping(DB6, WEB6, ident=9, reply=True)).states == [(E, N)]
        # Another identifier is another session, and needs the rule again.
        assert dp.send(ping(DB4, WEB4, ident=10, reply=False)).dropped

    def test_echo_the_other_way_with_the_same_identifier_is_judged_alone(
            self, dp: Harness) -> None:
        """db's echo request with the id of web's ping session is no part of
        it: judged in its own direction — dropped while db may not ping web,
        passed (by that rule, no session touched) once it may."""
        to_db = Rule.make("ping-db", S.of_workload("web"), S.of_workload("db"), "allow", "icmp")
        dp.install(shop(to_db))
        assert dp.send(ping(WEB4, DB4, ident=9)).passed
        out = dp.send(ping(DB4, WEB4, ident=9))
        assert out.dropped and out.verdict.reason == Reason.DEFAULT and out.states == []
        assert dp.send(ping(DB4, WEB4, ident=9, reply=True)).states == [(E, N)]
        to_web = Rule.make("ping-web", S.of_workload("db"), S.of_workload("web"), "allow",
                           "icmp")
        dp.install(shop(to_db, to_web))
        out = dp.send(ping(DB4, WEB4, ident=9))
        assert out.passed and dp.rule_name(out.verdict.rule_id) == "ping-web"
        # web's reply to it: judged alone too (web may ping db: it passes).
        assert dp.send(ping(WEB4, DB4, ident=9, reply=True)).passed
        assert [s.state for s in dp.sessions()] == [E]

    def test_icmp_error_about_a_session_passes_as_related(self, dp: Harness) -> None:
        dp.install(shop(self._dns()))
        dp.send(udp(WEB4, API4, 3333, 53))
        err = eth(IP(src=API4, dst=WEB4) / ICMP(type=3, code=3)
                  / IPErr(src=WEB4, dst=API4) / UDPerror(sport=3333, dport=53) / Raw(b"x"))
        out = dp.send(err)
        assert out.passed and out.events == []
        assert dp.stats()[(Direction.INGRESS, Verdict.ALLOWED, Reason.RELATED)][0] == 1

    def test_icmp_error_about_nothing_is_judged(self, dp: Harness) -> None:
        dp.install(shop(self._dns()))
        err = eth(IP(src=API4, dst=WEB4) / ICMP(type=3, code=3)
                  / IPErr(src=WEB4, dst=API4) / UDPerror(sport=4444, dport=53))
        out = dp.send(err)
        assert out.dropped and out.verdict.reason == Reason.DEFAULT

    def test_icmpv6_packet_too_big_for_tcp_session(self, dp: Harness) -> None:
        dp.install(shop())
        dp.send(tcp(WEB6, DB6, 1000, 5432, "S"))
        quoted = IPv6(src=WEB6, dst=DB6) / TCP(sport=1000, dport=5432, flags="A")
        out = dp.send(eth(IPv6(src=DB6, dst=WEB6) / ICMPv6PacketTooBig(mtu=1280) / quoted))
        assert out.passed and out.events == []

    def test_informational_icmp_is_judged_per_packet(self, dp: Harness) -> None:
        dp.install(shop())
        ts = eth(IP(src=WEB4, dst=DB4) / ICMP(type=13))
        assert dp.send(ts).dropped and dp.send(ts).dropped
        assert dp.sessions() == []
