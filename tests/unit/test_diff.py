"""`policy diff` (microseg/policy/diff.py, microseg/cli_learn.py): the flows a
candidate would judge otherwise, re-evaluated on both sides; counts; exit
codes 0/1/2; --json; offline from files, as a CI gate in a git repository,
and against a daemon (a stand-in serving the two endpoints the commands read)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from microseg.cli import main
from microseg.flow.diff import diff, replay_addresses
from microseg.flow.observed import FlowAggregate
from microseg.policy.model import Workload
from microseg.policy.parse import parse_policy

from .test_observed import verdict_event

WORKLOADS = """workloads:
  web: {labels: {tier: web}, addresses: [10.0.0.1, "fd00::1"]}
  api: {labels: {tier: web}, addresses: [10.0.0.2]}
  db: {labels: {tier: db}, addresses: [10.0.0.9], mode: audit}
"""
BASE = "version: 1\n" + WORKLOADS + """rules:
  - {name: web-db, from: {labels: {tier: web}}, to: {workload: db}, protocol: tcp,
     ports: [5432], action: allow}
  - {name: to-web, from: any, to: {workload: web}, protocol: tcp, ports: [443], action: allow}
"""
# web-db narrowed to web; ssh to web opened; to-web renamed (same verdicts).
CANDIDATE = "version: 1\n" + WORKLOADS + """rules:
  - {name: web-db, from: {workload: web}, to: {workload: db}, protocol: tcp, ports: [5432],
     action: allow}
  - {name: https, from: any, to: {workload: web}, protocol: tcp, ports: [443], action: allow}
  - {name: ssh, from: {cidr: 192.0.2.0/24}, to: {workload: web}, protocol: tcp, ports: [22],
     action: allow}
"""
EVENTS = [
    verdict_event("10.0.0.1", "web", "10.0.0.9", "db", port=5432, rule="web-db"),
    verdict_event("10.0.0.2", "api", "10.0.0.9", "db", port=5432, rule="web-db"),
    verdict_event("10.0.0.2", "api", "10.0.0.9", "db", port=5432, rule="web-db"),
    verdict_event("192.0.2.5", None, "10.0.0.1", "web", port=443, rule="to-web"),
    # Denied 40 times: judged again, not as recorded.
    verdict_event("192.0.2.5", None, "10.0.0.1", "web", port=22, verdict="denied", rule=None,
                  count=40),
    verdict_event("fd00::7", None, "fd00::1", "web", port=22, verdict="denied", rule=None),
    # Recorded as allowed by a rule long gone: both policies deny it alike.
    verdict_event("10.0.0.9", "db", "10.0.0.1", "web", port=80, rule="old"),
]


def pol(text: str):
    return parse_policy(text.encode(), "p.yaml").policy


def records(events: list[dict] = EVENTS) -> list[dict]:
    agg = FlowAggregate()
    for e in events:
        agg.add(e)
    return list(agg.records())


def test_changed_flows_with_their_verdicts_rules_and_counts() -> None:
    changes = diff(pol(BASE), pol(CANDIDATE), records())
    got = [(c.flow["src"]["workload"] or c.src_ip, c.flow["dst"]["workload"], c.flow["port"],
            c.before, c.after, c.sessions) for c in changes]
    assert got == [
        ("192.0.2.5", "web", 22, ("denied", None), ("allowed", "ssh"), 40),
        # db is in audit mode: what the baseline allowed is now audited.
        ("api", "db", 5432, ("allowed", "web-db"), ("audit", None), 2),
    ]
    assert changes[1].as_dict() == {
        "src": {"workload": "api", "ip": "10.0.0.2"}, "dst": {"workload": "db", "ip": "10.0.0.9"},
        "protocol": "tcp", "port": 5432, "sessions": 2,
        "first_seen": "2026-11-27T09:14:03.512907Z", "last_seen": "2026-11-27T09:14:03.512907Z",
        "before": {"verdict": "allowed", "rule": "web-db"},
        "after": {"verdict": "audit", "rule": None}}
    assert diff(pol(BASE), pol(BASE), records()) == []
    assert diff(pol(CANDIDATE), pol(CANDIDATE), records()) == []


def test_containers_are_replayed_by_name_where_they_run_now() -> None:
    text = "version: 1\ndiscover: {docker: {}}\nrules:\n  - {name: r, from: any, " \
           "to: {labels: {tier: web}}, protocol: tcp, ports: [80], action: allow}\n"
    # shop-web ran at 172.30.0.5 when observed; it runs at 172.30.0.8 now, and
    # 172.30.0.5 belongs to another container.
    now = [Workload.make("shop-web", ["172.30.0.8"], {"tier": "web"}),
           Workload.make("other", ["172.30.0.5"], {"tier": "db"})]
    recs = records([verdict_event("192.0.2.1", None, "172.30.0.5", "shop-web", port=80)])
    assert replay_addresses(recs[0], {w.name: w for w in now}) == ("192.0.2.1", "172.30.0.8")
    closed = pol(text.replace("[80]", "[81]"))
    (c,) = diff(pol(text), closed, recs, discovered=now)
    assert (c.before, c.after, c.dst_ip) == (("allowed", "r"), ("denied", None), "172.30.0.8")
    # By address, it would be `other`'s flow: denied both ways, no change seen.
    assert diff(pol(text), closed, recs, discovered=now[1:]) == []


def write_case(tmp_path: Path) -> tuple[Path, Path, Path]:
    base, cand, log = tmp_path / "base.yaml", tmp_path / "cand.yaml", tmp_path / "flows.json"
    base.write_text(BASE)
    cand.write_text(CANDIDATE)
    log.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in EVENTS) + b"not an event\n")
    return base, cand, log


def test_the_command_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, cand, log = write_case(tmp_path)
    assert main(["policy", "diff", str(cand), "--against", str(base), "--flow-log",
                 str(log)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["FROM", "TO", "PROTO", "PORT", "BEFORE", "AFTER", "SESSIONS"]
    assert lines[1].split() == ["192.0.2.5", "web", "(10.0.0.1)", "tcp", "22", "denied",
                                "(default)", "->", "allowed", "(ssh)", "40"]
    assert lines[2].split() == ["api", "(10.0.0.2)", "db", "(10.0.0.9)", "tcp", "5432",
                                "allowed", "(web-db)", "->", "audit", "(default)", "2"]
    assert lines[3] == (f"2 of 6 observed flows would be judged otherwise by {cand} than by "
                        f"{base} (42 sessions): 1 allowed -> audit, 1 denied -> allowed")
    assert err == "microseg: flow logs: skipped 1 of 8 lines that are not events (1 not JSON)\n"

    assert main(["policy", "diff", str(cand), "--against", str(base), "--flow-log", str(log),
                 "--json"]) == 1
    doc = orjson.loads(capsys.readouterr().out)
    assert (len(doc["changed"]), doc["flows"], doc["unchanged"]) == (2, 6, 4)
    assert set(doc) == {"changed", "flows", "unchanged"}
    assert doc["changed"][0]["after"] == {"verdict": "allowed", "rule": "ssh"}

    assert main(["policy", "diff", str(base), "--against", str(base), "--flow-log",
                 str(log)]) == 0
    assert capsys.readouterr().out == (f"no change: {base} judges all 6 observed flows as "
                                       f"{base} does\n")
    assert main(["policy", "diff", str(base), "--against", str(base), "--flow-log", str(log),
                 "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out) == {"changed": [], "flows": 6, "unchanged": 6}


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, cand, log = write_case(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nrules:\n  - {name: x, from: any, to: {workload: ghost}, "
                      "action: allow}\n  - {name: y, from: any, to: any, action: maybe}\n")
    assert main(["policy", "diff", str(broken), "--against", str(base), "--flow-log",
                 str(log)]) == 2
    err = capsys.readouterr().err
    assert f"{broken}:3:41: rules[0] (x).to.workload: undefined workload 'ghost'" in err
    assert f"{broken}:4:43: rules[1] (y).action: 'maybe' is not one of allow | deny" in err
    assert f"microseg: {broken}: 2 errors" in err
    for argv in ([str(cand), "--against", str(tmp_path / "nope.yaml"), "--flow-log", str(log)],
                 [str(cand), "--against", str(base), "--flow-log", str(tmp_path / "gone")],
                 [str(cand), "--against", str(base), "--flow-log", str(tmp_path)]):
        assert main(["policy", "diff", *argv]) == 2, argv
        assert "microseg: " in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_ci_gate_in_a_git_repository(tmp_path: Path) -> None:
    """The gate docs/policy.md shows: the branch's policy file against the
    main branch's, on the flow logs; it fails when a verdict would change."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _base, _cand, log = write_case(tmp_path)

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                        *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    (repo / "policy.yaml").write_text(BASE)
    git("add", "policy.yaml")
    git("commit", "-q", "-m", "policy")
    git("checkout", "-q", "-b", "change")
    gate = ("git show main:policy.yaml > /tmp/$$.main.yaml && "
            f"{sys.executable} -m microseg policy diff policy.yaml --against /tmp/$$.main.yaml "
            f"--flow-log {log}*; rc=$?; rm -f /tmp/$$.main.yaml; exit $rc")
    # A rename that changes no verdict passes the gate.
    (repo / "policy.yaml").write_text(BASE.replace("to-web", "https"))
    r = subprocess.run(["sh", "-c", gate], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (repo / "policy.yaml").write_text(CANDIDATE)
    r = subprocess.run(["sh", "-c", gate], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 1 and "2 of 6 observed flows would be judged otherwise" in r.stdout


# -- against a daemon -----------------------------------------------------------

@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[str, dict]]:
    """A stand-in for the daemon's GET /v1/policy/source and GET /v1/flows
    (microseg/control/api.py), serving what `state` holds."""
    sock = str(tmp_path / "d.sock")
    state: dict = {"text": BASE, "known": [], "records": records()}

    async def source(request: web.Request) -> web.Response:
        if state["text"] is None:
            return web.json_response({"generation": 0})
        return web.json_response({"generation": 7, "source": "/etc/microseg/policy.yaml",
                                  "sha256": "0" * 64, "text": state["text"],
                                  "known": state["known"]})

    async def flows(request: web.Request) -> web.Response:
        return web.Response(body=b"".join(orjson.dumps(r) + b"\n" for r in state["records"]),
                            content_type="application/x-ndjson")

    async def stats(request: web.Request) -> web.Response:
        if "stats" not in state:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(state["stats"])

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/policy/source", source)
    app.router.add_get("/v1/flows", flows)
    app.router.add_get("/v1/stats", stats)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.UnixSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield sock, state
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_against_the_daemon(daemon: tuple[str, dict], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    sock, state = daemon
    _base, cand, log = write_case(tmp_path)
    # The daemon's active policy and flows.
    assert main(["policy", "diff", str(cand), "--socket", sock, "--json"]) == 1
    doc = orjson.loads(capsys.readouterr().out)
    assert (len(doc["changed"]), doc["flows"]) == (2, 6)
    # Its policy, the log's flows.
    assert main(["policy", "diff", str(cand), "--socket", sock, "--flow-log", str(log)]) == 1
    assert "than by the active policy (42 sessions)" in capsys.readouterr().out
    # A daemon without a policy, or none at all: no answer, exit 2 — a CI
    # gate never takes it for a change.
    state["text"] = None
    assert main(["policy", "diff", str(cand), "--socket", sock]) == 2
    assert "the daemon has no policy applied yet" in capsys.readouterr().err
    assert main(["policy", "diff", str(cand), "--socket", str(tmp_path / "none.sock")]) == 2
    assert "daemon not reachable" in capsys.readouterr().err


def test_suggest_from_the_daemon(daemon: tuple[str, dict],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    sock, state = daemon
    state["text"] = "version: 1\ndiscover: {docker: {socket: /run/x.sock}}\n" + WORKLOADS
    state["known"] = [
        {"workload": "shop-1", "source": "docker", "labels": {"svc": "shop"},
         "addresses": ["172.30.0.2"]},
        {"workload": "shop-2", "source": "docker", "labels": {"svc": "shop"},
         "addresses": ["172.30.0.3"]}]
    state["records"] = records([
        verdict_event("172.30.0.2", "shop-1", "10.0.0.9", "db", port=5432),
        verdict_event("172.30.0.3", "shop-2", "10.0.0.9", "db", port=5432)])
    state["stats"] = {"flows": {"flows": 2, "capacity": 65536, "evicted": 4096}}
    assert main(["policy", "suggest", "--socket", sock]) == 0
    text = capsys.readouterr().out
    assert "# The daemon's aggregate of 65,536 flows has evicted 4,096: the most frequent " \
           "ones, missing here if they did not recur since.\n" in text
    assert text.startswith(f"# Suggested by `microseg policy suggest` from the flow aggregate "
                           f"of the daemon at {sock}:\n")
    p = parse_policy(text.encode(), "s").policy
    assert p.discover.docker_socket == "/run/x.sock"
    assert [w.name for w in p.workloads] == ["web", "api", "db"]
    assert [str(s) for s in p.rules[0].sources] == ["labels:svc=shop"]
    # Malformed records are the daemon's fault, said as such.
    state["records"] = [{"src": {}}]
    assert main(["policy", "suggest", "--socket", sock]) == 1
    assert "the daemon's flows: flow record 1: src.ip" in capsys.readouterr().err
