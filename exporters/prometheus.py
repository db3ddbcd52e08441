"""Prometheus metrics (docs/metrics.md), served at `--metrics ADDR` under /metrics.

Nothing is counted twice: the kernel's per-CPU maps hold the packet, rule
and ring-buffer counters, the daemon holds its own (events published,
reloads). A scrape reads all of them into one Report in a worker thread
(microseg/control/report.py: the same reading `/v1/stats` renders; a
million-entry session table takes a fraction of a second to census) and
turns it into fresh metric families — a custom collector over a report,
not counters incremented on the hot path. The text format or OpenMetrics
is chosen by the scraper's Accept header.

No label carries an address, a port or a session: label values come from
small fixed sets (directions, verdicts, reasons, protocols, states, event
types) and the policy's rule names.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from microseg.control.report import Report
from microseg.kernel import abi

DEFAULT_LISTEN = "127.0.0.1:9750"
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
STATES = {abi.State.NEW: "new", abi.State.ESTABLISHED: "established",
          abi.State.CLOSING: "closing", abi.State.CLOSED: "closed"}
# The (verdict, reason) pairs the datapath produces for IP traffic, exported
# from the first scrape on (at zero) so rate() sees their first increment.
VERDICT_REASONS = [("allowed", r) for r in ("rule", "default", "session")] \
    + [("denied", r) for r in ("rule", "default", "revoked")] \
    + [("audit", r) for r in ("rule", "default")] \
    + [("dropped", r) for r in ("invalid", "fragment", "state")]
# Packets the datapath drops (TC_ACT_SHOT): every denied and every dropped one.
DROPPING = (abi.Verdict.DENIED, abi.Verdict.DROPPED)


def parse_listen(addr: str) -> tuple[str, int] | None:
    """'HOST:PORT', '[V6]:PORT' or 'off' (None). Raises ValueError."""
    if addr == "off":
        return None
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics '{addr}': expected HOST:PORT, [IPV6]:PORT or off")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"--metrics '{addr}': '{host}' is not an IP address") from None
    return host or "0.0.0.0", int(port)


class ReportCollector(Collector):
    def __init__(self, snap: Report) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        s = self.snap
        yield InfoMetricFamily("microseg_build", "microseg version",
                               value={"version": s.version})

        packets = CounterMetricFamily("microseg_packets", "Packets seen by the datapath",
                                      labels=["direction", "verdict"])
        byts = CounterMetricFamily("microseg_bytes", "Bytes seen by the datapath",
                                   labels=["direction", "verdict"])
        verdicts = CounterMetricFamily(
            "microseg_verdicts", "Packets by verdict and reason (reason session: a packet "
            "of a known session; rule, default: a policy decision)", labels=["verdict", "reason"])
        drops = CounterMetricFamily(
            "microseg_drops", "Packets the datapath dropped, by reason: rule, default and "
            "revoked are policy denials; invalid, fragment and state are not",
            labels=["reason"])
        by_dv: dict[tuple[str, str], list[int]] = {}
        by_vr: dict[tuple[str, str], int] = {key: 0 for key in VERDICT_REASONS}
        by_r: dict[str, int] = {r: 0 for v, r in VERDICT_REASONS if v in ("denied", "dropped")}
        # Every label combination is present from the first scrape, at zero:
        # rate() and increase() then see a counter's first increment.
        for d in abi.Direction:
            for v in abi.Verdict:
                by_dv[(d.name.lower(), v.name.lower())] = [0, 0]
        for (d, v, r), (pk, by) in s.counters.items():
            cell = by_dv[(d.name.lower(), v.name.lower())]
            cell[0] += pk
            cell[1] += by
            key = (v.name.lower(), r.name.lower())
            by_vr[key] = by_vr.get(key, 0) + pk
            if v in DROPPING:
                by_r[r.name.lower()] = by_r.get(r.name.lower(), 0) + pk
        for (d, v), (pk, by) in sorted(by_dv.items()):
            packets.add_metric([d, v], pk)
            byts.add_metric([d, v], by)
        for (v, r), pk in sorted(by_vr.items()):
            verdicts.add_metric([v, r], pk)
        for r, pk in sorted(by_r.items()):
            drops.add_metric([r], pk)
        yield from (packets, byts, verdicts, drops)

        hits = CounterMetricFamily("microseg_rule_hits", "Sessions (and denied packets) each "
                                   "rule of the active policy decided", labels=["rule", "action"])
        for rule, action, n in s.rule_hits:
            hits.add_metric([rule, action], n)
        yield hits

        staged = CounterMetricFamily(
            "microseg_staged_verdicts", "New flows and denied packets a staged candidate "
            "policy judged, by its verdict and whether it differs from the active policy's",
            labels=["verdict", "differs"])
        for verdict in ("allowed", "denied", "audit"):
            for differs in (False, True):
                staged.add_metric([verdict, str(differs).lower()],
                                  s.staged_verdicts.get((verdict, differs), 0))
        yield staged

        sessions = GaugeMetricFamily("microseg_sessions", "Entries in the session table",
                                     labels=["protocol", "state"])
        counts: dict[tuple[str, str], int] = {(p, st): 0 for p in ("tcp", "udp", "icmp", "icmpv6")
                                              for st in STATES.values()}
        for (proto, state), n in s.sessions.items():
            key = (PROTOCOLS.get(proto, str(proto)), STATES.get(state, "new"))
            counts[key] = counts.get(key, 0) + n
        for (p, st), n in sorted(counts.items()):
            sessions.add_metric([p, st], n)
        yield sessions
        yield GaugeMetricFamily("microseg_session_table_entries", "Sessions in the table",
                                value=sum(s.sessions.values()))
        yield GaugeMetricFamily("microseg_session_table_capacity", "Session table size",
                                value=s.session_capacity)
        yield CounterMetricFamily("microseg_sessions_expired", "Idle sessions expired by the "
                                  "sweeper", value=s.sessions_expired)
        yield CounterMetricFamily("microseg_sessions_evicted", "Sessions the full table "
                                  "evicted (least recently used) to make room",
                                  value=s.sessions_evicted)

        events = CounterMetricFamily("microseg_events", "Events published by the daemon",
                                     labels=["type"])
        for t in ("verdict", "drop", "session", "policy", "lost"):
            events.add_metric([t], s.events_published.get(t, 0))
        yield events
        lost = CounterMetricFamily("microseg_events_lost", "Events lost: ringbuf (the kernel "
                                   "found the ring buffer full), subscriber (a slow client or "
                                   "sink)", labels=["source"])
        for src in ("ringbuf", "subscriber"):
            lost.add_metric([src], s.events_lost.get(src, 0))
        yield lost

        yield GaugeMetricFamily("microseg_policy_generation", "Active policy generation",
                                value=s.policy_generation)
        yield CounterMetricFamily("microseg_policy_reloads", "Policies applied",
                                  value=s.policy_reloads)
        yield CounterMetricFamily("microseg_policy_reload_failures", "Policy files rejected",
                                  value=s.policy_reload_failures)
        yield GaugeMetricFamily("microseg_policy_rules", "Rules in the active policy",
                                value=s.policy_rules)
        yield GaugeMetricFamily("microseg_policy_workloads", "Workloads in the active policy",
                                value=s.policy_workloads)
        yield GaugeMetricFamily("microseg_interfaces_attached", "Interfaces the datapath is "
                                "attached to", value=s.interfaces_attached)
        workloads = GaugeMetricFamily("microseg_workloads", "Workloads the daemon knows, by "
                                      "source (static: the policy file)", labels=["source"])
        for source in sorted({"static", *s.workloads, *s.discovery_errors}):
            workloads.add_metric([source], s.workloads.get(source, 0))
        yield workloads
        if s.discovery_events or s.discovery_errors:
            changes = CounterMetricFamily("microseg_discovery_events", "Workloads added, "
                                          "removed or changed by a discovery source",
                                          labels=["source", "action"])
            sources = {src for src, _ in s.discovery_events} | set(s.discovery_errors)
            for source in sorted(sources):
                for action in ("added", "removed", "changed"):
                    changes.add_metric([source, action],
                                       s.discovery_events.get((source, action), 0))
            yield changes
            errors = CounterMetricFamily("microseg_discovery_errors", "Times a discovery "
                                         "source lost its engine (or could not reach it)",
                                         labels=["source"])
            for source in sorted(sources):
                errors.add_metric([source], s.discovery_errors.get(source, 0))
            yield errors
        if s.etcd is not None:
            e = s.etcd
            yield GaugeMetricFamily("microseg_etcd_up", "1 while etcd answers this node "
                                    "(0: cut off, the last known state enforced)",
                                    value=1 if e["up"] else 0)
            yield CounterMetricFamily("microseg_etcd_errors", "Times the connection to etcd "
                                      "failed (each retried with back-off)", value=e["errors"])
            yield CounterMetricFamily("microseg_etcd_resyncs", "Times the node listed etcd "
                                      "afresh (each (re)connection)", value=e["resyncs"])
            yield GaugeMetricFamily("microseg_cluster_nodes", "Nodes publishing in etcd, as "
                                    "last known (this one included)", value=e["nodes"])
        yield CounterMetricFamily("microseg_datapath_run_time_seconds", "Time spent in the "
                                  "TC programs (kernel BPF run-time stats)",
                                  value=s.run_time_ns / 1e9)
        yield CounterMetricFamily("microseg_datapath_runs", "Runs of the TC programs",
                                  value=s.run_count)
        if s.flow_log is not None:
            fl = s.flow_log
            yield CounterMetricFamily("microseg_flow_log_lines", "Lines written to the flow log",
                                      value=fl["lines"])
            yield CounterMetricFamily("microseg_flow_log_bytes", "Bytes written to the flow log",
                                      value=fl["bytes"])
            yield CounterMetricFamily("microseg_flow_log_write_errors",
                                      "Failed flow log writes", value=fl["write_errors"])
            yield CounterMetricFamily("microseg_flow_log_rotations", "Flow log rotations",
                                      value=fl["rotations"])


def render(snap: Report, accept: str) -> tuple[bytes, str]:
    """The exposition of one report, in the format the Accept header asks
    for: (body, content type)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(snap))
    ProcessCollector(registry=registry)  # the daemon's CPU, memory, fds
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


def build_app(snapshot: Callable[[], Awaitable[Report]]) -> web.Application:
    """The read-only metrics listener: GET /metrics, and / pointing there."""

    async def metrics(request: web.Request) -> web.Response:
        snap = await snapshot()
        body, ctype = await asyncio.get_running_loop().run_in_executor(
            None, render, snap, request.headers.get("Accept", ""))
        resp = web.Response(body=body, headers={"Content-Type": ctype})
        resp.enable_compression()  # honoured when the scraper accepts gzip
        return resp

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="microseg: metrics at /metrics\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    return app
