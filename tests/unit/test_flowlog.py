"""The flow log: every event a line, rotation by size, write errors counted
and never fatal."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from microseg.exporters.flowlog import FlowLog
from microseg.flow.hub import EventHub


def events(n: int, start: int = 0) -> list[dict]:
    return [{"time": "2026-01-01T00:00:00.000000Z", "seq": 0, "type": "verdict",
             "n": start + i, "pad": "x" * 100} for i in range(n)]


async def run(log: FlowLog, batches: list[list[dict]]) -> EventHub:
    hub = EventHub()
    log.start(hub)
    for b in batches:
        hub.publish_batch(b)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    await log.stop()
    return hub


def test_every_event_a_line_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "flow.log"
    log = FlowLog(str(path), max_bytes=4096, keep=2)
    asyncio.run(run(log, [events(20), events(100, 20)]))
    files = [path, Path(f"{path}.1"), Path(f"{path}.2")]
    assert all(f.exists() for f in files) and not Path(f"{path}.3").exists()
    assert all(f.stat().st_size <= 4096 for f in files)
    lines = [json.loads(x) for f in reversed(files) for x in f.read_text().splitlines()]
    ns = [e["n"] for e in lines]
    assert ns == sorted(ns) and ns[-1] == 119  # the newest survive, in order
    assert [e["seq"] for e in lines] == sorted(e["seq"] for e in lines)
    assert log.rotations >= 2 and log.write_errors == 0


def test_keep_zero_discards_old_files(tmp_path: Path) -> None:
    path = tmp_path / "flow.log"
    log = FlowLog(str(path), max_bytes=2048, keep=0)
    asyncio.run(run(log, [events(100)]))
    assert path.exists() and not Path(f"{path}.1").exists()


def test_write_errors_are_counted_never_fatal() -> None:
    log = FlowLog("/dev/full", max_bytes=1 << 30)  # every write: ENOSPC
    asyncio.run(run(log, [events(5), events(5)]))
    assert log.write_errors == 2 and log.lines == 0
