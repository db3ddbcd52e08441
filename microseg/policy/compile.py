"""Compile a validated Policy into the contents of the datapath's policy maps.

The datapath does a constant number of lookups per new flow whatever the
rule count, so the work happens here:

1. **Identities.** Every address prefix the policy names (workload addresses
   and rule CIDRs) becomes an identity; the LPM tries map an address to the
   most specific one. An identity belongs to the most specific workload whose
   prefix contains it, and satisfies every CIDR selector that contains it —
   so an address of a workload inside a rule's CIDR matches both.
2. **Classes.** Identities that satisfy exactly the same rules' ``from``
   selectors share a source class; likewise ``to`` and destination classes.
   Class 0 stands for ``any``.
3. **Groups.** A rule lands in group (src class, dst class) for every pair of
   classes it covers, or (0, dst), (src, 0), (0, 0) for ``any`` sides. A flow
   looks up at most four groups: (s, d), (s, any), (any, d), (any, any).
4. **Entries.** Within a group, protocols and port ranges become LPM prefixes
   over (protocol, port) whose *longest* match already carries the group's
   answer: deny beats allow, then the rule written first. The datapath only
   merges the (up to four) group answers with the same ordering.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .. import abi
from .model import IPNetwork, Policy, Rule, Selector

_ACTIONS = {"allow": abi.Action.ALLOW, "deny": abi.Action.DENY}


@dataclass(frozen=True)
class Decision:
    """A group answer: which rule, how it ranks, what it does."""

    rule_id: int
    priority: int
    action: abi.Action

    def beats(self, other: Decision | None) -> bool:
        """Deny over allow, then the rule written first."""
        if other is None:
            return True
        return (self.action, -self.priority) > (other.action, -other.priority)


@dataclass(frozen=True)
class IdentityEntry:
    identity: int
    prefix: IPNetwork
    workload: str | None
    src_class: int
    dst_class: int
    flags: abi.IdentFlag


@dataclass(frozen=True)
class PolicyEntry:
    src_class: int
    dst_class: int
    proto: int       # 0 = any
    port: int        # first port of the prefix
    prefixlen: int   # POLICY_PREFIX_ANY_PROTO .. POLICY_PREFIX_FULL
    decision: Decision


@dataclass
class CompiledPolicy:
    default_action: abi.Action
    flags: abi.ConfigFlag
    identities: list[IdentityEntry]
    entries: list[PolicyEntry]
    rule_ids: dict[str, int]                 # rule name -> stable id
    workload_of_identity: dict[int, str | None] = field(default_factory=dict)
    rule_names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workload_of_identity = {e.identity: e.workload for e in self.identities}
        self.rule_names = {i: n for n, i in self.rule_ids.items()}

    # -- map contents ----------------------------------------------------

    def ident_records(self, family: int, slot: int) -> tuple[bytes, bytes, int]:
        """(keys, values, count) for ident4_map or ident6_map in slot."""
        key_layout = abi.IDENT4_KEY if family == 4 else abi.IDENT6_KEY
        keys, values = bytearray(), bytearray()
        n = 0
        for e in self.identities:
            if e.prefix.version != family:
                continue
            keys += key_layout.struct.pack(32 + e.prefix.prefixlen, slot,
                                           e.prefix.network_address.packed)
            values += abi.IDENT_VALUE.struct.pack(e.identity, e.src_class, e.dst_class,
                                                  int(e.flags))
            n += 1
        return bytes(keys), bytes(values), n

    def policy_records(self, slot: int) -> tuple[bytes, bytes, int]:
        """(keys, values, count) for policy_map in slot."""
        kp, vp = abi.POLICY_KEY.struct.pack, abi.POLICY_VALUE.struct.pack
        keys = b"".join(kp(e.prefixlen, slot, e.src_class, e.dst_class, e.proto,
                           e.port.to_bytes(2, "big")) for e in self.entries)
        values = b"".join(vp(e.decision.rule_id, e.decision.priority, int(e.decision.action))
                          for e in self.entries)
        return keys, values, len(self.entries)

    def config_record(self, generation: int) -> bytes:
        return abi.POLICY_CONFIG.struct.pack(generation, int(self.default_action),
                                             int(self.flags))


def assign_rule_ids(names: Iterable[str], previous: Mapping[str, int]) -> dict[str, int]:
    """Stable ids: a rule keeps its id (and so its hit counters) across
    reloads; new names take the lowest free ids. 0 means "no rule"."""
    names = list(names)
    ids = {n: previous[n] for n in names if n in previous}
    used = set(ids.values())
    free = (i for i in range(1, abi.MAX_RULES) if i not in used)
    for n in names:
        if n not in ids:
            try:
                ids[n] = next(free)
            except StopIteration:
                raise ValueError(f"more than {abi.MAX_RULES - 1} rules") from None
    return ids


def port_range_prefixes(lo: int, hi: int) -> list[tuple[int, int]]:
    """Cover [lo, hi] of the 16-bit port space with (start, bits) prefixes."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


class _Identities:
    """Identity assignment and selector -> identity resolution."""

    def __init__(self, policy: Policy) -> None:
        prefixes: set[IPNetwork] = set()
        self.owners: dict[IPNetwork, list[str]] = defaultdict(list)
        for w in policy.workloads:
            for a in w.addresses:
                prefixes.add(a)
                self.owners[a].append(w.name)
        self.cidrs: set[IPNetwork] = set()
        for r in policy.rules:
            for s in r.sources + r.destinations:
                if s.kind == "cidr" and s.cidr is not None:
                    self.cidrs.add(s.cidr)
                    prefixes.add(s.cidr)
        ordered = sorted(prefixes, key=lambda p: (p.version, int(p.network_address),
                                                  p.prefixlen))
        self.ids: dict[IPNetwork, int] = {p: i + 1 for i, p in enumerate(ordered)}
        self.workload_of: dict[int, str | None] = {}
        self.by_workload: dict[str, set[int]] = defaultdict(set)
        self.by_cidr: dict[IPNetwork, set[int]] = defaultdict(set)
        lens = {4: sorted({c.prefixlen for c in self.cidrs if c.version == 4}),
                6: sorted({c.prefixlen for c in self.cidrs if c.version == 6})}
        owner_lens = {4: sorted({p.prefixlen for p in self.owners if p.version == 4},
                                reverse=True),
                      6: sorted({p.prefixlen for p in self.owners if p.version == 6},
                                reverse=True)}
        for p, ident in self.ids.items():
            owner = self._owner(p, owner_lens[p.version])
            self.workload_of[ident] = owner
            if owner is not None:
                self.by_workload[owner].add(ident)
            for plen in lens[p.version]:
                if plen > p.prefixlen:
                    break
                sup = p.supernet(new_prefix=plen) if plen < p.prefixlen else p
                if sup in self.cidrs:
                    self.by_cidr[sup].add(ident)

    def _owner(self, p: IPNetwork, lens_desc: list[int]) -> str | None:
        """The most specific workload prefix containing p (first-declared
        workload wins a tie on the very same prefix)."""
        for plen in lens_desc:
            if plen > p.prefixlen:
                continue
            sup = p.supernet(new_prefix=plen) if plen < p.prefixlen else p
            names = self.owners.get(sup)
            if names:
                return names[0]
        return None


def _workloads_with_labels(policy: Policy, labels: tuple[tuple[str, str], ...]) -> list[str]:
    want = set(labels)
    return [w.name for w in policy.workloads if want <= set(w.labels)]


def _resolve(sel: Selector, policy: Policy, idents: _Identities) -> set[int] | None:
    """Identities a selector covers; None for ``any``."""
    if sel.kind == "any":
        return None
    if sel.kind == "workload":
        return set(idents.by_workload.get(sel.workload or "", ()))
    if sel.kind == "labels":
        out: set[int] = set()
        for name in _workloads_with_labels(policy, sel.labels):
            out |= idents.by_workload.get(name, set())
        return out
    assert sel.cidr is not None
    return set(idents.by_cidr.get(sel.cidr, ()))


def _resolve_side(sels: tuple[Selector, ...], policy: Policy,
                  idents: _Identities) -> set[int] | None:
    out: set[int] = set()
    for s in sels:
        r = _resolve(s, policy, idents)
        if r is None:
            return None
        out |= r
    return out


def _classes(sides: list[set[int] | None], all_ids: Iterable[int]) -> dict[int, int]:
    """identity -> class: identities covered by exactly the same rules
    share a class. Identities no rule names explicitly get class 0."""
    member: dict[int, list[int]] = defaultdict(list)
    for r, ids in enumerate(sides):
        if ids:
            for i in ids:
                member[i].append(r)
    sig_class: dict[tuple[int, ...], int] = {}
    out = {}
    for ident in sorted(all_ids):
        sig = tuple(member.get(ident, ()))
        if not sig:
            out[ident] = abi.CLASS_ANY
            continue
        if sig not in sig_class:
            sig_class[sig] = len(sig_class) + 1
        out[ident] = sig_class[sig]
    return out


@dataclass(frozen=True)
class _RuleView:
    decision: Decision
    proto: int | None
    ports: tuple[tuple[int, int], ...]


def _best(decisions: Iterable[Decision | None]) -> Decision | None:
    best: Decision | None = None
    for d in decisions:
        if d is not None and d.beats(best):
            best = d
    return best


def _port_segments(rules: list[_RuleView]) -> list[tuple[int, int, Decision]]:
    """Sweep the port space: (lo, hi, best rule) for every stretch covered by
    at least one of the rules' ranges, adjacent equal stretches merged."""
    starts: dict[int, list[Decision]] = defaultdict(list)
    ends: dict[int, list[Decision]] = defaultdict(list)
    for r in rules:
        for lo, hi in r.ports:
            starts[lo].append(r.decision)
            ends[hi + 1].append(r.decision)
    points = sorted(set(starts) | set(ends))
    # Heaps of active decisions ordered best-first, with lazy removal.
    deny: list[int] = []
    allow: list[int] = []
    by_prio: dict[int, Decision] = {}
    active: dict[int, int] = defaultdict(int)
    out: list[tuple[int, int, Decision]] = []
    for i, pt in enumerate(points):
        for d in ends.get(pt, ()):
            active[d.priority] -= 1
        for d in starts.get(pt, ()):
            active[d.priority] += 1
            by_prio[d.priority] = d
            heapq.heappush(deny if d.action == abi.Action.DENY else allow, d.priority)
        while deny and active[deny[0]] <= 0:
            heapq.heappop(deny)
        while allow and active[allow[0]] <= 0:
            heapq.heappop(allow)
        top = deny[0] if deny else allow[0] if allow else None
        if top is None or i + 1 == len(points):
            continue
        seg = (pt, points[i + 1] - 1, by_prio[top])
        if out and out[-1][2] == seg[2] and out[-1][1] + 1 == seg[0]:
            out[-1] = (out[-1][0], seg[1], seg[2])
        else:
            out.append(seg)
    return out


def _group_entries(src: int, dst: int, rules: list[_RuleView]) -> list[PolicyEntry]:
    entries: list[PolicyEntry] = []
    base = _best(r.decision for r in rules if r.proto is None)
    if base is not None:
        entries.append(PolicyEntry(src, dst, 0, 0, abi.POLICY_PREFIX_ANY_PROTO, base))
    for proto in sorted({r.proto for r in rules if r.proto is not None}):
        whole = _best([base] + [r.decision for r in rules if r.proto == proto and not r.ports])
        if whole is not None and whole != base:
            entries.append(PolicyEntry(src, dst, proto, 0, abi.POLICY_PREFIX_PROTO, whole))
        ported = [r for r in rules if r.proto == proto and r.ports]
        if not ported:
            continue
        runs: list[tuple[int, int, Decision]] = []
        for lo, hi, d in _port_segments(ported):
            final = _best([whole, d])
            assert final is not None
            if final == whole:
                continue  # the protocol-wide entry already answers this
            if runs and runs[-1][2] == final and runs[-1][1] + 1 == lo:
                runs[-1] = (runs[-1][0], hi, final)
            else:
                runs.append((lo, hi, final))
        for lo, hi, d in runs:
            for start, bits in port_range_prefixes(lo, hi):
                entries.append(PolicyEntry(src, dst, proto, start,
                                           abi.POLICY_PREFIX_PROTO + bits, d))
    return entries


def compile_policy(policy: Policy, previous_rule_ids: Mapping[str, int] | None = None
                   ) -> CompiledPolicy:
    rule_ids = assign_rule_ids((r.name for r in policy.rules), previous_rule_ids or {})
    idents = _Identities(policy)
    all_ids = list(idents.ids.values())

    src_sides = [_resolve_side(r.sources, policy, idents) for r in policy.rules]
    dst_sides = [_resolve_side(r.destinations, policy, idents) for r in policy.rules]
    src_class = _classes(src_sides, all_ids)
    dst_class = _classes(dst_sides, all_ids)
    src_members: dict[int, set[int]] = defaultdict(set)  # rule -> src classes
    dst_members: dict[int, set[int]] = defaultdict(set)
    for r, ids in enumerate(src_sides):
        for i in ids or ():
            src_members[r].add(src_class[i])
    for r, ids in enumerate(dst_sides):
        for i in ids or ():
            dst_members[r].add(dst_class[i])

    groups: dict[tuple[int, int], list[_RuleView]] = defaultdict(list)
    for idx, rule in enumerate(policy.rules):
        view = _RuleView(Decision(rule_ids[rule.name], idx, _ACTIONS[rule.action]),
                         rule.protocol, rule.ports)
        srcs = [abi.CLASS_ANY] if src_sides[idx] is None else sorted(src_members[idx])
        dsts = [abi.CLASS_ANY] if dst_sides[idx] is None else sorted(dst_members[idx])
        for s in srcs:
            for d in dsts:
                groups[(s, d)].append(view)

    entries: list[PolicyEntry] = []
    for (s, d), views in sorted(groups.items()):
        entries.extend(_group_entries(s, d, views))

    src_pair = {s for s, d in groups if s and d}
    dst_pair = {d for s, d in groups if s and d}
    src_any = {s for s, d in groups if s and not d}
    dst_any = {d for s, d in groups if d and not s}
    modes = {w.name: w.mode for w in policy.workloads}

    identities = []
    for prefix, ident in sorted(idents.ids.items(), key=lambda kv: kv[1]):
        owner = idents.workload_of[ident]
        sc, dc = src_class[ident], dst_class[ident]
        flags = abi.IdentFlag(0)
        mode = (modes.get(owner) if owner else None) or policy.mode
        if mode == "audit":
            flags |= abi.IdentFlag.AUDIT
        if sc in src_pair:
            flags |= abi.IdentFlag.SRC_PAIR
        if sc in src_any:
            flags |= abi.IdentFlag.SRC_ANY
        if dc in dst_pair:
            flags |= abi.IdentFlag.DST_PAIR
        if dc in dst_any:
            flags |= abi.IdentFlag.DST_ANY
        identities.append(IdentityEntry(ident, prefix, owner, sc, dc, flags))

    cfg = abi.ConfigFlag(0)
    if policy.mode == "audit":
        cfg |= abi.ConfigFlag.AUDIT
    if (abi.CLASS_ANY, abi.CLASS_ANY) in groups:
        cfg |= abi.ConfigFlag.ANY_ANY
    return CompiledPolicy(_ACTIONS[policy.default], cfg, identities, entries, rule_ids)


def lookup_identity(compiled: CompiledPolicy, ip: str) -> IdentityEntry | None:
    """The identity an address maps to (longest prefix), as the datapath's
    LPM lookup would answer. For events and tests; not a hot path."""
    addr = ipaddress.ip_address(ip)
    best: IdentityEntry | None = None
    for e in compiled.identities:
        if (e.prefix.version == addr.version and addr in e.prefix
                and (best is None or e.prefix.prefixlen > best.prefix.prefixlen)):
            best = e
    return best


__all__ = ["CompiledPolicy", "Decision", "IdentityEntry", "PolicyEntry", "Rule",
           "assign_rule_ids", "compile_policy", "lookup_identity", "port_range_prefixes"]
