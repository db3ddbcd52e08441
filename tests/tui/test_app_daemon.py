"""`microseg top` against a real daemon on the lab: Textual's pilot drives
the app while real traffic flows; then the daemon goes away and comes back.
And the real `microseg top` in a real terminal (tmux), keys sent as a
person types them."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microseg.lab.topology import Lab, WorkloadSpec, wait_for
from microseg.tui.app import TopApp
from microseg.tui.screentext import screen_text
from microseg.tui.source import DaemonSource

from ..e2e.harness import DaemonProcess, Daemons, LabSpec

pytestmark = pytest.mark.root  # a lab and a daemon

LAB = LabSpec([WorkloadSpec("client", 10), WorkloadSpec("web", 20), WorkloadSpec("db", 30)],
              prefix="mst7", subnet4="10.209.0.0/24", subnet6="fd00:209::/64",
              serve={"web": {"tcp": [80, 22]}, "db": {"tcp": [5432]}})

POLICY = """\
version: 1
default: deny
workloads:
  client: {addresses: [10.209.0.10, "fd00:209::10"]}
  web: {addresses: [10.209.0.20, "fd00:209::20"]}
  db: {addresses: [10.209.0.30, "fd00:209::30"], mode: audit}
rules:
  - {name: client-to-web, from: {workload: client}, to: {workload: web}, protocol: tcp,
     ports: [80], action: allow}
  - {name: no-ssh, from: any, to: {workload: web}, protocol: tcp, ports: [22], action: deny}
  - {name: unused, from: {workload: db}, to: {workload: client}, protocol: udp, ports: [9],
     action: allow}
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with LAB.up() as lab:
        yield lab


@pytest.fixture
def daemon(lab: Lab, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon per test, stopped and its clean-up checked afterwards."""
    daemons = Daemons(lambda: tmp_path)
    try:
        yield daemons.start(lab, POLICY)
    finally:
        daemons.close()


def traffic(lab: Lab) -> None:
    for _ in range(3):
        assert lab.probe("client", "tcp", lab.ipv4("web"), 80)
    assert not lab.probe("client", "tcp", lab.ipv4("web"), 22, timeout=0.3)
    assert lab.probe("client", "tcp", lab.ipv4("db"), 5432)  # audit mode: passes


async def until(pilot, cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await pilot.pause(0.2)
    return cond()


async def test_live_verdicts_matrix_rules_and_flows(lab: Lab, daemon: DaemonProcess) -> None:
    app = TopApp(DaemonSource(daemon.socket))
    async with app.run_test(size=(150, 40)) as pilot:
        assert await until(pilot, lambda: app.model.header.connected)
        hold = lab.spawn("client", [sys.executable, "-m", "microseg.lab.traffic", "hold", "tcp",
                                    lab.ipv4("web"), "80", "--interval", "0.1"],
                         stdout=subprocess.DEVNULL)
        try:
            await asyncio.to_thread(traffic, lab)
            await pilot.press("2")
            assert await until(pilot, lambda: "no-ssh" in screen_text(app))
            text = screen_text(app)
            assert "denied" in text and "audit" in text and "client-to-web" in text
            assert "10.209.0.10" in text and "(client)" in text and "(web)" in text

            await pilot.press("5")
            assert await until(pilot, lambda: "✗" in screen_text(app))
            rows = {line.split()[0]: line for line in screen_text(app).splitlines()
                    if line.strip().startswith(("client", "web", "db"))}
            assert "✓" in rows["client"] and "✗" in rows["client"] and "!" in rows["client"]

            await pilot.press("4")

            def hits(rule: str) -> int:
                line = next((x for x in screen_text(app).splitlines()
                             if x.strip().startswith(rule)), None)
                return int(line.split()[3]) if line else -1

            # 3 probes and the held connection (the policy is polled every 2 s)
            assert await until(pilot, lambda: hits("client-to-web") >= 4)
            assert hits("no-ssh") >= 1
            unused = next(x for x in screen_text(app).splitlines() if "unused" in x)
            assert "never hit" in unused

            await pilot.press("1")
            # the held connection is a flow with live counters
            assert await until(pilot, lambda: "client-to-web" in screen_text(app), timeout=15)
            await pilot.press("3")
            assert await until(pilot, lambda: "established" in screen_text(app), timeout=15)
            assert "10.209.0.10" in screen_text(app)
            header = screen_text(app).splitlines()[:3]
            assert "connected" in header[0] and "generation 1" in header[2]
        finally:
            hold.kill()


async def test_the_daemon_goes_away_and_comes_back(lab: Lab, daemon: DaemonProcess) -> None:
    app = TopApp(DaemonSource(daemon.socket))
    async with app.run_test(size=(150, 40)) as pilot:
        assert await until(pilot, lambda: app.model.header.connected)
        await asyncio.to_thread(daemon.stop)  # (it drives asyncio itself)
        assert await until(pilot, lambda: "disconnected — retrying" in screen_text(app))
        await asyncio.to_thread(daemon.start)
        assert await until(pilot, lambda: app.model.header.connected, timeout=20)
        assert await until(pilot, lambda: "● connected" in screen_text(app))
        await asyncio.to_thread(traffic, lab)
        await pilot.press("2")
        assert await until(pilot, lambda: "no-ssh" in screen_text(app))


def test_top_without_a_daemon_is_one_line_and_exit_1(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "microseg", "top", "--socket",
                        str(tmp_path / "none.sock")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "daemon not reachable" in r.stderr


# -- the real command in a real terminal -------------------------------------------

class Tmux:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout

    def start(self, command: str, env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        self.run("new-session", "-d", "-s", self.name, "-x", "150", "-y", "42",
                 f"env {exports} {command}; echo EXITED $?; sleep 30")

    def keys(self, *keys: str, pace: float = 0.15) -> None:
        """Keys of one send-keys, back to back; then a person's pace."""
        self.run("send-keys", "-t", self.name, *keys)
        time.sleep(pace)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.name)

    def header(self) -> str:
        return "\n".join(self.screen().splitlines()[:3])

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (make setup)")
def test_microseg_top_in_tmux(lab: Lab, daemon: DaemonProcess) -> None:
    tmux = Tmux(f"mstop{os.getpid()}")
    env = {"MICROSEG_SOCKET": daemon.socket, "TERM": "xterm-256color", "COLUMNS": "150",
           "LINES": "42"}
    tmux.start(f"{sys.executable} -m microseg top", env)
    try:
        assert wait_for(lambda: "connected" in tmux.screen(), timeout=20), tmux.screen()
        traffic(lab)
        tmux.keys("2")
        assert wait_for(lambda: "no-ssh" in tmux.screen(), timeout=10), tmux.screen()
        screen = tmux.screen()
        assert "denied" in screen and "Verdict" in screen
        tmux.keys("5")
        assert wait_for(lambda: "from \\ to" in tmux.screen(), timeout=10), tmux.screen()
        tmux.keys("4")
        assert wait_for(lambda: "never hit" in tmux.screen(), timeout=10), tmux.screen()
        tmux.keys("?")
        assert wait_for(lambda: "live view of the microseg daemon" in tmux.screen(),
                        timeout=10), tmux.screen()
        tmux.keys("Escape")
        assert wait_for(lambda: "live view of the microseg daemon" not in tmux.screen(),
                        timeout=10)
        tmux.keys("p")
        assert wait_for(lambda: "PAUSED" in tmux.screen(), timeout=10), tmux.screen()
        tmux.keys("p")
        assert wait_for(lambda: "PAUSED" not in tmux.screen(), timeout=10)
        tmux.keys("/")
        tmux.keys("-l", "verdict=denied")
        tmux.keys("Enter")
        tmux.keys("2")
        assert wait_for(lambda: "filter: verdict=denied" in tmux.screen(), timeout=10), \
            tmux.screen()
        tmux.keys("q")
        assert wait_for(lambda: "EXITED 0" in tmux.screen(), timeout=10), tmux.screen()
    finally:
        tmux.kill()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (make setup)")
def test_escape_glued_to_a_key_then_q_in_tmux(daemon: DaemonProcess) -> None:
    """Escape then `p` within milliseconds, as a fast typist or Alt+p sends
    them (`send-keys Escape p`; the raw bytes ESC p): whatever was open
    closes, the screen pauses, and the next `q` quits. Keys 0.5 s apart."""
    tmux = Tmux(f"msesc{os.getpid()}")
    env = {"MICROSEG_SOCKET": daemon.socket, "TERM": "xterm-256color", "COLUMNS": "150",
           "LINES": "42"}
    tmux.start(f"{sys.executable} -m microseg top", env)
    help_text = "live view of the microseg daemon"
    try:
        assert wait_for(lambda: "connected" in tmux.header(), timeout=20), tmux.screen()
        for opened, glued in ((["?"], ["Escape", "p"]), (["?"], ["-H", "1b", "70"]),
                              (["/", "-l", "port=22"], ["Escape", "p"])):
            tmux.keys(*opened[:1], pace=0.5)
            if opened[1:]:
                tmux.keys(*opened[1:], pace=0.5)
            if opened[0] == "?":
                assert wait_for(lambda: help_text in tmux.screen(), timeout=10), tmux.screen()
            tmux.keys(*glued, pace=0.5)
            assert wait_for(lambda: "PAUSED" in tmux.header() and help_text not in
                            tmux.screen() and "port=22" not in tmux.screen(), timeout=10), \
                (opened, glued, tmux.screen())
            tmux.keys("p", pace=0.5)
            assert wait_for(lambda: "PAUSED" not in tmux.header(), timeout=10), tmux.screen()
        tmux.keys("?", pace=0.5)
        assert wait_for(lambda: help_text in tmux.screen(), timeout=10), tmux.screen()
        tmux.keys("q", pace=0.5)
        assert wait_for(lambda: help_text not in tmux.screen(), timeout=10), tmux.screen()
        tmux.keys("q", pace=0.5)
        assert wait_for(lambda: "EXITED 0" in tmux.screen(), timeout=5), tmux.screen()
    finally:
        tmux.kill()
