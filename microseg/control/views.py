"""What the daemon shows: the views the control API serves and the report
the metrics render, built from the running parts.

The daemon owns the parts' lifecycle (microseg/control/daemon.py); this
module only reads them. Reads that block — map batch lookups, per-CPU
sums — run in worker threads so the loop keeps draining events.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from microseg import __version__
from microseg.control.config import RunConfig
from microseg.control.report import Report, evictions
from microseg.flow.enrich import VERDICT_NAMES, Names, session_rows
from microseg.flow.filters import Filter
from microseg.flow.hub import EventHub, rfc3339
from microseg.flow.observed import FlowAggregate
from microseg.flow.staging import StagedChanges
from microseg.flow.sweeper import timeout_name
from microseg.kernel import abi
from microseg.kernel.clock import monotonic_ns, wall_offset_ns
from microseg.kernel.datapath import SESSION_TABLES
from microseg.kernel.records import session_census
from microseg.policy.model import PROTOCOL_NAMES

if TYPE_CHECKING:
    from microseg.control.cluster import Cluster
    from microseg.control.discovery import Sources
    from microseg.control.runstats import RunTimeStats
    from microseg.exporters.flowlog import FlowLog
    from microseg.flow.pipeline import Pipeline
    from microseg.flow.sweeper import Sweeper
    from microseg.kernel.clock import SessionClock
    from microseg.kernel.datapath import Datapath
    from microseg.kernel.interfaces import InterfaceManager
    from microseg.kernel.journal import Journal
    from microseg.policy.manager import PolicyManager


@dataclass
class Parts:
    """What the daemon runs; the later fields are filled in as it starts."""

    cfg: RunConfig
    hub: EventHub
    datapath: Datapath
    policy: PolicyManager
    interfaces: InterfaceManager
    names: Names
    pipeline: Pipeline
    sources: Sources
    started_ns: int
    clock: SessionClock | None = None
    sweeper: Sweeper | None = None
    journal: Journal | None = None
    flowlog: FlowLog | None = None
    last_sweep: dict | None = None
    metrics_listen: str | None = None
    run_stats: RunTimeStats | None = None
    cluster: Cluster | None = None  # `run --etcd`
    ready: bool = False
    # Every verdict event's flow (`policy suggest`/`diff` read it) and the
    # flows a staged candidate would judge otherwise: fed by the hub.
    flows: FlowAggregate = field(default_factory=FlowAggregate)
    staged_changes: StagedChanges = field(default_factory=StagedChanges)


def _count_by_source(known) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in known:
        out[k.source] = out.get(k.source, 0) + 1
    return out


def _by_type(kernel: dict, ring: abi.Ring | None = None) -> dict[str, dict[str, int]]:
    """{type: {submitted, lost}} of one ring, or summed over both."""
    out: dict[str, dict[str, int]] = {}
    for (rg, t), (sub, lost) in kernel.items():
        if ring is not None and rg != ring:
            continue
        cell = out.setdefault(t.name.lower(), {"submitted": 0, "lost": 0})
        cell["submitted"] += sub
        cell["lost"] += lost
    return out


def _ports_text(ports: tuple[tuple[int, int], ...]) -> list[str]:
    return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports]


class Views:
    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self._baseline: Report | None = None
        # The programs' stack depths need a verification of their own (a
        # second or so each): measured once, in the background, when first
        # asked for.
        self._measuring: asyncio.Future | None = None

    # -- the report -----------------------------------------------------------

    def read_report(self) -> Report:
        """Every figure, read now (blocking: run it in a worker thread)."""
        p = self.parts
        dp = p.datapath
        census = session_census(dp.maps["session_map"].lookup_batch_raw(8192))
        one_way = session_census(dp.maps["pending_map"].lookup_batch_raw(8192))
        for key, n in one_way.items():
            census[key] = census.get(key, 0) + n
        counters = dp.read_stats()
        rule_stats = dp.read_rule_stats()
        run_ns, runs = dp.run_stats()
        kernel = dp.read_event_stats()
        made = dp.read_session_stats()
        a = p.policy.active
        rule_hits = []
        if a is not None:
            ids = a.compiled.rule_ids
            rule_hits = [(r.name, r.action, rule_stats.get(ids[r.name], (0, 0))[0])
                         for r in a.loaded.policy.rules]
        fl = p.flowlog
        swept = p.journal.sessions_swept if p.journal else 0
        entries = sum(census.values())
        return Report(
            version=__version__, counters=dict(counters), rule_hits=rule_hits,
            # Both tables: answered sessions, and the quarter as many more
            # that have seen one direction only (docs/how-it-works.md).
            sessions=census,
            session_capacity=p.cfg.session_capacity + dp.config.pending_capacity,
            sessions_expired=p.sweeper.expired_total if p.sweeper else 0,
            sessions_evicted=evictions(made, swept, entries),
            sessions_created=made.created, sessions_revoked=made.revoked,
            sessions_reused=made.reused, sessions_promoted=made.promoted,
            sessions_pending=sum(one_way.values()),
            denials_unaggregated=made.agg_full,
            sweeps=p.sweeper.sweeps if p.sweeper else 0, last_sweep=p.last_sweep,
            events_published=dict(p.hub.published),
            events_lost={"ringbuf": sum(lost for _, lost in kernel.values()),
                         "subscriber": p.hub.subscriber_lost},
            events_kernel=kernel, events_lost_reported=p.pipeline.lost_ringbuf,
            events_last_seq=p.hub.last_seq, subscribers=p.hub.subscribers,
            policy_generation=p.policy.generation, policy_reloads=p.policy.reloads_total,
            policy_reload_failures=p.policy.reload_failures_total,
            policy_rules=len(a.loaded.policy.rules) if a else 0,
            policy_workloads=len(a.loaded.policy.workloads) if a else 0,
            interfaces_attached=len(p.interfaces.attached),
            workloads=_count_by_source(p.policy.known.values()),
            discovery_events=p.sources.changes_by_action(),
            discovery_errors=p.sources.errors(),
            etcd=p.cluster.status() if p.cluster else None,
            staged_verdicts={(VERDICT_NAMES[v], d): n
                             for (v, d), n in dp.read_staged_stats().items()},
            run_time_ns=run_ns, run_count=runs,
            flow_log=None if fl is None else {
                "path": fl.path, "lines": fl.lines, "events": fl.events, "lost": fl.lost,
                "bytes": fl.bytes, "write_errors": fl.write_errors, "rotations": fl.rotations},
            at_ns=monotonic_ns())

    async def report(self) -> Report:
        return await asyncio.get_running_loop().run_in_executor(None, self.read_report)

    def mark_baseline(self) -> None:
        """Rates in `stats` are since this reading (the daemon's start)."""
        self._baseline = self.read_report()

    # -- GET /v1/stats --------------------------------------------------------

    def _programs(self) -> dict:
        """The verifier's figures per program; stack depths null until
        measured (started here, the first time)."""
        dp = self.parts.datapath
        if self._measuring is None:
            self._measuring = asyncio.get_running_loop().run_in_executor(
                None, lambda: dp.verifier_figures(measure=True))
        return dp.verifier_figures()

    def _load(self) -> dict | None:
        """How this daemon got its programs: compiled and verified, or the
        pinned ones of an earlier daemon reused (same source: no compile)."""
        rep = self.parts.datapath.load_report
        if rep is None:
            return None
        return {"programs": "reused" if rep.reused_programs else "compiled",
                "identity": rep.identity, "compile_s": round(rep.compile_s, 3),
                "load_s": round(rep.load_s, 3)}

    async def stats(self) -> dict:
        r = await self.report()
        base = self._baseline
        elapsed = max(1e-9, (r.at_ns - (base.at_ns if base else r.at_ns)) / 1e9)
        counters, totals, rates, drops = [], {}, {}, {}
        for (d, v, reason), (pk, by) in sorted(r.counters.items()):
            counters.append({"direction": d.name.lower(), "verdict": v.name.lower(),
                             "reason": reason.name.lower(), "packets": pk, "bytes": by})
            vname = v.name.lower()
            totals[vname] = totals.get(vname, 0) + pk
            before = base.counters.get((d, v, reason), (0, 0))[0] if base else 0
            rates[vname] = rates.get(vname, 0.0) + (pk - before) / elapsed
            if v == abi.Verdict.DROPPED:
                drops[reason.name.lower()] = drops.get(reason.name.lower(), 0) + pk
        runs = r.run_count - (base.run_count if base else 0)
        run_ns = r.run_time_ns - (base.run_time_ns if base else 0)
        entries = r.session_entries
        by_state = {f"{PROTOCOL_NAMES.get(p, p)}/{abi.State(st).name.lower()}": n
                    for (p, st), n in sorted(r.sessions.items())}
        started = self.parts.started_ns
        return {
            "time": rfc3339(time.time_ns()),
            "uptime_s": round((time.time_ns() - started) / 1e9, 3),
            "packets": totals,
            "rates_since_start_pps": {k: round(v, 3) for k, v in rates.items()},
            "drops": drops,
            "counters": counters,
            "sessions": {"entries": entries, "capacity": r.session_capacity,
                         "fill": round(entries / r.session_capacity, 6),
                         "pending": r.sessions_pending,
                         "pending_capacity": self.parts.datapath.config.pending_capacity,
                         "by_state": by_state,
                         "expired_total": r.sessions_expired,
                         "created_total": r.sessions_created,
                         "revoked_total": r.sessions_revoked,
                         "reused_total": r.sessions_reused,
                         "replied_total": r.sessions_promoted,
                         "evicted_total": r.sessions_evicted,
                         "sweeps": r.sweeps,
                         "last_sweep": r.last_sweep},
            "events": {"published": r.events_published, "last_seq": r.events_last_seq,
                       "lost": r.events_lost,
                       "lost_reported": {"ringbuf": r.events_lost_reported},
                       "kernel": _by_type(r.events_kernel),
                       "rings": {ring.name.lower(): _by_type(r.events_kernel, ring)
                                 for ring in abi.Ring},
                       "denials_unaggregated": r.denials_unaggregated,
                       "subscribers": r.subscribers},
            "policy": {"generation": r.policy_generation,
                       "reloads_total": r.policy_reloads,
                       "reload_failures_total": r.policy_reload_failures},
            # Counted while the kernel's run-time statistics were on: sampled
            # windows by default (microseg/control/runstats.py).
            "datapath": {"runs": runs, "run_time_ns": run_ns,
                         "avg_ns_per_packet": round(run_ns / runs, 1) if runs else None,
                         "run_time_stats": self.parts.run_stats.describe()
                         if self.parts.run_stats else None,
                         "programs": self._programs(),
                         "load": self._load()},
            "flow_log": r.flow_log,
            # The observed flows `policy suggest` learns from (GET /v1/flows).
            "flows": self.parts.flows.stats(),
        }

    # -- GET /v1/status -------------------------------------------------------

    def status(self) -> dict:
        p = self.parts
        staged = p.policy.stager.staged
        cfg = p.cfg
        a = p.policy.active
        pol = a.loaded.policy if a else None
        return {
            "version": __version__,
            "pid": os.getpid(),
            "ready": p.ready,
            "started_at": rfc3339(p.started_ns),
            "uptime_s": round((time.time_ns() - p.started_ns) / 1e9, 3),
            "socket": cfg.socket_path,
            "interfaces": {
                "patterns": cfg.interfaces,
                "attached": sorted(x.name for x in p.interfaces.attached.values()),
                "missing": p.interfaces.missing(),
                "failed": p.interfaces.failed,
            },
            "policy": {
                "path": cfg.policy_path if p.policy.from_cluster
                else os.path.abspath(cfg.policy_path),
                "generation": p.policy.generation,
                "source": a.loaded.source if a else None,
                "sha256": a.loaded.sha256 if a else None,
                "loaded_at": rfc3339(a.loaded_at_ns) if a else None,
                "mode": pol.mode if pol else None,
                "default": pol.default if pol else None,
                "rules": len(pol.rules) if pol else 0,
                "workloads": len(pol.workloads) if pol else 0,
                "reloads_total": p.policy.reloads_total,
                "reload_failures_total": p.policy.reload_failures_total,
                "last_reload": p.policy.last.as_dict() if p.policy.last else None,
                # A candidate judged beside it (`policy stage status` says more).
                "staged": None if staged is None else {
                    "source": staged.loaded.source, "sha256": staged.loaded.sha256,
                    "since": rfc3339(staged.since_ns),
                    "rules": len(staged.loaded.policy.rules),
                    "would_change": sum(n for (_v, differs), n in staged.judged(
                        p.datapath.read_staged_stats()).items() if differs)},
            },
            "metrics": p.metrics_listen,
            "workloads": _count_by_source(p.policy.known.values()),
            "discovery": p.sources.status(),
            "etcd": p.cluster.status() if p.cluster else None,
            "datapath": {
                "pin_dir": cfg.pin_dir,
                "session_capacity": cfg.session_capacity,
                "pending_capacity": p.datapath.config.pending_capacity,
                "ringbuf_bytes": cfg.ringbuf_bytes,
                "keep_on_exit": cfg.keep_on_exit,
                "load": self._load(),
            },
        }

    # -- GET /v1/policy -------------------------------------------------------

    async def policy_show(self) -> dict:
        p = self.parts
        loop = asyncio.get_running_loop()
        stats = await loop.run_in_executor(None, p.datapath.read_rule_stats)
        a = p.policy.active
        if a is None:
            return {"generation": 0, "rules": [], "workloads": [], "never_hit": []}
        pol, ids = a.loaded.policy, a.compiled.rule_ids
        offset = wall_offset_ns()
        rules = []
        for r in pol.rules:
            hits, last_ns = stats.get(ids[r.name], (0, 0))
            rules.append({
                "name": r.name,
                "from": [str(s) for s in r.sources],
                "to": [str(s) for s in r.destinations],
                "protocol": PROTOCOL_NAMES.get(r.protocol, "any") if r.protocol else "any",
                "ports": _ports_text(r.ports),
                "action": r.action,
                "hits": hits,
                "last_hit": rfc3339(last_ns + offset) if hits else None,
            })
        return {
            "generation": a.generation,
            "source": a.loaded.source,
            "sha256": a.loaded.sha256,
            "loaded_at": rfc3339(a.loaded_at_ns),
            "mode": pol.mode,
            "default": pol.default,
            "workloads": [{"name": w.name, "labels": dict(w.labels),
                           "addresses": [str(x) for x in w.addresses], "mode": w.mode}
                          for w in pol.workloads],
            "rules": rules,
            "never_hit": [r["name"] for r in rules if not r["hits"]],
            "last_reload": p.policy.last.as_dict() if p.policy.last else None,
        }

    # -- GET /v1/policy/source -------------------------------------------------

    def policy_source(self) -> dict:
        """The active policy file's text and every workload known: what a
        client needs to evaluate the policy as the daemon compiled it
        (microseg/control/client.py fetch_policy)."""
        p = self.parts
        a = p.policy.active
        if a is None:
            return {"generation": 0}
        return {"generation": a.generation, "source": a.loaded.source,
                "sha256": a.loaded.sha256, "text": a.loaded.data.decode(),
                "known": [k.as_dict() for k in p.policy.known.values()]}

    # -- GET /v1/policy/staged ------------------------------------------------

    async def staged_status(self) -> dict:
        """The staged candidate, what it judged since it was staged, the
        flows it would judge otherwise and its rules' hits; {"staged": null}
        when nothing is staged."""
        p = self.parts
        s = p.policy.stager.staged
        if s is None:
            return {"staged": None}
        loop = asyncio.get_running_loop()
        dp = p.datapath
        now = await loop.run_in_executor(None, dp.read_staged_stats)
        hits = await loop.run_in_executor(None, dp.read_rule_stats, "staged_rule_stats_map")
        judged = s.judged(now)
        verdicts: dict[str, int] = {}
        for (verdict, _differs), n in judged.items():
            name = VERDICT_NAMES[verdict]
            verdicts[name] = verdicts.get(name, 0) + n
        offset = wall_offset_ns()
        rules = []
        for r in s.loaded.policy.rules:
            n, last_ns = hits.get(s.compiled.rule_ids[r.name], (0, 0))
            rules.append({"name": r.name, "action": r.action, "hits": n,
                          "last_hit": rfc3339(last_ns + offset) if n else None})
        changes = p.staged_changes
        pol = s.loaded.policy
        return {"staged": {
            "source": s.loaded.source, "sha256": s.loaded.sha256,
            "generation": s.generation, "since": rfc3339(s.since_ns),
            "mode": pol.mode, "default": pol.default, "rules_count": len(pol.rules),
            "workloads_count": len(pol.workloads),
            "active_generation": p.policy.generation,
            "judged": sum(judged.values()), "verdicts": verdicts,
            "would_change": sum(n for (_v, differs), n in judged.items() if differs),
            "would_change_to": {VERDICT_NAMES[v]: n for (v, differs), n in judged.items()
                                if differs},
            "changes": changes.rows(), "changes_not_listed": changes.overflow,
            "rules": rules, "never_hit": [r["name"] for r in rules if not r["hits"]],
        }}

    # -- GET /v1/workloads ----------------------------------------------------

    async def workloads(self, source: str | None = None) -> list[dict]:
        """Every workload known, static and discovered, with its live
        sessions (either end, from both session tables)."""
        p = self.parts
        known = [k for k in p.policy.known.values() if source is None or k.source == source]
        live: dict[str, int] = dict.fromkeys((k.name for k in known), 0)
        if known:
            async for rows in self.session_rows(Filter()):
                for r in rows:
                    for name in {r["src"].get("workload"), r["dst"].get("workload")}:
                        if name in live:
                            live[name] += 1
        here = {"node": p.cluster.node.node} if p.cluster else {}
        return [{**here, **k.as_dict(), "sessions": live[k.name]}
                for k in sorted(known, key=lambda k: (k.source, k.name))]

    # -- GET /v1/nodes ----------------------------------------------------------

    def nodes(self) -> list[dict] | None:
        """Every node of the cluster (None: not running with --etcd)."""
        c = self.parts.cluster
        return c.nodes() if c else None

    # -- GET /v1/sessions -----------------------------------------------------

    async def session_rows(self, flt: Filter, chunk: int = 2048) -> AsyncIterator[list[dict]]:
        """Session rows, a batch at a time (the tables may hold millions):
        sessions that have seen both directions, then the others."""
        p = self.parts
        clock = p.clock
        assert clock is not None
        loop = asyncio.get_running_loop()
        ref = await loop.run_in_executor(None, clock.refresh)
        timeouts = p.cfg.timeouts
        match = flt.predicate()
        for table in SESSION_TABLES:
            pending = table == "pending_map"
            batches = p.datapath.maps[table].lookup_batch_raw(chunk)

            def timeout_of(proto: int, state: int, pending: bool = pending) -> float:
                return timeouts[timeout_name(proto, state, pending)]

            def next_rows(batches=batches, timeout_of=timeout_of,
                          pending=pending) -> list[dict] | None:
                try:
                    keys, values, _ = next(batches)
                except StopIteration:
                    return None
                rows = session_rows(keys, values, p.names, ref, clock.hz, timeout_of,
                                    p.interfaces.name_of, replied=not pending)
                return rows if match is None else [r for r in rows if match(r)]

            while (rows := await loop.run_in_executor(None, next_rows)) is not None:
                yield rows
