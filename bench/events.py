"""Event benchmarks.

- decode: records/s from a pre-filled ring buffer into event tuples (the
  pipeline's ring reader and struct unpack), and into enriched dicts;
- end to end: a running daemon with a flow log and a `watch --json` client;
  events are produced by running the daemon's own ingress program through
  BPF_PROG_TEST_RUN (its maps, its ring), in bursts faster than the pipeline
  drains. Measured: events/s into the flow log and to the client, and the
  accounting: produced = delivered + lost, exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from microseg.control.client import Client
from microseg.flow.enrich import Enricher, Names, TimeFormatter
from microseg.kernel import abi, bpfsys
from microseg.kernel.clock import wall_offset_ns
from microseg.kernel.datapath import Datapath, DatapathConfig
from microseg.kernel.records import EVENT_IN_RING
from microseg.kernel.ringbuf import RingBuffer
from microseg.lab.topology import Lab, WorkloadSpec, wait_for
from microseg.policy.compile import compile_policy
from microseg.policy.model import Policy, Workload

from .datapath import tcp_packet


def decode_rate(records: int) -> dict:
    import gc

    dp = Datapath(DatapathConfig(pin_dir=None, session_capacity=1 << 16,
                                 ringbuf_bytes=1 << 28))
    dp.load()
    try:
        pol = Policy(workloads=(Workload.make("a", ["10.9.0.1"]), Workload.make("b",
                                                                             ["10.9.0.2"])))
        c = compile_policy(pol)
        gen = dp.apply_policy(c)
        denied = tcp_packet("10.9.0.1", "10.9.0.2", 40000, 80, "S")
        # Denied SYNs: their records land in the denials ring (one each: the
        # datapath's aggregation window is 0 until a daemon sets it).
        ring = RingBuffer(dp.maps["denials"].fd, abi.EVENT.size)
        en = Enricher(Names(lambda g: c, lambda i: "eth0"), TimeFormatter(wall_offset_ns()),
                      lambda: gen)
        out = {}
        for label, enrich in (("decode", False), ("decode_enrich", True)):
            dp.test_run(denied, repeat=records)
            gc.collect()
            t0 = time.perf_counter()
            n = 0
            while True:
                batch = ring.drain(8192)  # the pipeline's slice
                if not batch.count:
                    break
                if enrich:  # decoded and enriched in one pass, as the pipeline does
                    n += len(en.events(batch.runs))
                else:
                    n += len([t for run in batch.runs for t in EVENT_IN_RING.iter_unpack(run)])
            dt = time.perf_counter() - t0
            out[label] = {"records": n, "seconds": round(dt, 3),
                          "per_s": round(n / dt)}
        ring.close()
        return out
    finally:
        dp.close()


def newest_prog_id(name: str) -> int:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return max(p["id"] for p in json.loads(out) if p.get("name") == name)


def _get(sock: str, path: str) -> dict:
    async def go() -> dict:
        async with Client(sock, timeout=30) as c:
            return await c.get(path)

    return asyncio.run(go())


def end_to_end(events: int, burst: int, *, ringbuf_bytes: int, paced: bool,
               with_watch: bool) -> dict:
    """events through a real daemon into its flow log (and a watch client).
    paced: bursts at ~2M events/s (the producer shares the machine's CPUs
    with the daemon all along); else back to back, as fast as test runs go."""
    work = tempfile.mkdtemp(prefix="microseg-bench-ev-")
    lab = Lab([WorkloadSpec("a", 10), WorkloadSpec("b", 20)], prefix="msbe",
              subnet4="10.207.0.0/24", subnet6="fd00:207::/64")
    policy = os.path.join(work, "policy.yaml")
    with open(policy, "w") as f:
        f.write("version: 1\ndefault: deny\nworkloads:\n"
                "  a: {addresses: [10.207.0.10]}\n  b: {addresses: [10.207.0.20]}\n")
    sock = os.path.join(work, "ms.sock")
    flow = os.path.join(work, "flow.log")
    proc = watch = None
    try:
        lab.up()
        proc = subprocess.Popen([sys.executable, "-m", "microseg", "run",
                                 "--metrics", "off", "-i", lab.glob,
                                 "--policy", policy, "--socket", sock, "--pin-dir",
                                 f"/sys/fs/bpf/microseg-bench-ev-{os.getpid()}",
                                 "--flow-log", flow, "--flow-log-max-bytes", "1GiB",
                                 "--ringbuf-bytes", str(ringbuf_bytes),
                                 # every denied packet its own event: a pipeline load
                                 "--event-window", "0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: os.path.exists(sock) and _get(sock, "/v1/status")["ready"],
                        timeout=60)
        received = [0]
        lost_sub = [0]
        if with_watch:
            watch = subprocess.Popen([sys.executable, "-m", "microseg", "watch", "--json",
                                      "--type", "verdict"], stdout=subprocess.PIPE,
                                     env=dict(os.environ, MICROSEG_SOCKET=sock))

            def read() -> None:
                assert watch is not None and watch.stdout is not None
                for line in watch.stdout:
                    if b'"type":"lost"' in line:
                        lost_sub[0] += json.loads(line)["count"]
                    else:
                        received[0] += 1
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
        time.sleep(1)
        fd = bpfsys.prog_fd_by_id(newest_prog_id("mseg_ingress"))
        pkt = tcp_packet("10.207.0.10", "10.207.0.20", 40000, 80, "S")
        # The first /v1/stats starts a one-off measurement of the programs'
        # stack depths (a verifier run per program, a second or more of one
        # CPU): done before the clock starts, it is no part of the pipeline.
        assert wait_for(lambda: all(
            p["stack_depth"] is not None
            for p in _get(sock, "/v1/stats")["datapath"]["programs"].values()), timeout=120)
        st0 = _get(sock, "/v1/stats")
        t0 = time.perf_counter()
        produced = 0
        while produced < events:
            n = min(burst, events - produced)
            bpfsys.prog_test_run(fd, pkt, repeat=n)
            produced += n
            if paced:
                time.sleep(n / 2e6)
        os.close(fd)

        def kernel(st: dict) -> dict:
            return st["events"]["kernel"].get("verdict", {"submitted": 0, "lost": 0})

        def published(st: dict) -> int:
            return sum(st["events"]["published"].values())

        def settled() -> bool:
            st = _get(sock, "/v1/stats")
            k, k0 = kernel(st), kernel(st0)
            made = k["submitted"] + k["lost"] - k0["submitted"] - k0["lost"]
            fl, fl0 = st["flow_log"], st0["flow_log"]
            # every event the hub published is in the flow log or counted lost
            return made >= events and st["events"]["published"].get("verdict", 0) \
                - st0["events"]["published"].get("verdict", 0) >= k["submitted"] \
                - k0["submitted"] and fl["events"] + fl["lost"] - fl0["events"] \
                - fl0["lost"] >= published(st) - published(st0)
        assert wait_for(settled, timeout=600, interval=0.05)
        t_log = time.perf_counter() - t0
        st = _get(sock, "/v1/stats")
        k, k0 = kernel(st), kernel(st0)
        submitted, lost = k["submitted"] - k0["submitted"], k["lost"] - k0["lost"]
        ev, ev0 = st["events"], st0["events"]
        verdicts = ev["published"]["verdict"] - ev0["published"].get("verdict", 0)
        lost_reported = ev["lost_reported"]["ringbuf"] - ev0["lost_reported"]["ringbuf"]
        fl, fl0 = st["flow_log"], st0["flow_log"]
        logged, log_lost = fl["events"] - fl0["events"], fl["lost"] - fl0["lost"]
        out = {"produced": submitted + lost, "ringbuf_lost": lost,
               "ringbuf_lost_reported": lost_reported, "published": verdicts,
               "flow_log_events": logged, "flow_log_lost": log_lost,
               "flow_log_per_s": round(logged / t_log),
               # produced = delivered + lost, exactly, at every stage
               "accounted": submitted == verdicts and lost == lost_reported
               and logged + log_lost == published(st) - published(st0)}
        if not with_watch:
            return out
        wait_for(lambda: received[0] + lost_sub[0] >= submitted, timeout=120)
        t_watch = time.perf_counter() - t0
        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=10)
        reader.join(timeout=10)
        out.update(watch_received=received[0], watch_lost=lost_sub[0],
                   watch_per_s=round(received[0] / t_watch))
        out["accounted"] = out["accounted"] and submitted == received[0] + lost_sub[0]
        return out
    finally:
        if watch is not None and watch.poll() is None:
            watch.kill()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def measure(records: int, events: int, burst: int) -> dict:
    """sink: a ring buffer that holds the whole burst, so the figure is the
    pipeline's and the flow log's pace, not the producer's. overload: the
    default 16 MiB ring and a `watch` client, fed faster than they drain —
    losses everywhere, and every one of them accounted."""
    return {"decode": decode_rate(records),
            "flow_log_only": end_to_end(events, burst, ringbuf_bytes=1 << 28, paced=False,
                                        with_watch=False),
            "flow_log_and_watch": end_to_end(events, burst, ringbuf_bytes=16 << 20,
                                             paced=True, with_watch=True)}
