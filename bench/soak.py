"""Soak: a daemon under steady connection churn for minutes, sampled.

Two lab namespaces; the client opens and closes TCP connections to the
server as fast as one process can, plus UDP flows from fresh source ports,
the whole time; a `watch --json` client reads the event stream. Every few
seconds the daemon's resident memory, open file descriptors and the session
table's fill are sampled. A daemon that leaks shows it as a slope: memory or
descriptors that keep growing after the warm-up, or a table that keeps
growing while the number of live sessions does not.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from microseg.lab.topology import Lab, WorkloadSpec, wait_for

from .policy import _status
from .sessions import _rss

CHURN = """
import socket, sys, time
host, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    try:
        with socket.create_connection((host, 80), timeout=1) as s:
            s.sendall(b"x"); s.recv(1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(b"x", (host, 53))
        n += 1
    except OSError:
        pass
print(n)
"""


WARMUP_S = 300
JUDGED_FROM_S = 300  # shorter runs (the quick mode) are reported, not judged


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _slope_per_min(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope, per minute."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs) or 1.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 60


def measure(seconds: float, sample_every: float | None = None) -> dict:
    if sample_every is None:  # every 5 s; at least four samples in a short run
        sample_every = min(5.0, seconds / 4)
    lab = Lab([WorkloadSpec("cli", 10), WorkloadSpec("srv", 20)], prefix="msbk",
              subnet4="10.215.0.0/24", subnet6="fd00:215::/64")
    work = tempfile.mkdtemp(prefix="microseg-bench-soak-")
    policy = os.path.join(work, "policy.yaml")
    with open(policy, "w") as f:
        f.write("version: 1\ndefault: deny\nworkloads:\n  cli: {addresses: [10.215.0.10]}\n"
                "  srv: {addresses: [10.215.0.20]}\nrules:\n"
                "  - {name: web, from: {workload: cli}, to: {workload: srv}, protocol: tcp, "
                "ports: [80], action: allow}\n"
                "  - {name: dns, from: {workload: cli}, to: {workload: srv}, protocol: udp, "
                "ports: [53], action: allow}\n")
    sock = os.path.join(work, "ms.sock")
    proc = watch = None
    samples: list[dict] = []
    try:
        lab.up()
        lab.serve("srv", tcp=[80], udp=[53])
        proc = subprocess.Popen(
            [sys.executable, "-m", "microseg", "run", "--metrics", "off", "-i", lab.glob,
             "--policy", policy, "--socket", sock, "--pin-dir",
             f"/sys/fs/bpf/microseg-bench-soak-{os.getpid()}",
             "--flow-log", os.path.join(work, "flow.log"), "--flow-log-max-bytes", "64MiB",
             "--flow-log-keep", "1", "--sweep-interval", "2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for(lambda: os.path.exists(sock) and _status(sock).get("ready"),
                        timeout=120):
            raise RuntimeError("bench soak: the daemon did not become ready")
        watch = subprocess.Popen([sys.executable, "-m", "microseg", "watch", "--json"],
                                 env={**os.environ, "MICROSEG_SOCKET": sock},
                                 stdout=subprocess.DEVNULL)
        churn = lab.spawn("cli", [sys.executable, "-c", CHURN, lab.ipv4("srv"), str(seconds)],
                          stdout=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while churn.poll() is None:
            st = _status_stats(sock)
            samples.append({"t": round(time.monotonic() - t0, 1),
                            "rss_mib": round(_rss(proc.pid) / 2**20, 1),
                            "fds": _fds(proc.pid),
                            "sessions": st["sessions"]["entries"],
                            "published": sum(st["events"]["published"].values())})
            time.sleep(sample_every)
        cycles = int(churn.communicate()[0].strip() or 0)
        elapsed = time.monotonic() - t0
    finally:
        for p in (watch, proc):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=60)
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    # The warm-up: the table filling until the first sessions expire (UDP's
    # 120 s timeout) and the daemon's heap reaching its working size (RSS
    # steps while the table climbs to its peak, ~200 s) — half a judged run.
    warm = max(elapsed / 5, min(WARMUP_S, elapsed / 2))
    steady = [s for s in samples if s["t"] >= warm] or samples
    ts = [s["t"] for s in steady]
    return {
        "seconds": round(elapsed), "warmup_s": round(warm), "judged": elapsed >= JUDGED_FROM_S,
        "cycles": cycles, "cycles_per_s": round(cycles / elapsed),
        "samples": samples,
        "rss_mib": {"first": steady[0]["rss_mib"], "last": steady[-1]["rss_mib"],
                    "max": max(s["rss_mib"] for s in steady),
                    "slope_mib_per_min": round(_slope_per_min(ts, [s["rss_mib"] for s in
                                                                   steady]), 3)},
        "fds": {"first": steady[0]["fds"], "last": steady[-1]["fds"],
                "max": max(s["fds"] for s in steady)},
        "sessions": {"first": steady[0]["sessions"], "last": steady[-1]["sessions"],
                     "max": max(s["sessions"] for s in steady),
                     "slope_per_min": round(_slope_per_min(ts, [s["sessions"] for s in
                                                                steady]), 1)},
    }


def _status_stats(sock: str) -> dict:
    import asyncio

    from microseg.control.client import Client

    async def go() -> dict:
        async with Client(sock, timeout=30) as c:
            return await c.get("/v1/stats")

    return asyncio.run(go())
