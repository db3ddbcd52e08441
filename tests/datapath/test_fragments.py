"""Fragments: later fragments follow their first fragment's verdict; a later
fragment without its first drops with reason `fragment`; fragments that
could rewrite the TCP header are invalid."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.packet import Raw

from microseg.kernel.abi import Direction, EventType, Reason, Verdict
from microseg.policy.model import Rule
from microseg.policy.model import Selector as S

from .harness import Harness, eth
from .policies import API4, DB6, ROGUE4, WEB4, WEB6, shop

DNS = Rule.make("dns", S.of_workload("web"), S.of_workload("api"), "allow", "udp", [53])
BIG = b"x" * 3000


def frags4(src: str, dst: str, dport: int, ident: int) -> list:
    return fragment(IP(src=src, dst=dst, id=ident) / UDP(sport=3333, dport=dport) / Raw(BIG),
                    fragsize=1000)


def test_later_fragments_follow_an_allowed_first(dp: Harness) -> None:
    dp.install(shop(DNS))
    first, *rest = frags4(WEB4, API4, 53, 77)
    out = dp.send(eth(first))
    assert out.passed and out.verdict.verdict == Verdict.ALLOWED
    for f in rest:
        out = dp.send(eth(f))
        assert out.passed and out.events == []
    assert dp.stats()[(Direction.INGRESS, Verdict.ALLOWED, Reason.FRAGMENT)][0] == len(rest)


def test_later_fragments_follow_a_denied_first(dp: Harness) -> None:
    dp.install(shop(DNS))
    first, *rest = frags4(ROGUE4, API4, 53, 78)
    assert dp.send(eth(first)).dropped
    for f in rest:
        out = dp.send(eth(f))
        assert out.dropped
        assert (out.verdict.verdict, out.verdict.reason) == (Verdict.DENIED, Reason.DEFAULT)


def test_fragment_without_its_first_is_dropped(dp: Harness) -> None:
    dp.install(shop(DNS))
    _first, second, *_ = frags4(WEB4, API4, 53, 79)
    out = dp.send(eth(second))
    assert out.dropped
    assert (out.verdict.type, out.verdict.reason) == (EventType.DROP, Reason.FRAGMENT)


def test_fragment_of_another_datagram_does_not_ride_along(dp: Harness) -> None:
    dp.install(shop(DNS))
    first, *_ = frags4(WEB4, API4, 53, 80)
    dp.send(eth(first))
    _, other, *_ = frags4(WEB4, API4, 53, 81)  # other id
    assert dp.send(eth(other)).dropped


def test_fragment_overlapping_the_tcp_header_is_invalid(dp: Harness) -> None:
    """RFC 1858: offset 8 could rewrite the flags the first fragment was
    judged by (a SYN turned into something else, or ports)."""
    dp.install(shop(DNS))
    evil = IP(src=WEB4, dst=API4, id=82, frag=1, proto=6) / Raw(b"\0" * 16)
    out = dp.send(eth(evil))
    assert out.dropped and out.verdict.reason == Reason.INVALID


def test_tiny_first_fragment_without_full_tcp_header_is_invalid(dp: Harness) -> None:
    dp.install(shop())
    tiny = IP(src=WEB4, dst=API4, id=83, flags="MF", proto=6) / Raw(b"\0" * 8)
    out = dp.send(eth(tiny))
    assert out.dropped and out.verdict.reason == Reason.INVALID


def test_ipv6_fragments(dp: Harness) -> None:
    dns6 = Rule.make("dns6", S.of_workload("web"), S.of_workload("db"), "allow", "udp", [53])
    dp.install(shop(dns6))
    pkt = IPv6(src=WEB6, dst=DB6) / IPv6ExtHdrFragment(id=99) / UDP(sport=3, dport=53) / Raw(BIG)
    first, *rest = fragment6(pkt, 1000)
    out = dp.send(eth(first))
    assert out.passed and dp.rule_name(out.verdict.rule_id) == "dns6"
    for f in rest:
        assert dp.send(eth(f)).passed
    # Without its first fragment, a later one drops.
    pkt2 = IPv6(src=WEB6, dst=DB6) / IPv6ExtHdrFragment(id=100) / UDP(dport=53) / Raw(BIG)
    _, second, *_ = fragment6(pkt2, 1000)
    out = dp.send(eth(second))
    assert out.dropped and out.verdict.reason == Reason.FRAGMENT


def test_ipv6_fragment_overlapping_tcp_header_is_invalid(dp: Harness) -> None:
    dp.install(shop())
    evil = IPv6(src=WEB6, dst=DB6) / IPv6ExtHdrFragment(id=5, offset=1, nh=6) / Raw(b"\0" * 16)
    out = dp.send(eth(evil))
    assert out.dropped and out.verdict.reason == Reason.INVALID


def test_unfragmented_tcp_is_not_remembered_as_fragment(dp: Harness) -> None:
    dp.install(shop())
    dp.send(eth(IP(src=WEB4, dst=API4) / TCP(dport=80, flags="S")))
    assert list(dp.dp.maps["frag_map"].iter_keys()) == []
