"""Policy benchmarks: compile + apply at several sizes, a one-rule edit on
the largest, and the time from writing the policy file to the new
generation enforced in a running daemon.

Write -> enforced is measured from just before the file is rewritten to the
moment the daemon's status reports the new generation (the generation is
switched in the kernel before status can report it), polling every 2 ms.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from microseg.control.client import Client
from microseg.kernel.datapath import Datapath, DatapathConfig
from microseg.lab.topology import Lab, WorkloadSpec, wait_for
from microseg.policy.compile import compile_policy
from microseg.policy.model import Rule
from microseg.policy.model import Selector as S

from .policygen import synthetic_policy


def compile_apply(sizes: tuple[int, ...], workloads: int) -> dict:
    dp = Datapath(DatapathConfig(pin_dir=None, session_capacity=1 << 16,
                                 ringbuf_bytes=1 << 20))
    dp.load()
    out: dict = {}
    try:
        for n in sizes:
            pol = synthetic_policy(workloads, n)
            t0 = time.perf_counter()
            compiled = compile_policy(pol)
            t1 = time.perf_counter()
            dp.apply_policy(compiled, converge=False)
            t2 = time.perf_counter()
            dp.converge()
            t3 = time.perf_counter()
            # A one-rule edit against what is loaded: compile, then write
            # only what differs.
            edit = dataclasses.replace(pol, rules=(*pol.rules, Rule.make(
                "bench-edit", S.of_workload("w1"), S.of_workload("w2"), "allow", "tcp",
                [8443])))
            t4 = time.perf_counter()
            edited = compile_policy(edit, compiled)
            t5 = time.perf_counter()
            dp.apply_policy(edited, converge=False)
            t6 = time.perf_counter()
            dp.converge()
            out[str(n)] = {
                "rules": n, "workloads": workloads, "entries": len(compiled.entries),
                "compile_s": round(t1 - t0, 3), "apply_s": round(t2 - t1, 3),
                "compile_apply_s": round(t2 - t0, 3), "converge_s": round(t3 - t2, 3),
                "edit_compile_s": round(t5 - t4, 3), "edit_apply_s": round(t6 - t5, 3),
            }
    finally:
        dp.close()
    return out


def _status(sock: str) -> dict:
    async def go() -> dict:
        async with Client(sock, timeout=10) as c:
            return await c.get("/v1/status")

    return asyncio.run(go())


def reload_latency(samples: int, sizes: tuple[tuple[int, int], ...]) -> dict:
    """Write -> enforced through a running daemon, per (rules, workloads)."""
    from .policyfile import policy_yaml

    out: dict = {}
    lab = Lab([WorkloadSpec("a", 10), WorkloadSpec("b", 20)], prefix="msbp")
    work = tempfile.mkdtemp(prefix="microseg-bench-")
    try:
        lab.up()
        for n, workloads in sizes:
            path = os.path.join(work, f"policy-{n}-{workloads}.yaml")
            texts = [policy_yaml(synthetic_policy(workloads, n), marker=str(i))
                     for i in range(2)]
            with open(path, "w") as f:
                f.write(texts[0])
            sock = os.path.join(work, f"ms-{n}-{workloads}.sock")
            pin = f"/sys/fs/bpf/microseg-bench-{os.getpid()}"
            proc = subprocess.Popen([sys.executable, "-m", "microseg", "run",
                                     "--metrics", "off", "-i", lab.glob,
                                     "--policy", path, "--socket", sock, "--pin-dir", pin],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                assert wait_for(lambda sock=sock: os.path.exists(sock)
                                and _status(sock).get("ready"), timeout=120)
                gen = _status(sock)["policy"]["generation"]
                lat = []
                for i in range(samples):
                    t0 = time.perf_counter()
                    with open(path, "w") as f:
                        f.write(texts[(i + 1) % 2])
                    while _status(sock)["policy"]["generation"] == gen:
                        time.sleep(0.002)
                    lat.append((time.perf_counter() - t0) * 1000)
                    gen = _status(sock)["policy"]["generation"]
                    time.sleep(0.1)
                lat.sort()
                out[f"{n}/{workloads}"] = {"rules": n, "workloads": workloads,
                                           "samples": samples,
                               "median_ms": round(statistics.median(lat), 1),
                               "p90_ms": round(lat[int(0.9 * (len(lat) - 1))], 1),
                               "max_ms": round(lat[-1], 1)}
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    return out


def measure(sizes: tuple[int, ...], workloads: int, samples: int,
            latency_sizes: tuple[tuple[int, int], ...]) -> dict:
    return {"compile_apply": compile_apply(sizes, workloads),
            "write_to_enforced": reload_latency(samples, latency_sizes)}
