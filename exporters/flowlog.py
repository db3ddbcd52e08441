"""The JSON flow log: every event as one line (docs/events.md), appended to a file
rotated by size (`FILE`, `FILE.1`, … `FILE.N`, oldest last).

It subscribes to the hub like any client, with a large queue; batches are
serialised on the loop and written by one worker thread, so the disk never
blocks the event loop. A write error is logged and counted — and the batch dropped —
but never stops the daemon; the next batch tries again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import time

from microseg.flow.hub import EventHub, Subscription, ndjson

log = logging.getLogger("microseg.flowlog")

BATCH = 8192
QUEUE = 1 << 18
WRITES_IN_FLIGHT = 8  # batches serialised and queued for the writer thread
ERROR_LOG_EVERY_S = 60.0


class FlowLog:
    def __init__(self, path: str, max_bytes: int = 100 << 20, keep: int = 5) -> None:
        if max_bytes < 1024:
            raise ValueError("--flow-log-max-bytes must be at least 1 KiB")
        if keep < 0:
            raise ValueError("--flow-log-keep must be 0 or more")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.lines = 0
        self.bytes = 0
        self.events = 0  # hub events taken (written, or dropped by a write error)
        self.write_errors = 0
        self.rotations = 0
        self._f = None
        self._size = 0
        self._last_error_log = 0.0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flowlog")
        self._sub: Subscription | None = None
        self._task: asyncio.Task | None = None

    # -- the file (worker thread) ------------------------------------------

    def _open(self) -> None:
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        self._f = open(self.path, "ab")  # noqa: SIM115 (kept open between batches)
        self._size = self._f.tell()

    def _rotate(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.keep == 0:
            os.unlink(self.path)
        else:
            for i in range(self.keep - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self.rotations += 1

    def _write(self, data: bytes, n: int) -> None:
        """n events as NDJSON lines, appended (rotating as needed)."""
        done = 0  # events written
        try:
            if self._f is None:
                self._open()
            assert self._f is not None
            if self._size + len(data) <= self.max_bytes:
                # The common case: the whole batch fits the current file.
                self._commit(data, n)
                return
            # Fill the file up to max_bytes (at least one line per file),
            # rotate, go on with the rest of the batch.
            lines = data.splitlines(keepends=True)
            while done < len(lines):
                room = self.max_bytes - self._size
                j, size = done, 0
                while j < len(lines) and (size + len(lines[j]) <= room
                                          or (j == done and self._size == 0)):
                    size += len(lines[j])
                    j += 1
                if j == done:
                    self._rotate()
                    self._open()
                    continue
                self._commit(b"".join(lines[done:j]), j - done)
                done = j
        except OSError as e:
            self.write_errors += 1
            if self._f is not None:
                with contextlib.suppress(OSError):
                    self._f.close()
                self._f = None
            now = time.monotonic()
            if now - self._last_error_log > ERROR_LOG_EVERY_S or self.write_errors == 1:
                self._last_error_log = now
                log.error("flow log write failed (%d so far, %d events of this batch "
                          "dropped): %s", self.write_errors, n - done, e)

    def _commit(self, data: bytes, n: int) -> None:
        assert self._f is not None
        self._f.write(data)
        self._f.flush()
        self._size += len(data)
        self.lines += n
        self.bytes += len(data)

    # -- the consumer (event loop) -----------------------------------------

    def start(self, hub: EventHub) -> None:
        self._sub = hub.subscribe(size=QUEUE)
        self._task = asyncio.create_task(self._run(), name="flowlog")

    async def _run(self) -> None:
        assert self._sub is not None
        writes: collections.deque[concurrent.futures.Future] = collections.deque()
        while True:
            first = await self._sub.get()
            batch = [first, *self._sub.take(BATCH - 1)]
            # Our own `lost` reports (only ever first, from get() and from
            # take()) are not hub events: events + lost accounts for every
            # hub event.
            self.events += len(batch) - sum(e["type"] == "lost" and e["source"] == "subscriber"
                                            for e in batch[:2])
            # Serialised here, on the loop, and handed to the writer thread
            # without waiting for it: the thread only makes the write call
            # (which releases the GIL), so the log keeps pace with the
            # pipeline. At most WRITES_IN_FLIGHT batches wait for the disk;
            # beyond that this task waits, and a disk that stalls shows up
            # as this subscription's counted losses, never as a stalled loop.
            writes.append(self._pool.submit(self._write, ndjson(batch), len(batch)))
            while writes and writes[0].done():
                writes.popleft()
            if len(writes) >= WRITES_IN_FLIGHT:
                await asyncio.wrap_future(writes.popleft())
            else:
                await asyncio.sleep(0)  # a backlog is taken a slice per loop turn

    @property
    def lost(self) -> int:
        """Hub events this log never saw: its queue overflowed."""
        return self._sub.lost if self._sub is not None else 0

    async def stop(self) -> None:
        """Write what is queued, then close."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            rest = []
            while (e := self._sub.get_nowait()) is not None:
                rest.append(e)
            self._sub.close()
            if rest:
                await asyncio.get_running_loop().run_in_executor(self._pool, self._write,
                                                                 ndjson(rest), len(rest))
        # The writer runs in order: this closes after every queued write.
        await asyncio.wrap_future(self._pool.submit(self._close))
        self._pool.shutdown()

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
