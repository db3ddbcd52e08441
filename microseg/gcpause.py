"""Pause Python's cyclic garbage collector around bulk work.

Parsing a policy, compiling it and sweeping a million sessions allocate
hundreds of thousands of small objects that form no reference cycles;
reference counting frees them. Left on, the cyclic collector rescans those
objects (and the daemon's large long-lived state) many times over: measured,
reloads twice as slow and a 100,000-session sweep 2x slower. Pauses nest and
may overlap across threads: the collector runs again when the last ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = True


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
