"""The daemon's bookkeeping, kept in the pinned daemon_map.

A daemon that dies (even by SIGKILL) leaves the datapath running: sessions,
policy and the ring buffer are pinned, and the datapath goes on writing
events. The next daemon must number on from the last event its predecessor
published — no `seq` used twice — and report, exactly, the events the
kernel could not fit in the ring meanwhile. Both numbers live here, written
before each event is handed to anyone, so they are never behind what a
subscriber saw. The sessions the sweeps deleted are counted here too: with
the datapath's own counts they tell the table's silent LRU evictions.
"""

from __future__ import annotations

from microseg.kernel import abi
from microseg.kernel.bpfsys import BpfMap

_KEY = b"\0\0\0\0"


class Journal:
    def __init__(self, m: BpfMap) -> None:
        self._map = m
        raw = m.lookup(_KEY)
        self.last_seq, self.ringbuf_lost_seen, self.sessions_swept = \
            abi.DAEMON_STATE.struct.unpack(raw) if raw else (0, 0, 0)
        # Written by an earlier daemon on these pins: this one continues it.
        self.inherited = self.last_seq > 0

    def record_seq(self, last_seq: int) -> None:
        self.last_seq = last_seq
        self._write()

    def record_lost(self, ringbuf_lost_seen: int) -> None:
        self.ringbuf_lost_seen = ringbuf_lost_seen
        self._write()

    def record_swept(self, deleted: int) -> None:
        self.sessions_swept += deleted
        self._write()

    def _write(self) -> None:
        self._map.update(_KEY, abi.DAEMON_STATE.struct.pack(
            self.last_seq, self.ringbuf_lost_seen, self.sessions_swept))
