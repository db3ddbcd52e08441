"""A compile that edits the previous one (compile_policy with `previous`:
only the groups the changed rules touch are resolved again) gives exactly
what a full compile gives, and its delta turns the previous map contents
into the new ones (docs/performance.md "Reloads")."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from microseg.policy import compile as C
from microseg.policy.compile import CompiledPolicy, compile_policy
from microseg.policy.model import Policy, Rule, Workload
from microseg.policy.model import Selector as S

from .test_compile import LABELS, policies

# Many distinct ports: more port classes than compile._NEEDY, so that the
# index of groups a new port class can change is used too.
PORTS = [22, 53, 80, 443, 1000, 1500, 2000, 5432, 6000, 6001, 6002, 7000, 8080, 9000,
         9100, 65001]


def _full(policy: Policy, previous: CompiledPolicy | None) -> CompiledPolicy:
    return C._compile_full(policy, previous)


def _same(a: CompiledPolicy, b: CompiledPolicy) -> None:
    assert a.map_contents() == b.map_contents()
    assert a.identities == b.identities
    assert (a.default_action, a.flags) == (b.default_action, b.flags)
    assert a.port_class_values() == b.port_class_values()
    assert a.rule_ids == b.rule_ids and a.ids == b.ids
    assert sorted(a.entries) == sorted(b.entries)


def _applied(base: dict[str, dict[bytes, bytes]], c: CompiledPolicy) -> dict:
    """What a slot holding `base` holds after the datapath writes c's delta."""
    out = {name: dict(m) for name, m in base.items()}
    assert c.delta is not None
    for name, changes in c.delta[1].items():
        for k, v in changes.items():
            if v is None:
                del out[name][k]
            else:
                out[name][k] = v
    return out


@st.composite
def rules(draw: st.DrawFn, n_workloads: int, name: str) -> Rule:
    def selector() -> S:
        kind = draw(st.sampled_from(["any", "workload", "workload", "labels", "cidr"]))
        if kind == "any":
            return S.any()
        if kind == "workload":
            return S.of_workload(f"w{draw(st.integers(0, max(n_workloads - 1, 0)))}")
        if kind == "labels":
            return S.of_labels(draw(st.sampled_from(LABELS[:4])))
        return S.of_cidr(draw(st.sampled_from(["10.0.0.0/24", "fd00::/64", "0.0.0.0/0"])))

    proto = draw(st.sampled_from([None, "tcp", "tcp", "udp", "icmp"]))
    ports = None
    if proto in ("tcp", "udp") and draw(st.integers(0, 3)):
        ports = []
        for _ in range(draw(st.integers(1, 3))):
            a, b = sorted((draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))))
            ports.append(a if a == b else (a, b))
    return Rule.make(name, [selector()], [selector()], draw(st.sampled_from(["allow", "deny"])),
                     proto, ports)


@st.composite
def edits(draw: st.DrawFn, policy: Policy, step: int) -> Policy:
    rs = list(policy.rules)
    n = len(policy.workloads)
    kind = draw(st.sampled_from(["append", "append", "change", "change", "insert", "delete",
                                 "pop", "rename", "default", "mode", "workloads", "same"]))
    if kind == "append" or (kind in ("change", "insert", "delete", "pop", "rename") and not rs):
        rs.append(draw(rules(n, f"e{step}")))
    elif kind == "change":
        i = draw(st.integers(0, len(rs) - 1))
        rs[i] = draw(rules(n, rs[i].name))
    elif kind == "insert":
        rs.insert(draw(st.integers(0, len(rs))), draw(rules(n, f"e{step}")))
    elif kind == "delete":
        del rs[draw(st.integers(0, len(rs) - 1))]
    elif kind == "pop":
        rs.pop()
    elif kind == "rename":
        i = draw(st.integers(0, len(rs) - 1))
        rs[i] = dataclasses.replace(rs[i], name=f"n{step}")
    elif kind == "default":
        return dataclasses.replace(policy, default="allow" if policy.default == "deny"
                                   else "deny")
    elif kind == "mode":
        return dataclasses.replace(policy, mode="audit" if policy.mode == "enforce"
                                   else "enforce")
    elif kind == "workloads" and policy.workloads:
        w = policy.workloads[-1]
        return dataclasses.replace(policy, workloads=(
            *policy.workloads[:-1], dataclasses.replace(w, labels=(("tier", "db"),))))
    return dataclasses.replace(policy, rules=tuple(rs))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_an_edit_compiles_to_what_a_full_compile_gives(data: st.DataObject) -> None:
    pol = data.draw(policies())
    # Rules with the many ports, so that port classes come and go.
    extra = tuple(data.draw(rules(len(pol.workloads), f"x{i}")) for i in range(
        data.draw(st.integers(0, 8))))
    pol = dataclasses.replace(pol, rules=pol.rules + extra)
    prev = compile_policy(pol)
    for step in range(data.draw(st.integers(1, 6))):
        pol = data.draw(edits(pol, step))
        want = _full(pol, prev)
        got = compile_policy(pol, prev)
        _same(got, want)
        if got.delta is not None:
            assert got.delta[0] == prev.serial
            assert _applied(prev.map_contents(), got) == want.map_contents()
        prev = got


def _big(n_rules: int = 300) -> Policy:
    wl = tuple(Workload.make(f"w{i}", [f"10.1.{i // 200}.{i % 200 + 1}"],
                             {"tier": f"t{i % 4}"}) for i in range(60))
    rs = []
    for i in range(n_rules):
        ports: list[int | tuple[int, int]] = [PORTS[i % len(PORTS)]]
        if i % 7 == 0:
            ports.append((6000, 9100))
        src = S.of_labels({"tier": f"t{i % 4}"}) if i % 10 == 0 else S.of_workload(f"w{i % 60}")
        rs.append(Rule.make(f"r{i}", src, S.of_workload(f"w{(i * 7) % 60}"),
                            "deny" if i % 9 == 0 else "allow", "tcp", ports))
    return Policy(workloads=wl, rules=tuple(rs))


def test_a_one_rule_edit_is_compiled_as_an_edit() -> None:
    pol = _big()
    first = compile_policy(pol)
    toggle = Rule.make("toggle", S.any(), S.any(), "allow", "tcp", [65001])
    added = dataclasses.replace(pol, rules=(*pol.rules, toggle))
    second = compile_policy(added, first)
    assert second.delta is not None and second.delta[0] == first.serial
    _same(second, _full(added, first))
    # A handful of entries changed, not the thousands there are.
    changed = sum(len(d) for d in second.delta[1].values())
    assert 0 < changed < len(first.map_contents()["policy_map"]) // 4
    # Back again: the same contents as the first compile.
    third = compile_policy(pol, second)
    assert third.delta is not None
    assert third.map_contents() == first.map_contents()
    # `previous` is left as it was: compiling from it again gives the same.
    again = compile_policy(added, first)
    assert again.map_contents() == second.map_contents()


def test_edits_that_change_what_classes_exist_compile_in_full() -> None:
    pol = _big(50)
    first = compile_policy(pol)
    new_cidr = Rule.make("net", S.of_cidr("10.9.0.0/16"), S.any(), "allow")
    for edited in (dataclasses.replace(pol, rules=(*pol.rules, new_cidr)),
                   dataclasses.replace(pol, workloads=pol.workloads[:-1])):
        got = compile_policy(edited, first)
        assert got.delta is None
        _same(got, _full(edited, first))


def test_a_changed_mode_reaches_the_identities() -> None:
    pol = _big(50)
    first = compile_policy(pol)
    audit = dataclasses.replace(pol, mode="audit")
    got = compile_policy(audit, first)
    _same(got, _full(audit, first))
    assert got.delta is not None and any(got.delta[1][m] for m in ("host4_map",))


def _wide(n_ports: int, extra_port: int) -> tuple[Policy, Policy]:
    """A group whose rule covers most port classes (its header is that
    rule's, the other classes are exceptions), and a rule elsewhere that
    adds a port class after all of them: the group's rule covers the same
    classes, yet the new class is one more exception of the group."""
    wl = (Workload.make("a", ["10.0.0.1"]), Workload.make("b", ["10.0.0.2"]),
          Workload.make("c", ["10.0.0.3"]))
    splits = tuple(Rule.make(f"s{p}", S.of_workload("c"), S.of_workload("a"), "allow", "tcp",
                             [p]) for p in range(1001, 1001 + n_ports))
    wide = Rule.make("wide", S.of_workload("a"), S.of_workload("b"), "allow", "tcp",
                     [(1000, 1000 + n_ports + 1)])
    pol = Policy(workloads=wl, rules=(wide, *splits))
    later = Rule.make("later", S.of_workload("c"), S.of_workload("b"), "deny", "tcp",
                      [extra_port])
    return pol, dataclasses.replace(pol, rules=(*pol.rules, later))


def test_a_new_port_class_reaches_groups_whose_rules_cover_most_classes() -> None:
    for n_ports in (2, 30):  # fewer port classes than _NEEDY, and more
        pol, added = _wide(n_ports, 40000)
        first = compile_policy(pol)
        second = compile_policy(added, first)
        assert second.delta is not None
        _same(second, _full(added, first))
        third = compile_policy(pol, second)
        _same(third, _full(pol, second))
