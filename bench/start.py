"""Daemon start, black-box: from exec of `microseg run` to its control socket
answering `GET /v1/status` with `ready: true` (programs loaded and attached,
the policy applied).

Two kinds of start, interleaved round by round on the same two-workload lab:
- cold: no pins (a fresh boot): BCC compiles the program, the verifier
  loads it, the maps are created;
- restart on pins: the previous daemon stopped with --keep-on-exit (or
  died), its pins are there: the pinned programs are reused when their
  source has not changed (microseg/kernel/loader.py), no compile, no
  verifier run.

The socket is polled every 5 ms with a raw HTTP/1.1 request (no client
library: the poller must not slow the daemon it is timing on this 2-CPU
VM). The daemon's own log gives the breakdown: compile, verifier load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from microseg.lab.topology import Lab, WorkloadSpec

POLICY = """version: 1
default: deny
workloads:
  a: {{addresses: [{a}]}}
  b: {{addresses: [{b}]}}
rules:
  - {{name: a-to-b, from: {{workload: a}}, to: {{workload: b}}, protocol: tcp, ports: [80],
     action: allow}}
"""
_LOADED = re.compile(r"datapath (loaded|reused) compile_s=([\d.]+) load_s=([\d.]+)")


def _ready(sock: str) -> bool:
    """One status request; False while the socket is absent or not ready."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(sock)
            s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: microseg\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return False
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return False
    if b"chunked" in head.lower():  # aiohttp may stream it: first chunk holds the JSON
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    try:
        return bool(json.loads(body).get("ready"))
    except ValueError:
        return False


def _start(lab: Lab, policy: str, sock: str, pin: str, log: str, keep: bool,
           timeout: float = 60.0, tree: str | None = None) -> tuple[float, dict]:
    """Exec the daemon (of another source tree: tree), time it to ready, stop
    it; (seconds, its breakdown)."""
    argv = [sys.executable, "-m", "microseg", "run", "--metrics", "off", "-i", lab.glob,
            "--policy", policy, "--socket", sock, "--pin-dir", pin]
    if keep:
        argv.append("--keep-on-exit")
    env = dict(os.environ, PYTHONPATH=tree) if tree else None
    with open(log, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=tree, env=env)
        try:
            while not _ready(sock):
                if proc.poll() is not None:
                    raise RuntimeError(f"bench start: the daemon exited ({proc.returncode}):\n"
                                       + Path(log).read_text()[-2000:])
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError("bench start: the daemon did not become ready")
                time.sleep(0.005)
            took = time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    m = _LOADED.search(Path(log).read_text())
    detail = {"programs": m.group(1), "compile_s": float(m.group(2)),
              "load_s": float(m.group(3))} if m else {}
    return took, detail


def _summary(values: list[float]) -> dict:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


def measure(rounds: int = 5, baseline: str | None = None) -> dict:
    """`rounds` cold starts and as many restarts on their pins, interleaved;
    with baseline (a source tree of another version), its starts too, in
    the same rounds (not part of `make bench`: a before/after for a note)."""
    lab = Lab([WorkloadSpec("a", 10), WorkloadSpec("b", 20)], prefix="msbs")
    work = tempfile.mkdtemp(prefix="microseg-bench-start-")
    pin = f"/sys/fs/bpf/microseg-bench-start-{os.getpid()}"
    cold: list[float] = []
    warm: list[float] = []
    details: dict[str, list[dict]] = {"cold": [], "restart": []}
    try:
        lab.up()
        policy = os.path.join(work, "policy.yaml")
        with open(policy, "w") as f:
            f.write(POLICY.format(a=lab.ipv4("a"), b=lab.ipv4("b")))
        sock = os.path.join(work, "ms.sock")
        log = os.path.join(work, "daemon.log")
        base: dict[str, list[float]] = {"cold": [], "restart": []}
        for _ in range(rounds):
            # Cold: nothing pinned; stopped with --keep-on-exit so that the
            # restart finds its pins, then stopped without: it cleans up.
            took, d = _start(lab, policy, sock, pin, log, keep=True)
            cold.append(took)
            details["cold"].append(d)
            took, d = _start(lab, policy, sock, pin, log, keep=False)
            warm.append(took)
            details["restart"].append(d)
            if baseline:
                for kind, keep in (("cold", True), ("restart", False)):
                    took, _d = _start(lab, policy, sock, pin + "-base", log, keep, tree=baseline)
                    base[kind].append(took)
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(pin, ignore_errors=True)
        shutil.rmtree(pin + "-base", ignore_errors=True)
    extra = {"baseline": {"tree": baseline, "cold_s": _summary(base["cold"]),
                          "restart_s": _summary(base["restart"])}} if baseline else {}
    return {**extra, "rounds": rounds, "cold_s": _summary(cold), "restart_s": _summary(warm),
            "cold_runs_s": [round(x, 3) for x in cold],
            "restart_runs_s": [round(x, 3) for x in warm],
            "cold_compile_s": _summary([d.get("compile_s", 0.0) for d in details["cold"]]),
            "cold_load_s": _summary([d.get("load_s", 0.0) for d in details["cold"]]),
            "restart_programs": sorted({d.get("programs", "?") for d in details["restart"]}),
            "target_cold_s": 2.0, "target_restart_s": 0.5}


def table(res: dict | None) -> str:
    if not res:
        return "start: not measured"
    c, r = res["cold_s"], res["restart_s"]
    return "\n".join([
        "| start (exec → ready) | min | median | max | target |",
        "|---|---|---|---|---|",
        f"| cold (no pins) | {c['min']} s | {c['median']} s | {c['max']} s | ≤ 2 s |",
        f"| restart on pins | {r['min']} s | {r['median']} s | {r['max']} s | ≤ 0.5 s |",
    ])


if __name__ == "__main__":
    # python -m bench.start [ROUNDS [BASELINE_TREE]]
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 3,
                             sys.argv[2] if len(sys.argv) > 2 else None), indent=2))
