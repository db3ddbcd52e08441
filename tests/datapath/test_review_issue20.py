"""Review of issue 20's start work, on the kernel: pinned programs reused
on a restart stay what their pin's name says (docs/how-it-works.md "Start
and restart")."""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from microseg.kernel import loader
from microseg.kernel.datapath import Datapath, DatapathConfig


@pytest.fixture
def pin_dir() -> Iterator[str]:
    path = f"/sys/fs/bpf/microseg-test-{uuid.uuid4().hex[:8]}"
    yield path
    if os.path.isdir(path):
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)


def test_l3_programs_after_a_reuse_are_made_of_the_loaded_source(
        pin_dir: str, tmp_path: Path) -> None:
    """A daemon that reused pinned programs compiles its L3 entry points
    when a link first needs them: from the source its programs were made
    of (the identity they are pinned under), not from what is on disk by
    then (a package upgrade while it runs)."""
    src = tmp_path / "bpf"
    shutil.copytree(loader.bpf_source_dir(), src)
    cfg = dataclasses.replace(DatapathConfig(pin_dir=pin_dir, session_capacity=4096,
                                             ringbuf_bytes=1 << 16),
                              source=src / loader.ENTRY)
    dp = Datapath(cfg)
    dp.load()
    dp.close()
    dp = Datapath(cfg)
    try:
        report = dp.load()
        assert report.reused_programs
        # The source changes on disk while the daemon runs.
        with open(src / loader.ENTRY, "a") as f:
            f.write('\n#error "the source changed after the load"\n')
        ingress, egress = dp.l3_programs()
        assert ingress >= 0 and egress >= 0
        # Pinned under the identity of the source they were made of.
        names = {os.path.basename(p) for p in loader.program_pins(pin_dir)}
        assert f"{loader.PROG_PIN_PREFIX}{report.identity}_{loader.PROG_INGRESS_L3}" in names
    finally:
        dp.close()
        dp.unpin()
