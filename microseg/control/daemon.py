"""`microseg run`: the daemon.

One asyncio loop: it loads the datapath, applies the policy and follows the
policy file, attaches interfaces, serves the control socket, and answers
SIGHUP (reload) and SIGINT/SIGTERM (stop). Blocking work — BCC compiles,
netlink, map writes — runs in worker threads so the loop stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from aiohttp import web

from microseg import __version__
from microseg.control import api
from microseg.flow.enrich import Names, session_rows
from microseg.flow.filters import Filter
from microseg.flow.hub import EventHub, rfc3339
from microseg.flow.pipeline import Pipeline
from microseg.flow.sweeper import DEFAULT_TIMEOUTS, Sweeper, timeout_name
from microseg.kernel import abi, bpfsys
from microseg.kernel.clock import SessionClock, monotonic_ns, wall_offset_ns
from microseg.kernel.datapath import DEFAULT_PIN_DIR, Datapath, DatapathConfig
from microseg.kernel.interfaces import InterfaceManager
from microseg.kernel.journal import Journal
from microseg.kernel.netlink import LinkWatcher
from microseg.kernel.records import session_census
from microseg.policy.manager import PolicyManager
from microseg.policy.model import PROTOCOL_NAMES
from microseg.policy.parse import PolicyError, load_policy_file
from microseg.policy.watch import watch_policy

SWEEP_PUBLISH_SLICE = 1024

log = logging.getLogger("microseg")

DEFAULT_POLICY = "/etc/microseg/policy.yaml"


class StartupError(Exception):
    """The daemon cannot start; the message is the one line to print."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class RunConfig:
    interfaces: list[str] = field(default_factory=list)
    policy_path: str = DEFAULT_POLICY
    policy_default_audit: bool = False
    socket_path: str = "/run/microseg/microseg.sock"
    socket_group: str | None = None
    pin_dir: str = DEFAULT_PIN_DIR
    keep_on_exit: bool = False
    session_capacity: int = 1 << 20
    ringbuf_bytes: int = 16 << 20
    flow_log: str | None = None
    flow_log_max_bytes: int = 100 << 20
    flow_log_keep: int = 5
    timeouts: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    sweep_interval: float = 5.0
    metrics: tuple[str, int] | None = ("127.0.0.1", 9750)  # None: no metrics listener


class OneLineFormatter(logging.Formatter):
    """`2026-11-27T07:40:12.123Z INFO  microseg.policy: message` — exceptions
    folded into the same line."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage()
        if record.exc_info:
            msg += " | " + repr(record.exc_info[1])
        return f"{t}.{int(record.msecs):03d}Z {record.levelname:<5} {record.name}: " + \
            msg.replace("\n", " | ")


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # logs every change at INFO


def _selector_text(sel) -> str:
    return str(sel)


def _ports_text(ports: tuple[tuple[int, int], ...]) -> list[str]:
    return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports]


class Daemon:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.hub = EventHub()
        self.datapath = Datapath(DatapathConfig(
            pin_dir=cfg.pin_dir, session_capacity=cfg.session_capacity,
            ringbuf_bytes=cfg.ringbuf_bytes))
        self.policy = PolicyManager(self.datapath, cfg.policy_path, publish=self.hub.publish,
                                    builtin_fallback=cfg.policy_default_audit)
        self.interfaces = InterfaceManager(self.datapath, cfg.interfaces)
        self.names = Names(self.policy.compiled_for, self.interfaces.name_of,
                           lambda: self.policy.active.compiled if self.policy.active else None)
        self.pipeline = Pipeline(self.datapath, self.hub, self.names,
                                 lambda: self.policy.generation)
        self.links = LinkWatcher(self._on_links_changed)
        self.clock: SessionClock | None = None
        self.sweeper: Sweeper | None = None
        self.journal: Journal | None = None
        self.last_sweep: dict | None = None
        self.metrics_listen: str | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.flowlog = None
        self._stats_fd = -1
        self._baseline: dict = {}
        self.started_ns = time.time_ns()
        self.ready = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._group_gid: int | None = None

    # -- lifecycle -------------------------------------------------------------

    def check_policy_file(self) -> None:
        """Refuse to start on a missing (without --policy-default audit) or
        invalid policy file: an operator must see that at once."""
        path = self.cfg.policy_path
        if not os.path.exists(path):
            if self.cfg.policy_default_audit:
                log.warning("policy file %s not found: running the built-in audit policy "
                            "(observe everything, enforce nothing) until it appears", path)
                return
            raise StartupError(f"policy file {path} not found (use --policy-default audit to "
                               "observe without one)")
        try:
            load_policy_file(path)
        except PolicyError as e:
            raise StartupError(f"invalid policy:\n{e}") from None

    async def run(self) -> int:
        t0 = time.perf_counter()
        self.check_policy_file()
        self._group_gid = api.group_id(self.cfg.socket_group)
        api.prepare_socket(self.cfg.socket_path)
        try:
            await self._start(t0)
        except BaseException:
            await self.shutdown()
            raise
        await self._stop.wait()
        await self.shutdown()
        return 0

    async def _start(self, t0: float) -> None:
        loop = asyncio.get_running_loop()
        if self.cfg.metrics is not None:  # first: a taken port fails before anything changed
            await self._serve_metrics(*self.cfg.metrics)
        report = await loop.run_in_executor(None, self.datapath.load)
        for w in report.warnings:
            log.warning("%s", w)
        log.info("datapath loaded compile_s=%.2f load_s=%.2f pin_dir=%s reused_pins=%d",
                 report.compile_s, report.load_s, self.cfg.pin_dir, len(report.reused_pins))
        try:  # kernel run-time stats (ns per packet), for as long as we hold the fd
            self._stats_fd = bpfsys.enable_run_time_stats()
        except OSError as e:
            log.warning("kernel BPF run-time stats unavailable: %s", e)
        self.clock = await loop.run_in_executor(None, SessionClock, self.datapath.clock_sample)
        self.sweeper = Sweeper(self.datapath, self.clock, self.cfg.timeouts)
        self.journal = journal = Journal(self.datapath.maps["daemon_map"])
        if journal.inherited:
            log.info("continuing an earlier daemon's events after seq %d", journal.last_seq)
            self.hub.continue_after(journal.last_seq)
        self.hub.on_seq = journal.record_seq
        self.pipeline.journal = journal
        res = await self.policy.reload("start", force=True)
        if res.result != "applied":
            raise StartupError("invalid policy:\n" + "\n".join(res.errors))
        # After the policy: what an earlier daemon left in the ring is named
        # with it (microseg/enrich.py Names.workload).
        self.pipeline.start(loop)
        await loop.run_in_executor(None, self.interfaces.sync)
        for name in self.interfaces.missing():
            log.warning("interface %s not found (yet)", name)
        self.links.start(loop)
        if self.cfg.flow_log:
            from microseg.exporters.flowlog import FlowLog

            self.flowlog = FlowLog(self.cfg.flow_log, self.cfg.flow_log_max_bytes,
                                   self.cfg.flow_log_keep)
            self.flowlog.start(self.hub)
        self._baseline = await loop.run_in_executor(None, self._counters)
        await self._serve()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self._tasks.append(asyncio.create_task(
            watch_policy(self.cfg.policy_path, self._on_file_change, self._stop),
            name="policy-watch"))
        self._tasks.append(asyncio.create_task(self._sweep_forever(), name="sweeper"))
        self.ready = True
        log.info("ready in %.2fs socket=%s interfaces=%s generation=%d", time.perf_counter() - t0,
                 self.cfg.socket_path, ",".join(a.name for a in self.interfaces.attached.values())
                 or "-", self.policy.generation)

    def _on_links_changed(self) -> None:
        async def resync() -> None:
            added, removed = await asyncio.get_running_loop().run_in_executor(
                None, self.interfaces.sync)
            if added or removed:
                self.names.forget_interfaces()

        self._tasks.append(asyncio.create_task(resync()))

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sweeper is not None
        while True:
            await asyncio.sleep(self.cfg.sweep_interval)
            res = await loop.run_in_executor(None, self.sweeper.sweep)
            if self.journal is not None and res.deleted:
                self.journal.record_swept(res.deleted)
            t0 = time.perf_counter()
            en = self.pipeline.enricher
            # In slices, so a sweep of a million sessions never holds the
            # loop for more than a few milliseconds at a time.
            for pairs in res.expired(SWEEP_PUBLISH_SLICE):
                self.hub.publish_batch(en.expired(pairs, res.ref_ktime_ns,
                                                  self.interfaces.name_of))
                await asyncio.sleep(0)
            self.last_sweep = {"scanned": res.scanned, "expired": res.expired_count,
                               "removed_closed": res.removed_closed,
                               "sweep_s": round(res.seconds, 6),
                               "publish_s": round(time.perf_counter() - t0, 6),
                               "at": rfc3339(time.time_ns())}
            if res.seconds > 1:
                log.info("sweep took %.2fs over %d sessions", res.seconds, res.scanned)

    async def _serve(self) -> None:
        app = api.build_app(self, self._group_gid)
        # Streams are ended at shutdown (hub.close); whatever still hangs
        # gets this long.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.UnixSite(self._runner, self.cfg.socket_path)
        old = os.umask(0o177)  # the socket is born 0600, then widened if asked
        try:
            await site.start()
        finally:
            os.umask(old)
        api.secure_socket(self.cfg.socket_path, self._group_gid)

    async def _serve_metrics(self, host: str, port: int) -> None:
        from microseg.exporters.prometheus import build_app

        self._metrics_runner = web.AppRunner(build_app(self.metrics_snapshot), access_log=None,
                                             shutdown_timeout=1.0)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise StartupError(f"cannot serve metrics on {host}:{port}: {e.strerror} "
                               "(--metrics ADDR, or --metrics off)") from None
        bound = site._server.sockets[0].getsockname()  # the port, when 0 was asked for
        self.metrics_listen = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] \
            else f"{bound[0]}:{bound[1]}"
        log.info("metrics at http://%s/metrics", self.metrics_listen)

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading the policy")
        self._tasks.append(asyncio.create_task(self.policy.reload("SIGHUP", force=True)))

    async def _on_file_change(self) -> None:
        await self.policy.reload("file changed", skip_rejected=True)

    def stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        log.info("stopping%s", " (datapath stays attached: --keep-on-exit)"
                 if self.cfg.keep_on_exit else "")
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.links.stop()
        self.pipeline.stop()  # the last events, to the subscribers still here
        if self.flowlog is not None:
            await self.flowlog.stop()
        self.hub.close()  # open `watch` streams end
        if self._stats_fd >= 0:
            os.close(self._stats_fd)
            self._stats_fd = -1
        if self._runner is not None:
            await self._runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.socket_path)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self.datapath.bpf is None:
            return  # never loaded: nothing to undo
        await loop.run_in_executor(None, self.policy.converge_now)
        if not self.cfg.keep_on_exit:
            await loop.run_in_executor(None, self.interfaces.detach_all)
            self.datapath.close()
            self.datapath.unpin()
        else:
            self.datapath.close()
        log.info("stopped")

    # -- what the API shows ----------------------------------------------------

    def _counters(self) -> dict:
        """Kernel counters now: for rates since start."""
        run_ns, run_cnt = self.datapath.run_stats()
        return {"at_ns": monotonic_ns(), "stats": self.datapath.read_stats(),
                "run_time_ns": run_ns, "run_cnt": run_cnt}

    def session_census(self) -> dict[tuple[int, int], int]:
        """(protocol, state) -> sessions (blocking: run it in a worker)."""
        return session_census(self.datapath.maps["session_map"].lookup_batch_raw(8192))

    async def metrics_snapshot(self):
        """All counters of a Prometheus scrape, read now (exporters.prometheus)."""
        from microseg.exporters.prometheus import Snapshot

        if not self.ready:
            raise web.HTTPServiceUnavailable(text="microseg: starting\n")
        loop = asyncio.get_running_loop()

        def kernel() -> tuple:
            return (self.datapath.read_stats(), self.datapath.read_rule_stats(),
                    self.session_census(), self.datapath.run_stats(),
                    self.datapath.read_event_stats(), self.datapath.read_session_stats())

        counters, rule_stats, census, (run_ns, runs), ev, made = \
            await loop.run_in_executor(None, kernel)
        a = self.policy.active
        rule_hits = []
        if a is not None:
            ids = a.compiled.rule_ids
            rule_hits = [(r.name, r.action, rule_stats.get(ids[r.name], (0, 0))[0])
                         for r in a.loaded.policy.rules]
        fl = self.flowlog
        return Snapshot(
            version=__version__, counters=counters, rule_hits=rule_hits, sessions=census,
            session_capacity=self.cfg.session_capacity,
            sessions_expired=self.sweeper.expired_total if self.sweeper else 0,
            sessions_evicted=self.evictions(made, sum(census.values())),
            events_published=dict(self.hub.published),
            # The kernel's own count of failed reservations: exact even
            # between two drains of the pipeline.
            events_lost={"ringbuf": sum(lost for _, lost in ev.values()),
                         "subscriber": self.hub.subscriber_lost},
            policy_generation=self.policy.generation,
            policy_reloads=self.policy.reloads_total,
            policy_reload_failures=self.policy.reload_failures_total,
            policy_rules=len(a.loaded.policy.rules) if a else 0,
            policy_workloads=len(a.loaded.policy.workloads) if a else 0,
            interfaces_attached=len(self.interfaces.attached),
            run_time_ns=run_ns, run_count=runs,
            flow_log=None if fl is None else {
                "lines": fl.lines, "bytes": fl.bytes, "write_errors": fl.write_errors,
                "rotations": fl.rotations})

    def evictions(self, made: tuple[int, int], entries: int) -> int:
        """Sessions the full table's LRU evicted to make room: it says
        nothing itself, so they are what is missing from the books — made
        by the datapath, minus revoked by it, swept by the daemons, and in
        the table now. (Read a few microseconds apart: ±a few in flight.)"""
        created, revoked = made
        swept = self.journal.sessions_swept if self.journal else 0
        return max(0, created - revoked - swept - entries)

    async def stats(self) -> dict:
        loop = asyncio.get_running_loop()
        now = await loop.run_in_executor(None, self._counters)

        census = await loop.run_in_executor(None, self.session_census)
        entries = sum(census.values())
        by_state = {f"{PROTOCOL_NAMES.get(p, p)}/{abi.State(st).name.lower()}": n
                    for (p, st), n in sorted(census.items())}
        events = await loop.run_in_executor(None, self.datapath.read_event_stats)
        made = await loop.run_in_executor(None, self.datapath.read_session_stats)
        base = self._baseline
        elapsed = max(1e-9, (now["at_ns"] - base.get("at_ns", now["at_ns"])) / 1e9)
        counters, totals, rates, drops = [], {}, {}, {}
        for (d, v, r), (pk, by) in sorted(now["stats"].items()):
            counters.append({"direction": d.name.lower(), "verdict": v.name.lower(),
                             "reason": r.name.lower(), "packets": pk, "bytes": by})
            vname = v.name.lower()
            totals[vname] = totals.get(vname, 0) + pk
            before = base.get("stats", {}).get((d, v, r), (0, 0))[0]
            rates[vname] = rates.get(vname, 0.0) + (pk - before) / elapsed
            if v == abi.Verdict.DROPPED:
                drops[r.name.lower()] = drops.get(r.name.lower(), 0) + pk
        runs = now["run_cnt"] - base.get("run_cnt", 0)
        run_ns = now["run_time_ns"] - base.get("run_time_ns", 0)
        return {
            "time": rfc3339(time.time_ns()),
            "uptime_s": round((time.time_ns() - self.started_ns) / 1e9, 3),
            "packets": totals,
            "rates_since_start_pps": {k: round(v, 3) for k, v in rates.items()},
            "drops": drops,
            "counters": counters,
            "sessions": {"entries": entries, "capacity": self.cfg.session_capacity,
                         "fill": round(entries / self.cfg.session_capacity, 6),
                         "by_state": by_state,
                         "expired_total": self.sweeper.expired_total if self.sweeper else 0,
                         "created_total": made[0], "revoked_total": made[1],
                         "evicted_total": self.evictions(made, entries),
                         "sweeps": self.sweeper.sweeps if self.sweeper else 0,
                         "last_sweep": self.last_sweep},
            "events": {"published": dict(self.hub.published), "last_seq": self.hub.last_seq,
                       "lost": {"ringbuf": self.pipeline.lost_ringbuf,
                                "subscriber": self.hub.subscriber_lost},
                       "kernel": {t.name.lower(): {"submitted": sub, "lost": lost}
                                  for t, (sub, lost) in events.items()},
                       "subscribers": self.hub.subscribers},
            "policy": {"generation": self.policy.generation,
                       "reloads_total": self.policy.reloads_total,
                       "reload_failures_total": self.policy.reload_failures_total},
            "datapath": {"runs": runs, "run_time_ns": run_ns,
                         "avg_ns_per_packet": round(run_ns / runs, 1) if runs else None},
            "flow_log": None if self.flowlog is None else {
                "path": self.flowlog.path, "lines": self.flowlog.lines,
                "events": self.flowlog.events, "lost": self.flowlog.lost,
                "bytes": self.flowlog.bytes, "write_errors": self.flowlog.write_errors,
                "rotations": self.flowlog.rotations},
        }

    async def session_rows(self, flt: Filter, chunk: int = 2048):
        """Session rows, a batch at a time (the table may hold millions)."""
        loop = asyncio.get_running_loop()
        assert self.clock is not None
        ref = await loop.run_in_executor(None, self.clock.refresh)
        batches = self.datapath.maps["session_map"].lookup_batch_raw(chunk)
        timeouts = self.cfg.timeouts
        match = flt.predicate()
        kf, vf = abi.SESSION_KEY.struct, abi.SESSION_VALUE.struct

        def timeout_of(proto: int, state: int) -> float:
            return timeouts[timeout_name(proto, state)]

        def next_rows() -> list[dict] | None:
            try:
                keys, values, _ = next(batches)
            except StopIteration:
                return None
            rows = session_rows(zip(kf.iter_unpack(keys), vf.iter_unpack(values), strict=True),
                                self.names, ref, self.clock.hz, timeout_of,
                                self.interfaces.name_of)
            return rows if match is None else [r for r in rows if match(r)]

        while (rows := await loop.run_in_executor(None, next_rows)) is not None:
            yield rows

    def status(self) -> dict:
        a = self.policy.active
        p = a.loaded.policy if a else None
        return {
            "version": __version__,
            "pid": os.getpid(),
            "ready": self.ready,
            "started_at": rfc3339(self.started_ns),
            "uptime_s": round((time.time_ns() - self.started_ns) / 1e9, 3),
            "socket": self.cfg.socket_path,
            "interfaces": {
                "patterns": self.cfg.interfaces,
                "attached": sorted(x.name for x in self.interfaces.attached.values()),
                "missing": self.interfaces.missing(),
                "failed": self.interfaces.failed,
            },
            "policy": {
                "path": os.path.abspath(self.cfg.policy_path),
                "generation": self.policy.generation,
                "source": a.loaded.source if a else None,
                "sha256": a.loaded.sha256 if a else None,
                "loaded_at": rfc3339(a.loaded_at_ns) if a else None,
                "mode": p.mode if p else None,
                "default": p.default if p else None,
                "rules": len(p.rules) if p else 0,
                "workloads": len(p.workloads) if p else 0,
                "reloads_total": self.policy.reloads_total,
                "reload_failures_total": self.policy.reload_failures_total,
                "last_reload": self.policy.last.as_dict() if self.policy.last else None,
            },
            "metrics": self.metrics_listen,
            "datapath": {
                "pin_dir": self.cfg.pin_dir,
                "session_capacity": self.cfg.session_capacity,
                "ringbuf_bytes": self.cfg.ringbuf_bytes,
                "keep_on_exit": self.cfg.keep_on_exit,
            },
        }

    async def policy_show(self) -> dict:
        loop = asyncio.get_running_loop()
        stats = await loop.run_in_executor(None, self.datapath.read_rule_stats)
        a = self.policy.active
        if a is None:
            return {"generation": 0, "rules": [], "workloads": [], "never_hit": []}
        p, ids = a.loaded.policy, a.compiled.rule_ids
        offset = wall_offset_ns()
        rules = []
        for r in p.rules:
            hits, last_ns = stats.get(ids[r.name], (0, 0))
            rules.append({
                "name": r.name,
                "from": [_selector_text(s) for s in r.sources],
                "to": [_selector_text(s) for s in r.destinations],
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
            "mode": p.mode,
            "default": p.default,
            "workloads": [{"name": w.name, "labels": dict(w.labels),
                           "addresses": [str(x) for x in w.addresses], "mode": w.mode}
                          for w in p.workloads],
            "rules": rules,
            "never_hit": [r["name"] for r in rules if not r["hits"]],
            "last_reload": self.policy.last.as_dict() if self.policy.last else None,
        }


M_ARENA_MAX = -8  # mallopt(3)


def steady_malloc() -> None:
    """Keep glibc's heap from ratcheting up under steady churn.

    Sweeps and listings copy the session table out in ~1 MiB batches on
    executor threads, and glibc gives each thread its own arena, which keeps
    its high-water mark: RSS stepped up by MiBs whenever the table reached a
    new peak. Two arenas bound what the threads can hold on to. (A fixed
    mmap threshold flattened RSS too, but cost the flow log and listings
    25-35 % of their throughput in page faults: measured side by side.)
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc: its own allocator, its own habits
        pass


def run(cfg: RunConfig) -> int:
    """Entry point of `microseg run`."""
    setup_logging()
    steady_malloc()
    if os.geteuid() != 0:
        print("microseg: run needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)",
              file=sys.stderr)
        return 3
    daemon = Daemon(cfg)
    try:
        return asyncio.run(daemon.run())
    except StartupError as e:
        print(f"microseg: {e}", file=sys.stderr)
        return e.code
    except OSError as e:
        print(f"microseg: {e}", file=sys.stderr)
        return 1
