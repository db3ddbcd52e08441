"""contrib/systemd/microseg.service: systemd accepts it, and its command
line is one `microseg run` accepts."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from microseg.cli import build_parser

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "microseg.service"


def exec_start() -> list[str]:
    text = UNIT.read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_exec_start_is_a_valid_microseg_run() -> None:
    argv = exec_start()
    assert argv[0].endswith("/.venv/bin/microseg") and argv[1] == "run"
    args = build_parser().parse_args(argv[1:])
    assert args.interface == ["veth*", "tap*"]
    assert args.policy == "/etc/microseg/policy.yaml"
    assert args.keep_on_exit


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze here")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    # The unit names the installed path; point it at this checkout's binary.
    unit = tmp_path / "microseg.service"
    unit.write_text(UNIT.read_text().replace("/opt/microseg/.venv/bin/microseg",
                                             str(Path(sys.executable).with_name("microseg"))))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
