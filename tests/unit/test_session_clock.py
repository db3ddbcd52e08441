"""SessionClock finds the kernel's HZ from samples of both clocks, also when
sampling is slow and irregular (a loaded machine): it measures between tick
edges, not wherever a sample happens to fall."""

from __future__ import annotations

import random
import time

import pytest

from microseg.kernel.clock import ClockSample, SessionClock


@pytest.mark.parametrize("hz", [100, 250, 300, 1000])
def test_hz_is_found_despite_slow_irregular_samples(hz: int) -> None:
    rng = random.Random(hz)

    def sample() -> ClockSample:
        # A sample that takes up to a millisecond and a half, taken at a
        # random point of that time: what a busy machine's test runs do.
        time.sleep(rng.uniform(0, 0.0015))
        now = time.monotonic_ns()
        return ClockSample(now * hz // 1_000_000_000, now)

    assert SessionClock(sample).hz == hz
