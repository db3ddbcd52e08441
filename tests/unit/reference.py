"""Two independent answers to "what does the policy say about this packet":

* ``reference_verdict`` reads docs/policy.md literally: walk every rule, deny beats
  allow, the first written decides among equals, else the default; audit by
  the destination workload's mode or the global one.
* ``simulate_datapath`` does what the kernel does with the compiled maps:
  longest-prefix identity lookups, up to four group lookups with
  longest-prefix over (protocol, port), and the same merge.

Tests compare them on random policies and packets.
"""

from __future__ import annotations

import ipaddress

from microseg.kernel import abi
from microseg.policy.compile import NO_DECISION, CompiledPolicy, lookup_identity
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


def reference_first_packet(policy: Policy, src: str, dst: str, proto: int, sport: int,
                           dport: int, *, may_be_reply: bool
                           ) -> tuple[abi.Verdict, str | None, bool]:
    """A packet with no session, read as docs/policy.md says: judged in its
    own direction; when denied and it may be a reply (not a connection
    start), judged as the flow it would answer — allowed there, it passes
    as that flow's reply. (verdict, rule, picked up as a reply)."""
    verdict, rule = reference_verdict(policy, src, dst, proto, dport)
    if verdict == abi.Verdict.DENIED and may_be_reply:
        back, back_rule = reference_verdict(policy, dst, src, proto, sport)
        if back != abi.Verdict.DENIED:
            return back, back_rule, True
    return verdict, rule, False


def simulate_datapath(compiled: CompiledPolicy, src: str, dst: str, proto: int,
                      dport: int) -> tuple[abi.Verdict, str | None]:
    """match_policy() of bpf/lib/policy.h, in Python, on the compiled maps."""
    entries = {(e.src_class, e.dst_class, e.proto, e.port_class): e for e in compiled.entries}
    si, di = lookup_identity(compiled, src), lookup_identity(compiled, dst)
    scls = (*si.cls, 0) if si else (0, 0, 0, 0)
    dcls = (*di.cls, 0) if di else (0, 0, 0, 0)
    src_bits = 0xF000 | (si.src_combos if si else 0)
    dst_bits = 0x8888 | (di.dst_combos if di else 0)
    combos = src_bits & dst_bits
    if not compiled.flags & abi.ConfigFlag.ANY_ANY:
        combos &= ~0x8000
    audit = bool(di.flags & abi.IdentFlag.AUDIT) if di else bool(
        compiled.flags & abi.ConfigFlag.AUDIT)
    pc = compiled.port_classes[proto][dport] if proto in (6, 17) else 0
    kproto = proto if proto in (6, 17, 1, 58) else 0
    best = NO_DECISION
    for x in range(4):
        for y in range(4):
            if not combos & (1 << (x * 4 + y)):
                continue
            head = entries.get((scls[x], dcls[y], kproto, 0))
            if head is None:
                continue
            dec = head.decision
            if head.flags & abi.PolicyFlag.EXCEPTIONS:
                exc = entries.get((scls[x], dcls[y], kproto, pc + 1))
                if exc is not None:
                    dec = exc.decision
            best = max(best, dec)
    if best == NO_DECISION:
        action, name = compiled.default_action, None
    else:
        action, name = abi.Action(best.action), compiled.rule_names[best.rule_id]
    if action == abi.Action.ALLOW:
        return abi.Verdict.ALLOWED, name
    return (abi.Verdict.AUDIT if audit else abi.Verdict.DENIED), name
