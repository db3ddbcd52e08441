"""`microseg top` with a staged candidate policy (docs/policy.md "Staging"):
the header says so, the Verdicts and Flows views mark what it would decide
otherwise, the Rules view lists its rules and hits; and Enter on a verdict
traces it against the active policy (docs/policy.md "Tracing a connection").

Pilot tests on the synthetic source, whose candidate (tui/source.py
STAGED_RULES) lets the client in over ssh and takes db out of audit mode;
then one against a real daemon, staged with `microseg policy stage`."""

from __future__ import annotations

import asyncio
import gc
import itertools
import re
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from textual import events
from textual.widgets import Input

from microseg.lab.topology import Lab, WorkloadSpec
from microseg.tui import model as model_mod
from microseg.tui.app import DrillScreen, TopApp, TraceScreen
from microseg.tui.model import Model
from microseg.tui.screentext import screen_text
from microseg.tui.source import STAGED_RULES, DaemonSource, SyntheticSource
from microseg.tui.table import Cell, SyncedTable

from ..e2e.harness import DaemonProcess, Daemons, LabSpec
from .test_app_synthetic import live_objects, tbl, until

SIZE = (140, 40)
BURST = 1000
CANDIDATE = "/srv/policies/candidate.yaml"
# The Verdicts table's columns, without and with the Staged column.
VERDICT_COLS = ("time", "verdict", "reason", "proto", "src", "dst", "rule", "iface")
STAGED_VERDICT_COLS = ("time", "verdict", "staged", "reason", "proto", "src", "dst", "rule",
                       "iface")
FLOW_COLS = ("src", "dst", "proto", "port", "sessions", "packets", "bytes", "pps", "bps",
             "rule", "verdict", "staged")
RULE_COLS = ("name", "action", "hits", "rate", "last")


def make_app(*, staged: bool = True, **kw) -> TopApp:
    """The synthetic daemon, its events one burst, the candidate staged
    before they are read (or not)."""
    src = SyntheticSource(rate=0, seed=1, burst=BURST)
    if staged:
        src.stage(CANDIDATE)
    return TopApp(src, **kw)


def rows(table: SyncedTable, cols: tuple[str, ...]) -> list[dict[str, Cell]]:
    """Every row in display order, its cells by column."""
    return [dict(zip(cols, table.get_row_at(i), strict=True)) for i in range(table.row_count)]


def top_lines(app: TopApp) -> str:
    return "\n".join(screen_text(app).splitlines()[:3])


async def verdicts_shown(pilot, *, staged: bool = True) -> list[dict[str, Cell]]:
    app = pilot.app
    await until(pilot, lambda: app.model.events_seen >= BURST, what="the burst")
    await pilot.press("2")
    await until(pilot, lambda: tbl(app, "verdicts").row_count >= 20, what="verdict rows")
    return rows(tbl(app, "verdicts"), STAGED_VERDICT_COLS if staged else VERDICT_COLS)


def expected_mark(row: dict[str, Cell]) -> str:
    """What the synthetic candidate decides where it differs, from what the
    row shows: the client's ssh is let in, db's audited traffic breaks."""
    v, src, dst = row["verdict"].text, row["src"].text, row["dst"].text
    if v == "denied" and re.search(r":22 \(", dst) and src.endswith("(client)"):
        return "→ allowed (ssh-admin)"
    if v == "audit":
        return "→ denied (default)"
    return ""


async def filter_to(pilot, text: str) -> None:
    """`/`, the filter, Enter: a burst shows a screenful, the filter finds the rest."""
    app = pilot.app
    await pilot.press("slash")
    app.query_one("#filter", Input).value = text
    await pilot.press("enter")
    assert app.filter.text == text


async def open_trace_on(pilot, pred: Callable[[dict[str, Cell]], bool], *,
                        staged: bool = True, filter: str = "") -> dict[str, Cell]:
    """Enter on the last Verdicts row that pred picks (among those the filter
    lets through); the trace screen up and filled in. Returns the row."""
    app = pilot.app
    shown = await verdicts_shown(pilot, staged=staged)
    if filter:
        await filter_to(pilot, filter)
        shown = rows(tbl(app, "verdicts"), STAGED_VERDICT_COLS if staged else VERDICT_COLS)
    index = max(i for i, r in enumerate(shown) if pred(r))
    tbl(app, "verdicts").move_cursor(row=index)
    await pilot.press("enter")
    assert isinstance(app.screen, TraceScreen)
    await until(pilot, lambda: "verdict: " in screen_text(app), what="the trace")
    return shown[index]


# -- the header ---------------------------------------------------------------------------


async def test_nothing_staged_shows_nothing_staged() -> None:
    app = make_app(staged=False)
    async with app.run_test(size=SIZE) as pilot:
        shown = await verdicts_shown(pilot, staged=False)
        await until(pilot, lambda: "last reload: applied" in top_lines(app), what="a status")
        assert "STAGED" not in top_lines(app)
        assert "Staged" not in screen_text(app)
        assert all(len(tbl(app, "verdicts").get_row_at(i)) == len(VERDICT_COLS)
                   for i in range(len(shown)))
        await pilot.press("4")
        await until(pilot, lambda: tbl(app, "rules").row_count == 6, what="rules")
        await pilot.pause(2.5)  # a policy poll
        assert "STAGED" not in screen_text(app)
        assert tbl(app, "staged-rules").row_count == 0


async def test_header_says_a_candidate_is_staged_and_what_it_would_change() -> None:
    app = make_app()
    src = app.source
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "STAGED" in top_lines(app), what="STAGED")
        assert src.would_change > 0
        # the basename: the path is in the Rules view
        assert f"STAGED candidate.yaml · {src.would_change:,} would change" in top_lines(app)
        assert "policy generation 1" in top_lines(app).splitlines()[2]

        src.unstage()  # `policy stage clear`
        await until(pilot, lambda: "STAGED" not in top_lines(app), what="STAGED to go")
        assert app.model.staged_flows == {}


# -- Verdicts and Flows ------------------------------------------------------------------


async def test_verdicts_view_marks_the_verdicts_that_would_change() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        shown = await verdicts_shown(pilot)
        marks = [r["staged"].text for r in shown]
        assert marks == [expected_mark(r) for r in shown]
        assert "→ allowed (ssh-admin)" in marks and "→ denied (default)" in marks
        assert "" in marks  # the rest: the candidate agrees
        for r in shown:  # in the colour of what the candidate would do
            if r["staged"].text.startswith("→ denied"):
                assert r["staged"].style == "bold red"
        text = screen_text(app)
        assert re.search(r"Verdict\s+Staged\s+Reason", text)
        assert re.search(r"audit\s+→ denied \(default\)\s+default", text)


async def test_flows_view_marks_a_flow_with_its_latest_differing_verdict() -> None:
    app = make_app(poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.events_seen >= BURST, what="the burst")
        src = app.source
        app.model.on_status(await src.status())
        app.model.on_sessions(await src.sessions(), now=0.0)
        app.render_model()
        table = tbl(app, "flows")
        await until(pilot, lambda: table.row_count > 20, what="flows")
        # Independently of the model: each flow's latest `staged` in the events
        latest: dict[tuple, dict] = {}
        for e in app.model.tail_events():
            if e["staged"] is not None:
                latest[(e["src"]["workload"], e["dst"]["workload"], e["protocol"],
                        e["dst"]["port"])] = e["staged"]
        marked = 0
        for r in rows(table, FLOW_COLS):
            key = (re.sub(r".*\((\w+)\)$", r"\1", r["src"].text),
                   re.sub(r".*\((\w+)\)$", r"\1", r["dst"].text), r["proto"].text,
                   int(r["port"].text))
            s = latest.get(key)
            want = "" if s is None else f"→ {s['verdict']} ({s['rule'] or 'default'})"
            assert r["staged"].text == want, key
            marked += bool(want)
        assert marked >= 3


def verdict_line(seq: int, src: str, dst: str, port: int, staged: dict | None) -> bytes:
    return orjson.dumps({
        "time": "2026-11-27T09:00:00.000000Z", "seq": seq, "type": "verdict",
        "verdict": "audit", "reason": "default", "rule": None, "protocol": "tcp",
        "src": {"ip": "10.0.0.1", "port": 40000 + seq, "workload": src},
        "dst": {"ip": "10.0.0.2", "port": port, "workload": dst}, "staged": staged})


def status(sha: str | None) -> dict:
    staged = None if sha is None else {"source": "c.yaml", "sha256": sha, "since": "",
                                       "rules": 1, "would_change": 1}
    return {"pid": 1, "uptime_s": 1, "policy": {"generation": 1, "staged": staged}}


def test_model_keeps_each_flows_latest_differing_staged_verdict() -> None:
    m = Model()
    denied, allowed = {"verdict": "denied", "rule": None}, {"verdict": "allowed", "rule": "r"}
    m.on_lines([verdict_line(1, "a", "b", 80, denied), verdict_line(2, "a", "b", 80, None),
                verdict_line(3, "a", "b", 80, allowed), verdict_line(4, "a", "b", 80, None),
                verdict_line(5, "a", "c", 80, None)])
    # a null `staged` (the candidate agrees) leaves the mark: the latest differing one
    assert m.staged_flows == {"a>b/tcp/80": allowed}


def test_model_marks_a_bounded_number_of_flows_oldest_out(monkeypatch) -> None:
    monkeypatch.setattr(model_mod, "STAGED_FLOWS", 3)
    m = Model()
    s = {"verdict": "denied", "rule": None}
    m.on_lines([verdict_line(i, "a", "b", port, s) for i, port in enumerate((1, 2, 3, 1, 4))])
    assert list(m.staged_flows) == ["a>b/tcp/3", "a>b/tcp/1", "a>b/tcp/4"]


def test_model_drops_the_marks_and_rules_when_the_candidate_changes() -> None:
    m = Model()
    s = {"verdict": "denied", "rule": None}
    m.on_lines([verdict_line(1, "a", "b", 80, s)])  # replayed before the first status
    m.on_status(status("one"))
    assert m.staged_flows and m.header.staged["sha256"] == "one"
    m.on_staged({"sha256": "one", "source": "c.yaml", "rules": [{"name": "r", "hits": 1}]})
    m.on_status(status("one"))
    assert m.staged_flows and list(m.staged_rules) == ["r"]
    m.on_status(status("two"))  # staged again: another candidate
    assert m.staged_flows == {} and m.staged_rules == {}
    m.on_lines([verdict_line(2, "a", "b", 80, s)])
    m.on_status(status(None))  # cleared, or promoted
    assert m.staged_flows == {} and m.header.staged is None


# -- Rules --------------------------------------------------------------------------------


async def test_rules_view_shows_the_candidates_rules_and_hits() -> None:
    app = make_app()
    src = app.source
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.events_seen >= BURST, what="the burst")
        await pilot.press("4")
        staged = tbl(app, "staged-rules")
        await until(pilot, lambda: staged.row_count == len(STAGED_RULES), what="staged rules")
        shown = {r["name"].text: r for r in rows(staged, RULE_COLS)}
        assert {n: int(r["hits"].text) for n, r in shown.items()} == src.staged_hits
        assert shown["ssh-admin"]["hits"].sort > 0
        assert shown["ssh-admin"]["action"].text == "allow"
        text = screen_text(app)
        assert f"STAGED  {CANDIDATE}: its rules, hits since it was staged 09:00:00" in text
        # below the active rules, which stay as they were
        assert text.index("no-ssh") < text.index("ssh-admin")
        assert tbl(app, "rules").row_count == len(src.rules)

        await pilot.press("n")  # the sort keys sort both
        assert [r["name"].text for r in rows(staged, RULE_COLS)] == \
            sorted((n for n, _ in STAGED_RULES), reverse=True)
        assert "Rule [n] ▼" in screen_text(app).split("STAGED  ")[1]

        # Tab reaches the candidate's table; Enter: the verdicts its rule would change
        await until(pilot, lambda: len(app.model.recent) >= BURST, what="recent events")
        await pilot.press("tab")
        assert app.focused is staged
        staged.move_cursor(row=[r["name"].text for r in rows(staged, RULE_COLS)]
                           .index("ssh-admin"))
        await pilot.press("enter")
        assert isinstance(app.screen, DrillScreen)
        assert app.screen.title_text == "staged rule ssh-admin: the verdicts it would change"
        assert app.screen.rows and all(
            e["staged"] == {"verdict": "allowed", "rule": "ssh-admin"} and
            e["src"]["workload"] == "client" and e["dst"]["port"] == 22
            for e in app.screen.rows)
        await pilot.press("escape")

        app.filter = app.filter.parse("rule=ssh-admin protocol=tcp")
        app.render_model()  # the candidate's rules name no protocol: that term passes
        assert [r["name"].text for r in rows(staged, RULE_COLS)] == ["ssh-admin"]


# -- Enter on a verdict: its trace ---------------------------------------------------------


def denied_to_web_not_from_client(r: dict[str, Cell]) -> bool:
    return r["verdict"].text == "denied" and r["dst"].text.endswith(":22 (web)") and \
        not r["src"].text.endswith("(client)")


TO_WEB_NOT_FROM_CLIENT = "verdict=denied to-ip=10.203.0.20 !from-ip=10.203.0.10"


async def test_enter_on_a_denied_verdict_shows_its_trace_and_escape_closes() -> None:
    app = make_app(staged=False)
    async with app.run_test(size=SIZE) as pilot:
        row = await open_trace_on(pilot, denied_to_web_not_from_client, staged=False,
                                    filter=TO_WEB_NOT_FROM_CLIENT)
        src_ip = row["src"].text.split(":")[0]
        text = screen_text(app)
        assert "why denied:" in text and "→ web tcp/22" in text
        assert "trace of the active policy, generation 1:" in text
        assert "verdict: DENIED by rule no-ssh" in text
        assert re.search(r"no-ssh\s+deny\s+<- decides", text)
        assert "not matched, naming 10.203.0.20 as destination:" in text
        # why the rule for web's clients did not let it in
        assert re.search(rf"client-to-web\s+source {re.escape(src_ip)} \(workload \w+\) is not "
                         r"workload client; port 22 not in 80,443", text), text
        assert "staged" not in text.split("why denied:")[1]  # nothing staged: not a word

        await pilot.press("escape")
        assert not isinstance(app.screen, TraceScreen)
        assert app.focused is tbl(app, "verdicts")
        assert "verdict: DENIED" not in screen_text(app)
        assert app.is_running


async def test_trace_of_an_audit_verdict_says_what_the_candidate_would_do() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_trace_on(pilot, lambda r: r["verdict"].text == "audit")
        text = screen_text(app)
        assert "verdict: AUDIT: denied by the default (no rule matches; default: deny), " \
               "but passes: workload db is in audit mode" in text
        assert "staged   candidate.yaml would decide DENIED by the default" in text
        await pilot.press("q")  # q closes it, as it closes a drill-in
        assert not isinstance(app.screen, TraceScreen) and app.is_running


async def test_trace_of_a_verdict_the_candidate_agrees_with_says_so() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_trace_on(pilot, denied_to_web_not_from_client,
                            filter=TO_WEB_NOT_FROM_CLIENT)
        assert "staged   candidate.yaml decides the same" in screen_text(app)


async def test_the_traced_policy_is_fetched_once_per_generation() -> None:
    app = make_app(staged=False)
    src = app.source
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.header.generation == 1, what="a status")
        await open_trace_on(pilot, denied_to_web_not_from_client, staged=False,
                            filter=TO_WEB_NOT_FROM_CLIENT)
        await pilot.press("escape", "enter")
        await until(pilot, lambda: "verdict: " in screen_text(app), what="the second trace")
        assert src.policy_fetches == 1

        await pilot.press("escape")
        # a reload: the rule is renamed in generation 2
        src.policy_text = src.policy_text.replace("name: no-ssh,", "name: no-ssh-v2,")
        src.generation = 2
        await until(pilot, lambda: app.model.header.generation == 2, what="generation 2")
        await pilot.press("enter")
        await until(pilot, lambda: "verdict: " in screen_text(app), what="the third trace")
        text = screen_text(app)
        assert src.policy_fetches == 2
        assert "verdict: DENIED by rule no-ssh-v2" in text
        assert "generation 2 (the event was judged by generation 1):" in text
        assert "by rule no-ssh, policy generation 1" in text  # the event's own word


async def test_a_failed_policy_fetch_is_said_in_the_trace() -> None:
    app = make_app(staged=False, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await verdicts_shown(pilot, staged=False)
        app.source.fail = True
        shown = rows(tbl(app, "verdicts"), VERDICT_COLS)
        tbl(app, "verdicts").move_cursor(row=max(
            i for i, r in enumerate(shown) if r["verdict"].text == "denied"))
        await pilot.press("enter")
        await until(pilot, lambda: "no trace: daemon not reachable" in screen_text(app),
                    what="the error")
        await pilot.press("escape")
        assert not isinstance(app.screen, TraceScreen)


async def test_enter_on_an_allowed_verdict_drills_into_its_flow() -> None:
    app = make_app(staged=False)
    async with app.run_test(size=SIZE) as pilot:
        shown = await verdicts_shown(pilot, staged=False)
        index = max(i for i, r in enumerate(shown) if r["verdict"].text == "allowed")
        tbl(app, "verdicts").move_cursor(row=index)
        await pilot.press("enter")
        assert isinstance(app.screen, DrillScreen)
        r = shown[index]
        src = re.sub(r".*\((\w+)\)$", r"\1", r["src"].text)
        dst = re.sub(r".*\((\w+)\)$", r"\1", r["dst"].text)
        port = r["dst"].text.split(":")[1].split()[0]
        assert app.screen.title_text == f"flow {src} → {dst} {r['proto'].text}/{port}"
        assert app.screen.rows and all(
            (e["src"]["workload"], e["dst"]["workload"], str(e["dst"]["port"])) ==
            (src, dst, port) for e in app.screen.rows)
        await pilot.press("escape")
        assert not isinstance(app.screen, DrillScreen)


# -- keys over the trace --------------------------------------------------------------------


@pytest.mark.parametrize("glued", [[("alt+p", "p")], [("escape", "\x1b"), ("p", "p")]],
                         ids=["as-alt-p", "back-to-back"])
async def test_escape_then_p_at_once_closes_the_trace_and_pauses(glued) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_trace_on(pilot, lambda r: r["verdict"].text == "denied")
        for key, char in glued:  # as a terminal delivers them, back to back
            app.post_message(events.Key(key, char))
        await until(pilot, lambda: not isinstance(app.screen, TraceScreen) and app.paused,
                    what="the trace to close and the screen to pause")
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running, what="the app to exit")


async def test_traces_leave_no_objects_behind() -> None:
    """One TraceScreen serves every trace (a new screen per press would pin
    its render caches, as tests/tui/test_app_synthetic.py explains)."""
    app = make_app(poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_trace_on(pilot, lambda r: r["verdict"].text == "denied")
        await pilot.press("escape")
        await until(pilot, lambda: gc.get_freeze_count() > 0, what="the start-up freeze")
        keys = ["enter", "escape", "2", "enter", "escape"]

        async def round_of_keys() -> None:
            for key in keys:
                await pilot.press(key)
            await until(pilot, lambda: app._trace_task is None or app._trace_task.done(),
                        what="the trace task")

        for _ in range(2):
            await round_of_keys()
        counts = [live_objects()]
        for _ in range(5):
            await round_of_keys()
            counts.append(live_objects())
        growth = [b - a for a, b in itertools.pairwise(counts)]
        assert statistics.median(growth) < len(keys) / 2, growth


# -- against a real daemon ---------------------------------------------------------------------

LAB = LabSpec([WorkloadSpec("client", 10), WorkloadSpec("web", 20), WorkloadSpec("db", 30)],
              prefix="mstg", subnet4="10.217.0.0/24", subnet6="fd00:217::/64",
              serve={"web": {"tcp": [80, 22]}, "db": {"tcp": [5432]}})

ACTIVE = """\
version: 1
default: deny
workloads:
  client: {addresses: [10.217.0.10]}
  web: {addresses: [10.217.0.20]}
  db: {addresses: [10.217.0.30], mode: audit}
rules:
  - {name: client-to-web, from: {workload: client}, to: {workload: web}, protocol: tcp,
     ports: [80], action: allow}
  - {name: no-ssh, from: any, to: {workload: web}, protocol: tcp, ports: [22], action: deny}
"""
# db enforced; the client may ssh to web
STAGED = """\
version: 1
default: deny
workloads:
  client: {addresses: [10.217.0.10]}
  web: {addresses: [10.217.0.20]}
  db: {addresses: [10.217.0.30]}
rules:
  - {name: client-to-web, from: {workload: client}, to: {workload: web}, protocol: tcp,
     ports: [80], action: allow}
  - {name: ssh-admin, from: {workload: client}, to: {workload: web}, protocol: tcp,
     ports: [22], action: allow}
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with LAB.up() as lab:
        yield lab


@pytest.fixture
def daemon(lab: Lab, tmp_path: Path) -> Iterator[DaemonProcess]:
    daemons = Daemons(lambda: tmp_path)
    try:
        yield daemons.start(lab, ACTIVE)
    finally:
        daemons.close()


def cli(daemon: DaemonProcess, *args: str) -> None:
    r = daemon.cli(*args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)


@pytest.mark.root
async def test_staged_candidate_against_a_real_daemon(lab: Lab, daemon: DaemonProcess,
                                                      tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(STAGED)
    await asyncio.to_thread(cli, daemon, "policy", "stage", str(candidate))
    app = TopApp(DaemonSource(daemon.socket))
    async with app.run_test(size=(150, 40)) as pilot:
        await until(pilot, lambda: app.model.header.connected, timeout=10, what="connected")

        def traffic() -> None:
            assert not lab.probe("client", "tcp", lab.ipv4("web"), 22, timeout=0.3)
            assert lab.probe("client", "tcp", lab.ipv4("db"), 5432)  # audit: passes

        await asyncio.to_thread(traffic)
        # both would change: the header counts them (the status poll: every second)
        badge = re.compile(r"STAGED candidate\.yaml · (\d+) would change")
        await until(pilot, lambda: (m := badge.search(top_lines(app))) and int(m[1]) >= 2,
                    timeout=10, what="the badge")

        await pilot.press("2")
        await until(pilot, lambda: "→ allowed (ssh-admin)" in screen_text(app)
                    and "→ denied (default)" in screen_text(app), timeout=10,
                    what="the marks")
        shown = rows(tbl(app, "verdicts"), STAGED_VERDICT_COLS)
        index = max(i for i, r in enumerate(shown)
                    if r["staged"].text == "→ allowed (ssh-admin)")
        assert shown[index]["verdict"].text.startswith("denied")
        tbl(app, "verdicts").move_cursor(row=index)
        await pilot.press("enter")
        assert isinstance(app.screen, TraceScreen)
        await until(pilot, lambda: "verdict: " in screen_text(app), timeout=10,
                    what="the trace")
        text = screen_text(app)
        assert "client 10.217.0.10 -> web 10.217.0.20, tcp port 22" in text
        assert "verdict: DENIED by rule no-ssh" in text
        assert re.search(r"client-to-web\s+port 22 not in 80", text), text
        assert "staged   candidate.yaml would decide ALLOWED by rule ssh-admin" in text
        await pilot.press("escape")

        await pilot.press("4")
        await until(pilot, lambda: any(
            r["name"].text == "ssh-admin" and r["hits"].sort >= 1
            for r in rows(tbl(app, "staged-rules"), RULE_COLS)), timeout=10,
            what="the candidate's rules")
        assert f"STAGED  {candidate}: its rules" in screen_text(app)

        await asyncio.to_thread(cli, daemon, "policy", "stage", "clear")
        await until(pilot, lambda: "STAGED" not in screen_text(app), timeout=10,
                    what="STAGED to go")
        assert not app.query_one("#rules").has_class("staged")
        assert "ssh-admin" not in screen_text(app)


def test_the_synthetic_candidate_decides_as_its_rules_say() -> None:
    """The synthetic events' `staged` against the candidate's rules written
    as a policy and traced: the marks the tests above expect are a policy's."""
    from microseg.policy.evaluate import parse_protocol, trace
    from microseg.policy.parse import parse_policy

    src = SyntheticSource(rate=0, seed=1)
    text = src.policy_text.replace(", mode: audit", "")
    text = re.sub(r"  - \{name: (no-ssh|legacy),.*\n", "", text)
    text += ("  - {name: ssh-admin, from: {workload: client}, to: any, protocol: tcp, "
             "ports: [22], action: allow}\n")
    active = parse_policy(src.policy_text.encode()).policy
    candidate = parse_policy(text.encode()).policy
    assert {r.name for r in candidate.rules} == {n for n, _ in STAGED_RULES}
    src.stage()
    checked = 0
    for line, _, _ in src._pool:
        e = orjson.loads(line)
        if e["verdict"] == "allowed":
            continue  # made up: its rule is random, not the policy's
        args = (e["src"]["ip"], e["dst"]["ip"], parse_protocol(e["protocol"]),
                e["dst"]["port"])
        if e["dst"]["workload"] == "db" and e["verdict"] == "denied":
            continue  # made up: db is in audit mode, it would be audit
        a, c = trace(active, *args), trace(candidate, *args)
        assert (a.verdict, a.rule) == (e["verdict"], e["rule"])
        want = None if c.verdict == a.verdict else {"verdict": c.verdict, "rule": c.rule}
        assert e["staged"] == want, e
        checked += 1
    assert checked > 500
