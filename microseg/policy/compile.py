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

Identity and class ids are kept from the previous compile where the thing
they name is unchanged (``previous=``), so a small edit changes few map
entries and the datapath rewrites only those.
"""

from __future__ import annotations

import ipaddress
import itertools
import struct
from array import array
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from microseg.kernel import abi
from microseg.policy.model import IPNetwork, Policy, Selector

_ACTIONS = {"allow": abi.Action.ALLOW, "deny": abi.Action.DENY}
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
# Protocols rules can name; any other protocol is looked up as proto 0.
NAMED_PROTOCOLS = (TCP, UDP, ICMP, ICMPV6)
W, L, C, A = abi.Space.WORKLOAD, abi.Space.LABELS, abi.Space.CIDR, abi.Space.ANY


class Decision(NamedTuple):
    """A group's answer, ordered so that the better decision compares
    greater: deny over allow over none, then the rule written first (rank is
    minus the rule's index)."""

    action: int
    rank: int
    rule_id: int

    @property
    def priority(self) -> int:
        return -self.rank

    @classmethod
    def of(cls, action: abi.Action, priority: int, rule_id: int) -> Decision:
        return cls(int(action), -priority, rule_id)


NO_DECISION = Decision(int(abi.Action.NONE), -0xFFFF, 0)


class IdentityEntry(NamedTuple):
    identity: int
    prefix: IPNetwork
    workload: str | None
    cls: tuple[int, int, int]  # class in the workload, labels, cidr spaces
    src_combos: int
    dst_combos: int
    flags: int                 # abi.IdentFlag


class PolicyEntry(NamedTuple):
    src_class: int
    dst_class: int
    proto: int       # 0: protocols no rule can name
    port_class: int  # 0: the header; n + 1: exception for port class n
    decision: Decision
    flags: int = 0   # abi.PolicyFlag


@dataclass
class CompiledPolicy:
    default_action: abi.Action
    flags: abi.ConfigFlag
    identities: list[IdentityEntry]
    entries: list[PolicyEntry]
    port_classes: dict[int, array]   # TCP/UDP -> class of every port
    rule_ids: dict[str, int]         # rule name -> stable id
    ids: dict[str, dict]             # what identity and class ids name, for the next compile
    workload_of_identity: dict[int, str | None] = field(default_factory=dict)
    rule_names: dict[int, str] = field(default_factory=dict)
    # Unique per compile, for caches keyed by compile (an id() is reused).
    serial: int = field(default_factory=itertools.count(1).__next__)

    def __post_init__(self) -> None:
        self.workload_of_identity = {e.identity: e.workload for e in self.identities}
        self.rule_names = {i: n for n, i in self.rule_ids.items()}

    # -- map contents, without the generation slot --------------------------

    def map_contents(self) -> dict[str, dict[bytes, bytes]]:
        """Map name -> {key without its slot field: value}. The datapath
        puts the slot in (microseg/datapath.py) and writes only what differs
        from what the slot holds."""
        ident_value = abi.IDENT_VALUE.struct.pack
        out: dict[str, dict[bytes, bytes]] = {
            "host4_map": {}, "host6_map": {}, "ident4_map": {}, "ident6_map": {}}
        for e in self.identities:
            p = e.prefix
            full = 32 if p.version == 4 else 128
            value = ident_value(e.identity, *e.cls, e.src_combos, e.dst_combos, e.flags)
            if p.prefixlen == full:
                out[f"host{p.version}_map"][p.network_address.packed] = value
            else:
                key = (32 + p.prefixlen).to_bytes(4, "little") + p.network_address.packed
                out[f"ident{p.version}_map"][key] = value
        rest = _POLICY_KEY_REST.pack
        value = _POLICY_VALUE.pack
        out["policy_map"] = {
            rest(e.src_class, e.dst_class, e.proto, e.port_class):
            value(e.decision.rule_id, -e.decision.rank, e.decision.action, e.flags)
            for e in self.entries}
        return out

    def port_class_values(self) -> bytes:
        """The slot's stretch of port_class_map: tcp's 65536 classes, then
        udp's, one u32 each."""
        return self.port_classes[TCP].tobytes() + self.port_classes[UDP].tobytes()

    def config_record(self, generation: int) -> bytes:
        return abi.POLICY_CONFIG.struct.pack(generation, int(self.default_action),
                                             int(self.flags))


# policy_key after its slot field, and policy_value (abi.POLICY_KEY/VALUE).
_POLICY_KEY_REST = struct.Struct(
    "<" + "".join(fmt for name, fmt in abi.POLICY_KEY.fields if name != "slot"))
_POLICY_VALUE = abi.POLICY_VALUE.struct


def assign_rule_ids(names: Iterable[str], previous: Mapping[str, int]) -> dict[str, int]:
    """Stable ids: a rule keeps its id (and so its hit counters) across
    reloads; new names take the lowest free ids. 0 means "no rule"."""
    return _assign((n for n in names), previous, limit=abi.MAX_RULES,
                   what="rules")


def _assign(keys: Iterable[Hashable], previous: Mapping, *, limit: int = 1 << 32,
            what: str = "ids", start: int = 1) -> dict:
    """Give each key its previous id when it had one, else the lowest free id."""
    keys = list(dict.fromkeys(keys))
    ids = {k: previous[k] for k in keys if k in previous}
    used = set(ids.values())
    nxt = start
    for k in keys:
        if k in ids:
            continue
        while nxt in used:
            nxt += 1
        if nxt >= limit:
            raise ValueError(f"more than {limit - 1} {what}")
        ids[k] = nxt
        used.add(nxt)
    return ids


# -- identities -------------------------------------------------------------

class _Identities:
    """Prefixes -> identities, owners, CIDR membership."""

    def __init__(self, policy: Policy, previous: Mapping[IPNetwork, int]) -> None:
        owners: dict[IPNetwork, str] = {}
        for w in policy.workloads:
            for a in w.addresses:
                owners.setdefault(a, w.name)  # first declared wins a tie
        self.cidrs: set[IPNetwork] = {
            s.cidr for r in policy.rules for s in r.sources + r.destinations
            if s.kind == "cidr" and s.cidr is not None}
        ordered = sorted(set(owners) | self.cidrs,
                         key=lambda p: (p.version, int(p.network_address), p.prefixlen))
        self.ids: dict[IPNetwork, int] = _assign(ordered, previous, what="identities")
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
    """Class ids per space (unique across spaces; stable across compiles for
    the same workload, set of label selectors, set of CIDRs) and what each
    selector covers, as (space, class) pairs."""

    def __init__(self, policy: Policy, idents: _Identities, previous: Mapping) -> None:
        labels_of = {w.name: frozenset(w.labels) for w in policy.workloads}
        sels = [s for r in policy.rules for s in r.sources + r.destinations]

        named = sorted({s.workload for s in sels if s.kind == "workload" and s.workload}
                       & set(labels_of))
        label_sels = sorted({s.labels for s in sels if s.kind == "labels"})
        sig_of_set = {ls: frozenset(want for want in label_sels if set(want) <= ls)
                      for ls in set(labels_of.values())}
        label_sigs = sorted({sig for sig in sig_of_set.values() if sig}, key=sorted)
        cidr_sigs = sorted({sig for sig in idents.cidrs_of.values() if sig},
                           key=lambda sig: sorted(map(str, sig)))
        keys = ([("w", n) for n in named] + [("l", sig) for sig in label_sigs]
                + [("c", sig) for sig in cidr_sigs])
        self.ids: dict[tuple, int] = _assign(keys, previous, what="classes")

        self.workload_class = {n: self.ids[("w", n)] for n in named}
        self.label_class = {name: self.ids.get(("l", sig_of_set[ls]), 0)
                            for name, ls in labels_of.items()}
        self.classes_of_label_sel: dict[tuple, set[int]] = defaultdict(set)
        for sig in label_sigs:
            for want in sig:
                self.classes_of_label_sel[want].add(self.ids[("l", sig)])
        self.cidr_class = {i: self.ids.get(("c", s), 0) for i, s in idents.cidrs_of.items()}
        self.classes_of_cidr: dict[IPNetwork, set[int]] = defaultdict(set)
        for sig in cidr_sigs:
            for c in sig:
                self.classes_of_cidr[c].add(self.ids[("c", sig)])

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

class _RuleView(NamedTuple):
    decision: Decision
    proto: int | None
    port_classes: tuple[int, ...] | None  # None: all ports


# A group's entries without its classes: (proto, port_class, decision, flags).
_Template = list[tuple[int, int, Decision, int]]


def _resolve(rules: list[_RuleView], n_classes: Mapping[int, int]) -> _Template:
    """A group's entries, whatever its classes: the header of each protocol
    and the port classes that decide otherwise."""
    out: _Template = []
    base = max((r.decision for r in rules if r.proto is None), default=NO_DECISION)
    if base != NO_DECISION:
        out.append((0, 0, base, 0))
    whole: dict[int, Decision] = {}
    ported: set[int] = set()
    for r in rules:
        if r.proto is None:
            continue
        if r.port_classes is None:
            if r.decision > whole.get(r.proto, NO_DECISION):
                whole[r.proto] = r.decision
        else:
            ported.add(r.proto)
    for proto in NAMED_PROTOCOLS:
        v0 = max(base, whole.get(proto, NO_DECISION))
        header, exceptions = v0, {}
        if proto in ported:
            per_class: dict[int, Decision] = {}
            for r in rules:
                if r.proto == proto and r.port_classes is not None:
                    for pc in r.port_classes:
                        if r.decision > per_class.get(pc, v0):
                            per_class[pc] = r.decision
            # Header: the most common decision over all port classes (0..n),
            # so that as few classes as possible need an exception.
            n_all = n_classes[proto] + 1
            top, top_count = (Counter(per_class.values()).most_common(1)[0] if per_class
                              else (v0, 0))
            v0_count = n_all - len(per_class)  # port rules never decide v0 itself
            if top != v0 and top_count > v0_count:
                header = top
                exceptions = {pc: d for pc, d in per_class.items() if d != top}
                exceptions.update((pc, v0) for pc in range(n_all) if pc not in per_class)
            else:
                exceptions = {pc: d for pc, d in per_class.items() if d != v0}
        if header == NO_DECISION and not exceptions:
            continue
        out.append((proto, 0, header, int(abi.PolicyFlag.EXCEPTIONS) if exceptions else 0))
        out.extend((proto, pc + 1, d, 0) for pc, d in exceptions.items())
    return out


def compile_policy(policy: Policy, previous: CompiledPolicy | None = None) -> CompiledPolicy:
    """Compile; with `previous`, keep the rule, identity and class ids of the
    things that did not change."""
    prev_ids = previous.ids if previous else {}
    rule_ids = assign_rule_ids((r.name for r in policy.rules),
                               previous.rule_ids if previous else {})
    idents = _Identities(policy, prev_ids.get("identities", {}))
    classes = _Classes(policy, idents, prev_ids.get("classes", {}))

    port_arrays: dict[int, array] = {}
    covers: dict[int, dict[int, list[int]]] = {}
    n_classes: dict[int, int] = {ICMP: 0, ICMPV6: 0}
    for proto in (TCP, UDP):
        ranges = {i: r.ports for i, r in enumerate(policy.rules)
                  if r.ports and r.protocol == proto}
        port_arrays[proto], covers[proto], n_classes[proto] = _port_classes(ranges)

    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    views: list[_RuleView] = []
    pairs: set[tuple[abi.Space, int, abi.Space, int]] = set()
    for idx, rule in enumerate(policy.rules):
        pcs = None
        if rule.ports and rule.protocol in (TCP, UDP):
            pcs = tuple(covers[rule.protocol].get(idx, ()))
        views.append(_RuleView(Decision.of(_ACTIONS[rule.action], idx, rule_ids[rule.name]),
                               rule.protocol, pcs))
        dsts = classes.side(rule.destinations)
        for sx, sc in classes.side(rule.sources):
            for dy, dc in dsts:
                groups[(sc, dc)].append(idx)
                pairs.add((sx, sc, dy, dc))

    # Groups with the same rules resolve alike: label groups share a few.
    templates: dict[tuple[int, ...], _Template] = {}
    entries: list[PolicyEntry] = []
    for (s, d), members in groups.items():
        key = tuple(members)
        tpl = templates.get(key)
        if tpl is None:
            tpl = templates[key] = _resolve([views[i] for i in members], n_classes)
        entries.extend(PolicyEntry(s, d, proto, pc, dec, flags) for proto, pc, dec, flags in tpl)

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
        flags = int(abi.IdentFlag.AUDIT) if mode == "audit" else 0
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
                          rule_ids, {"identities": idents.ids, "classes": classes.ids})


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
