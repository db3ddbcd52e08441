"""`make bench BENCH=quick` runs in the test suite, so the benchmark code
cannot rot: every figure present, positive, and the JSON written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import readme

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)  # about 4 minutes on a quiet machine
def test_quick_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    # Its own process group: if it must be stopped, the daemons and traffic
    # it started go with it.
    p = subprocess.Popen([sys.executable, "-m", "bench", "--mode", "quick", "--output",
                          str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=600)
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    assert r.returncode == 0, r.stderr
    assert "established TCP v4" in r.stdout
    res = json.loads(out.read_text())
    assert res["mode"] == "quick" and res["machine"]["kernel"]
    verifier = res["datapath"]["verifier"]
    assert {"mseg_ingress", "mseg_egress", "mseg_ingress_l3", "mseg_egress_l3",
            "mseg_reply", "mseg_staged"} <= set(verifier)
    for v in verifier.values():
        assert 0 < v["instructions"] < 1_000_000 and 0 < max(v["stack_depth"]) <= 512
    assert "insns processed" in r.stdout
    for scenario in res["datapath"]["scenarios"].values():
        for key in ("floor", "established_v4", "established_v6", "denied_v4", "denied_v6",
                    "new_flow_v4", "new_flow_v6", "rewrite_floor", "new_flow_uncached_v4",
                    "new_flow_uncached_v6", "rewrite_uncached_floor"):
            assert scenario[key]["median_ns"] > 0, key
        assert scenario["sessions"] > 0 and scenario["policy_entries"] > 0
    prim = res["datapath"]["primitives"]
    assert prim["miss"]["median_ns"] > 0 and prim["insert"]["median_ns"] > 0
    assert "kernel map operations alone" in r.stdout
    pol = res["policy"]
    assert all(r["compile_apply_s"] > 0 for r in pol["compile_apply"].values())
    assert all(r["median_ms"] > 0 for r in pol["write_to_enforced"].values())
    assert "Policy file written" in r.stdout
    ev = res["events"]
    assert ev["decode"]["decode"]["per_s"] > 0 and ev["decode"]["decode_enrich"]["per_s"] > 0
    for key in ("flow_log_only", "flow_log_and_watch"):
        assert ev[key]["accounted"], ev[key]  # produced = delivered + lost, exactly
        assert ev[key]["flow_log_per_s"] > 0
    for size in res["sessions"].values():
        assert size["list_rows_per_s"] > 0 and size["sweep_s"] > 0
        assert size["expired_events_in_flow_log"] + size["expired_events_lost_by_slow_sinks"] \
            >= size["sessions"]
    assert "Sessions, through a running daemon" in r.stdout
    for run in res["tui"].values():
        assert run["keys"] > 0 and run["median_ms"] > 0
        assert run["ingested_per_s"] >= 0.9 * run["rate"]  # the app kept up with the stream
    assert "key latency" in r.stdout
    traffic = res["traffic"]["configs"]
    assert set(traffic) == {"none", "microseg", "nft_linear", "nft_sets"}
    for kind, run in traffic.items():
        for key in ("rr_per_s", "p50_us", "p99_us", "udp_pps", "stream_gbps"):
            assert run[key]["median"] > 0, (kind, key)
    assert "Real traffic between two lab namespaces" in r.stdout
    breakdown = res["traffic"]["breakdown"]
    assert set(breakdown) == {"tc_ok", "microseg_kept", "microseg_kept_stats"}
    assert all(run["p50_us"]["median"] > 0 for run in breakdown.values())
    stress = res["stress"]
    assert set(stress["configs"]) == {"none", "tc_ok", "microseg", "nft"}
    assert stress["generator"]["offered_pps"]["median"] > 0
    for kind, cfg in stress["configs"].items():
        allowed, denied = cfg["floods"]["allowed"], cfg["floods"]["denied"]
        for flood in (allowed, denied):
            assert flood["offered_pps"]["median"] > 0 and flood["taken_pps"]["median"] > 0, kind
        assert allowed["delivered_pps"]["median"] > 0, kind  # the allowed flow gets through
        if kind not in ("none", "tc_ok"):  # a firewall stops the denied flood (stress.py too)
            assert denied["delivered_pps"]["max"] <= 0.01 * denied["taken_pps"]["min"], kind
    ms = stress["configs"]["microseg"]["floods"]
    for flood in ms.values():  # the kernel's run-time statistics of microseg's programs
        assert flood["bpf_ns_per_packet"]["median"] > 0
        assert flood["events_lost"]["max"] == 0  # denials aggregated: nothing lost
    assert "Stress: an XDP live-frames generator" in r.stdout
    clustered = res["cluster"]  # many hosts: a daemon on etcd, simulated nodes
    published = clustered["publish"]["publish_to_enforced"]
    assert published["n"] == clustered["params"]["samples"] and published["missing"] == 0
    assert 0 < published["p50_ms"] <= published["p99_ms"] <= published["max_ms"]
    assert clustered["publish"]["left_forgotten"]  # b's lease revoked: a forgot its workloads
    scale = clustered["scale"]
    n = scale["nodes"] * scale["workloads_per_node"]
    assert scale["load"]["workloads"] == n and scale["load"]["puts_per_s"] > 0
    assert scale["start"]["remote_at_ready"] == n  # listed before the first generation
    assert scale["start"]["ready_s"] > 0 and scale["start"]["alone_ready_s"] > 0
    burst = scale["burst"]
    assert burst["to_enforced"]["missing"] == 0 and burst["generations"] > 0
    churn = scale["churn"]
    assert churn["changes"] > 0 and churn["generations"] > 0
    for kind in ("update_to_enforced", "moved", "replaced_added", "removed"):
        assert churn[kind]["missing"] == 0 and churn[kind]["p50_ms"] > 0, kind
    assert churn["cpu_pct"] > 0 and len(churn["samples"]) >= 2
    assert all(s["rss_mib"] > 0 for s in churn["samples"])
    inventory = scale["inventory"]  # every workload as last published, with its node
    assert inventory["rows"] == inventory["matching"] == inventory["expected"] \
        == n + scale["workloads_per_node"]
    assert "Many hosts: daemon a" in r.stdout
    section = readme.render(res)  # the README generator reads every figure it needs
    assert "**Real traffic**" in section and "**TUI**" in section
    assert "Where the request/response overhead goes" in section
    assert "**Stress**" in section and "| microseg, a denied flood |" in section
    assert "**Many hosts**" in section and "under churn" in section
    soak = res["soak"]
    assert soak["cycles"] > 0 and len(soak["samples"]) >= 2
    assert "Soak:" in r.stdout
