"""One reading of every figure the daemon reports.

A Report is read at one moment — the kernel's per-CPU counters, the session
table's census, the daemon's own counts — and rendered by both `/v1/stats`
(microseg/control/views.py) and `/metrics` (microseg/exporters/prometheus.py),
so the two never show two sources for one figure (docs/metrics.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from microseg.kernel import abi
from microseg.kernel.datapath import SessionCounts

CounterKey = tuple[abi.Direction, abi.Verdict, abi.Reason]


@dataclass
class Report:
    version: str
    # (direction, verdict, reason) -> (packets, bytes), summed over CPUs
    counters: dict[CounterKey, tuple[int, int]]
    rule_hits: list[tuple[str, str, int]]  # (rule, action, hits) of the active policy
    sessions: dict[tuple[int, int], int]   # (protocol, public state) -> entries
    session_capacity: int
    sessions_expired: int
    events_published: dict[str, int]      # by type
    # by source: ringbuf (the kernel's count of failed reservations, exact
    # even between two drains), subscriber (dropped from slow clients' queues)
    events_lost: dict[str, int]
    policy_generation: int
    policy_reloads: int
    policy_reload_failures: int
    policy_rules: int
    policy_workloads: int
    interfaces_attached: int
    run_time_ns: int
    run_count: int
    flow_log: dict | None = None           # path, lines, events, lost, bytes, write_errors, ...
    sessions_evicted: int = 0              # by the full table's LRU (see evictions())
    sessions_created: int = 0              # entries the datapath made
    sessions_revoked: int = 0              # entries the datapath deleted (revocation)
    sessions_reused: int = 0               # closed entries deleted for a new connection
    sessions_promoted: int = 0             # sessions that saw their first reply
    sessions_pending: int = 0              # entries that have seen one direction only
    denials_unaggregated: int = 0          # reported one by one: agg_map was full
    sweeps: int = 0
    last_sweep: dict | None = None
    # (ring, event type) -> (records submitted, reservations that failed)
    events_kernel: dict[tuple[abi.Ring, abi.EventType], tuple[int, int]] = \
        field(default_factory=dict)
    # Σ count of the ringbuf `lost` events this daemon published (the kernel's
    # losses it has reported so far)
    events_lost_reported: int = 0
    events_last_seq: int = 0
    subscribers: int = 0
    workloads: dict[str, int] = field(default_factory=dict)          # by source
    discovery_events: dict[tuple[str, str], int] = field(default_factory=dict)  # (source, action)
    discovery_errors: dict[str, int] = field(default_factory=dict)   # by source
    # (staged verdict, differs from the active one) -> judgments, all time
    staged_verdicts: dict[tuple[str, bool], int] = field(default_factory=dict)
    etcd: dict | None = None               # `run --etcd`: up, errors, resyncs, nodes
    at_ns: int = 0                         # CLOCK_MONOTONIC when read

    @property
    def session_entries(self) -> int:
        return sum(self.sessions.values())


def evictions(made: SessionCounts, swept: int, entries: int) -> int:
    """Sessions the full tables' LRU evicted to make room: it says nothing
    itself, so they are what is missing from the books — made by the
    datapath, minus deleted by it (revoked, or a closed one reused), swept
    by the daemons, and in the tables now. (Read a few microseconds apart:
    ±a few in flight.)"""
    return max(0, made.created - made.revoked - made.reused - swept - entries)
