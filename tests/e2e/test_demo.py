"""`microseg demo` as a newcomer runs it, without a terminal: the summary
shows allowed, denied and audited verdicts from the rules the demo traffic is
built to hit; editing the printed policy file changes verdicts live; and
whatever ends it — the duration, SIGTERM, SIGKILL followed by a second run —
leaves no namespace, link, qdisc, pin or process behind.

The traffic is a random mix: a test that asserts on verdicts waits until each
one it names has come by (the demo runs until SIGTERM), never counts what a
few seconds of it happened to do."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from microseg.control.client import Client, fetch_flows
from microseg.lab import demo as demo_module
from microseg.lab.demo import PIN_DIR, PREFIX, STATE_DIR
from microseg.lab.topology import wait_for

# What the demo traffic is built to produce (microseg/lab/demo.py traffic()).
EXPECTED = {("allowed", "client-to-web"), ("allowed", "web-to-api"), ("allowed", "api-to-db"),
            ("allowed", "dns"), ("allowed", "ping-inside"), ("allowed", "ping6-inside"),
            ("denied", "no-ssh-to-db"), ("denied", "default"), ("audit", "default")}


class Demo:
    """`python -m microseg demo` in a pipe, its output read line by line."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.policy = tmp / "policy.yaml"
        self.socket = str(tmp / "demo.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "microseg", "demo", "--policy", str(self.policy),
             "--socket", self.socket, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def expect(self, pattern: str, timeout: float = 90) -> str:
        """The first further line matching pattern (fails on exit or timeout)."""
        rx = re.compile(pattern)
        while True:
            try:
                line = self._q.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} in {timeout}s:\n" + self.output())
            if line is None:
                pytest.fail(f"demo exited ({self.proc.wait()}) before {pattern!r}:\n"
                            + self.output())
            self.lines.append(line)
            if rx.search(line):
                return line

    def finish(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout=timeout)
        while (line := self._q.get(timeout=5)) is not None:
            self.lines.append(line)
        return rc

    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()


def leftovers() -> list[str]:
    """Everything a demo can leave behind, described; empty when clean."""
    found = []
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"namespace {n.split()[0]}" for n in ns.splitlines() if n.startswith(PREFIX + "-")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {m}" for m in re.findall(rf"^\d+: ({PREFIX}[\w.-]*)[@:]", links, re.M)]
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    found += [f"qdisc {q}" for q in qdiscs.splitlines() if f" dev {PREFIX}" in q]
    if Path(PIN_DIR).exists():
        found.append(f"pins {PIN_DIR}: {sorted(p.name for p in Path(PIN_DIR).iterdir())}")
    # The demo's processes, not those of other tests' labs and daemons.
    procs = subprocess.run(["pgrep", "-af", f"microseg demo|microseg run .*--pin-dir {PIN_DIR}"
                                            "|microseg.lab.traffic mix"],
                           capture_output=True, text=True).stdout
    found += [f"process {p}" for p in procs.splitlines() if "pgrep" not in p]
    if (STATE_DIR / "daemon.pid").exists():
        found.append(f"pidfile {STATE_DIR / 'daemon.pid'}")
    return found


@pytest.fixture
def clean() -> Iterator[None]:
    assert not leftovers(), f"a demo is already running here: {leftovers()}"
    yield
    if leftovers():  # a failed test: tidy up for the next one
        demo_module.Demo(Path("/nonexistent"), None, "off").clear_stale()


def summary_rows(text: str) -> dict[tuple[str, str], int]:
    rows = re.findall(r"^  (allowed|denied|audit)\s+(\S+)\s+([\d,]+)$", text, re.M)
    return {(v, r): int(n.replace(",", "")) for v, r, n in rows}


async def _wait_for_verdicts(sock: str, wanted: set, key: Callable[[dict], object],
                             timeout: float) -> set:
    """Read the demo's verdicts until key(e) has taken every wanted value,
    counting only events the demo's own count (its summary) has had too."""
    async with Client(sock, timeout=30) as c:
        # The daemon's subscribers: its flow log, then the demo's count.
        deadline = time.monotonic() + 30
        while (st := await c.get("/v1/stats"))["events"]["subscribers"] < 2:
            assert time.monotonic() < deadline, "the demo never subscribed to its events"
            await asyncio.sleep(0.1)
        since = st["events"]["last_seq"]

    async def read() -> set:
        seen: set = set()
        async with Client(sock, timeout=None) as c:
            async for e in c.stream("/v1/events", type="verdict"):
                if e["seq"] > since:
                    seen.add(key(e))
                if seen >= wanted:
                    # The demo's count reads the same stream: a second more
                    # and it has these too.
                    await asyncio.sleep(1)
                    return seen
        raise AssertionError("the event stream ended")

    try:
        return await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise AssertionError(f"not all of {wanted} in {timeout} s") from None


def wait_for_verdicts(demo: Demo, wanted: set, key: Callable[[dict], object],
                      timeout: float = 120) -> None:
    asyncio.run(_wait_for_verdicts(demo.socket, wanted, key, timeout))


def test_demo_summary_shows_every_verdict_kind_and_cleans_up(tmp_path: Path, clean) -> None:
    demo = Demo(tmp_path, "--duration", "300")
    try:
        demo.expect(rf"policy: {re.escape(str(demo.policy))}")
        demo.expect(r"running for")
        wait_for_verdicts(demo, EXPECTED, lambda e: (e["verdict"], e["rule"] or "default"))
        demo.proc.send_signal(signal.SIGTERM)
        assert demo.finish() == 0, demo.output()
    finally:
        demo.kill()
    out = demo.output()
    assert re.search(r"microseg demo: \d+ s, [\d,]+ verdicts: allowed [\d,]+, denied [\d,]+, "
                     r"audit [\d,]+", out), out
    seen = summary_rows(out)
    assert set(seen) >= EXPECTED, f"missing {EXPECTED - set(seen)}:\n{out}"
    assert "done: no namespace, link, pin or process left" in out
    assert leftovers() == []
    assert not Path(demo.socket).exists()


async def _verdicts(sock: str, want, timeout: float) -> dict:
    """The first verdict event for which want(e) is true."""
    async with Client(sock, timeout=None) as c:
        async def first() -> dict:
            async for e in c.stream("/v1/events", type="verdict"):
                if want(e):
                    return e
            raise AssertionError("the event stream ended")
        return await asyncio.wait_for(first(), timeout)


def test_editing_the_policy_changes_verdicts_live_then_sigterm_cleans_up(
        tmp_path: Path, clean) -> None:
    demo = Demo(tmp_path, "--duration", "300")
    try:
        demo.expect(r"running for")

        def rogue_to_db(e: dict) -> bool:
            return (e["src"].get("workload") == "rogue" and e["dst"].get("workload") == "db"
                    and e["dst"].get("port") == 5432)

        e = asyncio.run(_verdicts(demo.socket, rogue_to_db, 30))
        assert (e["verdict"], e["rule"]) == ("denied", None), e
        with demo.policy.open("a") as f:  # rules is the file's last section
            f.write("  - name: rogue-may-query\n    from: {workload: rogue}\n"
                    "    to: {workload: db}\n    protocol: tcp\n    ports: [5432]\n"
                    "    action: allow\n")
        e = asyncio.run(_verdicts(demo.socket, lambda e: rogue_to_db(e) and e["verdict"]
                                  == "allowed", 30))
        assert e["rule"] == "rogue-may-query", e
        demo.proc.send_signal(signal.SIGTERM)
        assert demo.finish() == 0, demo.output()
    finally:
        demo.kill()
    assert "done: no namespace, link, pin or process left" in demo.output()
    assert leftovers() == []


def test_a_second_run_after_a_crash_works(tmp_path: Path, clean) -> None:
    crashed = Demo(tmp_path, "--duration", "300")
    try:
        crashed.expect(r"running for")
    finally:
        crashed.proc.send_signal(signal.SIGKILL)  # no clean-up at all
        crashed.kill()
    assert leftovers(), "SIGKILL should have left the lab and the daemon behind"
    demo = Demo(tmp_path, "--duration", "300")
    try:
        demo.expect(r"running for")
        kinds = {"allowed", "denied", "audit"}
        wait_for_verdicts(demo, kinds, lambda e: e["verdict"])
        demo.proc.send_signal(signal.SIGTERM)
        assert demo.finish() == 0, demo.output()
    finally:
        demo.kill()
    seen = summary_rows(demo.output())
    assert {v for v, _ in seen} == kinds, demo.output()
    assert wait_for(lambda: not leftovers(), timeout=5), leftovers()


def test_the_demo_ends_by_itself_after_its_duration(tmp_path: Path, clean) -> None:
    """What it saw in so short a time is random: only that it ends, sums up
    and cleans up is asserted."""
    demo = Demo(tmp_path, "--duration", "3")
    try:
        assert demo.finish() == 0, demo.output()
    finally:
        demo.kill()
    out = demo.output()
    assert re.search(r"running for 3 s", out), out
    assert re.search(r"^microseg demo: \d+ s, [\d,]+ verdicts", out, re.M), out
    assert "done: no namespace, link, pin or process left" in out
    assert leftovers() == []


def test_the_demo_leaves_a_running_daemons_socket_alone(tmp_path: Path, monkeypatch) -> None:
    default = str(tmp_path / "microseg.sock")
    monkeypatch.setattr(demo_module, "DEFAULT_SOCKET", default)
    assert demo_module.demo_socket() == default  # nobody there: the default
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(default)
        live.listen()
        assert demo_module.demo_socket() == str(STATE_DIR / "microseg.sock")


def _cli(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microseg", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "MICROSEG_SOCKET": sock})


def _without_rogue(path: Path) -> None:
    """What the README asks the reader to do with the suggestion: take the
    rogue out — its rules, and its entry in shared `from` lists."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True  # "fd00::1" must stay quoted in a flow list
    doc = yaml.load(path.read_text())
    rogue = {"workload": "rogue"}
    keep = []
    for rule in doc["rules"]:
        sel = rule["from"]
        if isinstance(sel, list):
            sel[:] = [s for s in sel if dict(s) != rogue]
            if sel:
                keep.append(rule)
        elif dict(sel) != rogue:
            keep.append(rule)
    doc["rules"] = keep
    with path.open("w") as f:
        yaml.dump(doc, f)


def test_learn_a_policy_walkthrough(tmp_path: Path, clean) -> None:
    """The README's "learn a policy": the demo in audit mode (`--learn`),
    `policy suggest`, the rogue taken out, `policy stage`, `stage status`
    shows the rogue's flows as would-be denials while nothing is dropped,
    `promote`: the rogue is denied, the shop's own flows allowed."""
    demo = Demo(tmp_path, "--learn", "--duration", "300")
    sock = demo.socket
    try:
        demo.expect(r"audit mode, no rules")
        demo.expect(r"running for")
        # Every flow of the demo's traffic (microseg/lab/demo.py traffic())
        # observed at least once: 15 of them.
        assert wait_for(lambda: _observed(sock) >= 15, timeout=90), _observed(sock)
        suggested = tmp_path / "suggested.yaml"
        r = _cli(sock, "policy", "suggest", "-o", str(suggested))
        assert r.returncode == 0, r.stderr
        assert "rogue" in suggested.read_text()   # it learns what ran, rogue included
        _without_rogue(suggested)
        assert _cli(sock, "policy", "check", str(suggested)).returncode == 0
        r = _cli(sock, "policy", "stage", str(suggested))
        assert r.returncode == 0, r.stderr

        def rogue_would_be_denied() -> bool:
            s = json.loads(_cli(sock, "policy", "stage", "status", "--json").stdout)["staged"]
            return any(c["from"] == "rogue" and c["staged_verdict"] == "denied"
                       and c["verdict"] == "audit" for c in s["changes"])

        assert wait_for(rogue_would_be_denied, timeout=60)
        r = _cli(sock, "policy", "stage", "promote")
        assert r.returncode == 0, r.stderr
        after = json.loads(_cli(sock, "policy", "show", "--json").stdout)
        assert after["mode"] == "enforce" and after["generation"] == 2

        def verdicts_since_promote() -> set:
            r = _cli(sock, "watch", "--json", "--type", "verdict", "--last", "500",
                     "--no-follow")
            return {(e["src"]["workload"], e["verdict"]) for e in map(json.loads,
                    r.stdout.splitlines()) if e["policy_generation"] >= 2}

        want = {("rogue", "denied"), ("client", "allowed"), ("api", "allowed")}
        assert wait_for(lambda: want <= verdicts_since_promote(), timeout=60), \
            verdicts_since_promote()
        assert ("rogue", "allowed") not in verdicts_since_promote()
        demo.proc.send_signal(signal.SIGTERM)
        assert demo.finish() == 0, demo.output()
    finally:
        demo.kill()
    assert wait_for(lambda: not leftovers(), timeout=5), leftovers()


def _observed(sock: str) -> int:
    async def go() -> int:
        async with Client(sock, timeout=30) as c:
            return len(await fetch_flows(c))

    return asyncio.run(go())


def test_two_hosts_share_identities_through_etcd(tmp_path: Path, clean) -> None:
    """`microseg demo --hosts 2`: host a allows api (on host b) to db by the
    labels b published in etcd, and denies b's rogue; then nothing is left:
    no namespace of either host, no etcd, no daemon."""
    from microseg.lab.demo_hosts import PREFIX as HOSTS_PREFIX

    demo = Demo(tmp_path, "--hosts", "2", "--duration", "6")
    try:
        assert demo.finish() == 0, demo.output()
    finally:
        demo.kill()
    out = demo.output()
    assert re.search(r"^  allowed  api-to-db +[1-9]", out, re.M), out
    assert re.search(r"^  allowed  web-to-api +[1-9]", out, re.M), out
    assert re.search(r"^  denied   default +[1-9]", out, re.M), out
    assert "done: no namespace, link, pin or process left" in out
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in ns.splitlines() if n.startswith(HOSTS_PREFIX + "-")], ns
    procs = subprocess.run(["pgrep", "-af", "msetcd-|microseg run .*--node"],
                           capture_output=True, text=True).stdout
    assert not [p for p in procs.splitlines() if "pgrep" not in p], procs
    assert leftovers() == []
