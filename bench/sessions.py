"""Session-table benchmarks, through a running daemon.

For each size, a `microseg run` with its maps pinned gets that many
sessions opened through its own ingress program (a SYN and its SYN-ACK each, by
BPF_PROG_TEST_RUN: session insert, policy verdict, promotion, events, as on the wire),
then:

- memory: the map's kernel memory (memlock, from fdinfo) and the daemon's
  resident set before and after;
- listing: `microseg sessions --json` to the end — seconds, rows, and the
  client's peak resident set (it streams; it must not grow with the table);
- stats: one `microseg stats` call, and one Prometheus scrape of /metrics
  (both count sessions by protocol and state);
- expiry: the same sessions rewritten as idle for ages, then the daemon's
  own periodic sweep — time in the worker thread (read, judge, batch delete)
  and on the loop (the `expired` events, published in slices);
- loop stall: while listing and sweeping, a probe asks /v1/status every
  10 ms; its worst round trip is how long the loop was unavailable.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from microseg.control.client import Client
from microseg.kernel import bpfsys
from microseg.kernel.bpfsys import BpfMap

from .datapath import session_batches, tcp_packet
from .events import newest_prog_id
from .policygen import workload_ip4


def _memlock(m: BpfMap) -> int:
    with open(f"/proc/self/fdinfo/{m.fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


def _rss(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


# Runs the lister and reports its peak RSS. A small parent matters: a
# child's ru_maxrss includes the memory of the process it was forked from.
_MEASURED = """
import os, sys
argv = [sys.executable, "-m", "microseg", "sessions", "--json"]
pid = os.posix_spawn(sys.executable, argv, os.environ)
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _list_sessions(env: dict) -> tuple[int, int, int]:
    """`microseg sessions --json` to the end: (rows, exit code, peak RSS bytes)."""
    p = subprocess.Popen([sys.executable, "-c", _MEASURED], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    rows = 0
    while chunk := p.stdout.read(1 << 20):
        rows += chunk.count(b"\n")
    err = p.stderr.read().decode()
    code = p.wait()
    return rows, code, int(err.split()[-1]) * 1024 if code == 0 else 0


class StallProbe:
    """Round trips of GET /v1/status every `interval` while running, from a
    thread with its own event loop (the bench's loop may be busy)."""

    def __init__(self, sock: str, interval: float = 0.01) -> None:
        self.sock, self.interval = sock, interval
        self.worst = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with Client(self.sock, timeout=60) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                await c.get("/v1/status")
                self.worst = max(self.worst, time.perf_counter() - t0)
                self.samples += 1
                await asyncio.sleep(self.interval)

    async def __aenter__(self) -> StallProbe:
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join)


def session_syns(n: int) -> Iterator[bytes]:
    """A SYN and its SYN-ACK for each of n sessions through the datapath (a
    session that has seen no answer stays in the one-way table): the
    5-tuples of session_batches(n), so those rewrite exactly these sessions
    later."""
    syn = bytearray(tcp_packet("10.0.0.1", "10.0.0.2", 0, 443, "S"))
    synack = bytearray(tcp_packet("10.0.0.2", "10.0.0.1", 443, 0, "SA"))
    addrs = [bytes(map(int, workload_ip4(i).split("."))) for i in range(1000)]
    for i in range(n):
        client, server = addrs[i % 1000], addrs[(i + 1) % 1000]
        port = (10000 + i // 1000).to_bytes(2, "big")
        syn[26:30], syn[30:34], syn[34:36] = client, server, port     # IPv4 src, dst; sport
        yield bytes(syn)
        synack[26:30], synack[30:34], synack[36:38] = server, client, port  # ...; dport
        yield bytes(synack)


async def _one_size(n: int, work: str) -> dict:
    sock = os.path.join(work, "ms.sock")
    pins = f"/sys/fs/bpf/microseg-bench-sess-{os.getpid()}"
    policy = os.path.join(work, "policy.yaml")
    with open(policy, "w") as f:
        f.write("version: 1\ndefault: allow\n")
    sweep_interval = 3.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "microseg", "run",
         "--metrics", "127.0.0.1:0", "-i", "msbs-none-*", "--policy", policy,
         "--socket", sock, "--pin-dir", pins, "--session-capacity", str(max(n, 1 << 20)),
         "--sweep-interval", str(sweep_interval), "--flow-log", os.path.join(work, "flow.log"),
         "--flow-log-max-bytes", "4GiB"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, MICROSEG_SOCKET=sock)
    m = None
    try:
        async def ready() -> bool:
            try:
                async with Client(sock, timeout=5) as c:
                    return (await c.get("/v1/status"))["ready"]
            except Exception:
                return False

        t_end = time.monotonic() + 60
        while not await ready():
            if proc.poll() is not None or time.monotonic() > t_end:
                raise RuntimeError("daemon did not start")
            await asyncio.sleep(0.1)
        async with Client(sock, timeout=120) as c:
            async def stats() -> dict:
                return await c.get("/v1/stats")

            m = BpfMap.from_pin(os.path.join(pins, "session_map"), "session_map")
            rss0 = _rss(proc.pid)
            now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            fd = bpfsys.prog_fd_by_id(newest_prog_id("mseg_ingress"))
            try:
                t0 = time.perf_counter()
                for pkt in session_syns(n):
                    bpfsys.prog_test_run(fd, pkt)
                fill_s = time.perf_counter() - t0
            finally:
                os.close(fd)
            # Their verdict and `new` events: let the daemon be done with them.
            published = -1
            while (now := (await stats())["events"]["published"]) != published:
                published = now
                await asyncio.sleep(0.5)

            t0 = time.perf_counter()
            st = await stats()
            stats_s = time.perf_counter() - t0
            assert st["sessions"]["entries"] == n, st["sessions"]

            # A Prometheus scrape (it counts the table by protocol and state).
            url = f"http://{(await c.get('/v1/status'))['metrics']}/metrics"
            async with StallProbe(sock) as scrape_probe, aiohttp.ClientSession() as http:
                t0 = time.perf_counter()
                async with http.get(url) as resp:
                    exposition = await resp.text()
                scrape_s = time.perf_counter() - t0
            entries = next(s.value for f in text_string_to_metric_families(exposition)
                           for s in f.samples if s.name == "microseg_session_table_entries")
            assert entries == n, entries

            async with StallProbe(sock) as list_probe:
                t0 = time.perf_counter()
                rows, status, peak = await asyncio.to_thread(_list_sessions, env)
                list_s = time.perf_counter() - t0
            assert status == 0 and rows == n, (status, rows)
            rss1 = _rss(proc.pid)

            # Expiry: rewrite every session as last seen at jiffies 0 (ages
            # ago) right after a sweep, so the next sweep finds all of them.
            batches = list(session_batches(n, 1, created_ns=now_ns, last_seen=0))
            before = (await stats())["sessions"]["sweeps"]
            while (await stats())["sessions"]["sweeps"] == before:
                await asyncio.sleep(0.05)
            st0 = await stats()
            ev0, ev0_lines = st0["events"], st0["flow_log"]["lines"]
            for keys, values, count in batches:
                m.update_batch(keys, values, count)
            async with StallProbe(sock) as sweep_probe:
                deadline = time.monotonic() + 120
                while True:
                    se = (await stats())["sessions"]
                    last = se["last_sweep"]
                    if se["entries"] == 0 and last and last["expired"] == n:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"sweep did not expire {n}: {se}")
                    await asyncio.sleep(0.2)
            # The flow log keeps up or says what it lost.
            while True:
                st = await stats()
                logged = st["flow_log"]["lines"] - ev0_lines
                lost = st["events"]["lost"]["subscriber"] - ev0["lost"]["subscriber"]
                if logged + lost >= n or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
        return {
            "sessions": n, "fill_s": round(fill_s, 3),
            "session_map_memlock_mib": round(_memlock(m) / 2**20, 1),
            "daemon_rss_mib": {"before": round(rss0 / 2**20, 1),
                               "after_listing": round(rss1 / 2**20, 1),
                               "peak": round(_rss(proc.pid, "VmHWM") / 2**20, 1)},
            "stats_s": round(stats_s, 3),
            "scrape_s": round(scrape_s, 3),
            "scrape_loop_stall_ms": round(scrape_probe.worst * 1e3, 1),
            "list_s": round(list_s, 3), "list_rows_per_s": round(n / list_s),
            "list_client_peak_rss_mib": round(peak / 2**20, 1),
            "list_loop_stall_ms": round(list_probe.worst * 1e3, 1),
            "sweep_s": last["sweep_s"], "sweep_publish_s": last["publish_s"],
            "sweep_total_s": round(last["sweep_s"] + last["publish_s"], 3),
            "sweep_loop_stall_ms": round(sweep_probe.worst * 1e3, 1),
            "expired_events_in_flow_log": logged, "expired_events_lost_by_slow_sinks": lost,
        }
    finally:
        if m is not None:
            m.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def measure(sizes: tuple[int, ...]) -> dict:
    out = {}
    for n in sizes:
        work = tempfile.mkdtemp(prefix="microseg-bench-sess-")
        try:
            out[str(n)] = asyncio.run(_one_size(n, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out
