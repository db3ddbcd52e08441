"""Watch the policy file for changes, whatever way they arrive.

The directory holding the file is watched, not the file: editors that save
by writing a temp file and renaming it over the original, and the atomic
symlink swap of Kubernetes ConfigMap volumes (`..data` -> a new timestamped
directory), both replace directory entries, which a watch on the file's old
inode would miss. Any change in the directory triggers a reload; the
manager compares the content's sha256, so spurious triggers cost one read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

from watchfiles import awatch

log = logging.getLogger("microseg.policy")

# watchfiles batches changes that arrive within `debounce` ms.
DEBOUNCE_MS = 30
STEP_MS = 10


async def watch_policy(path: str, on_change: Callable[[], Awaitable[object]],
                       stop: asyncio.Event) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    while not stop.is_set():
        if not os.path.isdir(directory):
            # Nothing to watch yet: check again shortly.
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                continue
            return
        try:
            async for _changes in awatch(directory, watch_filter=None, stop_event=stop,
                                         debounce=DEBOUNCE_MS,
                                         step=STEP_MS, recursive=False,
                                         rust_timeout=1000, yield_on_timeout=False):
                await on_change()
        except (FileNotFoundError, RuntimeError, OSError) as e:
            # The directory went away (or could not be watched): retry.
            log.warning("policy watch on %s interrupted (%s); retrying", directory, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
