"""Two independent answers to "what does the policy say about this packet":

* ``reference_verdict`` reads SPEC §5 literally: walk every rule, deny beats
  allow, the first written decides among equals, else the default; audit by
  the destination workload's mode or the global one.
* ``simulate_datapath`` does what the kernel does with the compiled maps:
  longest-prefix identity lookups, up to four group lookups with
  longest-prefix over (protocol, port), and the same merge.

Tests compare them on random policies and packets.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict

from microseg import abi
from microseg.policy.compile import CompiledPolicy, PolicyEntry, lookup_identity
from microseg.policy.model import Policy, Selector, Workload


def owner(policy: Policy, ip: str) -> Workload | None:
    """The most specific workload whose addresses contain ip (the first
    declared one wins a tie on the same prefix)."""
    addr = ipaddress.ip_address(ip)
    best: tuple[int, int, Workload] | None = None
    for order, w in enumerate(policy.workloads):
        for net in w.addresses:
            if net.version == addr.version and addr in net:
                key = (net.prefixlen, -order)
                if best is None or key > best[:2]:
                    best = (net.prefixlen, -order, w)
    return best[2] if best else None


def selector_matches(policy: Policy, sel: Selector, ip: str) -> bool:
    if sel.kind == "any":
        return True
    addr = ipaddress.ip_address(ip)
    if sel.kind == "cidr":
        assert sel.cidr is not None
        return sel.cidr.version == addr.version and addr in sel.cidr
    w = owner(policy, ip)
    if w is None:
        return False
    if sel.kind == "workload":
        return w.name == sel.workload
    return set(sel.labels) <= set(w.labels)


def reference_verdict(policy: Policy, src: str, dst: str, proto: int,
                      dport: int) -> tuple[abi.Verdict, str | None]:
    deny = allow = None
    for r in policy.rules:
        if not any(selector_matches(policy, s, src) for s in r.sources):
            continue
        if not any(selector_matches(policy, s, dst) for s in r.destinations):
            continue
        if r.protocol is not None and r.protocol != proto:
            continue
        if r.ports and not any(lo <= dport <= hi for lo, hi in r.ports):
            continue
        if r.action == "deny" and deny is None:
            deny = r.name
        if r.action == "allow" and allow is None:
            allow = r.name
    if deny is not None:
        action, name = "deny", deny
    elif allow is not None:
        action, name = "allow", allow
    else:
        action, name = policy.default, None
    if action == "allow":
        return abi.Verdict.ALLOWED, name
    w = owner(policy, dst)
    mode = (w.mode if w and w.mode else None) or policy.mode
    return (abi.Verdict.AUDIT if mode == "audit" else abi.Verdict.DENIED), name


def _lpm(entries: list[PolicyEntry], proto: int, dport: int) -> PolicyEntry | None:
    best = None
    for e in entries:
        if e.prefixlen == abi.POLICY_PREFIX_ANY_PROTO:
            ok = True
        elif e.proto != proto:
            ok = False
        else:
            bits = e.prefixlen - abi.POLICY_PREFIX_PROTO
            ok = bits == 0 or (dport >> (16 - bits)) == (e.port >> (16 - bits))
        if ok and (best is None or e.prefixlen > best.prefixlen):
            best = e
    return best


def simulate_datapath(compiled: CompiledPolicy, src: str, dst: str, proto: int,
                      dport: int) -> tuple[abi.Verdict, str | None]:
    groups: dict[tuple[int, int], list[PolicyEntry]] = defaultdict(list)
    for e in compiled.entries:
        groups[(e.src_class, e.dst_class)].append(e)
    si, di = lookup_identity(compiled, src), lookup_identity(compiled, dst)
    sc, sf = (si.src_class, si.flags) if si else (0, abi.IdentFlag(0))
    dc, df = (di.dst_class, di.flags) if di else (0, abi.IdentFlag(0))
    audit = bool(df & abi.IdentFlag.AUDIT) if di else bool(compiled.flags & abi.ConfigFlag.AUDIT)
    lookups = []
    if sc and dc and sf & abi.IdentFlag.SRC_PAIR and df & abi.IdentFlag.DST_PAIR:
        lookups.append((sc, dc))
    if sc and sf & abi.IdentFlag.SRC_ANY:
        lookups.append((sc, 0))
    if dc and df & abi.IdentFlag.DST_ANY:
        lookups.append((0, dc))
    if compiled.flags & abi.ConfigFlag.ANY_ANY:
        lookups.append((0, 0))
    best = None
    for g in lookups:
        e = _lpm(groups.get(g, []), proto, dport)
        if e is not None and e.decision.beats(best):
            best = e.decision
    if best is None:
        action, name = compiled.default_action, None
    else:
        action, name = best.action, compiled.rule_names[best.rule_id]
    if action == abi.Action.ALLOW:
        return abi.Verdict.ALLOWED, name
    return (abi.Verdict.AUDIT if audit else abi.Verdict.DENIED), name
