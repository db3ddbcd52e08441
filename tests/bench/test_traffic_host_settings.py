"""A traffic run leaves the host's settings as it found them, also when it
fails (docs/performance.md)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from bench import traffic


class _FailingLab:
    def __init__(self, *args, **kw) -> None:
        pass

    def up(self) -> None:
        raise RuntimeError("lab failed")

    def down(self) -> None:
        pass


def test_a_failed_traffic_run_restores_the_run_time_statistics_switch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel.bpf_stats_enabled is host-wide: an operator (or a profiler)
    may have it on; the run turns it on and off for its breakdown and must
    put back what it found, not 0. Every host-wide path is redirected to
    files here: the test changes nothing of the host."""
    stats = tmp_path / "bpf_stats_enabled"
    stats.write_text("1\n")
    bridge = tmp_path / "bridge-nf-call-iptables"
    bridge.write_text("1\n")
    monkeypatch.setattr(traffic, "BPF_STATS_SYSCTL", str(stats))
    monkeypatch.setattr(traffic, "BRIDGE_NF", (str(bridge),))
    monkeypatch.setattr(traffic, "Lab", _FailingLab)
    monkeypatch.setattr(traffic, "shutil", types.SimpleNamespace(
        which=lambda tool: f"/usr/bin/{tool}", rmtree=lambda *a, **k: None))
    monkeypatch.setattr(traffic, "subprocess", types.SimpleNamespace(
        run=lambda *a, **k: None, DEVNULL=None))
    with pytest.raises(RuntimeError, match="lab failed"):
        traffic.measure(1, 0.1, 10)
    assert stats.read_text().strip() == "1"
    assert bridge.read_text().strip() == "1"
