"""The kernel's BPF run-time statistics, sampled.

While run-time statistics are on, the kernel times every run of every BPF
program: two clock reads and a per-CPU counter update around each run. On
a request/response exchange that is a measurable part of the datapath's
cost (+0.3 µs of +1.1 µs: docs/performance.md, "Real traffic"), so the
daemon turns them on for a short window now and then — a sample — instead
of for its whole run. What the counters then hold (runs, run time)
covers the packets seen inside the windows; their ratio is the time per
packet, averaged over the samples (docs/metrics.md).

`microseg run --run-time-stats`:
- WINDOW/PERIOD (default 1/15): on for WINDOW seconds at start and then
  every PERIOD seconds — a Prometheus rate() over a minute spans several
  windows;
- "on": for the whole run (the kernel's figures for every packet);
- "off": never (the counters stay at zero; `stats` shows no ns/packet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time

from microseg.kernel import bpfsys

log = logging.getLogger("microseg")

DEFAULT = "1/15"


def parse_mode(text: str) -> tuple[str, float, float]:
    """"on", "off" or "WINDOW/PERIOD" (seconds) -> (mode, window_s, period_s)."""
    if text in ("on", "off"):
        return text, 0.0, 0.0
    try:
        w, p = (float(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--run-time-stats {text!r}: 'on', 'off' or WINDOW/PERIOD in "
                         "seconds (e.g. 1/15)") from None
    if not (0 < w < p and math.isfinite(p)):
        raise ValueError(f"--run-time-stats {text!r}: 0 < WINDOW < PERIOD")
    return "sampled", w, p


class RunTimeStats:
    """Holds the kernel's BPF_ENABLE_STATS fd while a window is open."""

    def __init__(self, spec: str = DEFAULT) -> None:
        self.mode, self.window_s, self.period_s = parse_mode(spec)
        self.fd = -1
        self.windows = 0  # windows opened
        self.sampled_ns = 0  # time the statistics were on, closed windows
        self._opened_ns = 0
        self.unavailable = False

    @property
    def enabled(self) -> bool:
        return self.fd >= 0

    def sampled_s(self) -> float:
        """Seconds the statistics have been on, the open window included."""
        open_ns = time.monotonic_ns() - self._opened_ns if self.enabled else 0
        return (self.sampled_ns + open_ns) / 1e9

    def open(self) -> bool:
        if self.enabled or self.unavailable:
            return self.enabled
        try:
            self.fd = bpfsys.enable_run_time_stats()
        except OSError as e:
            log.warning("kernel BPF run-time stats unavailable: %s", e)
            self.unavailable = True
            return False
        self._opened_ns = time.monotonic_ns()
        self.windows += 1
        return True

    def close(self) -> None:
        if self.enabled:
            os.close(self.fd)
            self.fd = -1
            self.sampled_ns += time.monotonic_ns() - self._opened_ns

    async def run(self) -> None:
        """The windows, until cancelled (then closed)."""
        if self.mode == "off":
            return
        try:
            if self.mode == "on":
                self.open()
                await asyncio.Event().wait()
            while True:
                self.open()
                await asyncio.sleep(self.window_s)
                self.close()
                await asyncio.sleep(max(0.0, self.period_s - self.window_s))
        finally:
            with contextlib.suppress(OSError):
                self.close()

    def describe(self) -> dict:
        return {"mode": self.mode, "window_s": self.window_s, "period_s": self.period_s,
                "enabled": self.enabled, "windows": self.windows,
                "sampled_s": round(self.sampled_s(), 3)}
