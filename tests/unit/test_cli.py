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
