"""The Grafana dashboards: built from grafana/build.py, well-formed, and
asking only for metrics the exporter serves."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from microseg.exporters.prometheus import render

from .test_prometheus import snapshot

GRAFANA = Path(__file__).resolve().parents[2] / "grafana"


def _build():
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


BUILD = _build()
FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DASHBOARDS = {f.name: json.loads(f.read_text()) for f in FILES}


def exprs(doc: dict) -> list[str]:
    out = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    return out + [a["expr"] for a in doc["annotations"]["list"]]


def test_checked_in_json_is_what_build_py_makes() -> None:
    assert {f.name for f in FILES} == set(BUILD.DASHBOARDS)
    for f in FILES:
        assert f.read_text() == BUILD.render(BUILD.DASHBOARDS[f.name]), \
            f"{f.name} differs from grafana/build.py: run `python grafana/build.py`"


def test_uids_and_panel_ids_unique() -> None:
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids) == 2
    for doc in DASHBOARDS.values():
        ids = [p["id"] for p in doc["panels"]]
        assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panels_use_the_datasource_variable_and_have_units(name: str) -> None:
    doc = DASHBOARDS[name]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in doc["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"no unit on {p['title']}"
        assert p["targets"], p["title"]
    for a in doc["annotations"]["list"]:
        assert a["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_ranges_come_from_grafana(name: str) -> None:
    for e in exprs(DASHBOARDS[name]):
        # every range vector is $__rate_interval (or $__range): no fixed [5m]
        for rng in re.findall(r"\[([^\]]*)\]", e):
            assert rng in ("$__rate_interval", "$__range", "$__rate_interval:"), e
        assert 'instance=~"$instance"' in e, e


def test_every_metric_queried_is_exported() -> None:
    text = render(snapshot(), "")[0].decode()
    exported = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    for doc in DASHBOARDS.values():
        for e in exprs(doc):
            for name in re.findall(r"\bmicroseg_[a-z_]+", e):
                assert name in exported, (name, e)


def test_overview_covers_what_operators_ask_for() -> None:
    text = " ".join(exprs(DASHBOARDS["microseg-overview.json"]))
    for needed in ("microseg_packets_total", "microseg_drops_total", "microseg_verdicts_total",
                   "microseg_sessions", "microseg_session_table_capacity",
                   "microseg_events_total", "microseg_events_lost_total",
                   "microseg_policy_generation", "microseg_policy_reload_failures_total",
                   "microseg_datapath_run_time_seconds_total", "microseg_datapath_runs_total"):
        assert needed in text, needed
