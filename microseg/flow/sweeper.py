"""Expire idle sessions.

The datapath cannot run timers from BCC, so idle sessions leave the table
here: every few seconds the session table is read in batches (one syscall
per 8192 entries, in a worker thread), sessions idle longer than their
protocol's and state's timeout are deleted in batches, and each one that
was still open becomes a `session` event with state `expired`, its
counters and its duration. TCP sessions already closed are removed quietly
(their `closed` event was the last word).

A session that sends a packet between the read and the delete is deleted
anyway; its next packet is judged by the policy again (a TCP packet without
SYN is picked up mid-stream), so the cost of that race is one re-judgement.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from microseg.gcpause import gc_paused
from microseg.kernel import abi
from microseg.kernel.clock import ClockSample, SessionClock
from microseg.kernel.records import SESSION_KEY_PROTO, SESSION_VALUE_IDLE

# Conntrack-like defaults, in seconds. *_unreplied: a session that has seen
# one direction only (pending_map: a SYN, a request, a picked-up packet) —
# short, so an unanswered flood cannot hold the table (docs/how-it-works.md).
DEFAULT_TIMEOUTS: dict[str, float] = {
    "tcp_new": 120, "tcp_established": 432_000, "tcp_closing": 120, "tcp_closed": 10,
    "udp_new": 30, "udp_established": 120, "icmp": 30, "other_new": 30,
    "other_established": 600,
    "tcp_unreplied": 60, "udp_unreplied": 30, "other_unreplied": 30,
}
TABLES = ("session_map", "pending_map")



def timeout_name(proto: int, state: int, pending: bool = False) -> str:
    """The --timeout name that applies to a session (pending: it is in
    pending_map, one direction seen)."""
    public = abi.State(state).public if state in abi.State._value2member_map_ else None
    if pending and public != abi.State.CLOSED:
        if proto == 6:
            return "tcp_unreplied"
        if proto == 17:
            return "udp_unreplied"
        return "icmp" if proto in (1, 58) else "other_unreplied"
    if proto == 6:
        return {abi.State.NEW: "tcp_new", abi.State.ESTABLISHED: "tcp_established",
                abi.State.CLOSING: "tcp_closing"}.get(public, "tcp_closed")
    if proto == 17:
        return "udp_new" if public == abi.State.NEW else "udp_established"
    if proto in (1, 58):
        return "icmp"
    return "other_new" if public == abi.State.NEW else "other_established"


def parse_timeouts(items: list[str]) -> dict[str, float]:
    """'tcp_established=3600' items over the defaults."""
    out = dict(DEFAULT_TIMEOUTS)
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or name not in DEFAULT_TIMEOUTS:
            raise ValueError(f"--timeout '{item}': NAME=SECONDS with NAME one of "
                             f"{', '.join(DEFAULT_TIMEOUTS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--timeout '{item}': '{value}' is not a number") from None
        if out[name] <= 0:
            raise ValueError(f"--timeout '{item}': must be positive")
    return out


@dataclass
class SweepResult:
    scanned: int
    # The batch buffers holding expired sessions that were still open, with
    # their indices: entries and events are made from them later, in slices
    # on the loop. The sweep itself allocates next to nothing per session.
    expired_batches: list[tuple[bytes, bytes, list[int]]]
    expired_count: int
    removed_closed: int
    ref: ClockSample
    clock: SessionClock
    seconds: float
    deleted: int = 0  # entries actually deleted (some may be gone meanwhile)

    @property
    def ref_ktime_ns(self) -> int:
        return self.ref.ktime_ns

    def expired(self, slice_size: int = 4096) -> Iterator[list[tuple[bytes, bytes]]]:
        """The expired sessions as raw (key, value) records of session_map
        (records.decode_session() decodes one), in lists of at most
        slice_size."""
        ks, vs = abi.SESSION_KEY.size, abi.SESSION_VALUE.size
        out: list[tuple[bytes, bytes]] = []
        for keys, values, idx in self.expired_batches:
            for i in idx:
                out.append((keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs]))
                if len(out) >= slice_size:
                    yield out
                    out = []
        if out:
            yield out


class Sweeper:
    def __init__(self, datapath, clock: SessionClock,
                 timeouts: Mapping[str, float] | None = None) -> None:
        self.datapath = datapath
        self.clock = clock
        self.timeouts = dict(timeouts or DEFAULT_TIMEOUTS)
        self.sweeps = 0
        self.expired_total = 0
        self.last: SweepResult | None = None

    def _limits(self, pending: bool) -> dict[tuple[int, int], int]:
        """(proto class, state) -> idle limit in jiffies, for one table."""
        hz = self.clock.hz
        out = {}
        for proto in (6, 17, 1, 58, 0):
            for state in abi.State:
                name = timeout_name(proto, state.value, pending)
                out[(proto, state.value)] = int(self.timeouts[name] * hz)
        return out

    def sweep(self) -> SweepResult:
        """One pass over the table (blocking: run it in a worker thread)."""
        with gc_paused():
            return self._sweep()

    def _sweep(self) -> SweepResult:
        t0 = time.perf_counter()
        ref = self.clock.refresh()
        now_j = ref.jiffies
        expired: list[tuple[bytes, bytes, list[int]]] = []
        n_expired = closed = scanned = deleted = 0
        closed_state = int(abi.State.CLOSED)
        for table in TABLES:
            limits = self._limits(pending=table == "pending_map")
            m = self.datapath.maps[table]
            ks = m.key_size
            doomed: list[bytes] = []
            for keys, values, count in m.lookup_batch_raw(8192):
                gone: list[int] = []
                events: list[int] = []
                for i, ((proto,), (last_seen, state)) in enumerate(zip(
                        SESSION_KEY_PROTO.iter_unpack(keys),
                        SESSION_VALUE_IDLE.iter_unpack(values), strict=True)):
                    limit = limits.get((proto if proto in (6, 17, 1, 58) else 0, state))
                    if limit is None or now_j - last_seen <= limit:
                        continue
                    gone.append(i)
                    if proto == 6 and state == closed_state:
                        closed += 1
                    else:
                        events.append(i)
                scanned += count
                if len(gone) == count:
                    doomed.append(keys)
                else:
                    doomed.extend(keys[i * ks:(i + 1) * ks] for i in gone)
                if events:
                    expired.append((keys, values, events))
                    n_expired += len(events)
            if doomed:
                keys = b"".join(doomed)
                deleted += m.delete_batch(keys, len(keys) // ks)
        self.sweeps += 1
        self.expired_total += n_expired
        res = SweepResult(scanned, expired, n_expired, closed, ref, self.clock,
                          time.perf_counter() - t0, deleted)
        self.last = res
        return res
