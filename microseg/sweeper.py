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

import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass

from . import abi
from .clock import SessionClock
from .records import SessionEntry, decode_session

# Conntrack-like defaults, in seconds.
DEFAULT_TIMEOUTS: dict[str, float] = {
    "tcp_new": 120, "tcp_established": 432_000, "tcp_closing": 120, "tcp_closed": 10,
    "udp_new": 30, "udp_established": 120, "icmp": 30, "other_new": 30,
    "other_established": 600,
}

# Only the fields the sweep needs, straight from the batch buffers.
_KEY_PROTO = struct.Struct("<36xB3x")
_VALUE_IDLE = struct.Struct("<8xQ56xB7x")  # last_seen, state
assert _KEY_PROTO.size == abi.SESSION_KEY.size and _VALUE_IDLE.size == abi.SESSION_VALUE.size


def timeout_name(proto: int, state: int) -> str:
    public = abi.State(state).public if state in abi.State._value2member_map_ else None
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
    expired: list[tuple[SessionEntry, int]]  # (session, idle ns) still open
    removed_closed: int
    ref_ktime_ns: int
    seconds: float


class Sweeper:
    def __init__(self, datapath, clock: SessionClock,
                 timeouts: Mapping[str, float] | None = None) -> None:
        self.datapath = datapath
        self.clock = clock
        self.timeouts = dict(timeouts or DEFAULT_TIMEOUTS)
        self.sweeps = 0
        self.expired_total = 0
        self.last: SweepResult | None = None

    def _limits(self) -> dict[tuple[int, int], int]:
        """(proto class, state) -> idle limit in jiffies."""
        hz = self.clock.hz
        out = {}
        for proto in (6, 17, 1, 58, 0):
            for state in abi.State:
                out[(proto, state.value)] = int(self.timeouts[timeout_name(proto, state.value)]
                                                * hz)
        return out

    def sweep(self) -> SweepResult:
        """One pass over the table (blocking: run it in a worker thread)."""
        t0 = time.perf_counter()
        ref = self.clock.refresh()
        now_j = ref.jiffies
        limits = self._limits()
        m = self.datapath.maps["session_map"]
        ks, vs = m.key_size, m.full_value_size
        doomed: list[bytes] = []
        expired: list[tuple[SessionEntry, int]] = []
        closed = scanned = 0
        for keys, values, count in m.lookup_batch_raw(8192):
            protos = [p for (p,) in _KEY_PROTO.iter_unpack(keys)]
            for i, (last_seen, state) in enumerate(_VALUE_IDLE.iter_unpack(values)):
                proto = protos[i]
                limit = limits.get((proto if proto in (6, 17, 1, 58) else 0, state))
                idle = now_j - last_seen
                if limit is None or idle <= limit:
                    continue
                key = keys[i * ks:(i + 1) * ks]
                doomed.append(key)
                if proto == 6 and state == abi.State.CLOSED:
                    closed += 1
                    continue
                entry = decode_session(key, values[i * vs:(i + 1) * vs])
                expired.append((entry, self.clock.idle_ns(last_seen, ref)))
            scanned += count
        if doomed:
            m.delete_batch(b"".join(doomed), len(doomed))
        self.sweeps += 1
        self.expired_total += len(expired)
        res = SweepResult(scanned, expired, closed, ref.ktime_ns, time.perf_counter() - t0)
        self.last = res
        return res
