"""Link events from the kernel, on the daemon's asyncio loop.

A NETLINK_ROUTE socket subscribed to RTMGRP_LINK becomes readable whenever a
link appears, vanishes or changes; its fd is registered with the loop. The
messages themselves are not parsed: any of them (or an overflow of the
socket's buffer, ENOBUFS) schedules one re-read of the link list, debounced,
which is simpler and cannot miss a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
DEBOUNCE_S = 0.05


class LinkWatcher:
    def __init__(self, on_change: Callable[[], object]) -> None:
        self.on_change = on_change
        self.events = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                          NETLINK_ROUTE)
        s.bind((0, RTMGRP_LINK))
        self._sock, self._loop = s, loop
        loop.add_reader(s.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None and self._loop is not None
        while True:
            try:
                if not self._sock.recv(65536):
                    break
                self.events += 1
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: messages were lost; a resync covers them
                self.events += 1
                break
        if self._pending is None:
            self._pending = self._loop.call_later(DEBOUNCE_S, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self.on_change()

    def stop(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self._pending is not None:
            self._pending.cancel()
