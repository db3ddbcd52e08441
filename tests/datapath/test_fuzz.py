"""Random and mutated bytes through the real program: it only ever answers
pass or drop, counts every packet exactly once, and every drop carries a
reason in both its counter and its event."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microseg.kernel.abi import Direction, EventType, Reason, Verdict
from microseg.kernel.bpfsys import BpfError

from .harness import TC_ACT_OK, TC_ACT_SHOT, Harness, ping, tcp, udp
from .policies import DB4, DB6, ROGUE4, WEB4, WEB6, shop

SEEDS = [bytes(p) for p in (
    tcp(WEB4, DB4, 1000, 5432, "S"), tcp(WEB6, DB6, 1000, 5432, "SA"),
    udp(ROGUE4, DB4, 53, 53), ping(WEB6, DB6), ping(WEB4, DB4, reply=True),
)]
DROP_REASONS = {Reason.RULE, Reason.DEFAULT, Reason.REVOKED, Reason.INVALID, Reason.STATE,
                Reason.FRAGMENT}


def _total(stats) -> int:
    return sum(p for p, _b in stats.values())


def check_one(dp: Harness, data: bytes) -> None:
    before = dp.stats()
    try:
        out = dp.send(data)
    except BpfError:
        return  # BPF_PROG_TEST_RUN refuses some frames (IP ethertype, short IP header)
    after = dp.stats()
    assert out.action in (TC_ACT_OK, TC_ACT_SHOT)
    changed = {k: after[k][0] - before.get(k, (0, 0))[0] for k in after
               if after[k][0] != before.get(k, (0, 0))[0]}
    assert _total(after) - _total(before) == 1, "every packet is counted exactly once"
    ((direction, verdict, reason), _n), = changed.items()
    assert direction == Direction.INGRESS
    decisions = [e for e in out.events if e.type in (EventType.VERDICT, EventType.DROP)]
    if out.action == TC_ACT_SHOT:
        assert verdict in (Verdict.DENIED, Verdict.DROPPED)
        assert reason in DROP_REASONS
        assert [(e.verdict, e.reason) for e in decisions] == [(verdict, reason)]
    else:
        assert verdict in (Verdict.ALLOWED, Verdict.AUDIT)


@pytest.fixture
def fuzz_dp(dp: Harness) -> Harness:
    dp.install(shop())
    return dp


@settings(max_examples=1500, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(min_size=14, max_size=200))
def test_random_bytes(fuzz_dp: Harness, data: bytes) -> None:
    check_one(fuzz_dp, data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS),
       edits=st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), min_size=1,
                      max_size=6),
       cut=st.integers(0, 40))
def test_mutated_packets(fuzz_dp: Harness, seed: bytes, edits: list[tuple[int, int]],
                         cut: int) -> None:
    data = bytearray(seed)
    for pos, val in edits:
        if pos < len(data):
            data[pos] = val
    data = data[:max(14, len(data) - cut)]
    check_one(fuzz_dp, bytes(data))
