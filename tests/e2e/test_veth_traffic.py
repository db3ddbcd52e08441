"""Real traffic between two namespaces: the program attached to the host
ends of their veths lets through exactly what the policy allows (TCP, UDP,
ping; IPv4 and IPv6), then detaches cleanly."""

from __future__ import annotations

import subprocess

import pytest

from microseg.kernel.abi import EventType, Verdict
from microseg.kernel.datapath import Datapath, DatapathConfig
from microseg.kernel.maps import RINGS
from microseg.kernel.records import decode_events
from microseg.kernel.ringbuf import RingBuffer
from microseg.lab.topology import Lab, WorkloadSpec
from microseg.policy.compile import compile_policy
from microseg.policy.model import Policy, Rule, Workload
from microseg.policy.model import Selector as S

from .harness import LabSpec

LAB = LabSpec([WorkloadSpec("client", 10), WorkloadSpec("server", 20)], prefix="mst2",
              serve={"server": {"tcp": [8080, 8081], "udp": [5353, 5354]},
                     "client": {"tcp": [8080]}})


@pytest.fixture
def lab(new_lab) -> Lab:
    """A lab per test: each starts with nothing attached."""
    return new_lab(LAB)


def _policy(lab: Lab) -> Policy:
    wl = tuple(Workload.make(n, [lab.ipv4(n), lab.ipv6(n)]) for n in ("client", "server"))
    c, s = S.of_workload("client"), S.of_workload("server")
    return Policy(default="deny", workloads=wl, rules=(
        Rule.make("web", c, s, "allow", "tcp", [8080]),
        Rule.make("dns", c, s, "allow", "udp", [5353]),
        Rule.make("ping", c, s, "allow", "icmp"),
        Rule.make("ping6", c, s, "allow", "icmpv6"),
    ))


def _tc_filters(dev: str) -> str:
    return subprocess.run(["tc", "filter", "show", "dev", dev, "ingress"], capture_output=True,
                          text=True).stdout + subprocess.run(
        ["tc", "filter", "show", "dev", dev, "egress"], capture_output=True, text=True).stdout


def test_policy_enforced_on_real_traffic_then_detached(lab: Lab) -> None:
    dp = Datapath(DatapathConfig(pin_dir=None, session_capacity=4096, ringbuf_bytes=1 << 20))
    dp.load()
    compiled = compile_policy(_policy(lab))
    dp.apply_policy(compiled)
    rings = [RingBuffer(dp.maps[name].fd, 128) for name in RINGS.values()]
    ifaces = [lab.ifindex(n) for n in ("client", "server")]
    try:
        # Open before attaching: nothing filters yet.
        assert lab.probe("client", "tcp", lab.ipv4("server"), 8081)
        for i in ifaces:
            dp.attach(i)
        for n in ("client", "server"):
            assert "microseg" in _tc_filters(lab.host_if(n))

        srv4, srv6 = lab.ipv4("server"), lab.ipv6("server")
        assert lab.probe("client", "tcp", srv4, 8080)
        assert lab.probe("client", "tcp", srv6, 8080)
        assert lab.probe("client", "udp", srv4, 5353)
        assert lab.probe("client", "udp", srv6, 5353)
        assert lab.probe("client", "icmp", srv4)
        assert lab.probe("client", "icmp", srv6)
        assert not lab.probe("client", "tcp", srv4, 8081, timeout=0.5)
        assert not lab.probe("client", "udp", srv4, 5354, timeout=0.5)
        assert not lab.probe("client", "tcp", srv6, 8081, timeout=0.5)
        # Rules have a direction: the server may not open to the client.
        assert not lab.probe("server", "tcp", lab.ipv4("client"), 8080, timeout=0.5)

        events = [e for ring in rings for e in decode_events(ring.drain(1 << 20).runs)]
        verdicts = [e for e in events if e.type == EventType.VERDICT]
        allowed = {(compiled.rule_names.get(e.rule_id), e.family) for e in verdicts
                   if e.verdict == Verdict.ALLOWED}
        assert {("web", 4), ("web", 6), ("dns", 4), ("dns", 6), ("ping", 4),
                ("ping6", 6)} <= allowed
        denied = {(e.dport, e.family) for e in verdicts if e.verdict == Verdict.DENIED}
        assert {(8081, 4), (5354, 4), (8081, 6), (8080, 4)} <= denied
        # Each allowed flow is judged once, though it crosses two hooks.
        web4 = [e for e in verdicts if e.verdict == Verdict.ALLOWED and e.dport == 8080
                and e.family == 4]
        assert len(web4) == 1
        sessions = {(s.proto, s.dport if s.proto in (6, 17) else None, s.family)
                    for s in dp.sessions()}
        assert {(6, 8080, 4), (6, 8080, 6), (17, 5353, 4), (17, 5353, 6), (1, None, 4),
                (58, None, 6)} <= sessions
    finally:
        for i in ifaces:
            dp.detach(i)
        for ring in rings:
            ring.close()
        dp.close()
    for n in ("client", "server"):
        assert "microseg" not in _tc_filters(lab.host_if(n))
        qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", lab.host_if(n)],
                                capture_output=True, text=True).stdout
        assert "clsact" not in qdiscs
    assert lab.probe("client", "tcp", lab.ipv4("server"), 8081)


def test_reattach_swaps_programs_without_losing_packets(lab: Lab) -> None:
    """replace-filter swaps the program at a hook atomically: a ping flood
    across repeated re-attachments (also of a freshly loaded program) loses
    nothing."""
    dps = [Datapath(DatapathConfig(pin_dir=None, session_capacity=4096,
                                   ringbuf_bytes=1 << 20)) for _ in range(2)]
    ifaces = [lab.ifindex(n) for n in ("client", "server")]
    try:
        for d in dps:
            d.load()
            d.apply_policy(compile_policy(_policy(lab)))
        for i in ifaces:
            dps[0].attach(i)
        flood = lab.spawn("client", ["ping", "-q", "-c", "400", "-i", "0.005",
                                     lab.ipv4("server")],
                          stdout=subprocess.PIPE, text=True)
        swaps = 0
        while flood.poll() is None:
            for i in ifaces:
                dps[swaps % 2].attach(i)
            swaps += 1
        out = flood.stdout.read() if flood.stdout else ""
        assert swaps > 20
        assert " 0% packet loss" in out, out
    finally:
        for i in ifaces:
            dps[0].detach(i)
        for d in dps:
            d.close()
