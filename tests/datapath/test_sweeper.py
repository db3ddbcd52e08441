"""The sweeper against the real session map: idle sessions past their
protocol's and state's timeout are removed in batches and reported with
their counters; closed TCP sessions go quietly; fresh ones stay."""

from __future__ import annotations

from microseg.flow.sweeper import DEFAULT_TIMEOUTS, Sweeper, parse_timeouts, timeout_name
from microseg.kernel import abi
from microseg.kernel.clock import SessionClock
from microseg.kernel.records import addr16, decode_session, session_key

from .harness import Harness


def _fill(dp: Harness, n: int, proto: int, state: abi.State, idle_jiffies: int,
          first: int = 0, table: str = "session_map") -> None:
    now = dp.dp.clock_sample()
    m = dp.dp.maps[table]
    keys, values = [], []
    for i in range(first, first + n):
        a, b = addr16(f"10.1.{i >> 8 & 255}.{i & 255}"), addr16("10.2.0.1")
        keys.append(session_key(4, proto, a, b, 1000 + (i >> 16), 443))
        last = now.jiffies - idle_jiffies
        values.append(abi.SESSION_VALUE.pack(
            created_ns=now.ktime_ns - 10**9, last_seen=last, seen=(last, last),
            packets=(3, 2), bytes=(300, 200), rule_id=1, generation=1, state=state,
            flags=abi.SessionFlag.ORIG_LO, verdict=abi.Verdict.ALLOWED,
            reason=abi.Reason.RULE))
    m.update_batch(b"".join(keys), b"".join(values), n)


def test_idle_sessions_expire_and_fresh_ones_stay(dp: Harness) -> None:
    clock = SessionClock(dp.dp.clock_sample)
    hz = int(clock.hz)
    sw = Sweeper(dp.dp, clock, parse_timeouts(["udp_established=60", "tcp_established=60"]))
    _fill(dp, 20_000, 17, abi.State.ESTABLISHED, idle_jiffies=61 * hz)          # expire
    _fill(dp, 20_000, 17, abi.State.ESTABLISHED, idle_jiffies=30 * hz, first=20_000)  # stay
    _fill(dp, 5_000, 6, abi.State.CLOSED, idle_jiffies=11 * hz, first=40_000)   # quietly
    _fill(dp, 5_000, 6, abi.State.ESTABLISHED, idle_jiffies=61 * hz, first=45_000)  # expire
    res = sw.sweep()
    assert res.scanned == 50_000
    assert res.expired_count == 25_000 and res.removed_closed == 5_000
    assert dp.dp.session_count() == 20_000
    expired = [decode_session(k, v) for chunk in res.expired(1000) for k, v in chunk]
    assert len(expired) == 25_000 and max(map(len, res.expired(1000))) == 1000
    entry = expired[0]
    assert clock.idle_ns(entry.last_seen, res.ref) >= 60 * 10**9
    assert entry.packets == (3, 2) and entry.bytes == (300, 200)
    assert sw.expired_total == 25_000
    assert sw.sweep().expired_count == 0  # nothing left to expire


def test_unreplied_sessions_expire_sooner(dp: Harness) -> None:
    """pending_map (one direction seen) has its own, short timeouts: an
    unanswered flood leaves within a minute, whatever its state says."""
    clock = SessionClock(dp.dp.clock_sample)
    hz = int(clock.hz)
    sw = Sweeper(dp.dp, clock)
    _fill(dp, 1_000, 6, abi.State.ESTABLISHED, idle_jiffies=61 * hz, table="pending_map")
    _fill(dp, 1_000, 17, abi.State.NEW, idle_jiffies=31 * hz, first=1_000, table="pending_map")
    _fill(dp, 1_000, 6, abi.State.ESTABLISHED, idle_jiffies=20 * hz, first=2_000,
          table="pending_map")                                                   # stays
    _fill(dp, 1_000, 6, abi.State.ESTABLISHED, idle_jiffies=61 * hz, first=3_000)  # stays
    res = sw.sweep()
    assert res.scanned == 4_000 and res.expired_count == 2_000
    assert dp.dp.session_count() == 2_000
    assert sum(c for _k, _v, c in dp.dp.maps["session_map"].lookup_batch_raw()) == 1_000


def test_timeouts() -> None:
    assert timeout_name(6, abi.State.ESTABLISHED, pending=True) == "tcp_unreplied"
    assert timeout_name(17, abi.State.NEW, pending=True) == "udp_unreplied"
    assert timeout_name(6, abi.State.CLOSED, pending=True) == "tcp_closed"
    assert timeout_name(6, abi.State.SYN_RECV) == "tcp_new"
    assert timeout_name(17, abi.State.NEW) == "udp_new"
    assert timeout_name(58, abi.State.ESTABLISHED) == "icmp"
    assert timeout_name(47, abi.State.ESTABLISHED) == "other_established"
    assert parse_timeouts(["icmp=5"])["icmp"] == 5 and DEFAULT_TIMEOUTS["icmp"] == 30
    import pytest

    for bad in ("icmp", "nope=3", "icmp=x", "icmp=0"):
        with pytest.raises(ValueError):
            parse_timeouts([bad])
