"""The kernel's clocks, as the datapath stamps them, and the way to wall time.

Events and session creation carry CLOCK_MONOTONIC nanoseconds
(bpf_ktime_get_ns). A session's last-seen time is in jiffies
(bpf_jiffies64: a few ns per packet where a clock read costs tens); a
ClockSample of both clocks taken at one instant in the kernel converts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Kernel HZ values in use across architectures and distributions.
KNOWN_HZ = (100, 250, 300, 1000, 24, 32, 48, 64, 128, 256, 512, 1024)


CLOCK_MONOTONIC_COARSE = 6  # linux/time.h (the time module does not name it)


def kernel_hz() -> int | None:
    """The kernel's tick rate without measuring it: the coarse clocks tick
    with jiffies, so their resolution is one tick (TICK_NSEC). None when
    that is no known HZ (then SessionClock measures)."""
    try:
        res = time.clock_getres(CLOCK_MONOTONIC_COARSE)
    except OSError:
        return None
    hz = round(1 / res) if res > 0 else 0
    return hz if hz in KNOWN_HZ else None


def monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def wall_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC now: add it to a kernel timestamp to
    get Unix time (re-sample it now and then: NTP may step the wall clock)."""
    before = monotonic_ns()
    wall = time.time_ns()
    after = monotonic_ns()
    return wall - (before + after) // 2


@dataclass(frozen=True)
class ClockSample:
    jiffies: int
    ktime_ns: int


def hz_between(a: ClockSample, b: ClockSample) -> float:
    """The tick rate two samples imply, snapped to a known HZ when close."""
    dj, dt = b.jiffies - a.jiffies, b.ktime_ns - a.ktime_ns
    if dj <= 0 or dt <= 0:
        raise ValueError("samples too close to measure HZ")
    hz = dj * 1e9 / dt
    nearest = min(KNOWN_HZ, key=lambda k: abs(k - hz))
    return float(nearest) if abs(nearest - hz) <= 0.05 * nearest else hz


class SessionClock:
    """Converts session_map's jiffies to CLOCK_MONOTONIC nanoseconds."""

    def __init__(self, sample: Callable[[], ClockSample], *, span_s: float = 0.1,
                 hz: int | None = None) -> None:
        self._sample = sample
        if hz:  # known (kernel_hz()): one sample for the reference, no wait
            self.hz = float(hz)
            self.ref = sample()
            return
        # Measured between two tick edges at least span_s apart: a sample
        # taken anywhere within a tick would be off by up to a tick (10 %
        # over 10 ticks); at the edges the error is one sample's latency —
        # a millisecond on a busy machine, 1 % of the span.
        first = self._tick_edge()
        time.sleep(span_s)
        now = self._tick_edge()
        self.hz = hz_between(first, now)
        self.ref = now

    def _tick_edge(self) -> ClockSample:
        """The first sample after the jiffies counter moved on."""
        start = self._sample()
        while True:
            s = self._sample()
            if s.jiffies != start.jiffies:
                return s

    def refresh(self) -> ClockSample:
        self.ref = self._sample()
        return self.ref

    def to_monotonic_ns(self, jiffies: int, ref: ClockSample | None = None) -> int:
        ref = ref or self.ref
        return ref.ktime_ns - round((ref.jiffies - jiffies) * 1e9 / self.hz)

    def idle_ns(self, last_seen: int, ref: ClockSample | None = None) -> int:
        """Time since a last-seen jiffies value, never negative."""
        ref = ref or self.ref
        return max(0, round((ref.jiffies - last_seen) * 1e9 / self.hz))
