"""The real TC program, compiled once per test session, driven with crafted
packets through BPF_PROG_TEST_RUN. Each test starts from empty sessions,
counters and ring buffer, under the policy it installs."""

from __future__ import annotations

import pytest

from microseg.kernel.datapath import Datapath, DatapathConfig

from .harness import Harness

pytestmark = pytest.mark.root


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
