"""The policy compiler, without a kernel: prefixes, stable rule ids, classes,
and — on random policies and packets — the compiled maps answering exactly
what a literal reading of the policy answers."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from microseg.kernel import abi
from microseg.policy.compile import assign_rule_ids, compile_policy, lookup_identity
from microseg.policy.model import Policy, Rule, Workload
from microseg.policy.model import Selector as S

from .reference import reference_verdict, simulate_datapath


def test_port_classes_group_ports_named_by_the_same_rules() -> None:
    wl = (Workload.make("a", ["10.0.0.1"]), Workload.make("b", ["10.0.0.2"]))
    pol = Policy(workloads=wl, rules=(
        Rule.make("web", S.of_workload("a"), S.of_workload("b"), "allow", "tcp", [80, 443]),
        Rule.make("range", S.of_workload("a"), S.of_workload("b"), "allow", "tcp",
                  [(400, 500)]),
        Rule.make("dns", S.any(), S.of_workload("b"), "allow", "udp", [53]),
    ))
    pcs = compile_policy(pol).port_classes
    tcp, udp = pcs[6], pcs[17]
    assert tcp[80] != 0 and tcp[80] != tcp[443]  # 443 is also in the range
    assert tcp[400] == tcp[442] == tcp[444] == tcp[500] != tcp[443]
    assert tcp[399] == tcp[501] == tcp[53] == 0
    assert udp[53] != 0 and udp[80] == 0


def test_rule_ids_are_stable_and_reuse_nothing() -> None:
    first = assign_rule_ids(["a", "b", "c"], {})
    assert first == {"a": 1, "b": 2, "c": 3}
    second = assign_rule_ids(["c", "d", "a"], first)
    assert second["a"] == 1 and second["c"] == 3 and second["d"] == 2
    assert 0 not in second.values()


def test_workloads_matched_alike_share_a_class() -> None:
    wl = tuple(Workload.make(f"web{i}", [f"10.0.0.{i}"], {"tier": "web"}) for i in range(1, 51))
    pol = Policy(workloads=(*wl, Workload.make("db", ["10.0.1.1"])), rules=(
        Rule.make("web-db", S.of_labels({"tier": "web"}), S.of_workload("db"), "allow", "tcp",
                  [5432]),
    ))
    c = compile_policy(pol)
    assert len({e.cls for e in c.identities if e.workload.startswith("web")}) == 1
    # One group: a header (no rule for other ports) and one exception.
    assert len(c.entries) == 2


def test_label_rules_do_not_multiply_with_workload_rules() -> None:
    """Every workload is unique to workload rules; label rules still pair
    label classes (one per label set), not workloads."""
    wl = tuple(Workload.make(f"w{i}", [f"10.0.{i // 200}.{i % 200 + 1}"],
                             {"tier": f"t{i % 4}", "app": f"a{i % 5}"}) for i in range(400))
    pair_rules = tuple(Rule.make(f"p{i}", S.of_workload(f"w{i}"), S.of_workload(f"w{i + 1}"),
                                 "allow", "tcp", [80]) for i in range(399))
    label_rules = tuple(Rule.make(f"l{t}{a}", S.of_labels({"tier": f"t{t}"}),
                                  S.of_labels({"app": f"a{a}"}), "allow", "tcp", [443])
                        for t in range(4) for a in range(5))
    c = compile_policy(Policy(workloads=wl, rules=pair_rules + label_rules))
    groups = {(e.src_class, e.dst_class) for e in c.entries}
    assert len(groups) <= 399 + 20 * 20


def test_nested_prefixes_belong_to_the_most_specific_workload() -> None:
    pol = Policy(workloads=(Workload.make("net", ["10.0.0.0/24"]),
                            Workload.make("host", ["10.0.0.5"])))
    c = compile_policy(pol)
    assert lookup_identity(c, "10.0.0.5").workload == "host"
    assert lookup_identity(c, "10.0.0.6").workload == "net"
    assert lookup_identity(c, "10.0.1.1") is None


def test_deny_inside_an_allowed_range_is_an_exception() -> None:
    pol = Policy(workloads=(Workload.make("a", ["10.0.0.1"]), Workload.make("b", ["10.0.0.2"])),
                 rules=(Rule.make("allow-range", S.of_workload("a"), S.of_workload("b"), "allow",
                                  "tcp", [(1000, 2000)]),
                        Rule.make("deny-one", S.any(), S.of_workload("b"), "deny", "tcp",
                                  [1500])))
    c = compile_policy(pol)
    for port, want in ((999, None), (1000, "allow-range"), (1499, "allow-range"),
                       (1500, "deny-one"), (1501, "allow-range"), (2000, "allow-range")):
        assert simulate_datapath(c, "10.0.0.1", "10.0.0.2", 6, port)[1] == want


# -- random policies vs the reference evaluator -----------------------------

V4 = [f"10.0.{a}.{b}" for a in (0, 1) for b in (1, 2, 3, 130, 200)] + ["192.0.2.9"]
V6 = ["fd00::1", "fd00::2", "fd00:0:0:1::1", "2001:db8::7"]
LABELS = [{"tier": "web"}, {"tier": "db"}, {"app": "shop"}, {"tier": "web", "app": "shop"}, {}]
CIDRS = ["10.0.0.0/24", "10.0.0.128/25", "10.0.0.0/16", "10.0.1.0/30", "0.0.0.0/0",
         "fd00::/64", "fd00::/16", "::/0"]
PORTS = [22, 53, 80, 443, 1000, 1500, 2000, 5432]


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    n = draw(st.integers(1, 6))
    workloads = []
    for i in range(n):
        addrs = draw(st.lists(st.sampled_from(V4 + V6 + ["10.0.0.0/24", "10.0.1.0/28",
                                                         "fd00::/64"]),
                              min_size=1, max_size=3, unique=True))
        mode = draw(st.sampled_from([None, None, "audit", "enforce"]))
        workloads.append(Workload.make(f"w{i}", addrs, draw(st.sampled_from(LABELS)), mode))

    def selector() -> S:
        kind = draw(st.sampled_from(["any", "workload", "labels", "cidr"]))
        if kind == "any":
            return S.any()
        if kind == "workload":
            return S.of_workload(f"w{draw(st.integers(0, n - 1))}")
        if kind == "labels":
            return S.of_labels(draw(st.sampled_from(LABELS[:4])))
        return S.of_cidr(draw(st.sampled_from(CIDRS)))

    rules = []
    for i in range(draw(st.integers(0, 12))):
        proto = draw(st.sampled_from([None, "tcp", "udp", "icmp", "icmpv6"]))
        ports = None
        if proto in ("tcp", "udp") and draw(st.booleans()):
            ports = []
            for _ in range(draw(st.integers(1, 3))):
                a, b = sorted((draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))))
                ports.append(a if a == b else (a, b))
        srcs = [selector() for _ in range(draw(st.integers(1, 2)))]
        dsts = [selector() for _ in range(draw(st.integers(1, 2)))]
        rules.append(Rule.make(f"r{i}", srcs, dsts, draw(st.sampled_from(["allow", "deny"])),
                               proto, ports))
    return Policy(default=draw(st.sampled_from(["allow", "deny"])),
                  mode=draw(st.sampled_from(["enforce", "audit"])),
                  workloads=tuple(workloads), rules=tuple(rules))


@settings(max_examples=300, deadline=None)
@given(policy=policies(), data=st.data())
def test_compiled_maps_agree_with_reference(policy: Policy, data: st.DataObject) -> None:
    compiled = compile_policy(policy)
    for _ in range(25):
        v6 = data.draw(st.booleans())
        pool = V6 if v6 else V4
        src, dst = data.draw(st.sampled_from(pool)), data.draw(st.sampled_from(pool))
        proto = data.draw(st.sampled_from([6, 17, 58 if v6 else 1, 47]))
        dport = data.draw(st.sampled_from([*PORTS, 0, 999, 2001, 65535]))
        want = reference_verdict(policy, src, dst, proto, dport)
        got = simulate_datapath(compiled, src, dst, proto, dport)
        assert got == want, (src, dst, proto, dport)


def test_entries_do_not_grow_with_unrelated_rules() -> None:
    """Rules between other workloads add entries to other groups only: a
    flow's lookups stay at most four whatever the rule count."""
    wl = tuple(Workload.make(f"w{i}", [str(ipaddress.ip_address("10.1.0.0") + i)])
               for i in range(200))
    rules = tuple(Rule.make(f"r{i}", S.of_workload(f"w{i}"), S.of_workload(f"w{(i + 1) % 200}"),
                            "allow", "tcp", [80]) for i in range(200))
    c = compile_policy(Policy(workloads=wl, rules=rules))
    groups = {(e.src_class, e.dst_class) for e in c.entries}
    assert len(groups) == 200
    # Only the workload x workload combo is ever looked up.
    ww = abi.combo_bit(abi.Space.WORKLOAD, abi.Space.WORKLOAD)
    assert {e.src_combos | e.dst_combos for e in c.identities} == {ww}
