"""`policy trace` against the real program: for random policies and packets,
the trace's verdict and deciding rule are what the kernel decides for the
connection's first packet (docs/policy.md "Tracing a connection")."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from microseg.kernel.abi import Verdict
from microseg.policy.evaluate import Evaluator, trace
from microseg.policy.model import Policy

from ..unit.test_compile import PORTS, V4, V6, policies
from .harness import Harness, eth, ping, tcp, udp

_sports = itertools.count(10000)
GRE = 47
VERDICTS = {"allowed": Verdict.ALLOWED, "denied": Verdict.DENIED, "audit": Verdict.AUDIT}


def _start(src: str, dst: str, proto: int, sport: int, dport: int):
    """A connection's first packet: a SYN, a datagram, an echo request, or
    a GRE packet (a protocol no rule can name)."""
    if proto == 6:
        return tcp(src, dst, sport, dport, "S")
    if proto == 17:
        return udp(src, dst, sport, dport)
    if proto == GRE:
        ip = IP(src=src, dst=dst, proto=GRE) if ":" not in src else IPv6(src=src, dst=dst,
                                                                         nh=GRE)
        return eth(ip / Raw(b"\x00\x00\x08\x00"))
    return ping(src, dst, ident=sport)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(policy=policies(), data=st.data())
def test_trace_agrees_with_the_kernel(dp: Harness, policy: Policy, data: st.DataObject) -> None:
    dp.install(policy)
    ev = Evaluator(policy)
    for _ in range(15):
        v6 = data.draw(st.booleans())
        pool = V6 if v6 else V4
        src, dst = data.draw(st.sampled_from(pool)), data.draw(st.sampled_from(pool))
        proto = data.draw(st.sampled_from([6, 17, 58 if v6 else 1, GRE]))
        dport = data.draw(st.sampled_from(PORTS)) if proto in (6, 17) else None
        sport = 10000 + next(_sports) % 50000  # a fresh tuple: never an existing session
        t = trace(policy, src, dst, proto, dport, evaluator=ev)
        assert t.inconsistency is None, t.inconsistency
        want = (VERDICTS[t.verdict], t.rule)
        if proto == 17 and t.verdict == "denied":
            # A datagram may be the reply of the flow the other way round,
            # whose session was lost: the kernel lets it pass as that flow's
            # reply if the policy allows it (docs/policy.md "What the policy
            # means", 2). The trace of that flow says so.
            back = trace(policy, dst, src, 17, sport, evaluator=ev)
            if back.verdict != "denied":
                want = (VERDICTS[back.verdict], back.rule)
        if proto == GRE:
            # No ports to make the flow new: forget the sessions instead.
            dp.reset()
        out = dp.send(_start(src, dst, proto, sport, dport or 0))
        v = out.verdict
        assert (Verdict(v.verdict), dp.rule_name(v.rule_id)) == want, t.as_dict()
        assert out.passed is (want[0] != Verdict.DENIED)
