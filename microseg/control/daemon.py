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

from aiohttp import web

from microseg.control import api
from microseg.control.config import RunConfig
from microseg.control.discovery import Sources
from microseg.control.report import Report
from microseg.control.runstats import RunTimeStats
from microseg.control.views import Parts, Views
from microseg.flow.aggregates import Flusher
from microseg.flow.enrich import Names
from microseg.flow.hub import EventHub, rfc3339
from microseg.flow.pipeline import Pipeline
from microseg.flow.sweeper import Sweeper
from microseg.kernel.clock import SessionClock, kernel_hz
from microseg.kernel.datapath import Datapath
from microseg.kernel.interfaces import InterfaceManager
from microseg.kernel.journal import Journal
from microseg.kernel.loader import DatapathConfig, Preload
from microseg.kernel.netlink import LinkWatcher
from microseg.policy.manager import PolicyManager
from microseg.policy.model import Discovery
from microseg.policy.parse import PolicyError, load_policy_file, parse_policy
from microseg.policy.watch import watch_policy

SWEEP_PUBLISH_SLICE = 1024

log = logging.getLogger("microseg")


class StartupError(Exception):
    """The daemon cannot start; the message is the one line to print."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


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


class Daemon:
    """The daemon's lifecycle: start the parts in order, follow links, the
    policy file and signals, sweep, stop cleanly. What it shows lives in
    microseg/control/views.py."""

    def __init__(self, cfg: RunConfig, preload: Preload | None = None) -> None:
        self.cfg = cfg
        self.hub = EventHub()
        self.datapath = Datapath(DatapathConfig(
            pin_dir=cfg.pin_dir, session_capacity=cfg.session_capacity,
            ringbuf_bytes=cfg.ringbuf_bytes), preload)
        self.policy = PolicyManager(self.datapath, cfg.policy_path, publish=self.hub.publish,
                                    builtin_fallback=cfg.policy_default_audit,
                                    insecure_permissions=cfg.insecure_policy_permissions,
                                    on_discover=self._on_discover,
                                    on_applied=self._on_applied,
                                    state_dir=state_dir(cfg.socket_path))
        self.sources = Sources(self.policy)
        self.cluster = None
        if cfg.etcd is not None:
            from microseg.control.cluster import Cluster

            self.cluster = Cluster(cfg.etcd, self.policy, state_dir(cfg.socket_path))
        self.interfaces = InterfaceManager(self.datapath, cfg.interfaces)
        self.names = Names(self.policy.compiled_for, self.interfaces.name_of,
                           lambda: self.policy.active.compiled if self.policy.active else None)
        self.pipeline = Pipeline(self.datapath, self.hub, self.names,
                                 lambda: self.policy.generation)
        self.parts = Parts(cfg=cfg, hub=self.hub, datapath=self.datapath, policy=self.policy,
                           interfaces=self.interfaces, names=self.names, pipeline=self.pipeline,
                           sources=self.sources, started_ns=time.time_ns(),
                           cluster=self.cluster)
        self.views = Views(self.parts)
        self.hub.observers += [self.parts.flows.add_many, self.parts.staged_changes.observe]
        self.flusher = Flusher(self.datapath, cfg.event_window)
        self.links = LinkWatcher(self._on_links_changed)
        self._metrics_runner: web.AppRunner | None = None
        # The kernel's run-time statistics cost every packet while on: sampled
        # (microseg/control/runstats.py).
        self.run_stats = RunTimeStats(cfg.run_time_stats)
        self.parts.run_stats = self.run_stats
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._group_gid: int | None = None
        self._discover = Discovery()

    # -- lifecycle -------------------------------------------------------------

    def check_policy_file(self) -> Discovery:
        """Refuse to start on a missing (without --policy-default audit) or
        invalid policy file: an operator must see that at once. Returns its
        `discover` section."""
        path = self.cfg.policy_path
        if self.policy.from_cluster:
            return Discovery()  # the cluster policy's comes with it
        if not os.path.exists(path):
            if self.cfg.policy_default_audit:
                log.warning("policy file %s not found: running the built-in audit policy "
                            "(observe everything, enforce nothing) until it appears", path)
                return Discovery()
            raise StartupError(f"policy file {path} not found (use --policy-default audit to "
                               "observe without one)")
        try:
            self.policy.check_permissions()
        except PolicyError as e:
            raise StartupError(f"policy file {path} {e.errors[0].message}") from None
        try:
            return load_policy_file(path).policy.discover
        except PolicyError as e:
            raise StartupError(f"invalid policy:\n{e}") from None

    async def run(self) -> int:
        t0 = time.perf_counter()
        self._discover = self.check_policy_file()
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
        log.info("datapath %s compile_s=%.2f load_s=%.2f pin_dir=%s reused_pins=%d "
                 "identity=%s", "reused" if report.reused_programs else "loaded",
                 report.compile_s, report.load_s, self.cfg.pin_dir, len(report.reused_pins),
                 report.identity)
        parts = self.parts
        # The kernel's tick rate, from the coarse clock's resolution; measured
        # (a tenth of a second) only if that is no known HZ: beside the rest
        # of the start, needed only before the links are attached.
        clock = loop.run_in_executor(None, lambda: SessionClock(self.datapath.clock_sample,
                                                                hz=kernel_hz()))
        parts.journal = journal = Journal(self.datapath.maps["daemon_map"])
        if journal.inherited:
            log.info("continuing an earlier daemon's events after seq %d", journal.last_seq)
            self.hub.continue_after(journal.last_seq)
        self.hub.on_seq = journal.record_seq
        self.pipeline.journal = journal
        if self.cfg.flow_log:
            # Subscribed before the first event: the start's policy event,
            # and what an earlier daemon left in the ring, are logged too.
            from microseg.exporters.flowlog import FlowLog

            parts.flowlog = FlowLog(self.cfg.flow_log, self.cfg.flow_log_max_bytes,
                                    self.cfg.flow_log_keep)
            parts.flowlog.start(self.hub)
        if self.cluster is not None:
            # Other nodes' workloads (and the cluster policy) are known before
            # the first judgement too; etcd being down delays a start by a
            # few seconds, never stops it.
            self.cluster.start()
            if not await self.cluster.first_contact() and self.policy.from_cluster:
                self.cluster.restore_policy()
            if self.policy.from_cluster:
                self._discover = self._cluster_discover()
        # Running containers are known before the first judgement: a restart
        # must not revoke their sessions as strangers'.
        self.sources.configure(self._discover)
        await self.sources.first_inventory()
        res = await self.policy.reload("start", force=True)
        if res.result != "applied":
            raise StartupError("invalid policy:\n" + "\n".join(res.errors))
        await self.policy.stager.restore()  # a candidate staged before a restart
        parts.clock = await clock
        # The aggregation window, and how long a hook waits before taking a
        # session's direction over from one that stopped seeing it (1 s).
        self.datapath.write_settings(int(self.cfg.event_window * 1e9), int(parts.clock.hz))
        parts.sweeper = Sweeper(self.datapath, parts.clock, self.cfg.timeouts)
        # After the policy: what an earlier daemon left in the ring is named
        # with it (microseg/enrich.py Names.workload).
        self.pipeline.start(loop)
        await loop.run_in_executor(None, self.interfaces.sync)
        for name in self.interfaces.missing():
            log.warning("interface %s not found (yet)", name)
        self.links.start(loop)
        await loop.run_in_executor(None, self.views.mark_baseline)
        await self._serve()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        if not self.policy.from_cluster:  # the cluster policy comes by etcd's watch
            self._tasks.append(asyncio.create_task(
                watch_policy(self.cfg.policy_path, self._on_file_change, self._stop),
                name="policy-watch"))
        self._tasks.append(asyncio.create_task(self._sweep_forever(), name="sweeper"))
        self._tasks.append(asyncio.create_task(self._flush_forever(), name="aggregates"))
        self._tasks.append(asyncio.create_task(self.run_stats.run(), name="run-time-stats"))
        parts.ready = True
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

    async def _flush_forever(self) -> None:
        """Report the held counts of denied flows that went quiet."""
        loop = asyncio.get_running_loop()
        flusher = self.flusher
        if not flusher.window_ns:
            return
        while True:
            await asyncio.sleep(flusher.interval_s)
            try:
                await loop.run_in_executor(None, flusher.run)
            except OSError as e:
                log.error("flushing aggregated denials failed: %s", e)

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        parts = self.parts
        assert parts.sweeper is not None
        while True:
            await asyncio.sleep(self.cfg.sweep_interval)
            res = await loop.run_in_executor(None, parts.sweeper.sweep)
            if parts.journal is not None and res.deleted:
                parts.journal.record_swept(res.deleted)
            t0 = time.perf_counter()
            en = self.pipeline.enricher
            # In slices, so a sweep of a million sessions never holds the
            # loop for more than a few milliseconds at a time.
            for pairs in res.expired(SWEEP_PUBLISH_SLICE):
                self.hub.publish_batch(en.expired(pairs, res.ref_ktime_ns,
                                                  self.interfaces.name_of))
                await asyncio.sleep(0)
            parts.last_sweep = {"scanned": res.scanned, "expired": res.expired_count,
                               "removed_closed": res.removed_closed,
                               "sweep_s": round(res.seconds, 6),
                               "publish_s": round(time.perf_counter() - t0, 6),
                               "at": rfc3339(time.time_ns())}
            if res.seconds > 1:
                log.info("sweep took %.2fs over %d sessions", res.seconds, res.scanned)

    async def _serve(self) -> None:
        app = api.build_app(self.views, self._group_gid)
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

        self._metrics_runner = web.AppRunner(build_app(self._metrics_report), access_log=None,
                                             shutdown_timeout=1.0)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise StartupError(f"cannot serve metrics on {host}:{port}: {e.strerror} "
                               "(--metrics ADDR, or --metrics off)") from None
        bound = site._server.sockets[0].getsockname()  # the port, when 0 was asked for
        self.parts.metrics_listen = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] \
            else f"{bound[0]}:{bound[1]}"
        log.info("metrics at http://%s/metrics", self.parts.metrics_listen)

    async def _metrics_report(self) -> Report:
        if not self.parts.ready:
            raise web.HTTPServiceUnavailable(text="microseg: starting\n")
        return await self.views.report()

    def _cluster_discover(self) -> Discovery:
        """`--policy etcd`: the cluster policy's `discover` section, so that
        this host's containers are known before the first judgement too."""
        cp = self.policy.cluster_policy
        if cp is None:
            if self.cfg.policy_default_audit:
                return Discovery()
            assert self.cluster is not None
            why = self.cluster.node.last_error
            raise StartupError(
                "no cluster policy: " + (f"etcd unreachable ({why}) and none kept from an "
                                         "earlier run" if why else "none stored in etcd yet")
                + " (microseg policy apply --cluster FILE stores one; --policy-default audit "
                "starts without)")
        try:
            return parse_policy(cp[0], "etcd").policy.discover
        except PolicyError:
            return Discovery()  # the first apply says why it is refused

    def _on_applied(self, active, merged) -> None:
        if self.cluster is not None:
            self.cluster.on_applied(active, merged)

    def _on_discover(self, discover: Discovery) -> None:
        self.sources.configure(discover)

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
        await self.sources.stop()
        if self.cluster is not None:
            await self.cluster.stop()  # a clean stop withdraws this node's workloads now
        self.links.stop()
        self.pipeline.stop()  # the last events, to the subscribers still here
        if self.parts.flowlog is not None:
            await self.parts.flowlog.stop()
        self.hub.close()  # open `watch` streams end
        self.run_stats.close()
        if self._runner is not None:
            await self._runner.cleanup()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.socket_path)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if not self.datapath.loaded:
            return  # never loaded: nothing to undo
        # An apply still running (shielded from the cancellation of the task
        # that started it) finishes first, and none starts after.
        async with self.policy.lock:
            await self.policy.converge_now()
            if not self.cfg.keep_on_exit:
                await loop.run_in_executor(None, self.interfaces.detach_all)
                self.datapath.close()
                self.datapath.unpin()
            else:
                self.datapath.close()
        log.info("stopped")


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


def state_dir(socket_path: str) -> str:
    """What the daemon keeps across restarts (a staged candidate): a 0700
    directory of its own beside its control socket, named after it."""
    head, name = os.path.split(os.path.abspath(socket_path))
    return os.path.join(head, f".{name}.state")


def run(cfg: RunConfig, preload: Preload | None = None) -> int:
    """Entry point of `microseg run`; preload: the datapath's load, begun."""
    setup_logging()
    steady_malloc()
    if os.geteuid() != 0:
        print("microseg: run needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)",
              file=sys.stderr)
        return 3
    daemon = Daemon(cfg, preload)
    try:
        return asyncio.run(daemon.run())
    except StartupError as e:
        print(f"microseg: {e}", file=sys.stderr)
        return e.code
    except OSError as e:
        print(f"microseg: {e}", file=sys.stderr)
        return 1
