"""Inventory fixtures: the session's private Docker engine (`engine`, in
tests/conftest.py), a clean slate of containers for each test, and `follow`, which
runs a DockerSource on the test's loop and records what it emits.

Every test here carries the `root` marker. When this machine cannot run the
engine or a container (no dockerd, no busybox-static, a kernel without what
containers need), every test is skipped and the reason says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from microseg.inventory.docker import DockerSource
from microseg.inventory.model import Change, DiscoveredWorkload
from microseg.lab.dockerd import Engine

HERE = Path(__file__).parent

Workloads = Mapping[str, DiscoveredWorkload]


# A conftest's `pytestmark` marks nothing: mark the items themselves, before
# `-m` selects and tests/conftest.py skips by the marker.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.root)


@pytest.fixture(autouse=True)
def no_containers(engine: Engine) -> Iterator[None]:
    """Each test starts and ends with no container on the engine."""
    engine.remove_containers()
    yield
    if engine.ping():
        engine.remove_containers()


@dataclass(frozen=True)
class Call:
    at: float  # time.monotonic() when on_change was called
    wall: float  # time.time() then, to compare with the engine's event times
    workloads: dict[str, DiscoveredWorkload]
    changes: tuple[Change, ...]


class Follower:
    """A DockerSource running on the test's loop, and every on_change call."""

    def __init__(self, source: DockerSource) -> None:
        self.source = source
        self.calls: list[Call] = []
        self._called = asyncio.Event()
        self.task = asyncio.create_task(source.run(self.on_change))

    def on_change(self, workloads: Workloads, changes: tuple[Change, ...]) -> None:
        self.calls.append(Call(time.monotonic(), time.time(), dict(workloads), changes))
        self._called.set()

    async def wait_for(self, predicate: Callable[[Workloads], bool], timeout: float = 10.0,
                       after: int = 0) -> Call:
        """The first call from index `after` on whose workloads satisfy the
        predicate, waiting for it as long as `timeout`."""
        deadline = time.monotonic() + timeout
        seen = after
        while True:
            self._called.clear()
            for call in self.calls[seen:]:
                if predicate(call.workloads):
                    return call
            seen = max(seen, len(self.calls))
            left = deadline - time.monotonic()
            if left <= 0:
                last = self.calls[-1].workloads if self.calls else None
                raise AssertionError(f"not within {timeout} s; last emitted: {last}")
            waiter = asyncio.ensure_future(self._called.wait())
            done, _ = await asyncio.wait({waiter, self.task}, timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if self.task in done:
                self.task.result()  # raises what ended the source
                raise AssertionError("the source stopped")


@pytest.fixture
async def follow(engine: Engine) -> AsyncIterator[Callable[..., Follower]]:
    """follow(**options): a DockerSource on the private engine, running."""
    followers: list[Follower] = []

    def start(**options: float) -> Follower:
        follower = Follower(DockerSource(str(engine.sock), **options))
        followers.append(follower)
        return follower

    yield start
    for follower in followers:
        follower.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower.task
