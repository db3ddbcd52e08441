"""The event hub: every event of the daemon passes here once.

It stamps each event with the daemon's sequence number, keeps the most
recent ones for ``watch --last``, and hands each event to every subscriber
through that subscriber's own bounded queue. A subscriber that falls behind
loses events — counted, and told with a ``lost`` event — and never slows
the hub or anyone else.

Events are plain dicts in the SPEC §6 schema; serialising them is the
consumers' business (the API streams NDJSON, the flow log appends lines).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable

Event = dict
Predicate = Callable[[Event], bool]

DEFAULT_HISTORY = 16384
DEFAULT_QUEUE = 8192


def rfc3339(unix_ns: int) -> str:
    """RFC 3339 UTC with microseconds, as every event's `time`."""
    t = dt.datetime.fromtimestamp(unix_ns // 1000 / 1e6, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Subscription:
    """One consumer's view of the stream, with its own bounded queue."""

    def __init__(self, hub: EventHub, predicate: Predicate | None, size: int) -> None:
        self._hub = hub
        self._predicate = predicate
        self._queue: deque[Event] = deque()
        self._size = size
        self._wakeup = asyncio.Event()
        self.lost = 0            # events dropped for this subscriber, in total
        self._lost_pending = 0   # not yet reported
        self._last_lost_seq = 0
        self.closed = False

    def _offer(self, event: Event) -> None:
        if self._predicate is not None and not self._predicate(event):
            return
        if len(self._queue) >= self._size:
            self.lost += 1
            self._lost_pending += 1
            self._last_lost_seq = event["seq"]
            return
        self._queue.append(event)
        self._wakeup.set()

    def get_nowait(self) -> Event | None:
        """The next event, a `lost` report first if events were dropped."""
        if self._lost_pending:
            n, self._lost_pending = self._lost_pending, 0
            return self._hub.lost_event(n, "subscriber", seq=self._last_lost_seq)
        if self._queue:
            return self._queue.popleft()
        return None

    async def get(self) -> Event:
        while True:
            e = self.get_nowait()
            if e is not None:
                return e
            if self.closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self.get()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()
        self._hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    def __init__(self, history: int = DEFAULT_HISTORY, *,
                 clock: Callable[[], int] | None = None, first_seq: int = 1) -> None:
        import time

        self._clock = clock or time.time_ns
        self._seq = itertools.count(first_seq)
        self.last_seq = first_seq - 1
        self.recent: deque[Event] = deque(maxlen=history)
        self._subs: list[Subscription] = []
        self.published: dict[str, int] = {}  # events by type, for metrics

    def stamp(self, fields: Event, unix_ns: int | None = None) -> Event:
        """time + seq first, then the event's own fields (stable key order)."""
        seq = next(self._seq)
        self.last_seq = seq
        return {"time": rfc3339(self._clock() if unix_ns is None else unix_ns), "seq": seq,
                **fields}

    def publish(self, fields: Event, unix_ns: int | None = None) -> Event:
        event = self.stamp(fields, unix_ns)
        self._deliver(event)
        return event

    def publish_stamped(self, events: Iterable[Event]) -> None:
        """Events already stamped by stamp(), in order (the pipeline's batch)."""
        for event in events:
            self._deliver(event)

    def _deliver(self, event: Event) -> None:
        self.recent.append(event)
        t = event["type"]
        self.published[t] = self.published.get(t, 0) + 1
        for sub in self._subs:
            sub._offer(event)

    def lost_event(self, count: int, source: str, seq: int | None = None) -> Event:
        """A `lost` event: `count` events this stream will never show."""
        fields = {"type": "lost", "count": count, "source": source}
        if seq is None:
            return self.publish(fields)
        return {"time": rfc3339(self._clock()), "seq": seq, **fields}

    def subscribe(self, predicate: Predicate | None = None, *, size: int = DEFAULT_QUEUE,
                  last: int = 0) -> Subscription:
        """A new subscription; with `last`, it starts with up to that many
        recent events (those matching the predicate)."""
        sub = Subscription(self, predicate, size)
        if last:
            backlog = [e for e in self.recent if predicate is None or predicate(e)]
            for e in backlog[-last:]:
                sub._queue.append(e)
        self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)
