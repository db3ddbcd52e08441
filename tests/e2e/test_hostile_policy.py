"""Hostile policy files given to a running daemon (issue 9): a billion-laughs
file, deep nesting, invalid UTF-8, a file over 16 MiB, one of a million
nodes under it, random bytes, a YAML tag, a FIFO and a directory in its
place. After each one the daemon is alive, still runs the same generation
(same sha256), reports the reload rejected with one-line errors, and real
traffic in the lab gets the old verdicts; afterwards a valid policy still
applies, so no reload was left hanging."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

from microseg.lab.topology import Lab, WorkloadSpec
from microseg.policy.parse import MAX_ERRORS, MAX_FILE_BYTES, MAX_MESSAGE

from .harness import DaemonProcess, LabSpec, wait_until

LAB = LabSpec([WorkloadSpec("client", 10), WorkloadSpec("web", 20)], prefix="mst8",
              subnet4="10.211.0.0/24", subnet6="fd00:211::/64", serve={"web": {"tcp": [80, 81]}})
TEMPLATE = """\
version: 1
default: deny
workloads:
  client: {{addresses: [10.211.0.10, "fd00:211::10"]}}
  web: {{addresses: [10.211.0.20, "fd00:211::20"]}}
rules:
  - name: client-to-web
    from: {{workload: client}}
    to: {{workload: web}}
    protocol: tcp
    ports: [{ports}]
    action: allow
"""
POLICY = TEMPLATE.format(ports="80")


def laughs() -> bytes:
    lines = ["x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 12)]
    return ("version: 1\nanchors:\n" + "".join(f"  {x}\n" for x in lines)
            + "rules: *x11\n").encode()


def write(path: Path, data: bytes) -> None:
    """Atomically, as `policy apply` and editors do: the daemon never sees
    half a file."""
    tmp = path.with_name(".hostile.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def make_fifo(path: Path) -> None:
    tmp = path.with_name(".hostile.fifo")
    os.mkfifo(tmp)
    os.replace(tmp, path)


def make_directory(path: Path) -> None:
    tmp = path.with_name(".hostile.dir")
    tmp.mkdir()
    path.unlink(missing_ok=True)
    tmp.rename(path)


# What is put at the policy path, and a piece of the error it must give.
HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "billion-laughs": (lambda p: write(p, laughs()),
                       "rules[1]: aliases (*name) are not allowed"),
    "deep-nesting": (lambda p: write(p, b"version: 1\nrules: " + b"[{a: " * 100_000),
                     "nesting too deep"),
    "invalid-utf8": (lambda p: write(p, POLICY.encode().replace(
        b"default: deny", b"mode: \xff\xfe deny")), ":2:7: not valid UTF-8"),
    "over-16-mib": (lambda p: write(p, b"version: 1\n" + b"#" * (MAX_FILE_BYTES - 11) + b"\n"),
                    f"file is {MAX_FILE_BYTES + 1} bytes, over the 16 MiB limit"),
    "a-million-nodes": (lambda p: write(p, b"version: 1\nrules: ["
                                        + b"1," * (MAX_FILE_BYTES // 2 - 20) + b"1]\n"),
                        "YAML nodes; no policy needs that many"),
    "random-bytes": (lambda p: write(p, random.Random(9).randbytes(64 * 1024)),
                     ":1:2: not valid UTF-8"),
    "python-tag": (lambda p: write(p, TEMPLATE.format(ports="80, 81").replace(
        "action: allow", "action: !!python/object/apply:os.system allow").encode()),
                   "YAML tags (!!python/object/apply:os.system) are not allowed"),
    "too-many-errors": (lambda p: write(p, b"version: 1\nworkloads:\n" + b"".join(
        b"  w%d: {addresses: [bad]}\n" % i for i in range(100_000))),
                        f"more after the first {MAX_ERRORS} not shown"),
    "fifo": (make_fifo, "cannot read: a FIFO, not a regular file"),
    "directory": (make_directory, "cannot read: a directory, not a regular file"),
}


def restore_regular_file(p: Path) -> None:
    """Take away the FIFO or directory a case left at the policy path."""
    if p.is_dir() and not p.is_symlink():
        p.rmdir()
    elif p.exists() and not p.is_file():
        p.unlink()


def can(lab: Lab, port: int) -> bool:
    return lab.probe("client", "tcp", lab.ipv4("web"), port, timeout=0.5)


def rejected_with(daemon: DaemonProcess, failures: int, expected: str) -> bool:
    st = daemon.status()["policy"]
    return st["reload_failures_total"] > failures and \
        any(expected in e for e in st["last_reload"]["errors"])


def peak_rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) // 1024 for x in f if x.startswith("VmHWM:"))


def test_hostile_files_leave_the_running_policy_untouched(daemon: DaemonProcess,
                                                          lab: Lab) -> None:
    """Each hostile file in turn, then a valid one: see the module's docstring."""
    before = daemon.status()["policy"]
    assert before["last_reload"]["result"] == "applied"
    assert can(lab, 80) and not can(lab, 81)
    path = daemon.policy_path
    issue_line = re.compile(rf"^{re.escape(str(path))}:\d+:\d+: \S")
    for name, (make, expected) in HOSTILE.items():
        failures = daemon.status()["policy"]["reload_failures_total"]
        restore_regular_file(path)
        make(path)
        assert wait_until(partial(rejected_with, daemon, failures, expected), timeout=30), \
            (name, daemon.status(), daemon.log()[-3000:])
        assert daemon.proc is not None and daemon.proc.poll() is None, name
        st = daemon.status()["policy"]
        assert (st["generation"], st["sha256"]) == (before["generation"], before["sha256"]), name
        last = st["last_reload"]
        assert last["result"] == "rejected" and last["generation"] == before["generation"]
        assert 1 <= len(last["errors"]) <= MAX_ERRORS + 1, (name, len(last["errors"]))
        for e in last["errors"]:
            assert issue_line.match(e) and "\n" not in e, (name, e)
            assert len(e) <= len(str(path)) + 20 + MAX_MESSAGE, (name, e[:300])
        assert can(lab, 80), name  # the old allow...
        assert not can(lab, 81), name  # ...and the old deny
    # Nothing above grew the daemon by gigabytes (composing 8 million
    # nodes, or a million error lines, would).
    assert peak_rss_mib(daemon.proc.pid) < 1024
    # No reload is stuck (a FIFO once blocked one forever): a valid policy
    # still applies, and enforces.
    restore_regular_file(path)
    write(path, TEMPLATE.format(ports="80, 81").encode())
    assert wait_until(lambda: daemon.generation() > before["generation"], timeout=10), \
        daemon.log()
    assert wait_until(lambda: can(lab, 81)) is not None
