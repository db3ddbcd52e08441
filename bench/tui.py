"""`microseg top` under load: key latency while events stream in.

The app runs headless (Textual's test driver, a 160x50 screen) on the
synthetic source, which hands it NDJSON lines exactly as the daemon streams
them, at a fixed rate. Keys — view switches, sorts, pause, the filter box —
arrive a quarter second apart as a terminal would send them (not through
Pilot.press, which waits for the app to go idle: under a steady stream it
never does, and each press would stall for 2 s); a key's latency runs from
the key event's creation to the end of the first screen refresh after its
action (app.key_latencies). The same sequence runs with no events (the baseline)
and at each rate, side by side.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from microseg.tui.app import TopApp
from microseg.tui.source import SyntheticSource

KEYS = ["1", "k", "b", "2", "3", "a", "4", "h", "5", "1", "t", "p", "p", "slash", "escape",
        "question_mark", "escape"]


async def _run(rate: float, rounds: int) -> dict:
    source = SyntheticSource(rate=rate) if rate else SyntheticSource(rate=0, burst=0)
    app = TopApp(source)
    async with app.run_test(size=(160, 50)):
        await asyncio.sleep(2.0)  # the first polls, a full screen
        app.key_latencies.clear()
        seen0, t0 = app.model.events_seen, time.monotonic()
        for _ in range(rounds):
            for key in KEYS:
                app.simulate_key(key)
                await asyncio.sleep(0.25)
        elapsed = time.monotonic() - t0
        ingested = (app.model.events_seen - seen0) / elapsed
        lat = sorted(app.key_latencies)
    ms = [x * 1000 for x in lat]
    return {"rate": rate, "keys": len(ms), "ingested_per_s": round(ingested),
            "median_ms": round(statistics.median(ms), 1),
            "p95_ms": round(ms[int(len(ms) * 0.95) - 1], 1), "max_ms": round(ms[-1], 1)}


def measure(rates: tuple[float, ...], rounds: int) -> dict:
    return {str(int(r)): asyncio.run(_run(r, rounds)) for r in (0, *rates)}
