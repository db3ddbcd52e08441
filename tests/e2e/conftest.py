"""End-to-end fixtures: a lab of network namespaces and real daemons on it.

A test module declares what it needs and the fixtures here build it:

    LAB = LabSpec([WorkloadSpec("client", 10), ...], prefix="mst4", ...)
    POLICY = "version: 1 ..."           # what `daemon` starts with
    DAEMON_ARGS = ("--timeout", ...)     # optional: more `microseg run` options

`lab` and `daemon` then serve all of the module's tests. A module that needs
them otherwise (a fresh lab per test, a daemon per test) defines its own
`lab` / `daemon` on `new_lab` and `daemons`. Whatever happens, every daemon is
stopped and checked (exit 0, no pins, no socket, a flow log that matches the
event schema) and every namespace, link and process of a lab is removed.
Every test here carries the `root` marker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from microseg.lab.topology import Lab

from .harness import DaemonProcess, Daemons, LabSpec

HERE = Path(__file__).parent


# A conftest's `pytestmark` marks nothing: mark the items themselves, before
# `-m` selects and tests/conftest.py skips by the marker.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The module's LAB, up for all of its tests."""
    spec: LabSpec = request.module.LAB
    with spec.up() as lab:
        yield lab


@pytest.fixture
def new_lab() -> Iterator[Callable[[LabSpec], Lab]]:
    """new_lab(spec): a lab for this test alone."""
    with contextlib.ExitStack() as labs:
        yield lambda spec: labs.enter_context(spec.up())


# The daemon fixtures depend on the lab fixtures: their daemons stop before
# any lab goes down.

@pytest.fixture
def daemons(new_lab: Callable[[LabSpec], Lab],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    """Daemons for this test: daemons.start(lab, policy, *args)."""
    made = Daemons(lambda: tmp_path_factory.mktemp("daemon"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def module_daemons(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    """Daemons for all of the module's tests."""
    made = Daemons(lambda: tmp_path_factory.mktemp("daemon"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def daemon(request: pytest.FixtureRequest, lab: Lab,
           module_daemons: Daemons) -> DaemonProcess:
    """A daemon on the module's lab with its POLICY (and DAEMON_ARGS)."""
    return module_daemons.start(lab, request.module.POLICY,
                                *getattr(request.module, "DAEMON_ARGS", ()))
