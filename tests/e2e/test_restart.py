"""The README's "Reliability": the daemon can die and come back without the
traffic noticing.

A long-running TCP connection and a UDP stream keep exchanging through a
SIGKILL of the daemon and a new start on the same pins: not one of their
packets is dropped, their sessions stay in the table with counters going
on, the datapath keeps enforcing the last policy while no daemon runs, and
the events continue: the new daemon numbers on from the last `seq` the old
one published, delivers what the datapath wrote while none ran, and reports
what did not fit as a `lost` event with the kernel's exact count.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import time

import pytest

from microseg.lab.topology import Lab, WorkloadSpec, wait_for

from .harness import DaemonProcess, Daemons, LabSpec

LAB = LabSpec([WorkloadSpec("client", 10), WorkloadSpec("server", 20), WorkloadSpec("rogue", 66)],
              prefix="mstb", subnet4="10.214.0.0/24", subnet6="fd00:214::/64",
              serve={"server": {"tcp": [7000], "udp": [7001, 7002]}})

POLICY = """\
version: 1
default: deny
workloads:
  client: {addresses: [10.214.0.10]}
  server: {addresses: [10.214.0.20]}
  rogue: {addresses: [10.214.0.66]}
rules:
  - {name: hold-tcp, from: {workload: client}, to: {workload: server}, protocol: tcp,
     ports: [7000], action: allow}
  - {name: hold-udp, from: {workload: client}, to: {workload: server}, protocol: udp,
     ports: [7001], action: allow}
"""


# Per test: each starts from a lab nothing is attached to, and no pins.

@pytest.fixture
def lab(new_lab) -> Lab:
    return new_lab(LAB)


@pytest.fixture
def daemon(lab: Lab, daemons: Daemons) -> DaemonProcess:
    # --event-window 0: the rogue's denials, one event each, overflow the ring
    # while no daemon runs (aggregation: tests/e2e/test_hardening.py).
    return daemons.start(lab, POLICY, "--ringbuf-bytes", "65536", "--event-window", "0")


def retransmits(lab: Lab) -> int:
    """TCP segments the client's kernel retransmitted: any drop of the held
    connection's packets shows here."""
    out = lab.run("client", ["nstat", "-az", "TcpRetransSegs"]).stdout
    return int(re.search(r"TcpRetransSegs\s+(\d+)", out)[1])


def denied(lab: Lab) -> bool:
    """The rogue's attempt at the server's open port goes unanswered."""
    r = lab.run("rogue", [sys.executable, "-m", "microseg.lab.traffic", "probe", "tcp",
                          lab.ipv4("server"), "7000", "--timeout", "0.5"])
    return r.returncode != 0


def held_session(d: DaemonProcess, lab: Lab) -> dict:
    r = d.cli("sessions", "--json", "--protocol", "tcp", "--ip", lab.ipv4("client"))
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    return next(s for s in rows if s["dst"]["port"] == 7000)


def events(d: DaemonProcess) -> list[dict]:
    r = d.cli("watch", "--json", "--no-follow", "--last", "16384")
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_sigkill_and_restart_lose_nothing(daemon: DaemonProcess, lab: Lab) -> None:
    retrans0 = retransmits(lab)
    tcp = lab.spawn("client", [sys.executable, "-m", "microseg.lab.traffic", "hold", "tcp",
                               lab.ipv4("server"), "7000", "--interval", "0.01"],
                    stdout=subprocess.PIPE, text=True)
    udp = lab.spawn("client", [sys.executable, "-m", "microseg.lab.traffic", "hold", "udp",
                               lab.ipv4("server"), "7001", "--interval", "0.01"],
                    stdout=subprocess.PIPE, text=True)
    assert wait_for(lambda: held_session(daemon, lab)["packets"]["orig"] > 20, timeout=10)
    before = held_session(daemon, lab)
    assert denied(lab)
    # Everything the first daemon publishes, to its last breath.
    subscribers = daemon.api("GET", "/v1/stats")["events"]["subscribers"]
    watch = subprocess.Popen([sys.executable, "-m", "microseg", "watch", "--json", "--last",
                              "16384"],
                             env={**os.environ, "MICROSEG_SOCKET": daemon.socket},
                             stdout=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: daemon.api("GET", "/v1/stats")["events"]["subscribers"]
                        > subscribers, timeout=20), "watch never subscribed"
        daemon.kill()  # SIGKILL: no clean-up at all
        out = watch.communicate(timeout=10)[0]
    finally:
        if watch.poll() is None:  # a failure above: no watch left behind
            watch.kill()
            watch.communicate()
    first = [json.loads(line) for line in out.splitlines()]
    last_seq = max(e["seq"] for e in first)
    first_lost = sum(e["count"] for e in first if e["type"] == "lost" and e["source"] == "ringbuf")
    t_dead = time.monotonic()
    # No daemon: the datapath goes on enforcing, and writing events into
    # the pinned ring (the rogue's denials) — more than it holds, too.
    assert denied(lab)
    lab.run("rogue", [sys.executable, "-m", "microseg.lab.traffic", "flood", "udp",
                      lab.ipv4("server"), "7002", "--count", "3000", "--sources", "3000"])
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t_dead)))

    daemon.start()
    # the connections keep going under the new daemon
    assert wait_for(lambda: held_session(daemon, lab)["packets"]["orig"]
                    > before["packets"]["orig"] + 150, timeout=20)
    after = held_session(daemon, lab)
    tcp.terminate()
    udp.terminate()
    held_tcp, _ = tcp.communicate(timeout=10)
    held_udp, _ = udp.communicate(timeout=10)

    # Not one packet of the allowed flows dropped.
    assert "timeout" not in held_tcp and held_tcp.count("ok ") > 150, held_tcp[-300:]
    assert "timeout" not in held_udp and held_udp.count("ok ") > 150, held_udp[-300:]
    assert retransmits(lab) == retrans0
    # The same session, its counters going on.
    assert (after["src"], after["dst"], after["rule"]) == \
        (before["src"], before["dst"], before["rule"])
    assert after["packets"]["orig"] > before["packets"]["orig"] + 100
    assert after["age_s"] > before["age_s"]
    # Still enforcing under the new daemon.
    assert denied(lab)

    # Events: numbered on from the old daemon's last, with what the datapath
    # wrote meanwhile, and an exact count of what did not fit in the ring.
    evs = [e for e in events(daemon) if e["seq"] > last_seq]
    seqs = [e["seq"] for e in evs]
    assert seqs[0] == last_seq + 1 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    down = [e for e in evs if e["type"] == "verdict" and e["verdict"] == "denied"
            and e["src"]["workload"] == "rogue"]
    assert len(down) > 100, ("the denials made while no daemon ran are delivered",
                             collections.Counter((e["type"], e.get("verdict"), e.get("source"))
                                                 for e in evs))
    lost = sum(e["count"] for e in evs if e["type"] == "lost" and e["source"] == "ringbuf")
    assert lost > 0, "3,000 denials do not fit a 64 KiB ring: some were lost, and said so"
    kernel = daemon.api("GET", "/v1/stats")["events"]["kernel"]
    assert first_lost + lost == sum(t["lost"] for t in kernel.values())


def tc_state(lab: Lab) -> dict[str, str]:
    """Per workload interface: its qdiscs and TC filters, as tc shows them."""
    out = {}
    for w in lab.workloads:
        dev = lab.host_if(w.name)
        q = subprocess.run(["tc", "qdisc", "show", "dev", dev], capture_output=True,
                           text=True).stdout
        f = "".join(subprocess.run(["tc", "filter", "show", "dev", dev, hook],
                                   capture_output=True, text=True).stdout
                    for hook in ("ingress", "egress"))
        out[dev] = q + f
    return out


def test_clean_stop_leaves_nothing_behind(lab: Lab, daemons: Daemons) -> None:
    before = tc_state(lab)
    d = daemons.start(lab, POLICY)
    assert all("clsact" in s and "bpf" in s for s in tc_state(lab).values())
    assert denied(lab)
    d.stop()  # checks: exit 0, no pins, no socket
    assert tc_state(lab) == before  # no filter, and the clsact qdisc it added is gone
    assert not denied(lab), "nothing enforces any more"


def test_keep_on_exit_leaves_everything_enforcing(lab: Lab, daemons: Daemons) -> None:
    d = daemons.start(lab, POLICY, "--keep-on-exit")
    assert d.status()["datapath"]["load"]["programs"] == "compiled"
    attached = tc_state(lab)
    pins = sorted(os.listdir(d.pin_dir))
    assert d.stop(check=False) == 0
    assert tc_state(lab) == attached and sorted(os.listdir(d.pin_dir)) == pins
    assert denied(lab), "the last policy is still enforced"
    ok = lab.run("client", [sys.executable, "-m", "microseg.lab.traffic", "probe", "tcp",
                            lab.ipv4("server"), "7000"])
    assert ok.returncode == 0, "and still allows what it allowed"
    # The next daemon takes over the same pins and filters — and the pinned
    # programs themselves: same source, no compile; its clean stop removes
    # everything.
    d.extra.remove("--keep-on-exit")
    d.start()
    assert d.status()["datapath"]["load"]["programs"] == "reused"
    assert tc_state(lab) == attached  # the very programs: the filters did not change
    assert "programs reused from pins" in d.cli("stats").stdout
    assert denied(lab)
    d.stop()  # checks: exit 0, no pins, no socket
    assert not any("bpf" in s for s in tc_state(lab).values())


def test_upgrade_with_a_changed_map_layout_replaces_the_pins_and_keeps_enforcing(
        lab: Lab, daemons: Daemons) -> None:
    """A new daemon whose session table has another layout (here: capacity)
    never reuses the old pinned table: it warns and replaces it. The held
    connection is picked up mid-stream (re-judged under the policy) without
    losing a packet; the denied flow stays denied."""
    d = daemons.start(lab, POLICY)
    tcp = lab.spawn("client", [sys.executable, "-m", "microseg.lab.traffic", "hold", "tcp",
                               lab.ipv4("server"), "7000", "--interval", "0.01"],
                    stdout=subprocess.PIPE, text=True)
    assert wait_for(lambda: held_session(d, lab)["packets"]["orig"] > 20, timeout=10)
    retrans0 = retransmits(lab)
    d.kill()
    d.extra += ["--session-capacity", "65536"]
    d.start()

    def picked_up() -> bool:
        try:
            s = held_session(d, lab)
        except StopIteration:  # not yet in the new table
            return False
        return s["rule"] == "hold-tcp" and s["state"] == "established"
    assert wait_for(picked_up, timeout=20), d.log()[-2000:]
    assert re.search(r"WARNING .*session_map.*replac", d.log()), d.log()[-2000:]
    tcp.terminate()
    held, _ = tcp.communicate(timeout=10)
    assert "timeout" not in held and held.count("ok ") > 100, held[-300:]
    assert retransmits(lab) == retrans0
    assert d.status()["datapath"]["session_capacity"] == 65536
    assert d.status()["datapath"]["load"]["programs"] == "compiled"  # other -D flags
    assert denied(lab)


def test_a_refused_start_changes_nothing(lab: Lab, daemons: Daemons) -> None:
    """The compile of a cold start begins before the policy is checked; a
    start refused for an invalid policy undoes it: no pins, no filters."""
    before = tc_state(lab)
    d = daemons.new(lab, POLICY.replace("default: deny", "default: maybe"))
    r = subprocess.run(d.argv(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "invalid policy" in r.stderr, r.stderr
    assert not os.path.exists(d.pin_dir)
    assert tc_state(lab) == before
