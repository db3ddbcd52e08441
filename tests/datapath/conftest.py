"""The real TC program, compiled once per test session, driven with crafted
packets through BPF_PROG_TEST_RUN. Each test starts from empty sessions,
counters and ring buffer, under the policy it installs. All of them need
root: each carries the `root` marker (tests/conftest.py skips them for others)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from microseg.kernel.datapath import Datapath, DatapathConfig

from .harness import Harness

HERE = Path(__file__).parent


# A conftest's `pytestmark` marks nothing: mark the items themselves, before
# `-m` selects and tests/conftest.py skips by the marker.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="session")
def loaded_datapath():
    dp = Datapath(DatapathConfig(pin_dir=None, session_capacity=65536,
                                 ringbuf_bytes=1 << 22))
    dp.load()
    yield dp
    dp.close()


@pytest.fixture
def dp(loaded_datapath: Datapath) -> Harness:
    h = Harness(loaded_datapath)
    h.reset()
    return h


@pytest.fixture
def pin_dir() -> Iterator[str]:
    """A pin directory of the test's own, removed after it."""
    path = f"/sys/fs/bpf/microseg-test-{uuid.uuid4().hex[:8]}"
    yield path
    if os.path.isdir(path):
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
