"""The session clock: jiffies in session_map convert to CLOCK_MONOTONIC."""

from __future__ import annotations

from microseg.kernel.clock import KNOWN_HZ, SessionClock, kernel_hz

from .harness import Harness, tcp
from .policies import DB4, WEB4, shop


def test_last_seen_converts_to_monotonic_time(dp: Harness) -> None:
    clock = SessionClock(dp.dp.clock_sample)
    assert clock.hz in KNOWN_HZ
    # What the daemon takes without measuring: the coarse clock's tick.
    assert kernel_hz() == clock.hz
    assert SessionClock(dp.dp.clock_sample, hz=kernel_hz()).hz == clock.hz
    dp.install(shop())
    dp.send(tcp(WEB4, DB4, 1, 5432))
    s = dp.session(WEB4, DB4)
    ref = clock.refresh()
    tick = 1e9 / clock.hz
    seen = clock.to_monotonic_ns(s.last_seen, ref)
    assert abs(seen - s.created_ns) <= 2 * tick
    assert 0 <= clock.idle_ns(s.last_seen, ref) <= ref.ktime_ns - s.created_ns + 2 * tick
