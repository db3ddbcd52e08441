"""Flows of denied or dropped packets that went quiet: report what they
still hold, retire their entries.

The datapath reports a flow's first denial at once and counts the repeats
within the window (bpf/lib/aggregate.h); the next packet after the window
reports them. A flow that stops leaves its count in agg_map: every half
window this reads agg_map and, for each such flow, runs the kernel's
mseg_flush, which takes the count by atomic exchange and writes the event
itself — so every packet is reported exactly once, by the kernel. Idle
entries are retired the same way (marked, then deleted a window later).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from microseg.kernel import abi
from microseg.kernel.records import fields_struct

# What a decision needs from struct agg_value.
_VALUE = fields_struct(abi.AGG_VALUE, ("window_start", "last_ns", "pending"))


def due(entries: Iterable[tuple[bytes, bytes]], now_ns: int,
        window_ns: int) -> Iterator[bytes]:
    """The keys mseg_flush has work for: a count held past its window, or
    an entry idle for two windows (to mark, or to delete)."""
    unpack = _VALUE.unpack
    for key, value in entries:
        start, last, pending = unpack(value)
        if pending:
            if now_ns - start >= window_ns:
                yield key
        elif now_ns - last >= 2 * window_ns:
            yield key


class Flusher:
    def __init__(self, datapath, window_s: float) -> None:
        self.datapath = datapath
        self.window_ns = int(window_s * 1e9)
        self.flushes = 0
        self.reported = 0

    @property
    def interval_s(self) -> float:
        return max(0.05, self.window_ns / 2e9)

    def run(self) -> int:
        """One pass (blocking: a worker thread); the flows flushed."""
        if not self.window_ns:
            return 0
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        n = 0
        for key in list(due(self.datapath.aggregates(), now, self.window_ns)):
            if self.datapath.flush_flow(key) == 1:  # FLUSH_REPORTED
                self.reported += 1
            n += 1
        self.flushes += 1
        return n
