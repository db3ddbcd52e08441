"""Shared fixtures. Datapath and end-to-end tests need root (BPF, tc,
network namespaces); `make test` runs as root, as CI does. Every test under
tests/datapath/ and tests/e2e/ carries the `root` marker (their conftests add
it), so `-m "not root"` leaves them out and a run as another user skips them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from microseg.lab.dockerd import IMAGE, NETWORKS, Engine, EngineUnavailable, missing_tools


# Last: after the conftests below have marked their tests.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: run `make test` as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """A private dockerd with IMAGE and NETWORKS, up for the whole session, for
    every test that asks (tests/inventory, tests/e2e/test_discovery.py); never
    the host's own engine."""
    missing = list(missing_tools())
    if missing:
        pytest.skip("the Docker source tests need " + ", ".join(missing))
    made = Engine()
    skip_reason = None
    try:
        try:
            ready = made.start()
            print(f"\nprivate dockerd ready in {ready:.2f} s at {made.sock}")
            made.build_image()
            # Can this kernel run a container at all (namespaces, cgroups, overlay)?
            made.docker("run", "--rm", "--network", "none", IMAGE, "true")
        except (EngineUnavailable, RuntimeError) as e:
            skip_reason = f"this machine cannot run Docker containers: {e}"
        if skip_reason is None:
            for network in NETWORKS:
                made.create_network(*network)
            yield made
    finally:
        problems = made.teardown()
    if skip_reason:
        pytest.skip(skip_reason)
    assert not problems, f"the private engine left things behind: {problems}"
