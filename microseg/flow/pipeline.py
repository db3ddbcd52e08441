"""Ring buffer -> events, on the daemon's asyncio loop.

The ring buffer's fd is registered with the loop (epoll, level-triggered:
readable while records wait), so there is no polling. Each readiness drains
at most BATCH records — decode, enrich, number, fan out — and yields back to
the loop; a flood is consumed in slices and never freezes it.

Loss is exact: the kernel counts every failed reservation per event type;
each drain turns the growth of those counters into one `lost` event with
source `ringbuf`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from microseg.flow.enrich import Enricher, Names, TimeFormatter
from microseg.flow.hub import EventHub
from microseg.gcpause import gc_paused
from microseg.kernel import abi
from microseg.kernel.clock import wall_offset_ns
from microseg.kernel.maps import RINGS
from microseg.kernel.ringbuf import RingBuffer

log = logging.getLogger("microseg.pipeline")

BATCH = 8192
WALL_RESYNC_S = 10.0  # re-read the wall clock offset (NTP may step it)
LOSS_CHECK_S = 0.5


class Pipeline:
    def __init__(self, datapath, hub: EventHub, names: Names,
                 active_generation) -> None:
        self.datapath = datapath
        self.hub = hub
        self.time = TimeFormatter(wall_offset_ns())
        self.enricher = Enricher(names, self.time, active_generation)
        # The ring buffers (microseg.kernel.maps.RINGS): denied verdicts and
        # drops have their own, so a flood of them never crowds out the rest.
        self.rings: list[RingBuffer] = []
        self.decoded = 0            # records taken from the ring
        self.lost_ringbuf = 0       # reported to subscribers so far
        self._lost_seen: int | None = None
        self.journal = None  # microseg/journal.py, when the daemon keeps one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_wall = time.monotonic()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.rings = [RingBuffer(self.datapath.maps[name].fd, abi.EVENT.size)
                      for name in RINGS.values()]
        if self.journal is not None and self.journal.inherited:
            # An earlier daemon reported losses up to here: what the kernel
            # counted since (while no daemon ran) is reported now.
            self._lost_seen = self.journal.ringbuf_lost_seen
        self._check_loss()  # else the baseline: losses before any daemon are not ours
        for ring in self.rings:
            loop.add_reader(ring.fd, self.drain_ring, ring)
        self._schedule()

    def stop(self) -> None:
        if self._loop is not None and self.rings:
            for ring in self.rings:
                self._loop.remove_reader(ring.fd)
            if self._timer is not None:
                self._timer.cancel()
            self.drain_all()
            for ring in self.rings:
                ring.close()
            self.rings = []

    def _schedule(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(LOSS_CHECK_S, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_wall > WALL_RESYNC_S:
            self.time.offset = wall_offset_ns()
            self._last_wall = now
        self._check_loss()
        self._schedule()

    def drain(self, limit: int = BATCH) -> int:
        """One bounded slice of every ring: records into events."""
        return sum(self.drain_ring(ring, limit) for ring in self.rings)

    def drain_ring(self, ring: RingBuffer, limit: int = BATCH) -> int:
        """One bounded slice of one ring: up to `limit` records into events."""
        batch = ring.drain(limit)
        if batch.count:
            # Events form no cycles, and once the hub's history is full each
            # batch frees as many as it makes: with the cyclic collector
            # paused meanwhile, it never scans them (it took a tenth of the
            # pipeline's time in a flood, each event scanned twice or more).
            with gc_paused():
                events = self.enricher.events(batch.runs)
                self.decoded += len(events)
                self.hub.publish_batch(events)
        if batch.skipped:
            log.warning("skipped %d ring-buffer records of an unknown size", batch.skipped)
        self._check_loss()
        return batch.count

    def drain_all(self) -> None:
        while self.rings and self.drain():
            pass

    def _check_loss(self) -> None:
        """Publish the growth of the kernel's failed-reservation counters."""
        stats = self.datapath.read_event_stats()
        lost = sum(lost for _sub, lost in stats.values())
        if self._lost_seen is None or lost < self._lost_seen:  # none yet, or new counters
            self._lost_seen = lost
            if self.journal is not None:
                self.journal.record_lost(lost)
        if lost > self._lost_seen:
            delta = lost - self._lost_seen
            self._lost_seen = lost
            self.lost_ringbuf += delta
            if self.journal is not None:
                self.journal.ringbuf_lost_seen = lost  # written with the event's seq
            self.hub.publish({"type": "lost", "count": delta, "source": "ringbuf"})
