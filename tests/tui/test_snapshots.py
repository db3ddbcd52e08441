"""Text snapshots of every `microseg top` screen, from fixed synthetic data.

The screens are compared with tests/tui/snapshots/<name>.txt. After a change
that is meant to alter them, regenerate and review the diff:

    UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/tui/test_snapshots.py

A missing snapshot fails (it is only written with UPDATE_SNAPSHOTS=1).
"""

from __future__ import annotations

import copy
import difflib
import os
import time
from pathlib import Path

import pytest

from microseg.tui.app import DrillScreen, HelpScreen, TopApp
from microseg.tui.screentext import screen_text
from microseg.tui.source import SyntheticSource

SNAPSHOTS = Path(__file__).parent / "snapshots"
SIZE = (120, 34)
UPTIME_S = 3725  # shown as "up 62m"


async def feed(pilot, app: TopApp, src: SyntheticSource) -> None:
    """Two polls of everything, one second apart, with fixed numbers."""
    m = app.model
    deadline = time.monotonic() + 5
    while m.events_seen < src.burst:  # the burst, through the app's own stream
        assert time.monotonic() < deadline, "the burst did not arrive"
        await pilot.pause(0.02)
    st0 = await src.stats()
    st1 = copy.deepcopy(st0)
    for verdict, extra in (("allowed", 1234), ("denied", 87), ("audit", 9), ("dropped", 2)):
        st1["packets"][verdict] += extra
    st1["counters"][0]["packets"] += 345
    st1["events"]["published"]["verdict"] += 1500
    st1["events"]["lost"] = {"ringbuf": 3, "subscriber": 4}
    m.on_stats(st0, now=0.0)
    m.on_stats(st1, now=1.0)
    src.started = time.monotonic() - UPTIME_S  # status reports a fixed uptime
    m.on_status(await src.status())
    pol = await src.policy()
    m.on_policy({**pol, "rules": [{**r, "hits": r["hits"] // 2} for r in pol["rules"]]},
                now=0.0)
    m.on_policy(pol, now=2.0)
    m.on_sessions(await src.sessions(), now=0.0)
    m.on_sessions(await src.sessions(), now=2.0)  # every session +10 packets
    app.render_model()


async def settle(pilot) -> None:
    await pilot.wait_for_scheduled_animations()  # the tabs' underline slides
    await pilot.pause(0.1)


async def show(pilot, name: str) -> None:
    """Bring up the screen the snapshot `name` is of."""
    app = pilot.app
    if name in ("flows", "verdicts", "sessions", "rules", "matrix"):
        await pilot.press(str(1 + ["flows", "verdicts", "sessions", "rules",
                                   "matrix"].index(name)))
        assert app.query_one("#views").active == name
    elif name == "help":  # over the Rules view: its screen is short and stable
        await pilot.press("4")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
    elif name == "drill":  # the busiest rule's recent events
        await pilot.press("4")
        await pilot.press("enter")
        assert isinstance(app.screen, DrillScreen)
        assert app.screen.title_text == "rule client-to-web"
        assert app.screen.rows
    await settle(pilot)


def check(name: str, text: str) -> None:
    path = SNAPSHOTS / f"{name}.txt"
    text = text.rstrip("\n") + "\n"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"no snapshot {path}: run with UPDATE_SNAPSHOTS=1 to write it, "
                    "and review it")
    want = path.read_text(encoding="utf-8")
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(keepends=True),
                                            text.splitlines(keepends=True),
                                            f"snapshots/{name}.txt", "screen"))
        pytest.fail(f"screen differs from snapshots/{name}.txt (UPDATE_SNAPSHOTS=1 "
                    f"rewrites it):\n{diff}")


@pytest.mark.parametrize("name", [
    "flows", "verdicts", "sessions", "rules", "matrix", "help", "drill"])
async def test_snapshot(name: str) -> None:
    src = SyntheticSource(rate=0, burst=300, seed=7)
    app = TopApp(src, poll=False)
    async with app.run_test(size=SIZE) as pilot:
        await feed(pilot, app, src)
        await show(pilot, name)
        first = screen_text(app)
        await pilot.pause(0.3)  # a render tick later: the same screen
        assert screen_text(app) == first
        # what a snapshot must not enshrine
        main = app.screen_stack[0]
        assert main.max_scroll_y == 0, "the screen scrolls, not the table in it"
        if name == "verdicts":
            assert app.query_one("#verdicts-table").row_count >= 20, "a few rows only"
        check(name, first)


def test_missing_snapshot_fails_unless_updating(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(f"{__name__}.SNAPSHOTS", tmp_path)
    monkeypatch.delenv("UPDATE_SNAPSHOTS", raising=False)
    with pytest.raises(pytest.fail.Exception, match="no snapshot"):
        check("nothing", "a screen")
    assert not (tmp_path / "nothing.txt").exists()
    monkeypatch.setenv("UPDATE_SNAPSHOTS", "1")
    check("nothing", "a screen")
    assert (tmp_path / "nothing.txt").read_text() == "a screen\n"
    monkeypatch.delenv("UPDATE_SNAPSHOTS")
    check("nothing", "a screen")
    with pytest.raises(pytest.fail.Exception, match="differs"):
        check("nothing", "another screen")
