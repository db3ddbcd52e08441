"""The README's "Reliability": a session table at capacity keeps working.
More concurrent flows than the table holds: the LRU evicts the least recently used sessions, new
flows are still judged and allowed, a connection in active use keeps its
session, and the fill and the evictions show in `stats` and in the metrics."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from microseg.lab.topology import Lab, WorkloadSpec, wait_for

from .harness import DaemonProcess, LabSpec

LAB = LabSpec([WorkloadSpec("client", 10), WorkloadSpec("server", 20)], prefix="mstc",
              subnet4="10.216.0.0/24", subnet6="fd00:216::/64",
              serve={"server": {"tcp": [7000, 7003], "udp": [7001]}})
CAPACITY = 2048
PENDING = max(1024, CAPACITY // 4)
DAEMON_ARGS = ("--session-capacity", str(CAPACITY))
POLICY = """\
version: 1
default: deny
workloads:
  client: {addresses: [10.216.0.10]}
  server: {addresses: [10.216.0.20]}
rules:
  - {name: tcp, from: {workload: client}, to: {workload: server}, protocol: tcp,
     ports: [7000, 7003], action: allow}
  - {name: udp, from: {workload: client}, to: {workload: server}, protocol: udp,
     ports: [7001], action: allow}
"""


def gauges(d: DaemonProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{d.status()['metrics']}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith(("microseg_session_table_", "microseg_sessions_evicted"))}


def test_a_full_table_keeps_new_flows_working(lab: Lab, daemon: DaemonProcess) -> None:
    d, flow_log = daemon, daemon.flow_log
    hold = lab.spawn("client", [sys.executable, "-m", "microseg.lab.traffic", "hold", "tcp",
                                lab.ipv4("server"), "7000", "--interval", "0.01"],
                     stdout=subprocess.PIPE, text=True)
    # Four times the table's size in UDP flows, each from its own port.
    flows = 4 * CAPACITY
    r = lab.run("client", [sys.executable, "-m", "microseg.lab.traffic", "flood", "udp",
                           lab.ipv4("server"), "7001", "--count", str(flows),
                           "--sources", str(flows), "--rate", "4000"], timeout=60)
    assert r.returncode == 0
    st = json.loads(d.cli("stats", "--json").stdout)
    entries = st["sessions"]["entries"]
    # Full, never over: the LRU made room for every new flow.
    answered = entries - st["sessions"]["pending"]
    assert CAPACITY * 0.9 <= answered <= CAPACITY, st["sessions"]
    # The capacity counts the table of one-way sessions too (a quarter more,
    # at least 1,024).
    assert st["sessions"]["capacity"] == CAPACITY + PENDING
    assert st["sessions"]["pending"] <= PENDING
    assert sum(st["drops"].values()) == 0, st["drops"]  # nothing refused for room
    g = gauges(d)
    assert g["microseg_session_table_capacity"] == CAPACITY + PENDING
    assert g["microseg_session_table_entries"] >= CAPACITY * 0.9
    # The evictions: every session opened, less those still in the table
    # (none expired or was revoked here) — the opened ones counted
    # independently, from the `new` events in the flow log.
    def logged() -> int:
        return json.loads(d.cli("stats", "--json").stdout)["flow_log"]["lines"]

    n = -1
    while (m := logged()) != n:
        n = m
        time.sleep(0.5)
    full = json.loads(d.cli("stats", "--json").stdout)
    assert full["events"]["lost"] == {"ringbuf": 0, "subscriber": 0}  # the log has all
    opened = sum(1 for line in flow_log.read_text().splitlines()
                 if '"type":"session"' in line and '"state":"new"' in line)
    st = full["sessions"]
    assert st["created_total"] == opened > flows * 0.9
    assert st["evicted_total"] == opened - st["entries"] > 2 * CAPACITY
    assert gauges(d)["microseg_sessions_evicted_total"] == st["evicted_total"]
    # A brand-new connection is judged and allowed with the table full.
    ok = lab.run("client", [sys.executable, "-m", "microseg.lab.traffic", "probe", "tcp",
                            lab.ipv4("server"), "7003"])
    assert ok.returncode == 0
    # The connection in use all along kept its session: no exchange lost.
    hold.terminate()
    held, _ = hold.communicate(timeout=10)
    assert "timeout" not in held and held.count("ok ") > 50, held[-300:]
    assert wait_for(lambda: d.status()["ready"], timeout=5)
