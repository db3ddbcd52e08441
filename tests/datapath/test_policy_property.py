"""Random policies compiled and installed in the real program: every packet's
verdict and deciding rule is what a literal reading of the policy says."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microseg.kernel.abi import Verdict
from microseg.policy.model import Policy

from ..unit.reference import reference_first_packet
from ..unit.test_compile import PORTS, V4, V6, policies
from .harness import Harness, ping, tcp, udp

_sports = itertools.count(10000)


def _packet(src: str, dst: str, proto: int, sport: int, dport: int, start: bool):
    """start: a SYN / an echo request; else an ACK / an echo reply (what a
    connection whose session was lost sends). UDP is either."""
    if proto == 6:
        return tcp(src, dst, sport, dport, "S" if start else "A")
    if proto == 17:
        return udp(src, dst, sport, dport)
    return ping(src, dst, ident=sport, reply=not start)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(policy=policies(), data=st.data())
def test_kernel_verdicts_agree_with_reference(dp: Harness, policy: Policy,
                                              data: st.DataObject) -> None:
    dp.install(policy)
    for _ in range(15):
        v6 = data.draw(st.booleans())
        pool = V6 if v6 else V4
        src, dst = data.draw(st.sampled_from(pool)), data.draw(st.sampled_from(pool))
        proto = data.draw(st.sampled_from([6, 17, 58 if v6 else 1]))
        dport = data.draw(st.sampled_from(PORTS)) if proto in (6, 17) else 0
        start = data.draw(st.booleans())
        sport = 10000 + next(_sports) % 50000  # a fresh tuple: never an existing session
        if proto not in (6, 17):
            dport = sport  # an echo's identifier plays both ports
        # Anything but a SYN or an echo request may be a reply whose
        # session was lost.
        want_verdict, want_rule, _reply = reference_first_packet(
            policy, src, dst, proto, sport, dport, may_be_reply=proto == 17 or not start)
        out = dp.send(_packet(src, dst, proto, sport, dport, start))
        v = out.verdict
        assert (Verdict(v.verdict), dp.rule_name(v.rule_id)) == (want_verdict, want_rule)
        assert out.passed is (want_verdict != Verdict.DENIED)
