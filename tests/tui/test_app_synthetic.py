"""`microseg top` driven by keys (Textual's pilot) against the synthetic source."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import itertools
import re
import statistics
import time
from collections.abc import Callable

import pytest
from textual import events
from textual.cache import FIFOCache, LRUCache
from textual.widgets import Input, Static, TabbedContent

from microseg.tui.app import DrillScreen, HelpScreen, TopApp
from microseg.tui.model import endpoint_label
from microseg.tui.screentext import screen_text
from microseg.tui.source import SyntheticSource
from microseg.tui.table import Cell, SyncedTable

SIZE = (140, 40)
RATE = 500     # events/s, for the tests about a live stream
BURST = 1000   # events at once otherwise: the views fill at once and keys stay quick


def make_app(rate: float = 0, **kw) -> TopApp:
    """Polls run as with the daemon; events come as one burst unless rate > 0."""
    return TopApp(SyntheticSource(rate=rate, seed=1, burst=BURST), **kw)


async def fed_app_started(pilot, app: TopApp) -> None:
    """poll=False: the data of two polls one second apart, fed as the polls would
    (rates need two), and rendered once."""
    src = app.source
    await until(pilot, lambda: app.model.events_seen >= (src.burst if src.rate <= 0 else 1),
                what="events")
    pol = await src.policy()
    app.model.on_policy({**pol, "rules": [{**r, "hits": 0} for r in pol["rules"]]}, now=0.0)
    app.model.on_policy(pol, now=1.0)
    app.model.on_sessions(await src.sessions(), now=0.0)
    app.model.on_sessions(await src.sessions(), now=1.0)
    app.render_model()


async def until(pilot, cond: Callable[[], object], timeout: float = 20.0,
                what: str = "condition") -> None:
    """Wait (bounded: a loaded machine is slow, never wrong) for cond; the
    screen says what was there instead."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{screen_text(pilot.app)}")
        await pilot.pause(0.05)


def tbl(app: TopApp, view: str) -> SyncedTable:
    return app.query_one(f"#{view}-table", SyncedTable)


# the columns of each table, as the app lays them out
COLUMNS = {
    "flows-table": ("src", "dst", "proto", "port", "sessions", "packets", "bytes", "pps",
                    "bps", "rule", "verdict"),
    "verdicts-table": ("time", "verdict", "reason", "proto", "src", "dst", "rule", "iface"),
    "sessions-table": ("proto", "state", "src", "dst", "packets", "bytes", "age", "idle",
                       "rule"),
    "rules-table": ("name", "action", "proto", "hits", "rate", "last"),
    "drill-table": ("time", "type", "what", "src", "dst", "rule"),
}


def column(table: SyncedTable, col: str) -> list[Cell]:
    """A column's cells, in display order."""
    idx = COLUMNS[table.id].index(col)
    return [table.get_row_at(i)[idx] for i in range(table.row_count)]


def contents(table: SyncedTable) -> list[list[tuple[str, object]]]:
    """Every row in display order: what each cell shows and its sort value."""
    return [[(c.text, c.sort) for c in table.get_row_at(i)] for i in range(table.row_count)]


def row_index(table: SyncedTable, col: str, text: str) -> int:
    return [c.text for c in column(table, col)].index(text)


def ep_text(ep: dict, port: bool = True) -> str:
    """An endpoint as the tables show it (IPv4)."""
    where = f"{ep['ip']}:{ep['port']}" if port else ep["ip"]
    return f"{where} ({ep['workload']})"


def active(app: TopApp) -> str:
    return app.query_one("#views", TabbedContent).active


def header(app: TopApp) -> str:
    """The header's text, whether or not it is scrolled into view (see LAYOUT_BUG)."""
    return str(app.query_one("#header", Static).content)


def top_lines(app: TopApp) -> str:
    """The first three lines on screen: the header, as a person sees it."""
    return "\n".join(screen_text(app).splitlines()[:3])


async def started(pilot, view: str = "flows", rows: int = 2) -> None:
    """Wait until the view's table shows at least `rows` rows."""
    await until(pilot, lambda: tbl(pilot.app, view).row_count >= rows, what=f"{view} rows")


async def open_filter(pilot) -> Input:
    await pilot.press("slash")
    await pilot.pause(0.05)
    box = pilot.app.query_one("#filter", Input)
    assert box.has_class("open") and not box.disabled
    assert pilot.app.focused is box
    return box


async def apply_filter(pilot, text: str, *, typed: bool = False) -> Input:
    """Open the box, replace what is in it with text, press Enter. Typing each
    key costs ~0.1 s: only some tests do (the box's own typing is Textual's)."""
    box = await open_filter(pilot)
    if typed:
        await pilot.press("ctrl+a", "ctrl+k", *text)
    else:
        box.value = text
    await pilot.press("enter")
    await pilot.pause(0.05)
    return box


def verdicts_shown(app: TopApp) -> list[str]:
    return [c.text for c in column(tbl(app, "verdicts"), "verdict")]


# -- views -------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "view"), [("1", "flows"), ("2", "verdicts"),
                                            ("3", "sessions"), ("4", "rules"), ("5", "matrix")])
async def test_view_keys(key: str, view: str) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        if view == "flows":  # flows is where it starts: go away first
            await pilot.press("2")
            assert active(app) == "verdicts"
        await pilot.press(key)
        assert active(app) == view
        assert app.focused is tbl(app, view)
        await until(pilot, lambda: tbl(app, view).row_count > 0, what=f"{view} rows")
        if view == "matrix":  # one row and one column per workload
            assert tbl(app, view).row_count == len(app.source.names)


# -- sorting -----------------------------------------------------------------------------

SORT_KEYS = [("1", "flows", "k", "packets"), ("1", "flows", "b", "bytes"),
             ("1", "flows", "t", "pps"), ("1", "flows", "n", "sessions"),
             ("3", "sessions", "a", "age"), ("3", "sessions", "i", "idle"),
             ("3", "sessions", "k", "packets"), ("3", "sessions", "b", "bytes"),
             ("4", "rules", "h", "hits"), ("4", "rules", "t", "rate"),
             ("4", "rules", "n", "name")]
DEFAULT_SORT = {"flows": "packets", "sessions": "age", "rules": "hits"}


def assert_sorted(table: SyncedTable, col: str, reverse: bool) -> None:
    values = [c.sort for c in column(table, col)]
    assert len(set(values)) > 1, f"{col}: all rows equal, the order proves nothing"
    assert values == sorted(values, reverse=reverse), f"rows not in {col} order: {values}"


async def test_sort_keys_are_labelled_in_column_titles() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        text = screen_text(app)
        assert "Packets [k] ▼" in text and "Bytes [b]" in text and "Pkts/s [t]" in text
        await pilot.press("b")
        text = screen_text(app)
        assert "Bytes [b] ▼" in text and "Packets [k] ▼" not in text
        await pilot.press("b")
        assert "Bytes [b] ▲" in screen_text(app)


@pytest.mark.parametrize(("view_key", "view", "letter", "col"), SORT_KEYS,
                         ids=[f"{v}-{letter}" for _, v, letter, _ in SORT_KEYS])
async def test_sort_key(view_key: str, view: str, letter: str, col: str) -> None:
    app = make_app(poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await fed_app_started(pilot, app)
        await pilot.press(view_key)
        await started(pilot, view, rows=3)
        table = tbl(app, view)
        assert (table.sort_column, table.sort_reverse) == (DEFAULT_SORT[view], True)

        await pilot.press(letter)
        if col == DEFAULT_SORT[view]:  # already sorted by it: the key reverses
            assert (table.sort_column, table.sort_reverse) == (col, False)
        else:
            assert (table.sort_column, table.sort_reverse) == (col, True)
        first = table.sort_reverse
        assert_sorted(table, col, reverse=first)

        await pilot.press(letter)
        assert (table.sort_column, table.sort_reverse) == (col, not first)
        assert_sorted(table, col, reverse=not first)


async def test_rows_resort_when_the_data_changes() -> None:
    app = make_app(poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await fed_app_started(pilot, app)
        table = tbl(app, "flows")
        await pilot.press("t")
        assert_sorted(table, "pps", reverse=True)
        before = [c.sort for c in column(table, "pps")]
        # the next poll: other flows are busy now
        sessions = await app.source.sessions()
        for i, s in enumerate(sessions):
            s["packets"] = {"orig": s["packets"]["orig"] + 37 * (i % 11), "reply": 0}
        app.model.on_sessions(sessions, now=2.0)
        app.render_model()
        assert [c.sort for c in column(table, "pps")] != before
        assert_sorted(table, "pps", reverse=True)


async def test_sort_keys_of_other_views_do_nothing() -> None:
    app = make_app(poll=False)
    foreign = {"1": ("flows", "ah"), "2": ("verdicts", "kh"), "3": ("sessions", "tn"),
               "4": ("rules", "ka"), "5": ("matrix", "bi")}
    async with app.run_test(size=SIZE) as pilot:
        await fed_app_started(pilot, app)
        tables = [tbl(app, v) for v in DEFAULT_SORT]
        before = [(t.sort_column, t.sort_reverse) for t in tables]
        for view_key, (view, letters) in foreign.items():
            await pilot.press(view_key)
            await pilot.press(*letters)
            assert active(app) == view
            assert [(t.sort_column, t.sort_reverse) for t in tables] == before, \
                f"a sort key of another view changed a sort on {view}"
        assert app.is_running
        # the keys of the view itself still work afterwards
        await pilot.press("4", "n")
        assert (tbl(app, "rules").sort_column, tbl(app, "rules").sort_reverse) == ("name", True)


# -- the cursor ------------------------------------------------------------------------


async def test_cursor_stays_on_its_flow_when_rows_resort() -> None:
    src = SyntheticSource(rate=0, seed=1)
    app = TopApp(src, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        sessions = await src.sessions()
        app.model.on_sessions(sessions, now=0.0)
        app.render_model()
        table = tbl(app, "flows")
        await started(pilot, rows=20)
        await pilot.press(*["down"] * 5)
        assert table.cursor_row == 5
        key = table.cursor_key()
        flow = app.model.flows[key]

        def of_flow(s: dict) -> bool:
            return (endpoint_label(s["src"]), endpoint_label(s["dst"]), s["protocol"],
                    s["dst"]["port"]) == (endpoint_label(flow.src), endpoint_label(flow.dst),
                                          flow.protocol, flow.port)

        # the flow under the cursor jumps to the top...
        for s in sessions:
            if of_flow(s):
                s["packets"] = {"orig": 10**9, "reply": 0}
        app.model.on_sessions(sessions, now=1.0)
        app.render_model()
        await pilot.pause(0.05)
        assert table.cursor_key() == key
        assert table.cursor_row == 0, "the flow did not move up, or the cursor not with it"
        top = table.get_row_at(0)
        assert (top[0].text, top[1].text, top[3].text) == \
            (ep_text(flow.src, port=False), ep_text(flow.dst, port=False), str(flow.port))

        # ...and then to the bottom
        for s in sessions:
            if of_flow(s):
                s["packets"] = {"orig": 0, "reply": 0}
        app.model.on_sessions(sessions, now=2.0)
        app.render_model()
        await pilot.pause(0.05)
        assert table.cursor_key() == key
        assert table.cursor_row == table.row_count - 1

        # sorting by another column keeps it too
        await pilot.press("n")
        assert table.cursor_key() == key


# -- pause -----------------------------------------------------------------------------


async def test_pause_freezes_the_screen_and_resumes() -> None:
    app = make_app(rate=RATE, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await fed_app_started(pilot, app)
        await started(pilot)
        table = tbl(app, "flows")
        assert "PAUSED" not in screen_text(app)
        await pilot.press("p")
        assert app.paused
        assert "PAUSED" in top_lines(app)
        frozen = contents(table)
        # the next poll changes every flow's packets and rates
        sessions = await app.source.sessions()
        for i, s in enumerate(sessions):
            s["packets"]["orig"] += 1000 * (i % 5)
        app.model.on_sessions(sessions, now=2.0)
        await pilot.pause(0.3)  # a render tick or more
        assert contents(table) == frozen
        assert "PAUSED" in top_lines(app)

        await pilot.press("p")
        assert not app.paused
        assert "PAUSED" not in top_lines(app)
        await until(pilot, lambda: contents(table) != frozen, timeout=1.0,
                    what="the table to catch up")  # by the next refresh


# -- the filter ------------------------------------------------------------------------


def assert_newest(app: TopApp, pred: Callable[[dict], bool]) -> list[str]:
    """The verdicts table shows the newest events of the tail that pass pred, oldest
    first (how many is the app's business, none is not); returns their verdicts."""
    table = tbl(app, "verdicts")
    shown = [(src.text, dst.text, v.text) for src, dst, v in
             zip(column(table, "src"), column(table, "dst"), column(table, "verdict"),
                 strict=True)]
    assert shown, "no rows"
    passing = [(ep_text(e["src"]), ep_text(e["dst"]), e["verdict"])
               for e in app.model.tail_events() if pred(e)]
    assert shown == passing[-len(shown):]
    return [v for _, _, v in shown]


async def verdicts_started(pilot) -> None:
    app = pilot.app
    await until(pilot, lambda: app.model.events_seen >= BURST, what="the burst")
    await pilot.press("2")
    await started(pilot, "verdicts", rows=1)
    tail = [e["verdict"] for e in app.model.tail_events()]
    assert "denied" in tail and "allowed" in tail  # a filter has something to do


async def test_filter_verdict_denied_on_verdicts_view() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await verdicts_started(pilot)
        box = await apply_filter(pilot, "verdict=denied", typed=True)
        assert not box.has_class("open") and box.disabled
        assert app.filter.text == "verdict=denied"
        assert app.focused is tbl(app, "verdicts")
        assert set(assert_newest(app, lambda e: e["verdict"] == "denied")) == {"denied"}
        assert "filter: verdict=denied" in header(app)


async def test_filter_negation_on_verdicts_view() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await verdicts_started(pilot)
        await apply_filter(pilot, "!verdict=denied", typed=True)
        assert app.filter.text == "!verdict=denied"
        shown = assert_newest(app, lambda e: e["verdict"] != "denied")
        assert "denied" not in shown


async def test_filter_on_flows_rules_and_sessions_views() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        assert len({c.text for c in column(tbl(app, "flows"), "port")}) > 1
        await apply_filter(pilot, "port=22")
        assert {c.text for c in column(tbl(app, "flows"), "port")} == {"22"}
        await pilot.press("4")
        await started(pilot, "rules", rows=1)  # rules know no ports: all shown
        assert tbl(app, "rules").row_count == len(app.source.rules)
        await apply_filter(pilot, "rule=dns")
        assert [c.text for c in column(tbl(app, "rules"), "name")] == ["dns"]
        await pilot.press("3")
        await started(pilot, "sessions", rows=1)
        assert {c.text for c in column(tbl(app, "sessions"), "rule")} == {"dns"}


async def test_invalid_filter_keeps_the_old_one_and_says_why() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await verdicts_started(pilot)
        await apply_filter(pilot, "verdict=denied")
        box = await apply_filter(pilot, "verdict=ok")
        assert box.has_class("open"), "the box closed on an invalid filter"
        assert "verdict 'ok'" in str(box.border_title)
        assert app.filter.text == "verdict=denied"
        assert set(assert_newest(app, lambda e: e["verdict"] == "denied")) == {"denied"}
        # fixing the text applies it and clears the error
        await pilot.press("end", "backspace", "backspace", *"audit", "enter")
        await pilot.pause(0.05)
        assert not box.has_class("open")
        assert not box.border_title
        assert app.filter.text == "verdict=audit"
        assert set(assert_newest(app, lambda e: e["verdict"] == "audit")) == {"audit"}


async def test_invalid_filter_then_escape() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await verdicts_started(pilot)
        box = await apply_filter(pilot, "bogus=1")
        assert "unknown key 'bogus'" in str(box.border_title)
        assert box.has_class("open")
        await pilot.press("escape")
        assert not box.has_class("open") and box.disabled
        assert app.filter.empty
        assert app.focused is tbl(app, "verdicts")


async def test_escape_closes_the_filter_without_applying() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await verdicts_started(pilot)
        before = contents(tbl(app, "verdicts"))
        box = await open_filter(pilot)
        box.value = "verdict=denied"
        await pilot.press("escape")
        assert not box.has_class("open") and box.disabled
        assert app.focused is tbl(app, "verdicts")
        assert app.filter.empty
        await pilot.pause(0.3)  # a render tick
        assert contents(tbl(app, "verdicts")) == before
        assert "filter:" not in header(app)


async def test_reopening_prefills_the_last_filter_and_empty_clears() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await verdicts_started(pilot)
        box = await open_filter(pilot)
        assert box.value == "", "the '/' that opened the box landed in it"
        box.value = "verdict=denied"
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert app.filter.text == "verdict=denied"
        box = await open_filter(pilot)
        assert box.value == "verdict=denied"
        await pilot.press("escape")
        # empty clears
        await apply_filter(pilot, "")
        assert app.filter.empty
        assert "filter:" not in header(app)
        assert_newest(app, lambda e: True)
        # and the last filter is still offered
        box = await open_filter(pilot)
        assert box.value == "verdict=denied"


async def test_keys_typed_into_the_filter_go_into_the_box() -> None:
    app = make_app(rate=RATE)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        table = tbl(app, "flows")
        box = await open_filter(pilot)
        await pilot.press("q", "p", "1", "2", "k", "n", "question_mark")
        assert box.value == "qp12kn?"
        assert app.is_running
        assert not app.paused
        assert active(app) == "flows"
        assert (table.sort_column, table.sort_reverse) == ("packets", True)
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        # closed: the same keys act on the app again
        await pilot.press("p")
        assert app.paused


# -- drilling in ----------------------------------------------------------------------


async def test_enter_on_a_flow_shows_its_events_only() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        await until(pilot, lambda: len(app.model.recent) >= 500, what="events")
        app.paused = True  # rows stay where they are while we pick one
        table = tbl(app, "flows")
        for row in range(table.row_count):  # the first flow with recent events
            table.move_cursor(row=row)
            flow = app.model.flows[table.cursor_key()]
            if app.model.events_of_flow(flow):
                break
        expected = app.model.events_of_flow(flow)
        assert len(expected) < len(app.model.recent)  # there is something to leave out

        await pilot.press("enter")
        assert isinstance(app.screen, DrillScreen)
        drill = app.screen
        src, dst = endpoint_label(flow.src), endpoint_label(flow.dst)
        assert f"flow {src} → {dst} {flow.protocol}/{flow.port}" in drill.title_text
        drill_table = drill.query_one("#drill-table", SyncedTable)
        assert drill_table.row_count == len(drill.rows) > 0
        for i in range(drill_table.row_count):
            cells = drill_table.get_row_at(i)
            s, d = cells[3].text, cells[4].text
            assert s.endswith(f"({src})"), s
            assert d.endswith(f":{flow.port} ({dst})"), d
        for e in drill.rows:
            assert e["protocol"] == flow.protocol
            assert (e["src"]["workload"], e["dst"]["workload"], e["dst"]["port"]) == \
                (src, dst, flow.port)
        assert "no recent events" not in screen_text(app)

        await pilot.press("escape")
        assert not isinstance(app.screen, DrillScreen)
        assert app.focused is table


async def drill_into_rule(pilot, app: TopApp, name: str, *, events: bool = True) -> SyncedTable:
    """On the Rules view, Enter on rule `name`: the drill table."""
    if app.query_one(TabbedContent).active != "rules":
        await pilot.press("4")
        await started(pilot, "rules", rows=6)
    if events:
        await until(pilot, lambda: len(app.model.recent) >= 500, what="events")
    table = tbl(app, "rules")
    table.move_cursor(row=row_index(table, "name", name))
    await pilot.press("enter")
    assert isinstance(app.screen, DrillScreen)
    return app.screen.query_one("#drill-table", SyncedTable)


async def test_enter_on_a_rule_shows_its_events_only() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        drill_table = await drill_into_rule(pilot, app, "no-ssh")
        drill = app.screen
        assert drill.title_text == "rule no-ssh"
        assert drill_table.row_count == len(drill.rows) > 0
        assert {c.text for c in column(drill_table, "rule")} == {"no-ssh"}
        assert {c.text for c in column(drill_table, "what")} == {"denied"}
        assert "rule no-ssh" in screen_text(app)
        await pilot.press("escape")
        assert not isinstance(app.screen, DrillScreen)


async def test_enter_on_a_rule_never_hit_says_so() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        drill_table = await drill_into_rule(pilot, app, "legacy", events=False)
        assert drill_table.row_count == 0
        assert "rule legacy — no recent events" in screen_text(app)
        await pilot.press("q")  # q closes the drill screen, not the app
        assert not isinstance(app.screen, DrillScreen)
        assert app.is_running


async def test_a_second_drill_shows_its_own_events_not_the_first() -> None:
    # One DrillScreen serves every drill: nothing of the last one may stay.
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        drill_table = await drill_into_rule(pilot, app, "no-ssh")
        drill_table.move_cursor(row=drill_table.row_count - 1)
        assert drill_table.row_count > 0
        await pilot.press("escape")
        assert await drill_into_rule(pilot, app, "legacy", events=False) is drill_table
        assert app.screen.title_text == "rule legacy"
        assert drill_table.row_count == 0 and drill_table.cursor_row == 0
        assert "rule legacy — no recent events" in screen_text(app)
        await pilot.press("escape")


async def test_key_hints_follow_the_view() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)

        def hints() -> str:
            return str(app.query_one("#keys", Static).render())

        assert "k packets  b bytes  t pkts/s  n sessions" in hints()
        assert "Enter drill in" in hints()
        await pilot.press("3")
        assert "a age  i idle  k packets  b bytes" in hints()
        assert "Enter" not in hints()
        await pilot.press("5")
        assert "sort" not in hints()
        assert hints().startswith("q quit  ? help  / filter  p pause  1-5 views")


def live_objects() -> int:
    """Objects alive, as gc counts them after a full collection. Left out:
    what caches hold (Textual's and Rich's caches are emptied first: each
    fills up to its bound, which is no leak) and the pilot's own timeouts
    (cancelled, they wait in the event loop's heap until due). The app's
    frozen start-up objects are counted again (gc.get_objects skips them)."""
    gc.unfreeze()
    for o in gc.get_objects():
        if isinstance(o, functools._lru_cache_wrapper) and \
                o.__module__.startswith(("textual", "rich", "microseg")):
            o.cache_clear()
        elif isinstance(o, FIFOCache | LRUCache):
            o.clear()
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if not isinstance(o, asyncio.TimerHandle | contextvars.Context))


async def test_keys_leave_no_objects_behind() -> None:
    """Every key, over and over: once warmed up, a round of keys leaves no
    more live objects than it found.

    Textual's Footer kept ~1,000 objects per focus change alive for good, and
    every new modal screen pinned its render caches; either grew the heap by
    thousands of objects per round of keys here (and full garbage
    collections, which a key waits behind, with it). One object kept per key
    would be len(KEYS) a round."""
    keys = ["1", "2", "3", "4", "5", "1", "k", "question_mark", "escape", "slash", "escape",
            "enter", "escape", "4", "enter", "escape", "p", "p"]
    app = make_app(poll=False)  # no new data: the keys are all that happens
    async with app.run_test(size=SIZE) as pilot:
        await fed_app_started(pilot, app)
        await started(pilot)
        # The app freezes its start-up objects once; measure after that.
        await until(pilot, lambda: gc.get_freeze_count() > 0, what="the start-up freeze")

        async def round_of_keys() -> None:
            for key in keys:
                await pilot.press(key)

        for _ in range(2):  # what lives as long as the app is made on first use
            await round_of_keys()
        counts = [live_objects()]
        for _ in range(5):
            await round_of_keys()
            counts.append(live_objects())
        growth = [b - a for a, b in itertools.pairwise(counts)]
        assert statistics.median(growth) < len(keys) / 2, \
            f"live objects grew by {growth} in rounds of {len(keys)} keys"


# -- help, quit -------------------------------------------------------------------------


async def test_help_opens_and_escape_closes() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        assert "live view of the microseg daemon" not in screen_text(app)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.pause(0.3)  # a render tick under the modal
        text = screen_text(app)
        assert "live view of the microseg daemon" in text
        assert "Rules: h hits, t hits/s, n name" in text
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        assert "live view of the microseg daemon" not in screen_text(app)
        assert app.is_running


async def test_q_quits() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        assert app.is_running
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running, timeout=3, what="the app to exit")
    assert not app.is_running
    assert app.return_value is None


# -- q and Escape in what opens over the views --------------------------------------------
# A terminal delivers Escape followed within Textual's escape delay (0.1 s) by
# a key as one `alt+KEY` event: what it also sends for Alt+KEY. A fast typist's
# Escape then `p` must close what is open and pause; a `q` after it must quit.


def post_keys(app: TopApp, *keys: tuple[str, str | None]) -> None:
    """(key, character) events into the app back to back, as a terminal
    delivers them: the pilot waits for the app to go idle after each key."""
    for key, char in keys:
        app.post_message(events.Key(key, char))


async def open_over_the_views(pilot, what: str) -> None:
    """Open the help, a flow's drill-in, or the filter box (some text typed in)."""
    app = pilot.app
    await started(pilot)
    if what == "help":
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
    elif what == "drill":
        await pilot.press("enter")
        assert isinstance(app.screen, DrillScreen)
    else:
        box = await open_filter(pilot)
        await pilot.press(*"port=22")
        assert box.value == "port=22"


def nothing_open(app: TopApp) -> bool:
    return not isinstance(app.screen, (HelpScreen, DrillScreen)) and \
        not app.query_one("#filter", Input).has_class("open")


async def quits(pilot) -> None:
    await pilot.press("q")
    await until(pilot, lambda: not pilot.app.is_running, timeout=3, what="the app to exit")


@pytest.mark.parametrize("what", ["help", "drill", "filter"])
@pytest.mark.parametrize("glued", [[("alt+p", "p")], [("escape", "\x1b"), ("p", "p")]],
                         ids=["as-alt-p", "back-to-back"])
async def test_escape_then_p_at_once_closes_pauses_and_q_quits(
        what: str, glued: list[tuple[str, str]]) -> None:
    app = make_app(rate=RATE)
    async with app.run_test(size=SIZE) as pilot:
        await open_over_the_views(pilot, what)
        post_keys(app, *glued)
        await until(pilot, lambda: nothing_open(app) and app.paused, timeout=3,
                    what=f"the {what} to close and the screen to pause")
        assert app.filter.empty, "Escape applied the filter"
        await quits(pilot)


@pytest.mark.parametrize("what", ["help", "drill"])
async def test_q_closes_help_and_drill_in_then_quits(what: str) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_over_the_views(pilot, what)
        await pilot.press("q")
        assert nothing_open(app) and app.is_running
        assert app.focused is tbl(app, "flows")
        await quits(pilot)


async def test_q_closes_the_filter_when_not_typing_in_it() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await open_over_the_views(pilot, "filter")
        await pilot.click("#flows-table")  # the box stays open, the table has the keys
        assert app.focused is tbl(app, "flows")
        await pilot.press("q")
        assert nothing_open(app) and app.is_running
        assert app.filter.empty
        await quits(pilot)


# -- connection state -------------------------------------------------------------------


async def test_disconnected_then_reconnected() -> None:
    app = make_app(rate=RATE)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "● connected" in header(app), what="connected")
        app.source.fail = True
        await until(pilot, lambda: "disconnected" in header(app), timeout=10,
                    what="disconnected")
        text = header(app)
        assert "disconnected — retrying" in text
        assert "daemon not reachable" in text
        assert "● connected" not in text
        app.source.fail = False
        await until(pilot, lambda: "● connected" in header(app), timeout=4,
                    what="reconnected")
        assert "disconnected" not in header(app)


# -- the layout ---------------------------------------------------------------------------


async def test_header_stays_on_screen_after_the_filter_closes() -> None:
    app = make_app(poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await fed_app_started(pilot, app)
        await started(pilot, rows=60)
        assert top_lines(app).startswith(" microseg top synthetic")
        await open_filter(pilot)
        await pilot.press("escape")  # focuses the table again
        await pilot.pause(0.1)
        assert top_lines(app).startswith(" microseg top synthetic")


async def test_verdicts_view_follows_the_newest_verdict() -> None:
    app = make_app(rate=1000)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        table = tbl(app, "verdicts")
        # a stream: more verdicts than the table shows at once (at this rate a
        # refresh keeps a screenful and a few more: never the whole scrollback)
        await until(pilot, lambda: table.row_count > table.size.height > 0, timeout=10,
                    what="verdicts")
        app.paused = True
        assert table.cursor_row == table.row_count - 1  # the cursor follows the tail...
        newest = column(table, "src")[-1].text  # the ports are unique in the stream
        assert newest in screen_text(app)  # ...and so does the screen


# -- regressions ---------------------------------------------------------------------------


async def test_cursor_moved_to_the_last_row_as_rows_arrive_is_on_screen() -> None:
    app = make_app(poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await fed_app_started(pilot, app)  # 127 flows in the table, laid out or not
        table = tbl(app, "flows")
        table.move_cursor(row=table.row_count - 1)  # as End does
        await pilot.pause(0.1)
        assert table.cursor_row == table.row_count - 1
        f = app.model.flows[table.cursor_key()]
        line = re.compile(rf"{re.escape(ep_text(f.src, port=False))}\s+"
                          rf"{re.escape(ep_text(f.dst, port=False))}\s+"
                          rf"{f.protocol}\s+{f.port}\b")
        assert line.search(screen_text(app)), "the row under the cursor is not on screen"


async def test_verdicts_after_a_burst_fill_the_screen() -> None:
    app = make_app(poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.events_seen == BURST, what="the burst")
        await pilot.press("2")
        await pilot.pause(0.3)
        # 40 lines: header 3, sparklines 3, tabs 2, column titles 1, footer 1
        assert tbl(app, "verdicts").row_count >= 40 - 10


async def test_verdicts_stay_in_order_after_another_view() -> None:
    # Back on Verdicts after a while away: first a screenful of the newest,
    # then the scrollback fills in — above them, in order, never after them.
    app = make_app(rate=40)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: tbl(app, "verdicts").row_count > 0, what="verdicts")
        await pilot.press("5")
        away = app.model.events_seen  # then more events than the screen has rows
        await until(pilot, lambda: app.model.events_seen > away + 2 * SIZE[1], timeout=10,
                    what="events")
        await pilot.press("2")
        table = tbl(app, "verdicts")
        await until(pilot, lambda: table.row_count > SIZE[1], timeout=10,
                    what="the scrollback to come back")
        app.paused = True
        port = re.compile(r":(\d+) ")
        shown = [int(port.search(c.text)[1]) for c in column(table, "src")]
        tail = [e["src"]["port"] for e in app.model.tail_events()]
        start = tail.index(shown[0])
        assert tail[start:start + len(shown)] == shown
