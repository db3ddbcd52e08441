"""Shared fixtures. Datapath and end-to-end tests need root (BPF, tc,
network namespaces); `make test` runs as root, as CI does. Every test under
tests/datapath/ and tests/e2e/ carries the `root` marker (their conftests add
it), so `-m "not root"` leaves them out and a run as another user skips them."""

from __future__ import annotations

import os

import pytest


# Last: after the conftests below have marked their tests.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: run `make test` as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
