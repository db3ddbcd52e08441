"""The suggestion enforced by the real program: on random observed flows over
random workloads, labels and outside addresses, the policy `policy suggest`
writes — parsed back from its text, compiled and installed — passes the first
packet of every flow that ran and drops the first packet of any other
(tests/unit/test_suggest.py checks the same against the literal reading)."""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from microseg.kernel.abi import Verdict
from microseg.policy.suggest import suggest

from ..unit.test_suggest import _endpoint as endpoint
from ..unit.test_suggest import inventories, observations, parsed, records, universe
from .harness import Harness, eth, ping, tcp, udp

# Source ports (and echo identifiers) never used twice, and above every port
# a suggestion names: no packet meets a session or is a reply of one.
_fresh = itertools.count(20000)


def _first_packet(src: str, dst: str, proto: str | int, port: int | None):
    sport = next(_fresh) % 40000 + 20000
    if proto == "tcp":
        return tcp(src, dst, sport, port or 0, "S")
    if proto == "udp":
        return udp(src, dst, sport, port or 0)
    if proto in ("icmp", "icmpv6"):
        return ping(src, dst, ident=sport)
    ip = IPv6(src=src, dst=dst, nh=proto) if ":" in src else IP(src=src, dst=dst, proto=proto)
    return eth(ip / Raw(b"\x00" * 8))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), with_file=st.booleans())
def test_the_kernel_enforces_exactly_what_ran(dp: Harness, data: st.DataObject,
                                              with_file: bool) -> None:
    pol = data.draw(inventories())
    events = data.draw(observations(pol))
    seen_at: dict[str, set[str]] = {}
    for e in events:
        for side in (e["src"], e["dst"]):
            if side["workload"]:
                seen_at.setdefault(side["workload"], set()).add(side["ip"])
    suggested = parsed(suggest(records(*events), pol if with_file else None, seen_at=seen_at))
    dp.install(suggested)

    def key(src: str, dst: str, proto: str | int, port: int | None) -> tuple:
        return (endpoint(pol, src), endpoint(pol, dst), proto, port)

    ran = {key(e["src"]["ip"], e["dst"]["ip"], e["protocol"],
               e["dst"]["port"] if e["protocol"] in ("tcp", "udp") else None)
           for e in events
           if e["verdict"] != "denied" and e["protocol"] != 47 and e["dst"]["port"] != 0}
    observed = [(e["src"]["ip"], e["dst"]["ip"], e["protocol"],
                 e["dst"]["port"] if e["protocol"] in ("tcp", "udp") else None) for e in events]
    others = universe(random.Random(data.draw(st.integers(0, 1 << 30))), 40)
    for i, (src, dst, proto, port) in enumerate(observed + others):
        out = dp.send(_first_packet(src, dst, proto, port))
        v = out.verdict
        if key(src, dst, proto, port) not in ran:
            assert out.dropped and Verdict(v.verdict) == Verdict.DENIED, (src, dst, proto, port)
            assert dp.rule_name(v.rule_id) is None  # the default decided
        elif i < len(observed) or with_file:
            assert out.passed and Verdict(v.verdict) == Verdict.ALLOWED, (src, dst, proto, port)
            assert dp.rule_name(v.rule_id) in {r.name for r in suggested.rules}
