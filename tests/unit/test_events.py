"""The event hub: numbering, recent history, bounded subscriber queues that
drop the oldest and report the gap exactly, and NDJSON serialisation."""

from __future__ import annotations

import asyncio

import orjson
from hypothesis import given
from hypothesis import strategies as st

from microseg.flow.hub import EventHub, ndjson


def test_seq_time_and_history() -> None:
    hub = EventHub(history=3, clock=lambda: 1_700_000_000_123_456_789)
    for i in range(5):
        hub.publish({"type": "policy", "n": i})
    assert [e["seq"] for e in hub.recent] == [3, 4, 5]
    e = hub.recent[-1]
    assert list(e)[:3] == ["time", "seq", "type"]
    assert e["time"] == "2023-11-14T22:13:20.123456Z"
    batch = [{"time": "t", "seq": 0, "type": "verdict"} for _ in range(3)]
    hub.publish_batch(batch)
    assert [e["seq"] for e in batch] == [6, 7, 8] and hub.last_seq == 8
    assert hub.published == {"policy": 5, "verdict": 3}


def test_slow_subscriber_loses_oldest_and_learns_where() -> None:
    async def go() -> None:
        hub = EventHub()
        slow = hub.subscribe(size=4)
        fast = hub.subscribe()
        hub.publish_batch([{"time": "t", "seq": 0, "type": "verdict"} for _ in range(10)])
        got = [await fast.get() for _ in range(10)]
        assert [e["seq"] for e in got] == list(range(1, 11))
        report = await slow.get()
        assert (report["type"], report["count"], report["source"]) == ("lost", 6, "subscriber")
        after = await slow.get()
        assert report["seq"] == 6 and after["seq"] == 7  # the gap is exactly seq 1..6
        assert [e["seq"] for e in [after, *slow.take(10)]] == [7, 8, 9, 10]
        assert slow.lost == 6 and fast.lost == 0

    asyncio.run(go())


def test_filters_and_last() -> None:
    hub = EventHub()
    for t in ("verdict", "session", "verdict"):
        hub.publish({"type": t})
    sub = hub.subscribe(lambda e: e["type"] == "verdict", last=5)
    assert [e["seq"] for e in sub.take(10)] == [1, 3]
    hub.publish({"type": "session"})
    assert sub.get_nowait() is None
    sub.close()
    assert hub.subscribers == 0


@given(st.lists(st.text(), max_size=5))
def test_ndjson_is_one_object_per_line_whatever_the_strings(texts: list[str]) -> None:
    events = [{"time": "t", "seq": i, "type": "policy", "errors": texts,
               "src": {"ip": "},{\"time\":", "workload": t}} for i, t in enumerate(texts or ["x"])]
    lines = ndjson(events).split(b"\n")
    assert lines[-1] == b""
    assert [orjson.loads(x) for x in lines[:-1]] == events
