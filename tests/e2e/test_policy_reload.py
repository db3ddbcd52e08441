"""Hot reload with a real daemon on the lab: the policy file edited by
writing, by rename and by a ConfigMap-style symlink swap changes verdicts;
established sessions the new policy denies are revoked; an invalid edit is
rejected with the old policy still enforced; SIGHUP, `policy apply`,
`policy show` and `rule add/delete` work; and an allowed long-running flow
loses no packet across 100 reloads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from microseg.lab.topology import Lab, WorkloadSpec

from .harness import DaemonProcess, LabSpec, wait_until

LAB = LabSpec([WorkloadSpec("client", 10), WorkloadSpec("web", 20)], prefix="mst3",
              subnet4="10.204.0.0/24", subnet6="fd00:204::/64",
              serve={"web": {"tcp": [80, 81, 82]}})
TEMPLATE = """\
# lab policy
version: 1
default: deny
workloads:
  client: {{addresses: [10.204.0.10, "fd00:204::10"], labels: {{role: client}}}}
  web: {{addresses: [10.204.0.20, "fd00:204::20"], labels: {{tier: web}}}}
rules:
  - name: client-to-web
    from: {{labels: {{role: client}}}}
    to: {{workload: web}}
    protocol: tcp
    ports: [{ports}]
    action: allow
  - name: ping-web
    from: {{workload: client}}
    to: {{workload: web}}
    protocol: icmp
    action: allow
{extra}"""


def policy(ports: str = "80", extra: str = "") -> str:
    return TEMPLATE.format(ports=ports, extra=extra)


POLICY = policy()


@pytest.fixture
def fresh(daemon: DaemonProcess) -> DaemonProcess:
    """Each test starts from the base policy (the file a plain file again)."""
    p = daemon.policy_path
    if p.is_symlink():
        p.unlink()
    daemon.apply_policy(policy(extra="# " + os.urandom(4).hex() + "\n"))
    return daemon


def can(lab: Lab, port: int, timeout: float = 0.3) -> bool:
    return lab.probe("client", "tcp", lab.ipv4("web"), port, timeout=timeout)


def test_write_in_place_changes_verdicts(fresh: DaemonProcess, lab: Lab) -> None:
    assert can(lab, 80) and not can(lab, 81)
    gen = fresh.generation()
    fresh.write_policy(policy("80, 81"))
    assert wait_until(lambda: can(lab, 81)) is not None
    assert fresh.generation() == gen + 1
    st = fresh.status()["policy"]
    assert st["last_reload"]["result"] == "applied" and st["rules"] == 2


def test_rename_over_the_file_changes_verdicts(fresh: DaemonProcess, lab: Lab) -> None:
    tmp = fresh.policy_path.with_name(".policy.yaml.swp")
    tmp.write_text(policy("80, 82"))
    os.rename(tmp, fresh.policy_path)
    assert wait_until(lambda: can(lab, 82)) is not None
    tmp.write_text(policy("80"))
    os.rename(tmp, fresh.policy_path)
    assert wait_until(lambda: not can(lab, 82)) is not None


def test_configmap_symlink_swap_changes_verdicts(fresh: DaemonProcess, lab: Lab) -> None:
    """Kubernetes mounts: policy.yaml -> ..data/policy.yaml, ..data -> a
    timestamped directory, swapped by renaming a new ..data symlink in."""
    d = fresh.policy_path.parent
    (d / "..v1").mkdir()
    (d / "..v1" / "policy.yaml").write_text(policy("80"))
    os.symlink("..v1", d / "..data")
    gen = fresh.generation()
    fresh.policy_path.unlink()
    os.symlink("..data/policy.yaml", fresh.policy_path)
    fresh.wait_generation_above(gen)
    assert not can(lab, 81)
    (d / "..v2").mkdir()
    (d / "..v2" / "policy.yaml").write_text(policy("80, 81"))
    os.symlink("..v2", d / "..data_tmp")
    os.rename(d / "..data_tmp", d / "..data")
    assert wait_until(lambda: can(lab, 81)) is not None
    for name in ("..data",):
        os.unlink(d / name)
    for v in ("..v1", "..v2"):
        (d / v / "policy.yaml").unlink()
        (d / v).rmdir()


def test_invalid_edit_is_rejected_and_the_old_policy_stays(fresh: DaemonProcess,
                                                           lab: Lab) -> None:
    gen = fresh.generation()
    failures = fresh.status()["policy"]["reload_failures_total"]
    fresh.write_policy(policy("80, 99999"))
    assert wait_until(lambda: fresh.status()["policy"]["reload_failures_total"] > failures)
    st = fresh.status()["policy"]
    assert st["generation"] == gen
    last = st["last_reload"]
    assert last["result"] == "rejected"
    assert any(":12:17: rules[0] (client-to-web).ports[1]: 99999 is outside 1-65535" in e
               for e in last["errors"]), last
    assert can(lab, 80) and not can(lab, 81)  # the old policy still enforces
    assert "policy rejected, generation" in fresh.log()
    # ...and `watch` shows the rejection, with every error.
    r = fresh.cli("watch", "--json", "--type", "policy", "--last", "1", "--no-follow")
    (event,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert (event["result"], event["generation"]) == ("rejected", gen)
    assert any("99999 is outside 1-65535" in x for x in event["errors"])
    assert set(event) >= {"time", "seq", "type", "result", "generation", "source", "errors",
                          "rules", "workloads", "apply_ms"}


def test_established_session_is_revoked(fresh: DaemonProcess, lab: Lab) -> None:
    fresh.write_policy(policy("80, 81"))
    assert wait_until(lambda: can(lab, 81)) is not None
    hold = lab.spawn("client", [sys.executable, "-m", "microseg.lab.traffic", "hold", "tcp",
                                lab.ipv4("web"), "81", "--interval", "0.05",
                                "--timeout", "1"], stdout=subprocess.PIPE, text=True)
    assert hold.stdout is not None
    assert hold.stdout.readline().strip() == "connected"
    for _ in range(5):
        assert hold.stdout.readline().startswith("ok ")
    gen = fresh.generation()
    fresh.write_policy(policy("80"))
    fresh.wait_generation_above(gen)
    # The connection's next exchange after the switch times out: revoked.
    lines = []
    for line in hold.stdout:
        lines.append(line.strip())
        if line.startswith("timeout"):
            break
    assert lines[-1].startswith("timeout"), lines
    hold.wait(timeout=5)


def test_sighup_reloads(fresh: DaemonProcess) -> None:
    gen = fresh.generation()
    fresh.signal(signal.SIGHUP)
    fresh.wait_generation_above(gen)
    assert fresh.status()["policy"]["last_reload"]["result"] == "applied"


def test_policy_apply_show_and_rule_edits(fresh: DaemonProcess, lab: Lab,
                                          tmp_path: Path) -> None:
    new = tmp_path / "candidate.yaml"
    new.write_text(policy("80, 81"))
    r = fresh.cli("policy", "apply", str(new))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"generation {fresh.generation()} active (2 rules, 2 workloads")
    assert fresh.policy_path.read_text() == new.read_text()
    assert can(lab, 81)

    bad = tmp_path / "bad.yaml"
    bad.write_text(policy("80", extra="  - {name: x, from: any, to: any}\n"))
    gen = fresh.generation()
    r = fresh.cli("policy", "apply", str(bad))
    assert r.returncode == 1 and "missing 'action'" in r.stderr
    assert fresh.generation() == gen and fresh.policy_path.read_text() == new.read_text()

    r = fresh.cli("policy", "rule", "add", "web-82", "--from", "workload:client",
                  "--to", "labels:tier=web", "--protocol", "tcp", "--ports", "82",
                  "--action", "allow")
    assert r.returncode == 0, r.stderr
    assert can(lab, 82)
    text = fresh.policy_path.read_text()
    assert text.startswith("# lab policy\n") and "  - name: web-82" in text
    r = fresh.cli("policy", "rule", "delete", "web-82")
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: not can(lab, 82)) is not None
    assert fresh.policy_path.read_text() == new.read_text()

    r = fresh.cli("policy", "show", "--json")
    assert r.returncode == 0
    show = json.loads(r.stdout)
    assert show["generation"] == fresh.generation()
    rules = {x["name"]: x for x in show["rules"]}
    assert rules["client-to-web"]["hits"] > 0 and rules["client-to-web"]["last_hit"]
    assert rules["client-to-web"]["ports"] == ["80", "81"]
    assert "ping-web" in show["never_hit"]
    r = fresh.cli("policy", "show")
    assert r.returncode == 0 and "client-to-web" in r.stdout and "never hit  ping-web" in \
        r.stdout


def test_no_packet_of_an_allowed_flow_is_lost_across_100_reloads(
        fresh: DaemonProcess, lab: Lab) -> None:
    ping = lab.spawn("client", ["ping", "-q", "-i", "0.01", "-W", "1", lab.ipv4("web")],
                     stdout=subprocess.PIPE, text=True)
    hold = lab.spawn("client", [sys.executable, "-m", "microseg.lab.traffic", "hold", "tcp",
                                lab.ipv4("web"), "80", "--interval", "0.01"],
                     stdout=subprocess.PIPE, text=True)
    gen = fresh.generation()
    for i in range(100):
        # A real change each time: the allowed flows stay allowed throughout.
        fresh.write_policy(policy("80" if i % 2 else "80, 81"))
        gen = fresh.wait_generation_above(gen)
    ping.send_signal(signal.SIGINT)
    out, _ = ping.communicate(timeout=10)
    hold.terminate()
    held, _ = hold.communicate(timeout=10)
    assert " 0% packet loss" in out, out
    assert "timeout" not in held and held.count("ok ") > 50, held[-300:]
    assert fresh.generation() >= gen
