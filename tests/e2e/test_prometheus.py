"""Metrics against a real Prometheus (Debian's `prometheus`, on loopback):
a daemon on the lab, known traffic, a reload and a rejected reload; then the
values Prometheus scraped agree with the traffic exactly, every PromQL
expression of every Grafana dashboard returns data, and `promtool check
metrics` accepts the exposition."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from microseg.lab.topology import Lab, WorkloadSpec, wait_for

from .harness import DaemonProcess, LabSpec

GRAFANA = Path(__file__).resolve().parents[2] / "grafana" / "dashboards"
SCRAPE_S = 1

POLICY = """\
version: 1
default: deny
workloads:
  client: {addresses: [10.208.0.10, "fd00:208::10"], labels: {role: client}}
  web: {addresses: [10.208.0.20, "fd00:208::20"], labels: {tier: web}}
  db: {addresses: [10.208.0.30, "fd00:208::30"], mode: audit}
rules:
  - {name: web, from: {workload: client}, to: {workload: web}, protocol: tcp, ports: [80],
     action: allow}
  - {name: no-dns, from: any, to: {workload: web}, protocol: udp, ports: [53], action: deny}
  - {name: ssh-db, from: any, to: {workload: db}, protocol: tcp, ports: [22], action: deny}
  - {name: never, from: {workload: db}, to: {workload: client}, protocol: tcp, ports: [9],
     action: allow}
"""
LAB = LabSpec([WorkloadSpec("client", 10), WorkloadSpec("web", 20), WorkloadSpec("db", 30)],
              prefix="mst6", subnet4="10.208.0.0/24", subnet6="fd00:208::/64",
              serve={"web": {"tcp": [80], "udp": [53]}, "db": {"tcp": [22]}})
# Every packet timed: the run-time counters and the dashboard's ns/packet
# then have values in any range (sampled by default: docs/metrics.md).
DAEMON_ARGS = ("--run-time-stats", "on")
ALLOWED_SESSIONS = 5
DENIED_DATAGRAMS = 37


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = workdir / "prometheus.yml"
        cfg.write_text(f"global: {{scrape_interval: {SCRAPE_S}s, evaluation_interval: 1s}}\n"
                       f"scrape_configs:\n  - job_name: microseg\n"
                       f"    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={cfg}",
             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:"
             f"{self.port}"], stdout=self.log, stderr=self.log)

    def ready(self) -> bool:
        try:
            return b"Ready" in get(self.url + "/-/ready", timeout=1)
        except OSError:
            return False

    def api(self, path: str, **params: object) -> dict:
        q = urllib.parse.urlencode(params)
        out = json.loads(get(f"{self.url}/api/v1/{path}?{q}"))
        assert out["status"] == "success", out
        return out["data"]

    def value(self, expr: str) -> float:
        res = self.api("query", query=expr)["result"]
        assert len(res) == 1, (expr, res)
        return float(res[0]["value"][1])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def scraped(lab: Lab, daemon: DaemonProcess) -> Iterator[tuple]:
    d = daemon
    # Prometheus keeps its TSDB next to the policy file (see the rejected reload).
    prom = Prometheus(d.workdir, d.status()["metrics"])
    try:
        assert wait_for(prom.ready, timeout=60), (d.workdir / "prometheus.log").read_text()
        # Prometheus applies new targets after a few seconds: the first
        # scrape (all counters, at zero) comes before any traffic.
        assert wait_for(lambda: prom.api("query", query="up")["result"], timeout=30)
        started = time.time()
        for _ in range(ALLOWED_SESSIONS):
            assert lab.probe("client", "tcp", lab.ipv4("web"), 80)
        r = lab.run("client", [sys.executable, "-m", "microseg.lab.traffic", "flood", "udp",
                               lab.ipv4("web"), "53", "--count", str(DENIED_DATAGRAMS)])
        assert r.returncode == 0, r.stderr
        assert lab.probe("client", "tcp", lab.ipv4("db"), 22)  # audit: passes
        gen = d.apply_policy(POLICY.replace("ports: [80]", "ports: [80, 8080]"))
        failures = d.status()["policy"]["reload_failures_total"]
        # Rejected once, counted once: Prometheus writing its TSDB next to
        # the policy file sets off the file watcher again and again.
        d.write_policy(POLICY + "  - {name: broken}\n")
        assert wait_for(lambda: d.status()["policy"]["reload_failures_total"] > failures,
                        timeout=10)
        # Scraped after the last change, then enough scrapes more for rate()
        # and changes().
        assert wait_for(lambda: scraped_value(prom, "microseg_policy_reload_failures_total")
                        == failures + 1, timeout=30)
        seen = time.time()
        assert wait_for(lambda: scraped_value(prom, "timestamp(up)") > seen + 5 * SCRAPE_S,
                        timeout=30)
        yield d, prom, started, gen
    finally:
        prom.stop()


def scraped_value(prom: Prometheus, expr: str) -> float:
    """The latest value Prometheus has of expr; NaN (equal to nothing) if none."""
    res = prom.api("query", query=expr)["result"]
    return float(res[0]["value"][1]) if res else float("nan")


def test_prometheus_scrapes_the_daemon(scraped) -> None:
    _, prom, *_ = scraped
    targets = prom.api("targets")["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets


def test_values_agree_with_the_traffic(scraped) -> None:
    d, prom, _, gen = scraped
    v = prom.value
    # every denied datagram, exactly: by rule, as drops, as packets
    assert v('microseg_rule_hits_total{rule="no-dns",action="deny"}') == DENIED_DATAGRAMS
    assert v('microseg_drops_total{reason="rule"}') == DENIED_DATAGRAMS
    assert v('sum(microseg_packets_total{verdict="denied"})') == DENIED_DATAGRAMS
    assert v('microseg_verdicts_total{verdict="denied",reason="rule"}') == DENIED_DATAGRAMS
    # one policy decision per allowed session
    assert v('microseg_rule_hits_total{rule="web",action="allow"}') == ALLOWED_SESSIONS
    assert v('microseg_verdicts_total{verdict="allowed",reason="rule"}') == ALLOWED_SESSIONS
    # db is in audit mode: the ssh attempt passed, with verdict audit
    assert v('microseg_verdicts_total{verdict="audit",reason="rule"}') == 1
    assert v('microseg_rule_hits_total{rule="never"}') == 0
    assert v("microseg_policy_generation") == gen
    assert v("microseg_policy_reload_failures_total") == 1
    assert v("microseg_policy_rules") == 4 and v("microseg_policy_workloads") == 3
    assert v("microseg_interfaces_attached") == 3
    dp = d.status()["datapath"]
    assert v("microseg_session_table_capacity") == dp["session_capacity"] + dp["pending_capacity"]
    assert v("microseg_session_table_entries") == v("sum(microseg_sessions)") > 0
    st = d.api("GET", "/v1/stats")
    assert v('microseg_events_total{type="policy"}') == st["events"]["published"]["policy"]
    assert v('sum(microseg_events_lost_total)') == 0
    assert v("microseg_datapath_runs_total") > 0
    assert v("microseg_datapath_run_time_seconds_total") > 0


def test_every_dashboard_expression_returns_data(scraped) -> None:
    d, prom, started, _ = scraped
    discovering = bool(d.status()["discovery"])
    docs = [json.loads(f.read_text()) for f in sorted(GRAFANA.glob("*.json"))]
    assert docs
    end = time.time()
    checked = 0
    for doc in docs:
        queries = [(p["title"], t["expr"], t.get("instant", False))
                   for p in doc["panels"] for t in p["targets"]]
        queries += [(a["name"], a["expr"], False) for a in doc["annotations"]["list"]]
        for title, expr, instant in queries:
            if "microseg_discovery_" in expr and not discovering:
                continue  # exported only while a discovery source is configured
            # what Grafana substitutes: 4 scrape intervals, the time range, All
            q = (expr.replace("$__rate_interval", f"{4 * SCRAPE_S}s")
                 .replace("$__range", f"{int(end - started) + 60}s")
                 .replace("$instance", ".*"))
            if instant:
                res = prom.api("query", query=q, time=end)["result"]
            else:
                res = prom.api("query_range", query=q, start=started, end=end,
                               step=SCRAPE_S)["result"]
            assert res, f"{doc['uid']}: '{title}' returned no data: {q}"
            checked += 1
    assert checked >= 25


def test_promtool_accepts_the_exposition(scraped) -> None:
    d, *_ = scraped
    text = get(f"http://{d.status()['metrics']}/metrics")
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_openmetrics_by_accept_header(scraped) -> None:
    d, *_ = scraped
    req = urllib.request.Request(f"http://{d.status()['metrics']}/metrics",
                                 headers={"Accept": "application/openmetrics-text; "
                                                    "version=1.0.0; charset=utf-8"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        body = r.read().decode()
    assert body.rstrip().endswith("# EOF")
    assert "microseg_rule_hits_total{" in body
