"""The command line as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from microseg import __version__


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microseg", *args], capture_output=True,
                          text=True, timeout=60)


def test_version() -> None:
    r = run("version")
    assert r.returncode == 0 and r.stdout.strip() == f"microseg {__version__}"


def test_unknown_command_is_a_usage_error() -> None:
    r = run("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_policy_check_valid(tmp_path) -> None:
    from .test_policy_parse import GOOD

    f = tmp_path / "p.yaml"
    f.write_text(GOOD)
    r = run("policy", "check", str(f))
    assert r.returncode == 0
    assert r.stdout.strip() == f"{f}: valid (2 workloads, 3 rules, enforce, default deny)"
    assert "warning: rules[1] (clients-to-web).from[1].labels" in r.stderr


def test_policy_check_prints_every_error_with_line_and_column(tmp_path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("version: 1\nmode: strict\nrules:\n"
                 "  - {name: a, from: any, to: {workload: ghost}, action: allow}\n"
                 "  - {name: b, from: any, to: any, ports: [99999], protocol: tcp, "
                 "action: allow}\n")
    r = run("policy", "check", str(f))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"{f}:2:7: mode: 'strict' is not one of enforce | audit",
        f"{f}:4:41: rules[0] (a).to.workload: undefined workload 'ghost'",
        f"{f}:5:43: rules[1] (b).ports[0]: 99999 is outside 1-65535",
        f"{f}: 3 errors",
    ]
    assert r.stdout == ""


def test_policy_check_missing_file(tmp_path) -> None:
    r = run("policy", "check", str(tmp_path / "nope.yaml"))
    assert r.returncode == 1 and "cannot read" in r.stderr


def test_client_commands_without_a_daemon_fail_with_one_line(tmp_path) -> None:
    r = run("policy", "show", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "daemon not reachable" in r.stderr


def test_the_example_policy_is_valid_and_fits_the_starter_lab() -> None:
    from pathlib import Path

    from microseg.lab.topology import STARTER, Lab
    from microseg.policy.parse import load_policy_file

    path = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
    r = run("policy", "check", str(path))
    assert r.returncode == 0 and "valid (3 workloads, 5 rules" in r.stdout, r.stdout + r.stderr
    lab = Lab(STARTER)  # not built: only its addresses are read
    policy = load_policy_file(str(path)).policy
    for w in policy.workloads:
        assert {lab.ipv4(w.name), lab.ipv6(w.name)} == {str(a.network_address)
                                                         for a in w.addresses}


def test_apply_and_stage_refuse_special_files_in_one_line(tmp_path) -> None:
    """A FIFO would hang the reader, /dev/zero never ends: `policy apply`
    and `policy stage` say so in one line and exit 1, before any daemon."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        for cmd in (("policy", "apply", path), ("policy", "stage", path)):
            r = run(*cmd, "--socket", str(tmp_path / "none.sock"))
            assert r.returncode == 1, (cmd, r.stderr)
            assert r.stderr.strip().splitlines() == [f"microseg: {path}: " + (
                "a FIFO, not a regular file" if path == str(fifo)
                else "a device, not a regular file")], (cmd, r.stderr)
