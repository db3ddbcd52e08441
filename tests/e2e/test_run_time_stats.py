"""The kernel's BPF run-time statistics, sampled (docs/metrics.md): the
daemon holds its BPF_ENABLE_STATS fd only inside its windows, and the
datapath's run counters advance inside them and stand still outside, while
traffic flows all along."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from microseg.lab.topology import Lab, WorkloadSpec

from .harness import DaemonProcess, LabSpec, wait_until

LAB = LabSpec([WorkloadSpec("client", 10), WorkloadSpec("web", 20)], prefix="msrs",
              subnet4="10.236.0.0/24", subnet6="fd00:236::/64")
POLICY = """\
version: 1
default: deny
workloads:
  client: {addresses: [10.236.0.10]}
  web: {addresses: [10.236.0.20]}
rules:
  - {name: ping, from: any, to: any, protocol: icmp, action: allow}
"""
# Short windows, so that a test sees several of them.
DAEMON_ARGS = ("--run-time-stats", "1/3")


def holds_stats_fd(pid: int) -> bool:
    """The process holds an fd of bpf(BPF_ENABLE_STATS) (an anonymous inode
    named bpf-stats)."""
    fds = f"/proc/{pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{fd}") == "anon_inode:bpf-stats":
                return True
        except FileNotFoundError:
            pass
    return False


@pytest.fixture(scope="module")
def pinging(lab: Lab) -> Iterator[None]:
    """Packets through both hooks all along: ping every 10 ms."""
    p = lab.spawn("client", ["ping", "-q", "-i", "0.01", lab.ipv4("web")],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield
    p.terminate()
    p.wait()


def sampling(d: DaemonProcess) -> dict:
    return d.api("GET", "/v1/stats")["datapath"]


def test_the_stats_fd_is_held_only_inside_a_window(daemon: DaemonProcess,
                                                   pinging: None) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    first = sampling(daemon)["run_time_stats"]
    assert first["mode"] == "sampled" and first["window_s"] == 1 and first["period_s"] == 3
    # Both states come round, and the windows go on opening.
    assert wait_until(lambda: holds_stats_fd(pid), timeout=10) is not None
    assert wait_until(lambda: not holds_stats_fd(pid), timeout=10) is not None
    assert wait_until(lambda: holds_stats_fd(pid), timeout=10) is not None
    assert sampling(daemon)["run_time_stats"]["windows"] > first["windows"]


def test_counters_advance_inside_windows_only(daemon: DaemonProcess, pinging: None) -> None:
    # Three readings within one pause between windows (the same window count,
    # none open): the first says the window had closed before the second was
    # read, so the second and the third counted nothing in between, though
    # packets flowed.
    def still_outside() -> bool:
        s0, s1, s2 = sampling(daemon), sampling(daemon), sampling(daemon)
        rs = [s["run_time_stats"] for s in (s0, s1, s2)]
        if any(r["enabled"] for r in rs) or len({r["windows"] for r in rs}) != 1:
            return False
        assert s2["runs"] == s1["runs"] and s2["run_time_ns"] == s1["run_time_ns"]
        still_outside.seen = s2
        return True

    assert wait_until(still_outside, timeout=20) is not None
    before = still_outside.seen
    # The next window counts the packets it sees, and times them.
    assert wait_until(lambda: sampling(daemon)["run_time_stats"]["windows"]
                      > before["run_time_stats"]["windows"] + 1, timeout=15) is not None
    after = sampling(daemon)
    assert after["runs"] > before["runs"]
    assert after["run_time_ns"] > before["run_time_ns"]
    assert after["avg_ns_per_packet"] > 0
    text = daemon.cli("stats")
    assert text.returncode == 0 and "ns/packet" in text.stdout
    assert "(sampled: 1 s every 3 s)" in text.stdout
