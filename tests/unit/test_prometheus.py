"""The exporter's exposition, without a daemon: names, labels, formats."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from microseg.control.report import Report
from microseg.exporters.prometheus import parse_listen, render
from microseg.kernel import abi

# docs/metrics.md, names as exposed (counters with _total).
CONTRACT_METRICS = {
    "microseg_workloads": {"source"},
    "microseg_discovery_events_total": {"source", "action"},
    "microseg_discovery_errors_total": {"source"},
    "microseg_packets_total": {"direction", "verdict"},
    "microseg_bytes_total": {"direction", "verdict"},
    "microseg_verdicts_total": {"verdict", "reason"},
    "microseg_drops_total": {"reason"},
    "microseg_rule_hits_total": {"rule", "action"},
    "microseg_sessions": {"protocol", "state"},
    "microseg_session_table_entries": set(),
    "microseg_session_table_capacity": set(),
    "microseg_events_total": {"type"},
    "microseg_events_lost_total": {"source"},
    "microseg_policy_generation": set(),
    "microseg_policy_reloads_total": set(),
    "microseg_policy_reload_failures_total": set(),
    "microseg_policy_rules": set(),
    "microseg_policy_workloads": set(),
    "microseg_interfaces_attached": set(),
    "microseg_datapath_run_time_seconds_total": set(),
    "microseg_datapath_runs_total": set(),
    "microseg_build_info": {"version"},
}

D, V, R = abi.Direction, abi.Verdict, abi.Reason


def snapshot(**kw) -> Report:
    base = dict(
        version="1.2.3",
        counters={(D.INGRESS, V.ALLOWED, R.RULE): (10, 1000),
                  (D.INGRESS, V.ALLOWED, R.SESSION): (90, 9000),
                  (D.INGRESS, V.DENIED, R.DEFAULT): (7, 420),
                  (D.EGRESS, V.DENIED, R.RULE): (3, 180),
                  (D.EGRESS, V.DROPPED, R.INVALID): (2, 100)},
        rule_hits=[("web", "allow", 10), ("no-ssh", "deny", 3), ("unused", "allow", 0)],
        sessions={(6, abi.State.ESTABLISHED): 5, (17, abi.State.NEW): 2, (47, 1): 1},
        session_capacity=1 << 20, sessions_expired=4,
        events_published={"verdict": 20, "session": 30}, events_lost={"ringbuf": 5},
        policy_generation=3, policy_reloads=3, policy_reload_failures=1, policy_rules=3,
        policy_workloads=2, interfaces_attached=4, run_time_ns=2_500_000_000, run_count=1000,
        flow_log={"lines": 50, "bytes": 5000, "write_errors": 0, "rotations": 1},
        workloads={"static": 2, "docker": 5},
        discovery_events={("docker", "added"): 7, ("docker", "removed"): 2},
        discovery_errors={"docker": 1})
    base.update(kw)
    return Report(**base)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def test_every_spec_metric_with_its_labels() -> None:
    body, ctype = render(snapshot(), "")
    assert ctype.startswith("text/plain")
    text = body.decode()
    seen: dict[str, set[str]] = {}
    for (name, labels) in samples(text):
        seen.setdefault(name, set()).update(k for k, _ in labels)
    for name, labels in CONTRACT_METRICS.items():
        assert name in seen, name
        assert seen[name] == labels, (name, seen[name])


def test_values_follow_the_snapshot() -> None:
    text = render(snapshot(), "")[0].decode()
    assert value(text, "microseg_packets_total", direction="ingress", verdict="allowed") == 100
    assert value(text, "microseg_bytes_total", direction="ingress", verdict="allowed") == 10000
    assert value(text, "microseg_packets_total", direction="egress", verdict="audit") == 0
    assert value(text, "microseg_verdicts_total", verdict="denied", reason="default") == 7
    assert value(text, "microseg_verdicts_total", verdict="allowed", reason="session") == 90
    # drops: policy denials and malformed packets alike, by reason; pre-filled zeros
    assert value(text, "microseg_drops_total", reason="default") == 7
    assert value(text, "microseg_drops_total", reason="rule") == 3
    assert value(text, "microseg_drops_total", reason="invalid") == 2
    assert value(text, "microseg_drops_total", reason="revoked") == 0
    assert value(text, "microseg_rule_hits_total", rule="unused", action="allow") == 0
    assert value(text, "microseg_sessions", protocol="tcp", state="established") == 5
    assert value(text, "microseg_sessions", protocol="icmp", state="closing") == 0
    assert value(text, "microseg_sessions", protocol="47", state="new") == 1
    assert value(text, "microseg_session_table_entries") == 8
    assert value(text, "microseg_events_lost_total", source="subscriber") == 0
    assert value(text, "microseg_events_total", type="policy") == 0
    assert value(text, "microseg_datapath_run_time_seconds_total") == 2.5
    assert value(text, "microseg_build_info", version="1.2.3") == 1


def test_openmetrics_when_asked() -> None:
    body, ctype = render(snapshot(), "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.rstrip().endswith("# EOF")
    assert "# TYPE microseg_packets counter" in text
    assert 'microseg_packets_total{direction="ingress",verdict="allowed"} 100.0' in text


def test_no_flow_log_no_flow_log_metrics() -> None:
    text = render(snapshot(flow_log=None), "")[0].decode()
    assert "microseg_flow_log" not in text


@pytest.mark.parametrize(("addr", "want"), [
    ("127.0.0.1:9750", ("127.0.0.1", 9750)), ("[::1]:9750", ("::1", 9750)),
    (":9750", ("0.0.0.0", 9750)), ("127.0.0.1:0", ("127.0.0.1", 0)), ("off", None)])
def test_parse_listen(addr: str, want) -> None:
    assert parse_listen(addr) == want


@pytest.mark.parametrize("addr", ["9750", "localhost:9750", "127.0.0.1:http", "1.2.3.4:70000",
                                  "[::1]"])
def test_parse_listen_rejects(addr: str) -> None:
    with pytest.raises(ValueError, match="--metrics"):
        parse_listen(addr)


def test_discovery_metrics() -> None:
    text = render(snapshot(), "")[0].decode()
    assert value(text, "microseg_workloads", source="docker") == 5
    assert value(text, "microseg_workloads", source="static") == 2
    assert value(text, "microseg_discovery_events_total", source="docker", action="added") == 7
    assert value(text, "microseg_discovery_events_total", source="docker",
                 action="changed") == 0
    assert value(text, "microseg_discovery_errors_total", source="docker") == 1
    # Without a source: the file's workloads, and no discovery counters.
    text = render(snapshot(workloads={"static": 2}, discovery_events={},
                           discovery_errors={}), "")[0].decode()
    assert value(text, "microseg_workloads", source="static") == 2
    assert "microseg_discovery" not in text


def test_etcd_metrics_only_with_etcd() -> None:
    etcd = {"up": False, "errors": 3, "resyncs": 2, "nodes": 4}
    text = render(snapshot(etcd=etcd, workloads={"static": 2, "etcd": 9}), "")[0].decode()
    assert value(text, "microseg_etcd_up") == 0
    assert value(text, "microseg_etcd_errors_total") == 3
    assert value(text, "microseg_etcd_resyncs_total") == 2
    assert value(text, "microseg_cluster_nodes") == 4
    assert value(text, "microseg_workloads", source="etcd") == 9
    assert value(text, "microseg_etcd_up") == 0
    text = render(snapshot(etcd={**etcd, "up": True}), "")[0].decode()
    assert value(text, "microseg_etcd_up") == 1
    assert "microseg_etcd" not in render(snapshot(), "")[0].decode()
