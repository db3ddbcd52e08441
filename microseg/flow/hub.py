"""The event hub: every event of the daemon passes here once.

It stamps each event with the daemon's sequence number, keeps the most
recent ones for ``watch --last``, and hands each event to every subscriber
through that subscriber's own bounded queue. A subscriber that falls behind
loses its oldest queued events — counted, and told with a ``lost`` event
placed exactly at the gap (its `seq` is the last one missed) — and never
slows the hub or anyone else.

Events are plain dicts in the schema of docs/events.md; serialising them is the
consumers' business (the API streams NDJSON, the flow log appends lines).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable

import orjson

Event = dict
Predicate = Callable[[Event], bool]

DEFAULT_HISTORY = 16384
DEFAULT_QUEUE = 8192


def ndjson(events: list[Event]) -> bytes:
    """Events as NDJSON, serialised in one orjson call (several times faster
    than one call per event). Every event's first key is "time", and JSON
    escapes every quote inside a string, so `},{"time":` occurs only
    between two events of the list — never inside one."""
    if not events:
        return b""
    data = orjson.dumps(events)
    return data[1:-1].replace(b'},{"time":', b'}\n{"time":') + b"\n"


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
            # Drop the oldest: the gap then sits right where the reader
            # left off, which is where the `lost` report goes — and a live
            # view keeps the freshest events.
            dropped = self._queue.popleft()
            self.lost += 1
            self._hub.subscriber_lost += 1
            self._lost_pending += 1
            self._last_lost_seq = dropped["seq"]
        self._queue.append(event)
        self._wakeup.set()

    def _offer_many(self, events: list[Event]) -> None:
        if self._predicate is not None:
            events = [e for e in events if self._predicate(e)]
            if not events:
                return
        q = self._queue
        q.extend(events)
        over = len(q) - self._size
        if over > 0:
            # Drop the oldest (see _offer).
            for _ in range(over):
                dropped = q.popleft()
            self.lost += over
            self._hub.subscriber_lost += over
            self._lost_pending += over
            self._last_lost_seq = dropped["seq"]
        self._wakeup.set()

    def take(self, limit: int) -> list[Event]:
        """Up to `limit` queued events at once (a `lost` report first if
        events were dropped): for consumers that work in batches."""
        out: list[Event] = []
        if self._lost_pending:
            first = self.get_nowait()
            assert first is not None
            out.append(first)
        q = self._queue
        n = min(limit - len(out), len(q))
        if n == len(q):
            out.extend(q)
            q.clear()
        else:
            out.extend([q.popleft() for _ in range(n)])
        return out

    def get_nowait(self) -> Event | None:
        """The next event, a `lost` report first if events were dropped."""
        if self._lost_pending:
            n, self._lost_pending = self._lost_pending, 0
            return self._hub.lost_event(n, "subscriber", seq=self._last_lost_seq)
        if self._queue:
            return self._queue.popleft()
        return None

    async def get(self) -> Event:
        """The next event; StopAsyncIteration once closed and empty."""
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
        self.subscriber_lost = 0  # dropped from slow subscribers' queues, all time
        # Told the last seq before anyone sees its event (microseg/journal.py).
        self.on_seq: Callable[[int], None] | None = None
        # Consumers inside the daemon that must see every event (the flow
        # aggregate, the staged changes): called with each batch, in the
        # loop, no queue — they are quick and never fall behind.
        self.observers: list[Callable[[list[Event]], None]] = []

    def continue_after(self, last_seq: int) -> None:
        """Number on from an earlier daemon's last event."""
        self._seq = itertools.count(last_seq + 1)
        self.last_seq = last_seq

    def stamp(self, fields: Event, unix_ns: int | None = None) -> Event:
        """time + seq first, then the event's own fields (stable key order)."""
        seq = next(self._seq)
        self.last_seq = seq
        if self.on_seq is not None:
            self.on_seq(seq)
        return {"time": rfc3339(self._clock() if unix_ns is None else unix_ns), "seq": seq,
                **fields}

    def publish(self, fields: Event, unix_ns: int | None = None) -> Event:
        event = self.stamp(fields, unix_ns)
        self._deliver(event)
        return event

    def publish_batch(self, events: list[Event]) -> None:
        """Events that carry their own `time` (kernel events): number them
        in order and deliver them, one hand-over per subscriber."""
        if not events:
            return
        seq = self._seq
        counts = self.published
        for event in events:
            event["seq"] = next(seq)
            t = event["type"]
            counts[t] = counts.get(t, 0) + 1
        self.last_seq = events[-1]["seq"]
        if self.on_seq is not None:
            self.on_seq(self.last_seq)
        self.recent.extend(events)
        for observe in self.observers:
            observe(events)
        for sub in self._subs:
            sub._offer_many(events)

    def _deliver(self, event: Event) -> None:
        self.recent.append(event)
        t = event["type"]
        self.published[t] = self.published.get(t, 0) + 1
        for observe in self.observers:
            observe([event])
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

    def close(self) -> None:
        """End every subscription (the daemon is stopping): their readers
        get what is queued, then the end of the stream."""
        for sub in list(self._subs):
            sub.close()
