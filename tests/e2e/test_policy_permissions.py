"""Only root decides the policy (docs/policy.md, "Who may change the
policy"): a policy file anyone else could change — the file, a directory on
its path, a symlink's target — is refused at start and at every reload (the
running policy stays); --insecure-policy-permissions uses it with a warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from microseg.lab.topology import Lab, WorkloadSpec, wait_for

from .harness import Daemons, LabSpec

LAB = LabSpec([WorkloadSpec("a", 10)], prefix="mspp", subnet4="10.235.0.0/24",
              subnet6="fd00:235::/64")
POLICY = "version: 1\ndefault: allow\nworkloads:\n  a: {addresses: [10.235.0.10]}\n"
EDITED = POLICY.replace("default: allow", "default: deny")


def _start(lab: Lab, policy: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    """`microseg run` on that file, expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "microseg", "run", "-i", lab.glob, "--policy", str(policy),
         "--socket", str(tmp / "refused.sock"), "--pin-dir", f"/sys/fs/bpf/mspp-{os.getpid()}",
         "--metrics", "off", *extra], capture_output=True, text=True, timeout=60)


def _tree(tmp: Path, dir_mode: int, file_mode: int) -> Path:
    d = tmp / "conf"
    d.mkdir()
    p = d / "policy.yaml"
    p.write_text(POLICY)
    os.chmod(p, file_mode)
    os.chmod(d, dir_mode)
    return p


@pytest.mark.parametrize(("what", "dir_mode", "file_mode", "named", "mode"), [
    ("a file everyone may write", 0o755, 0o666, "file", "0666"),
    ("a file its group may write", 0o755, 0o664, "file", "0664"),
    ("a directory everyone may write", 0o777, 0o644, "directory", "0777"),
])
def test_start_is_refused(lab: Lab, tmp_path: Path, what: str, dir_mode: int,
                          file_mode: int, named: str, mode: str) -> None:
    policy = _tree(tmp_path, dir_mode, file_mode)
    if file_mode & 0o020:
        os.chown(policy, 0, 100)  # group "users": not root's
    r = _start(lab, policy, tmp_path)
    assert r.returncode == 1, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("microseg:")]
    assert "refused" in line and named in line and f"mode {mode}" in line, line
    assert "--insecure-policy-permissions" in line


def test_a_symlink_into_a_writable_directory_is_refused(lab: Lab, tmp_path: Path) -> None:
    """/etc-like path is fine, its target is not: the target decides."""
    target = _tree(tmp_path, 0o777, 0o644)
    safe = tmp_path / "etc"
    safe.mkdir(mode=0o755)
    link = safe / "policy.yaml"
    link.symlink_to(target)
    r = _start(lab, link, tmp_path)
    assert r.returncode == 1 and f"directory {target.parent} is writable by everyone" \
        in r.stderr, r.stderr


def test_a_reload_is_refused_and_the_running_policy_stays(
        lab: Lab, daemons: Daemons, tmp_path: Path) -> None:
    d = daemons.start(lab, POLICY)
    gen = d.generation()
    os.chmod(d.policy_path, 0o666)
    d.write_policy(EDITED)
    assert wait_for(lambda: d.status()["policy"]["last_reload"]["result"] == "rejected",
                    timeout=10), d.log()
    st = d.status()["policy"]
    assert st["generation"] == gen and "writable by everyone" in \
        st["last_reload"]["errors"][0]
    os.chmod(d.policy_path, 0o644)  # mended: the same content now applies
    d.signal(1)  # SIGHUP
    assert d.wait_generation_above(gen) > gen
    assert d.status()["policy"]["default"] == "deny"


def test_insecure_policy_permissions_uses_it_and_warns(
        lab: Lab, daemons: Daemons, tmp_path: Path) -> None:
    d = daemons.new(lab, POLICY, "--insecure-policy-permissions")
    os.chmod(d.policy_path, 0o666)
    d.start()
    gen = d.generation()
    assert "used anyway (--insecure-policy-permissions)" in d.log()
    d.write_policy(EDITED)
    assert d.wait_generation_above(gen) > gen
    assert d.log().count("used anyway (--insecure-policy-permissions)") >= 2
