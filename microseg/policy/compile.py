"""Compile a validated Policy into the contents of the datapath's policy maps.

The datapath does a bounded number of hash lookups per new flow whatever
the rule count, so the work happens here (bpf/lib/policy.h is the other
half of this contract):

1. **Identities.** Every address prefix the policy names (workload addresses
   and rule CIDRs) becomes an identity; an address maps to the most specific
   one. An identity belongs to the most specific workload whose prefix
   contains it, and lies inside every CIDR selector that contains it — so an
   address of a workload inside a rule's CIDR matches both selectors.
2. **Classes, one space per selector kind.** Workload selectors give one
   class per named workload; label selectors one class per distinct set of
   matching label selectors (a function of a workload's labels); CIDR
   selectors one class per distinct set of containing CIDRs. Spaces never
   mix, so a coarse label rule is never multiplied by the fine classes that
   workload rules create. Class 0 is "any".
3. **Groups.** A rule lands in group (src class, dst class) for every pair
   of classes its two sides cover. A packet looks up, for each (src space,
   dst space) combo both identities' masks allow, the group of its classes.
4. **Ports.** All port ranges of all rules split each of tcp and udp into
   port classes (a direct-index array in the kernel). Per group and protocol
   one header carries the most common decision over port classes; the port
   classes that decide otherwise are exceptions with entries of their own.
   Deny beats allow, then the rule written first — resolved here within a
   group, and by the datapath across groups.
"""

from __future__ import annotations

import ipaddress
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .. import abi
from .model import IPNetwork, Policy, Selector

_ACTIONS = {"allow": abi.Action.ALLOW, "deny": abi.Action.DENY}
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
# Protocols rules can name; any other protocol is looked up as proto 0.
NAMED_PROTOCOLS = (TCP, UDP, ICMP, ICMPV6)
W, L, C, A = abi.Space.WORKLOAD, abi.Space.LABELS, abi.Space.CIDR, abi.Space.ANY


@dataclass(frozen=True)
class Decision:
    """A group's answer: which rule, how it ranks, what it does."""

    rule_id: int
    priority: int
    action: abi.Action

    def beats(self, other: Decision | None) -> bool:
        """Deny over allow, then the rule written first."""
        if other is None or other.action == abi.Action.NONE:
            return self.action != abi.Action.NONE
        return (self.action, -self.priority) > (other.action, -other.priority)


NO_DECISION = Decision(0, 0xFFFF, abi.Action.NONE)
_NO_FLAGS = abi.PolicyFlag(0)


@dataclass(frozen=True)
class IdentityEntry:
    identity: int
    prefix: IPNetwork
    workload: str | None
    cls: tuple[int, int, int]  # class in the workload, labels, cidr spaces
    src_combos: int
    dst_combos: int
    flags: abi.IdentFlag


@dataclass(frozen=True)
class PolicyEntry:
    src_class: int
    dst_class: int
    proto: int       # 0: protocols no rule can name
    port_class: int  # 0: the header; n + 1: exception for port class n
    decision: Decision
    flags: abi.PolicyFlag = _NO_FLAGS


@dataclass
class CompiledPolicy:
    default_action: abi.Action
    flags: abi.ConfigFlag
    identities: list[IdentityEntry]
    entries: list[PolicyEntry]
    port_classes: dict[int, array]   # TCP/UDP -> class of every port
    rule_ids: dict[str, int]         # rule name -> stable id
    workload_of_identity: dict[int, str | None] = field(default_factory=dict)
    rule_names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workload_of_identity = {e.identity: e.workload for e in self.identities}
        self.rule_names = {i: n for n, i in self.rule_ids.items()}

    # -- map contents ----------------------------------------------------

    def _ident_value(self, e: IdentityEntry) -> bytes:
        return abi.IDENT_VALUE.struct.pack(e.identity, *e.cls, e.src_combos, e.dst_combos,
                                           int(e.flags))

    def host_records(self, family: int, slot: int) -> tuple[bytes, bytes, int]:
        """(keys, values, count) for host4_map / host6_map in slot."""
        layout = abi.HOST4_KEY if family == 4 else abi.HOST6_KEY
        full = 32 if family == 4 else 128
        chosen = [e for e in self.identities
                  if e.prefix.version == family and e.prefix.prefixlen == full]
        keys = b"".join(layout.struct.pack(slot, e.prefix.network_address.packed)
                        for e in chosen)
        return keys, b"".join(self._ident_value(e) for e in chosen), len(chosen)

    def prefix_records(self, family: int, slot: int) -> tuple[bytes, bytes, int]:
        """(keys, values, count) for the ident4_map / ident6_map tries."""
        layout = abi.IDENT4_KEY if family == 4 else abi.IDENT6_KEY
        full = 32 if family == 4 else 128
        chosen = [e for e in self.identities
                  if e.prefix.version == family and e.prefix.prefixlen < full]
        keys = b"".join(layout.struct.pack(32 + e.prefix.prefixlen, slot,
                                           e.prefix.network_address.packed) for e in chosen)
        return keys, b"".join(self._ident_value(e) for e in chosen), len(chosen)

    def policy_records(self, slot: int) -> tuple[bytes, bytes, int]:
        kp, vp = abi.POLICY_KEY.struct.pack, abi.POLICY_VALUE.struct.pack
        keys = b"".join(kp(slot, e.src_class, e.dst_class, e.proto, e.port_class)
                        for e in self.entries)
        values = b"".join(vp(e.decision.rule_id, e.decision.priority, int(e.decision.action),
                             int(e.flags)) for e in self.entries)
        return keys, values, len(self.entries)

    def port_class_values(self, slot: int) -> tuple[int, bytes]:
        """(first index, values) of the slot's stretch of port_class_map:
        tcp's 65536 classes then udp's, one u32 each."""
        del slot  # the stretch is contiguous; the caller places it
        return 0, self.port_classes[TCP].tobytes() + self.port_classes[UDP].tobytes()

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


# -- identities -------------------------------------------------------------

class _Identities:
    """Prefixes -> identities, owners, CIDR membership."""

    def __init__(self, policy: Policy) -> None:
        prefixes: set[IPNetwork] = set()
        owners: dict[IPNetwork, str] = {}
        for w in policy.workloads:
            for a in w.addresses:
                prefixes.add(a)
                owners.setdefault(a, w.name)  # first declared wins a tie
        self.cidrs: set[IPNetwork] = {
            s.cidr for r in policy.rules for s in r.sources + r.destinations
            if s.kind == "cidr" and s.cidr is not None}
        prefixes |= self.cidrs
        ordered = sorted(prefixes, key=lambda p: (p.version, int(p.network_address),
                                                  p.prefixlen))
        self.ids: dict[IPNetwork, int] = {p: i + 1 for i, p in enumerate(ordered)}
        self.owner: dict[int, str | None] = {}
        self.cidrs_of: dict[int, frozenset[IPNetwork]] = {}
        owner_lens = _lengths(owners, reverse=True)
        cidr_lens = _lengths(self.cidrs)
        for p, ident in self.ids.items():
            self.owner[ident] = _first_supernet(p, owner_lens[p.version], owners)
            self.cidrs_of[ident] = frozenset(
                sup for plen in cidr_lens[p.version] if plen <= p.prefixlen
                for sup in (_supernet(p, plen),) if sup in self.cidrs)


def _lengths(nets: Iterable[IPNetwork], reverse: bool = False) -> dict[int, list[int]]:
    out: dict[int, set[int]] = {4: set(), 6: set()}
    for n in nets:
        out[n.version].add(n.prefixlen)
    return {v: sorted(s, reverse=reverse) for v, s in out.items()}


def _supernet(p: IPNetwork, plen: int) -> IPNetwork:
    return p if plen == p.prefixlen else p.supernet(new_prefix=plen)


def _first_supernet(p: IPNetwork, lens_desc: list[int], table: dict[IPNetwork, str]
                    ) -> str | None:
    for plen in lens_desc:
        if plen <= p.prefixlen:
            hit = table.get(_supernet(p, plen))
            if hit is not None:
                return hit
    return None


# -- classes ----------------------------------------------------------------

class _Classes:
    """Class ids per space (unique across spaces) and what each selector
    covers, as (space, class) pairs."""

    def __init__(self, policy: Policy, idents: _Identities) -> None:
        self._next = 1
        labels_of = {w.name: frozenset(w.labels) for w in policy.workloads}
        sels = [s for r in policy.rules for s in r.sources + r.destinations]

        named = sorted({s.workload for s in sels if s.kind == "workload" and s.workload})
        self.workload_class = {name: self._new() for name in named if name in labels_of}

        label_sels = sorted({s.labels for s in sels if s.kind == "labels"})
        sig_of_set: dict[frozenset, tuple] = {}
        for ls in set(labels_of.values()):
            sig_of_set[ls] = tuple(i for i, want in enumerate(label_sels) if set(want) <= ls)
        label_class_of_sig: dict[tuple, int] = {}
        for sig in sorted(set(sig_of_set.values())):
            if sig:
                label_class_of_sig[sig] = self._new()
        self.label_class = {name: label_class_of_sig.get(sig_of_set[ls], 0)
                            for name, ls in labels_of.items()}
        self.classes_of_label_sel: dict[tuple, set[int]] = defaultdict(set)
        for sig, cls in label_class_of_sig.items():
            for i in sig:
                self.classes_of_label_sel[label_sels[i]].add(cls)

        cidr_class_of_sig: dict[frozenset, int] = {}
        for ident in sorted(idents.cidrs_of):
            sig = idents.cidrs_of[ident]
            if sig and sig not in cidr_class_of_sig:
                cidr_class_of_sig[sig] = self._new()
        self.cidr_class = {i: cidr_class_of_sig.get(s, 0) for i, s in idents.cidrs_of.items()}
        self.classes_of_cidr: dict[IPNetwork, set[int]] = defaultdict(set)
        for sig, cls in cidr_class_of_sig.items():
            for c in sig:
                self.classes_of_cidr[c].add(cls)

    def _new(self) -> int:
        self._next += 1
        return self._next - 1

    def identity_classes(self, idents: _Identities, ident: int) -> tuple[int, int, int]:
        owner = idents.owner[ident]
        return (self.workload_class.get(owner, 0) if owner else 0,
                self.label_class.get(owner, 0) if owner else 0,
                self.cidr_class.get(ident, 0))

    def side(self, sels: tuple[Selector, ...]) -> list[tuple[abi.Space, int]]:
        """(space, class) pairs a rule side covers; [(ANY, 0)] for any."""
        out: set[tuple[abi.Space, int]] = set()
        for s in sels:
            if s.kind == "any":
                return [(A, abi.CLASS_ANY)]
            if s.kind == "workload":
                cls = self.workload_class.get(s.workload or "")
                if cls:
                    out.add((W, cls))
            elif s.kind == "labels":
                out.update((L, c) for c in self.classes_of_label_sel.get(s.labels, ()))
            elif s.cidr is not None:
                out.update((C, c) for c in self.classes_of_cidr.get(s.cidr, ()))
        return sorted(out)


# -- ports ------------------------------------------------------------------

def _port_classes(ranges_by_rule: dict[int, tuple[tuple[int, int], ...]]
                  ) -> tuple[array, dict[int, list[int]], int]:
    """Split the port space by every rule's ranges. Returns the class of each
    port, the classes each rule covers, and the number of classes. Ports no
    rule names are class 0; stretches covered by the same rules share one."""
    starts: dict[int, list[int]] = defaultdict(list)
    ends: dict[int, list[int]] = defaultdict(list)
    for r, ranges in ranges_by_rule.items():
        for lo, hi in ranges:
            starts[lo].append(r)
            ends[hi + 1].append(r)
    points = sorted(set(starts) | set(ends))
    classes = array("I", bytes(4 * 65536))
    class_of_sig: dict[frozenset[int], int] = {}
    covers: dict[int, list[int]] = defaultdict(list)
    active: Counter[int] = Counter()
    for i, pt in enumerate(points[:-1]):
        for r in ends.get(pt, ()):
            active[r] -= 1
            if not active[r]:
                del active[r]
        for r in starts.get(pt, ()):
            active[r] += 1
        if not active:
            continue
        sig = frozenset(active)
        cls = class_of_sig.get(sig)
        if cls is None:
            cls = class_of_sig[sig] = len(class_of_sig) + 1
            for r in sig:
                covers[r].append(cls)
        nxt = points[i + 1]
        classes[pt:nxt] = array("I", [cls]) * (nxt - pt)
    return classes, covers, len(class_of_sig)


# -- groups -----------------------------------------------------------------

@dataclass(frozen=True)
class _RuleView:
    index: int
    decision: Decision
    proto: int | None


def _best(decisions: Iterable[Decision]) -> Decision:
    best = NO_DECISION
    for d in decisions:
        if d.beats(best):
            best = d
    return best


def _group_entries(src: int, dst: int, rules: list[_RuleView],
                   covers: dict[int, dict[int, list[int]]], n_classes: dict[int, int],
                   ported: set[int]) -> list[PolicyEntry]:
    out: list[PolicyEntry] = []
    base = _best(r.decision for r in rules if r.proto is None)
    if base != NO_DECISION:
        out.append(PolicyEntry(src, dst, 0, 0, base))
    for proto in NAMED_PROTOCOLS:
        mine = [r for r in rules if r.proto == proto]
        v0 = _best([base] + [r.decision for r in mine if r.index not in ported])
        exceptions: dict[int, Decision] = {}
        header = v0
        port_rules = [r for r in mine if r.index in ported]
        if port_rules:
            per_class: dict[int, Decision] = {}
            for r in port_rules:
                for pc in covers[proto][r.index]:
                    cur = per_class.get(pc, v0)
                    if r.decision.beats(cur):
                        per_class[pc] = r.decision
            # Header: the most common decision over all port classes (0..n),
            # so that as few classes as possible need an exception.
            counts = Counter(per_class.values())
            counts[v0] += n_classes[proto] + 1 - len(per_class)
            header = max(counts, key=lambda d: (counts[d], d == v0))
            exceptions = {pc: d for pc, d in per_class.items() if d != header}
            if header != v0:
                exceptions.update({pc: v0 for pc in range(n_classes[proto] + 1)
                                   if pc not in per_class})
        if header == NO_DECISION and not exceptions:
            continue
        flags = abi.PolicyFlag.EXCEPTIONS if exceptions else abi.PolicyFlag(0)
        out.append(PolicyEntry(src, dst, proto, 0, header, flags))
        out.extend(PolicyEntry(src, dst, proto, pc + 1, d) for pc, d in exceptions.items())
    return out


def compile_policy(policy: Policy, previous_rule_ids: Mapping[str, int] | None = None
                   ) -> CompiledPolicy:
    rule_ids = assign_rule_ids((r.name for r in policy.rules), previous_rule_ids or {})
    idents = _Identities(policy)
    classes = _Classes(policy, idents)

    ported = {i for i, r in enumerate(policy.rules) if r.ports}
    port_arrays: dict[int, array] = {}
    covers: dict[int, dict[int, list[int]]] = {}
    n_classes: dict[int, int] = {}
    for proto in (TCP, UDP):
        ranges = {i: r.ports for i, r in enumerate(policy.rules)
                  if r.ports and r.protocol == proto}
        port_arrays[proto], covers[proto], n_classes[proto] = _port_classes(ranges)
    for proto in (ICMP, ICMPV6):
        covers[proto], n_classes[proto] = {}, 0

    groups: dict[tuple[int, int], list[_RuleView]] = defaultdict(list)
    pairs: set[tuple[abi.Space, int, abi.Space, int]] = set()
    for idx, rule in enumerate(policy.rules):
        view = _RuleView(idx, Decision(rule_ids[rule.name], idx, _ACTIONS[rule.action]),
                         rule.protocol)
        dsts = classes.side(rule.destinations)
        for sx, sc in classes.side(rule.sources):
            for dy, dc in dsts:
                groups[(sc, dc)].append(view)
                pairs.add((sx, sc, dy, dc))

    entries: list[PolicyEntry] = []
    for (s, d), views in groups.items():
        entries.extend(_group_entries(s, d, views, covers, n_classes, ported))

    # Which spaces each class pairs with, for the identities' combo masks.
    src_spaces: dict[int, set[abi.Space]] = defaultdict(set)
    dst_spaces: dict[int, set[abi.Space]] = defaultdict(set)
    for sx, sc, dy, dc in pairs:
        if sc:
            src_spaces[sc].add(dy)
        if dc:
            dst_spaces[dc].add(sx)
    modes = {w.name: w.mode for w in policy.workloads}
    identities = []
    for prefix, ident in sorted(idents.ids.items(), key=lambda kv: kv[1]):
        owner = idents.owner[ident]
        cls = classes.identity_classes(idents, ident)
        src_combos = dst_combos = 0
        for space, c in zip((W, L, C), cls, strict=True):
            if c:
                for other in src_spaces.get(c, ()):
                    src_combos |= abi.combo_bit(space, other)
                for other in dst_spaces.get(c, ()):
                    dst_combos |= abi.combo_bit(other, space)
        mode = (modes.get(owner) if owner else None) or policy.mode
        flags = abi.IdentFlag.AUDIT if mode == "audit" else abi.IdentFlag(0)
        identities.append(IdentityEntry(ident, prefix, owner, cls, src_combos, dst_combos,
                                        flags))

    cfg = abi.ConfigFlag(0)
    if policy.mode == "audit":
        cfg |= abi.ConfigFlag.AUDIT
    if (abi.CLASS_ANY, abi.CLASS_ANY) in groups:
        cfg |= abi.ConfigFlag.ANY_ANY
    if any(e.prefix.version == 4 and e.prefix.prefixlen < 32 for e in identities):
        cfg |= abi.ConfigFlag.PREFIX4
    if any(e.prefix.version == 6 and e.prefix.prefixlen < 128 for e in identities):
        cfg |= abi.ConfigFlag.PREFIX6
    return CompiledPolicy(_ACTIONS[policy.default], cfg, identities, entries, port_arrays,
                          rule_ids)


def lookup_identity(compiled: CompiledPolicy, ip: str) -> IdentityEntry | None:
    """The identity an address maps to (longest prefix), as the datapath's
    lookups would answer. For events and tests; not a hot path."""
    addr = ipaddress.ip_address(ip)
    best: IdentityEntry | None = None
    for e in compiled.identities:
        if (e.prefix.version == addr.version and addr in e.prefix
                and (best is None or e.prefix.prefixlen > best.prefix.prefixlen)):
            best = e
    return best


__all__ = ["NO_DECISION", "CompiledPolicy", "Decision", "IdentityEntry", "PolicyEntry",
           "assign_rule_ids", "compile_policy", "lookup_identity"]
