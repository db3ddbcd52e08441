"""Build the Grafana dashboards in grafana/dashboards/ from the panel lists
below (ids, grid positions and the datasource wiring are derived, so they
stay unique and consistent). Run it after changing a panel:

    python grafana/build.py

tests/unit/test_grafana.py fails when the JSON files and this script differ.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).with_name("dashboards")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'  # every query is scoped to the chosen daemons


@dataclass
class Panel:
    title: str
    exprs: list[tuple[str, str]]  # (PromQL, legend)
    unit: str
    kind: str = "timeseries"      # timeseries | stat | gauge | table | bargauge
    width: int = 12
    height: int = 8
    description: str = ""
    instant: bool = False
    overrides: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)


def rate(metric: str, labels: str = "") -> str:
    inner = f"{SEL},{labels}" if labels else SEL
    return f"rate({metric}{{{inner}}}[$__rate_interval])"


VERDICT_COLOURS = [
    {"matcher": {"id": "byRegexp", "options": f".*{v}.*"},
     "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": c}}]}
    for v, c in (("allowed", "green"), ("denied", "red"), ("audit", "yellow"),
                 ("dropped", "purple"))]

OVERVIEW = [
    *[Panel(f"{v.capitalize()} packets/s",
            [("sum(" + rate("microseg_packets_total", f'verdict="{v}"') + ")", v)],
            "pps", "stat", 4, 4) for v in ("allowed", "denied", "audit")],
    Panel("Active sessions", [(f"sum(microseg_session_table_entries{{{SEL}}})", "sessions")],
          "short", "stat", 4, 4),
    Panel("Session table fill", [(f"sum(microseg_session_table_entries{{{SEL}}}) / "
                                  f"sum(microseg_session_table_capacity{{{SEL}}})", "fill")],
          "percentunit", "gauge", 4, 4,
          options={"min": 0, "max": 1}),
    Panel("Policy generation", [(f"max(microseg_policy_generation{{{SEL}}})", "generation")],
          "none", "stat", 4, 4),
    Panel("Packets/s by verdict and direction",
          [(f"sum by (verdict, direction) ({rate('microseg_packets_total')})",
            "{{verdict}} {{direction}}")], "pps", overrides=VERDICT_COLOURS),
    Panel("Bytes/s by verdict and direction",
          [(f"sum by (verdict, direction) ({rate('microseg_bytes_total')})",
            "{{verdict}} {{direction}}")], "Bps", overrides=VERDICT_COLOURS),
    Panel("Drops/s by reason", [(f"sum by (reason) ({rate('microseg_drops_total')})",
                                 "{{reason}}")], "pps",
          description="rule, default, revoked: policy denials; invalid, fragment, state: "
                      "malformed or out-of-state packets"),
    Panel("New sessions/s", [("sum by (verdict) (" + rate(
        "microseg_verdicts_total", 'verdict=~"allowed|audit",reason=~"rule|default"') + ")",
        "{{verdict}}")], "ops", overrides=VERDICT_COLOURS,
          description="Sessions the policy let in (audit: would have been denied)"),
    Panel("Active sessions by protocol and state",
          [(f"sum by (protocol, state) (microseg_sessions{{{SEL}}})", "{{protocol}} {{state}}")],
          "short"),
    Panel("Session table fill over time",
          [(f"sum(microseg_session_table_entries{{{SEL}}}) / "
            f"sum(microseg_session_table_capacity{{{SEL}}})", "fill")], "percentunit"),
    Panel("Events/s by type", [(f"sum by (type) ({rate('microseg_events_total')})", "{{type}}")],
          "ops"),
    Panel("Events lost/s by source",
          [(f"sum by (source) ({rate('microseg_events_lost_total')})", "{{source}}")], "ops",
          description="ringbuf: the kernel found the ring buffer full; subscriber: a slow "
                      "client or sink fell behind. Every loss is counted."),
    Panel("Datapath time per packet",
          [(f"sum({rate('microseg_datapath_run_time_seconds_total')}) / "
            f"sum({rate('microseg_datapath_runs_total')})", "per packet")], "s",
          description="Kernel BPF run-time stats of the TC programs, sampled "
                      "(microseg run --run-time-stats): their ratio is the time per packet"),
    Panel("Datapath CPU",
          [(f"sum({rate('microseg_datapath_run_time_seconds_total')}) / "
            f"sum({rate('microseg_datapath_runs_total')}) * "
            f"sum({rate('microseg_packets_total')})", "CPU seconds/s")], "percentunit",
          description="Share of one CPU spent in the TC programs: the sampled time per "
                      "packet times every packet the datapath counted"),
    Panel("Policy reloads", [(f"sum(increase(microseg_policy_reloads_total{{{SEL}}}"
                              f"[$__rate_interval]))", "applied"),
                             (f"sum(increase(microseg_policy_reload_failures_total{{{SEL}}}"
                              f"[$__rate_interval]))", "rejected")], "short"),
    Panel("Interfaces attached", [(f"sum(microseg_interfaces_attached{{{SEL}}})",
                                   "interfaces")], "short"),
]

POLICY = [
    Panel("Rules", [(f"max(microseg_policy_rules{{{SEL}}})", "rules")], "short", "stat", 6, 4),
    Panel("Workloads", [(f"max(microseg_policy_workloads{{{SEL}}})", "workloads")], "short",
          "stat", 6, 4),
    Panel("Rules never hit", [(f"count(sum by (rule) (microseg_rule_hits_total{{{SEL}}}) == 0)",
                               "never hit")], "short", "stat", 6, 4),
    Panel("Policy reloads rejected",
          [(f"sum(microseg_policy_reload_failures_total{{{SEL}}})", "rejected")], "short",
          "stat", 6, 4),
    Panel("Rule hits/s", [(f"sum by (rule, action) ({rate('microseg_rule_hits_total')})",
                           "{{rule}} ({{action}})")], "ops", width=24,
          description="Sessions (and denied packets) each rule decided"),
    Panel("Top denied rules", [("topk(10, sum by (rule) (increase(microseg_rule_hits_total{"
                                + SEL + ',action="deny"}[$__range])))', "{{rule}}")],
          "short", "bargauge", instant=True,
          description="Hits of deny rules over the dashboard's time range"),
    Panel("Rules never hit", [(f"sum by (rule, action) (microseg_rule_hits_total{{{SEL}}}) == 0",
                               "{{rule}}")], "short", "table", instant=True,
          description="Rules of the active policy that decided nothing since the daemon's "
                      "counters began: candidates for removal"),
    Panel("Audit verdicts/s", [("sum by (reason) (" + rate("microseg_verdicts_total",
                                                            'verdict="audit"') + ")",
                                "{{reason}}")], "ops",
          description="Traffic an audit-mode policy or workload let through that it would "
                      "have denied"),
    Panel("Denied verdicts/s by reason",
          [("sum by (reason) (" + rate("microseg_verdicts_total", 'verdict="denied"') + ")",
            "{{reason}}")], "ops"),
    Panel("Workloads by source", [(f"sum by (source) (microseg_workloads{{{SEL}}})",
                                   "{{source}}")], "short",
          description="static: the policy file's; docker: running containers discovered "
                      "from the engine"),
    Panel("Discovery: workload changes/s and engine errors",
          [(f"sum by (source, action) ({rate('microseg_discovery_events_total')})",
            "{{source}} {{action}}"),
           (f"sum by (source) ({rate('microseg_discovery_errors_total')})",
            "{{source}} errors")], "ops",
          description="Containers started, stopped or changed as the daemon applied them; "
                      "errors: attempts to reach an engine that is down (the last inventory "
                      "stays enforced meanwhile)"),
    Panel("Staged candidate: verdicts that would change/s",
          [("sum by (verdict) (" + rate("microseg_staged_verdicts_total", 'differs="true"')
            + ")", "would be {{verdict}}")], "ops",
          description="While a candidate policy is staged (microseg policy stage): new flows "
                      "it judges otherwise than the active policy, by its verdict. "
                      "'would be denied' is what a promote would break"),
    Panel("All rules by hits", [(f"sort_desc(sum by (rule, action) "
                                 f"(microseg_rule_hits_total{{{SEL}}}))", "{{rule}}")],
          "short", "table", 24, 10, instant=True),
]

ANNOTATIONS = [
    ("Policy applied", f"changes(max(microseg_policy_generation{{{SEL}}})[$__rate_interval:]) > 0",
     "blue"),
    ("Policy rejected", f"increase(sum(microseg_policy_reload_failures_total{{{SEL}}})"
                        f"[$__rate_interval:]) > 0", "red"),
]


def panel_json(p: Panel, pid: int, x: int, y: int) -> dict:
    targets = [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i),
                **({"instant": True, "range": False, "format": "table"}
                   if p.instant else {"range": True})}
               for i, (expr, legend) in enumerate(p.exprs)]
    defaults: dict = {"unit": p.unit}
    defaults.update(p.options)
    out = {"id": pid, "type": p.kind, "title": p.title, "datasource": DS,
           "gridPos": {"x": x, "y": y, "w": p.width, "h": p.height},
           "fieldConfig": {"defaults": defaults, "overrides": p.overrides},
           "targets": targets}
    if p.description:
        out["description"] = p.description
    if p.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "table", "placement": "bottom",
                                     "calcs": ["mean", "max"]},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    return out


def dashboard(uid: str, title: str, panels: list[Panel], description: str) -> dict:
    laid, x, y, row_h = [], 0, 0, 0
    for pid, p in enumerate(panels, start=1):
        if x + p.width > 24:
            x, y, row_h = 0, y + row_h, 0
        laid.append(panel_json(p, pid, x, y))
        x += p.width
        row_h = max(row_h, p.height)
    return {
        "uid": uid, "title": title, "description": description,
        "tags": ["microseg"], "timezone": "browser", "schemaVersion": 39, "version": 1,
        "editable": True, "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
        "links": [{"type": "dashboards", "tags": ["microseg"], "title": "microseg",
                   "asDropdown": True}],
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            {"name": "instance", "label": "Daemon", "type": "query", "datasource": DS,
             "query": {"query": "label_values(microseg_build_info, instance)",
                       "refId": "instance"},
             "definition": "label_values(microseg_build_info, instance)",
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"text": "All", "value": "$__all"}, "hide": 0},
        ]},
        "annotations": {"list": [
            {"name": name, "datasource": DS, "enable": True, "expr": expr, "iconColor": colour,
             "step": "30s", "titleFormat": name}
            for name, expr, colour in ANNOTATIONS]},
        "panels": laid,
    }


DASHBOARDS = {
    "microseg-overview.json": dashboard(
        "microseg-overview", "microseg — overview", OVERVIEW,
        "Traffic by verdict, drops, sessions, events and their loss, the datapath's cost"),
    "microseg-policy.json": dashboard(
        "microseg-policy", "microseg — policy", POLICY,
        "Rule hits, top denied rules, rules never hit, audit verdicts"),
}


def render(doc: dict) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, doc in DASHBOARDS.items():
        (OUT / name).write_text(render(doc))
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
