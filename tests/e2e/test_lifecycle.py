"""The policy lifecycle with a real daemon on the lab (docs/policy.md "Policy
lifecycle"): audit everything → `policy suggest` → `policy stage` → `stage
status` shows the would-be denial of a flow never observed → `promote` →
enforced; the observed traffic is never dropped on the way. Also the
staged verdicts in events and metrics, a restart with a candidate staged,
and what bad input gets."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from microseg.control.client import Client, fetch_flows
from microseg.lab.topology import Lab, WorkloadSpec

from .harness import DaemonProcess, Daemons, LabSpec, wait_until

LAB = LabSpec([WorkloadSpec("client", 10), WorkloadSpec("web", 20), WorkloadSpec("db", 30)],
              prefix="mstl", subnet4="10.219.0.0/24", subnet6="fd00:219::/64",
              serve={"web": {"tcp": [80, 8080]}, "db": {"tcp": [5432]}})
AUDIT = """\
version: 1
mode: audit          # observe: would-be denials pass, verdict "audit"
default: deny
workloads:
  client: {addresses: [10.219.0.10, "fd00:219::10"], labels: {role: client}}
  web: {addresses: [10.219.0.20, "fd00:219::20"], labels: {tier: web}}
  db: {addresses: [10.219.0.30, "fd00:219::30"], labels: {tier: db}}
rules: []
"""
# What runs: the client talks to web, web to the database.
OBSERVED = [("client", "web", 80), ("web", "db", 5432)]


def _can(lab: Lab, src: str, dst: str, port: int) -> bool:
    return lab.probe(src, "tcp", lab.ipv4(dst), port, timeout=0.5)


def _ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


def _staged(d: DaemonProcess) -> dict | None:
    return json.loads(_ok(d.cli("policy", "stage", "status", "--json")).stdout)["staged"]


@pytest.fixture
def audited(daemons: Daemons, lab: Lab) -> DaemonProcess:
    d = daemons.start(lab, AUDIT)
    for _ in range(3):
        for src, dst, port in OBSERVED:
            assert _can(lab, src, dst, port)
    return d


def _flows(d: DaemonProcess) -> list[dict]:
    async def go() -> list[dict]:
        async with Client(d.socket) as c:
            return await fetch_flows(c)

    return asyncio.run(go())


def test_audit_suggest_stage_promote(audited: DaemonProcess, lab: Lab) -> None:
    d = audited
    assert wait_until(lambda: sum(f["sessions"] for f in _flows(d)) >= 6, timeout=10)
    suggested = d.workdir / "suggested.yaml"
    r = _ok(d.cli("policy", "suggest", "-o", str(suggested)))
    text = suggested.read_text()
    _ok(d.cli("policy", "check", str(suggested)))
    assert "mode: enforce" in text, text

    # The gate: the candidate judges the observed flows otherwise than the
    # audit-mode policy does (allowed by a rule, not audited)...
    r = d.cli("policy", "diff", str(suggested), "--json")
    assert r.returncode == 1, r.stderr
    diff = json.loads(r.stdout)
    assert {(c["before"]["verdict"], c["after"]["verdict"]) for c in diff["changed"]} == {
        ("audit", "allowed")}, diff
    # ...and the active policy judges them as itself does.
    assert d.cli("policy", "diff", str(d.policy_path)).returncode == 0

    # Staged: the active (audit) policy still decides; the candidate's view
    # of a flow never observed — the client straight to the database — is
    # a denial, and status says so.
    r = _ok(d.cli("policy", "stage", str(suggested)))
    assert "staged" in r.stdout
    gen = d.generation()
    assert _can(lab, "client", "db", 5432)      # audit lets it pass...
    for src, dst, port in OBSERVED:
        assert _can(lab, src, dst, port)

    def would_deny() -> list[dict]:
        s = _staged(d)
        assert s is not None
        return [c for c in s["changes"] if (c["from"], c["to"], c["port"]) ==
                ("client", "db", 5432) and c["staged_verdict"] == "denied"]

    assert wait_until(lambda: would_deny(), timeout=10), _staged(d)
    (change,) = would_deny()
    assert (change["verdict"], change["rule"], change["staged_rule"]) == ("audit", None, None)
    s = _staged(d)
    assert s["source"] == str(suggested) and s["judged"] >= 3 and s["would_change"] >= 1
    assert s["verdicts"].get("denied", 0) >= 1 and s["verdicts"].get("allowed", 0) >= 2
    assert all(r["hits"] >= 1 for r in s["rules"]), s["rules"]   # every rule saw its flow
    human = _ok(d.cli("policy", "stage", "status")).stdout
    assert "judged otherwise by the candidate" in human and "denied (default)" in human
    assert s["would_change_to"].get("denied", 0) >= 1

    # ...in the events: the audit verdict carries the candidate's denial.
    r = _ok(d.cli("watch", "--json", "--type", "verdict", "--last", "200", "--no-follow"))
    events = [json.loads(x) for x in r.stdout.splitlines()]
    flagged = [e for e in events if e["dst"]["ip"] == lab.ipv4("db")
               and e["src"]["ip"] == lab.ipv4("client") and e.get("staged")]
    assert flagged and flagged[-1]["staged"] == {"verdict": "denied", "rule": None}
    # ...and in the metrics.
    metrics = _ok(subprocess.run(
        ["curl", "-s", f"http://{d.status()['metrics']}/metrics"], capture_output=True,
        text=True, timeout=10)).stdout
    line = 'microseg_staged_verdicts_total{differs="true",verdict="denied"}'
    assert any(x.startswith(line) and float(x.split()[-1]) >= 1 for x in metrics.splitlines())

    # Promote: the policy file is the candidate, one generation later, and
    # enforced — what ran still runs, the rest does not.
    r = _ok(d.cli("policy", "stage", "promote"))
    assert "promoted" in r.stdout
    assert d.generation() == gen + 1
    assert d.policy_path.read_text() == text
    assert _staged(d) is None
    for src, dst, port in OBSERVED:
        assert _can(lab, src, dst, port), (src, dst, port)
    assert not _can(lab, "client", "db", 5432)
    assert not _can(lab, "client", "web", 8080)   # a port never used
    # Why? The trace says it, as the datapath decided it.
    trace = json.loads(_ok(d.cli("policy", "trace", "--from", "client", "--to", "db",
                                 "--port", "5432", "--json")).stdout)
    assert (trace["verdict"], trace["rule"]) == ("denied", None)
    # Observed traffic was never denied, from the first packet to now.
    d.stop()
    log = [json.loads(x) for x in d.flow_log.read_text().splitlines()]
    observed_ips = {(lab.ipv4(s), lab.ipv4(t), p) for s, t, p in OBSERVED}
    denied = [e for e in log if e["type"] == "verdict" and e["verdict"] == "denied"
              and (e["src"]["ip"], e["dst"]["ip"], e["dst"]["port"]) in observed_ips]
    assert denied == []


def test_bad_input_changes_nothing(audited: DaemonProcess, lab: Lab) -> None:
    d = audited
    r = d.cli("policy", "stage", "promote")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "microseg: policy stage promote: nothing is staged"]
    r = d.cli("policy", "stage", "clear")
    assert r.returncode == 1 and "nothing is staged" in r.stderr
    s = _ok(d.cli("policy", "stage", "status"))
    assert s.stdout.startswith("nothing staged")
    assert _staged(d) is None

    bad = d.workdir / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: x\n    from: any\n    to: {workload: nope}\n"
                   "    action: allow\n    ports: [99999]\n")
    r = d.cli("policy", "stage", str(bad))
    assert r.returncode == 1
    errors = [x for x in r.stderr.splitlines() if x.startswith(str(bad) + ":")]
    assert len(errors) >= 2, r.stderr           # every error, with its line and column
    assert "nothing staged" in r.stderr
    assert _staged(d) is None

    # Staged once, a bad second candidate keeps the first.
    good = d.workdir / "good.yaml"
    good.write_text(AUDIT.replace("mode: audit ", "mode: enforce"))
    _ok(d.cli("policy", "stage", str(good)))
    assert d.cli("policy", "stage", str(bad)).returncode == 1
    assert _staged(d)["source"] == str(good)
    _ok(d.cli("policy", "stage", "clear"))
    assert _staged(d) is None


def test_staged_candidate_survives_a_restart(audited: DaemonProcess, lab: Lab) -> None:
    d = audited
    cand = d.workdir / "candidate.yaml"
    cand.write_text(AUDIT.replace("mode: audit ", "mode: enforce").replace(
        "rules: []", "rules:\n  - {name: c-w, from: {workload: client}, to: {workload: web}, "
        "protocol: tcp, ports: [80], action: allow}"))
    _ok(d.cli("policy", "stage", str(cand)))
    since = _staged(d)["since"]
    assert _can(lab, "client", "web", 80)
    # Killed: the pins (and the staged slot, still judging) stay; the new
    # daemon takes the candidate and its counts over.
    d.kill()
    d.start()
    s = _staged(d)
    assert s is not None and (s["source"], s["since"]) == (str(cand), since)
    assert s["judged"] >= 1 and s["rules"] == [  # counted before the restart
        {"name": "c-w", "action": "allow", "hits": s["rules"][0]["hits"],
         "last_hit": s["rules"][0]["last_hit"]}] and s["rules"][0]["hits"] >= 1
    assert _can(lab, "client", "db", 5432)                   # still audit, still staged
    assert wait_until(lambda: any(c["to"] == "db" for c in _staged(d)["changes"]), timeout=10)
    # A clean stop removes the pins: the candidate comes back, counting anew.
    d.stop()
    d.start()
    s = _staged(d)
    assert s is not None and (s["source"], s["since"], s["judged"]) == (str(cand), since, 0)
    _ok(d.cli("policy", "stage", "clear"))
    d.stop()
    d.start()
    assert _staged(d) is None
