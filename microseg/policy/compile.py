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
from microseg.policy.model import IPNetwork, Policy, Rule, Selector, selector_name

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
    # (src class, dst class) -> (its entries without the classes, and what
    # the next compile needs to know of them; see _resolve).
    groups: dict[tuple[int, int], tuple[list[tuple[int, int, Decision, int]], dict[int, int]]]
    port_classes: dict[int, array]   # TCP/UDP -> class of every port
    rule_ids: dict[str, int]         # rule name -> stable id
    ids: dict[str, dict]             # what identity and class ids name, for the next compile
    workload_of_identity: dict[int, str | None] = field(default_factory=dict)
    rule_names: dict[int, str] = field(default_factory=dict)
    # Unique per compile, for caches keyed by compile (an id() is reused).
    serial: int = field(default_factory=itertools.count(1).__next__)
    # Compiled as an edit: (serial of the compile it edits, map name ->
    # {key without its slot field: new value, or None: deleted}).
    delta: tuple[int, dict[str, dict[bytes, bytes | None]]] | None = field(
        default=None, repr=False, compare=False)
    _memo: _Memo | None = field(default=None, repr=False, compare=False)
    _base: CompiledPolicy | None = field(default=None, repr=False, compare=False)
    _contents: dict[str, dict[bytes, bytes]] | None = field(default=None, repr=False,
                                                            compare=False)
    _entries: list[PolicyEntry] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.workload_of_identity = {e.identity: e.workload for e in self.identities}
        self.rule_names = {i: n for n, i in self.rule_ids.items()}

    @property
    def entries(self) -> list[PolicyEntry]:
        """Every policy_map entry (made when first asked: the datapath
        needs only map_contents())."""
        if self._entries is None:
            self._entries = [PolicyEntry(s, d, proto, pc, dec, flags)
                             for (s, d), (tpl, _needs) in self.groups.items()
                             for proto, pc, dec, flags in tpl]
        return self._entries

    # -- map contents, without the generation slot --------------------------

    def map_contents(self) -> dict[str, dict[bytes, bytes]]:
        """Map name -> {key without its slot field: value}. The datapath
        puts the slot in (microseg/datapath.py) and writes only what differs
        from what the slot holds. Kept once made; an edit's contents are
        its base's with the delta applied, and the base hands them on."""
        if self._contents is not None:
            return self._contents
        base = self._base
        if base is not None and base._contents is not None and self.delta is not None:
            out = {name: dict(m) for name, m in base._contents.items()}
            base._contents = None  # one copy of 400,000 entries is enough
            for name, changes in self.delta[1].items():
                m = out[name]
                for k, v in changes.items():
                    if v is None:
                        del m[k]
                    else:
                        m[k] = v
        else:
            out = _identity_contents(self.identities)
            policy_map = out["policy_map"] = {}
            for g, (tpl, _needs) in self.groups.items():
                policy_map.update(_group_contents(g, tpl))
        self._contents, self._base = out, None
        return out

    def port_class_values(self) -> bytes:
        """The slot's stretch of port_class_map: tcp's 65536 classes, then
        udp's, one u32 each."""
        return self.port_classes[TCP].tobytes() + self.port_classes[UDP].tobytes()

    def config_record(self, generation: int, stamp: int) -> bytes:
        """config_map's value for this policy in a slot; stamp: the slot
        write's nonce (struct policy_config)."""
        return abi.POLICY_CONFIG.struct.pack(generation, int(self.default_action),
                                             int(self.flags), stamp)

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
                       & {selector_name(n) for n in labels_of})
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
        return (self.workload_class.get(selector_name(owner), 0) if owner else 0,
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
    active: dict[int, int] = {}  # rule -> its ranges covering this stretch
    for i, pt in enumerate(points[:-1]):
        for r in ends.get(pt, ()):
            n = active[r] - 1
            if n:
                active[r] = n
            else:
                del active[r]
        for r in starts.get(pt, ()):
            active[r] = active.get(r, 0) + 1
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


def _resolve(rules: list[_RuleView], n_classes: Mapping[int, int]
             ) -> tuple[_Template, dict[int, int]]:
    """A group's entries, whatever its classes: the header of each protocol
    and the port classes that decide otherwise. And per protocol with port
    rules, its `need`: the result depends on the number of port classes n
    only while n + 1 < need (a compile that adds or removes a port class
    resolves only those groups again)."""
    out: _Template = []
    needs: dict[int, int] = {}
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
            needs[proto] = top_count + len(per_class) if top != v0 else 0
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
    return out, needs


def compile_policy(policy: Policy, previous: CompiledPolicy | None = None) -> CompiledPolicy:
    """Compile; with `previous`, keep the rule, identity and class ids of the
    things that did not change. When `previous` differs from `policy` in a
    few rules only (same workloads, same selectors in use), only the groups
    those rules touch are resolved again, and the result carries the map
    entries that changed (`delta`); the map contents are the same as a full
    compile's either way (docs/performance.md "Reloads")."""
    if previous is not None and previous._memo is not None:
        out = _compile_edit(policy, previous)
        if out is not None:
            return out
    return _compile_full(policy, previous)


class _Ports(NamedTuple):
    ranges: dict[int, tuple[tuple[int, int], ...]]  # rule index -> its ranges
    classes: array
    covers: dict[int, list[int]]
    n: int


def _ports_of(ranges: dict[int, tuple[tuple[int, int], ...]]) -> _Ports:
    return _Ports(ranges, *_port_classes(ranges))


def _port_ranges(policy: Policy, proto: int) -> dict[int, tuple[tuple[int, int], ...]]:
    return {i: r.ports for i, r in enumerate(policy.rules) if r.ports and r.protocol == proto}


def _shape_items(rule: Rule) -> list[tuple]:
    """What of a rule the identities and classes depend on: the workloads,
    label sets and CIDRs its selectors name."""
    out: list[tuple] = []
    for s in rule.sources + rule.destinations:
        if s.kind == "workload":
            out.append(("w", s.workload))
        elif s.kind == "labels":
            out.append(("l", s.labels))
        elif s.kind == "cidr":
            out.append(("c", s.cidr))
    return out


# A rule's sides: the (space, class) pairs of its sources, of its destinations.
_Sides = tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]


def _space_counts(sides: _Sides, src_cnt: Counter, dst_cnt: Counter, step: int) -> None:
    """Count which spaces each class pairs with (for the identities' combo
    masks), so that a rule can be taken out again."""
    srcs, dsts = sides
    dst_spaces = {dy for dy, _ in dsts}
    src_spaces = {sx for sx, _ in srcs}
    for _sx, sc in srcs:
        if sc:
            for dy in dst_spaces:
                src_cnt[(sc, dy)] += step
    for _dy, dc in dsts:
        if dc:
            for sx in src_spaces:
                dst_cnt[(dc, sx)] += step


@dataclass
class _Memo:
    """What a compile keeps so that the next one can redo only what an edit
    touches. A compile that derives from it copies its containers (shallow,
    a few ms) and never changes them: `previous` stays valid."""

    rules: tuple[Rule, ...]
    workloads: tuple
    mode: str
    shape: Counter                # _shape_items over all rules
    idents: _Identities
    classes: _Classes
    ports: dict[int, _Ports]      # TCP, UDP
    views: list[_RuleView]
    sides: list[_Sides]
    groups: dict[tuple[int, int], tuple[int, ...]]             # -> rule indexes
    tpls: dict[tuple[int, int], tuple[_Template, dict[int, int]]]  # -> (entries, needs)
    src_cnt: Counter
    dst_cnt: Counter
    ident_contents: dict[str, dict[bytes, bytes]]
    # Per protocol, the groups whose `need` (see _resolve) is over _NEEDY:
    # those a change in the number of port classes can change.
    needy: dict[int, dict[tuple[int, int], int]]


_NEEDY = 8


def _needy(tpls: Mapping[tuple[int, int], tuple[_Template, dict[int, int]]]
           ) -> dict[int, dict[tuple[int, int], int]]:
    return {p: {g: needs[p] for g, (_tpl, needs) in tpls.items() if needs.get(p, 0) > _NEEDY}
            for p in (TCP, UDP)}


def _n_classes(ports: Mapping[int, _Ports]) -> dict[int, int]:
    return {ICMP: 0, ICMPV6: 0, TCP: ports[TCP].n, UDP: ports[UDP].n}


def _view(rule: Rule, idx: int, rule_ids: Mapping[str, int], ports: Mapping[int, _Ports]
          ) -> _RuleView:
    pcs = None
    if rule.ports and rule.protocol in (TCP, UDP):
        pcs = tuple(ports[rule.protocol].covers.get(idx, ()))
    return _RuleView(Decision.of(_ACTIONS[rule.action], idx, rule_ids[rule.name]),
                     rule.protocol, pcs)


def _compile_full(policy: Policy, previous: CompiledPolicy | None) -> CompiledPolicy:
    prev_ids = previous.ids if previous else {}
    rule_ids = assign_rule_ids((r.name for r in policy.rules),
                               previous.rule_ids if previous else {})
    idents = _Identities(policy, prev_ids.get("identities", {}))
    classes = _Classes(policy, idents, prev_ids.get("classes", {}))
    ports = {proto: _ports_of(_port_ranges(policy, proto)) for proto in (TCP, UDP)}
    n_classes = _n_classes(ports)

    building: dict[tuple[int, int], list[int]] = defaultdict(list)
    views: list[_RuleView] = []
    sides: list[_Sides] = []
    src_cnt: Counter = Counter()
    dst_cnt: Counter = Counter()
    shape: Counter = Counter()
    for idx, rule in enumerate(policy.rules):
        views.append(_view(rule, idx, rule_ids, ports))
        rs = (tuple(classes.side(rule.sources)), tuple(classes.side(rule.destinations)))
        sides.append(rs)
        for _sx, sc in rs[0]:
            for _dy, dc in rs[1]:
                building[(sc, dc)].append(idx)
        _space_counts(rs, src_cnt, dst_cnt, 1)
        shape.update(_shape_items(rule))

    # Groups with the same rules resolve alike: label groups share a few.
    resolved: dict[tuple[int, ...], tuple[_Template, dict[int, int]]] = {}
    groups: dict[tuple[int, int], tuple[int, ...]] = {}
    tpls: dict[tuple[int, int], tuple[_Template, dict[int, int]]] = {}
    for g, members in building.items():
        key = groups[g] = tuple(members)
        tpl = resolved.get(key)
        if tpl is None:
            tpl = resolved[key] = _resolve([views[i] for i in key], n_classes)
        tpls[g] = tpl

    identities = _identity_entries(policy, idents, classes, src_cnt, dst_cnt)
    memo = _Memo(policy.rules, policy.workloads, policy.mode, shape, idents, classes, ports,
                 views, sides, groups, tpls, src_cnt, dst_cnt, _identity_contents(identities),
                 _needy(tpls))
    return _finish(policy, identities, ports, rule_ids, idents, classes, memo)


def _finish(policy: Policy, identities: list[IdentityEntry], ports: Mapping[int, _Ports],
            rule_ids: dict[str, int], idents: _Identities, classes: _Classes, memo: _Memo,
            base: CompiledPolicy | None = None, delta: dict | None = None) -> CompiledPolicy:
    cfg = abi.ConfigFlag(0)
    if policy.mode == "audit":
        cfg |= abi.ConfigFlag.AUDIT
    if (abi.CLASS_ANY, abi.CLASS_ANY) in memo.groups:
        cfg |= abi.ConfigFlag.ANY_ANY
    if any(e.prefix.version == 4 and e.prefix.prefixlen < 32 for e in identities):
        cfg |= abi.ConfigFlag.PREFIX4
    if any(e.prefix.version == 6 and e.prefix.prefixlen < 128 for e in identities):
        cfg |= abi.ConfigFlag.PREFIX6
    out = CompiledPolicy(_ACTIONS[policy.default], cfg, identities, memo.tpls,
                         {p: ports[p].classes for p in (TCP, UDP)}, rule_ids,
                         {"identities": idents.ids, "classes": classes.ids})
    out._memo = memo
    if base is not None and delta is not None:
        out._base, out.delta = base, (base.serial, delta)
        base._base = None  # no chain of compiles kept alive
    return out


def _identity_entries(policy: Policy, idents: _Identities, classes: _Classes,
                      src_cnt: Counter, dst_cnt: Counter) -> list[IdentityEntry]:
    # Which spaces each class pairs with, for the identities' combo masks.
    src_spaces: dict[int, set[abi.Space]] = defaultdict(set)
    dst_spaces: dict[int, set[abi.Space]] = defaultdict(set)
    for (sc, dy), n in src_cnt.items():
        if n:
            src_spaces[sc].add(dy)
    for (dc, sx), n in dst_cnt.items():
        if n:
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
    return identities


def _identity_contents(identities: Iterable[IdentityEntry]) -> dict[str, dict[bytes, bytes]]:
    ident_value = abi.IDENT_VALUE.struct.pack
    out: dict[str, dict[bytes, bytes]] = {
        "host4_map": {}, "host6_map": {}, "ident4_map": {}, "ident6_map": {}}
    for e in identities:
        p = e.prefix
        full = 32 if p.version == 4 else 128
        value = ident_value(e.identity, *e.cls, e.src_combos, e.dst_combos, e.flags)
        if p.prefixlen == full:
            out[f"host{p.version}_map"][p.network_address.packed] = value
        else:
            key = (32 + p.prefixlen).to_bytes(4, "little") + p.network_address.packed
            out[f"ident{p.version}_map"][key] = value
    return out


def _group_contents(g: tuple[int, int], tpl: _Template) -> dict[bytes, bytes]:
    rest, value = _POLICY_KEY_REST.pack, _POLICY_VALUE.pack
    s, d = g
    return {rest(s, d, proto, pc): value(dec.rule_id, -dec.rank, dec.action, flags)
            for proto, pc, dec, flags in tpl}


def _edit_rule_ids(previous: dict[str, int], old: tuple[Rule, ...], new: tuple[Rule, ...],
                   changed: list[int]) -> dict[str, int]:
    """assign_rule_ids(new's names, previous) when only the rules at
    `changed` differ from `old`, whose ids `previous` holds: the other names
    keep theirs, so only the changed rules' names are looked at."""
    gone = {old[i].name for i in changed if i < len(old)}
    if gone:
        gone -= {r.name for r in new}
    ids = {n: i for n, i in previous.items() if n not in gone} if gone else dict(previous)
    fresh = dict.fromkeys(new[i].name for i in changed
                          if i < len(new) and new[i].name not in ids)
    if fresh:
        used = set(ids.values())
        nxt = 1
        for name in fresh:  # the lowest free ids, in rule order (as _assign)
            while nxt in used:
                nxt += 1
            if nxt >= abi.MAX_RULES:
                raise ValueError(f"more than {abi.MAX_RULES - 1} rules")
            ids[name] = nxt
            used.add(nxt)
    return ids


# An edit of more rules than this is compiled in full: past it, the
# bookkeeping of what changed costs more than it saves.
EDIT_RULES_MAX = 256


def _compile_edit(policy: Policy, previous: CompiledPolicy) -> CompiledPolicy | None:
    """`policy` as an edit of `previous` (see compile_policy), or None when
    it is not a small one: other workloads, another set of selectors in use
    (identities and classes change), or many rules changed or moved."""
    memo = previous._memo
    assert memo is not None
    old, new = memo.rules, policy.rules
    if policy.workloads is not memo.workloads and policy.workloads != memo.workloads:
        return None
    changed = [i for i in range(max(len(old), len(new)))
               if i >= len(old) or i >= len(new) or (old[i] is not new[i] and old[i] != new[i])]
    if len(changed) > EDIT_RULES_MAX:
        return None
    shape = memo.shape.copy()
    for i in changed:
        if i < len(old):
            shape.subtract(_shape_items(old[i]))
        if i < len(new):
            shape.update(_shape_items(new[i]))
    if {k for k, n in shape.items() if n > 0} != {k for k, n in memo.shape.items() if n > 0}:
        return None
    shape = +shape
    rule_ids = _edit_rule_ids(previous.rule_ids, old, new, changed)
    idents, classes = memo.idents, memo.classes

    ports = dict(memo.ports)
    affected = set(changed)
    for proto in (TCP, UDP):
        if not any((i < len(old) and old[i].ports and old[i].protocol == proto)
                   or (i < len(new) and new[i].ports and new[i].protocol == proto)
                   for i in changed):
            continue
        was = memo.ports[proto]
        now = ports[proto] = _ports_of(_port_ranges(policy, proto))
        if now.classes != was.classes or now.covers != was.covers:
            affected.update(i for i in now.ranges if i < len(old) and i not in affected
                            and now.covers.get(i) != was.covers.get(i))
    n_classes = _n_classes(ports)
    old_n = _n_classes(memo.ports)
    if len(affected) > EDIT_RULES_MAX:
        return None

    views = memo.views[:len(new)] + [None] * (len(new) - len(memo.views))  # type: ignore[list-item]
    sides = memo.sides[:len(new)] + [None] * (len(new) - len(memo.sides))  # type: ignore[list-item]
    src_cnt, dst_cnt = memo.src_cnt.copy(), memo.dst_cnt.copy()
    removed: dict[tuple[int, int], set[int]] = defaultdict(set)
    added: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i in sorted(affected):
        if i < len(old):
            was_sides = memo.sides[i]
            for _sx, sc in was_sides[0]:
                for _dy, dc in was_sides[1]:
                    removed[(sc, dc)].add(i)
            _space_counts(was_sides, src_cnt, dst_cnt, -1)
        if i < len(new):
            rule = new[i]
            views[i] = _view(rule, i, rule_ids, ports)
            rs = sides[i] = (tuple(classes.side(rule.sources)),
                             tuple(classes.side(rule.destinations)))
            for _sx, sc in rs[0]:
                for _dy, dc in rs[1]:
                    added[(sc, dc)].add(i)
            _space_counts(rs, src_cnt, dst_cnt, 1)
    touched = set(removed) | set(added)
    # A group's header may depend on how many port classes there are (see
    # _resolve): those whose `need` reaches past the smaller count resolve again.
    for proto in (TCP, UDP):
        if n_classes[proto] != old_n[proto]:
            least = min(n_classes[proto], old_n[proto]) + 1
            if least >= _NEEDY:
                touched.update(g for g, need in memo.needy[proto].items() if need > least)
            else:
                touched.update(g for g, (_tpl, needs) in memo.tpls.items()
                               if needs.get(proto, 0) > least)
    needy = {p: memo.needy[p].copy() for p in (TCP, UDP)}

    groups, tpls = memo.groups.copy(), memo.tpls.copy()
    changes: dict[bytes, bytes | None] = {}
    resolved: dict[tuple[int, ...], tuple[_Template, dict[int, int]]] = {}
    rest, value = _POLICY_KEY_REST.pack, _POLICY_VALUE.pack
    for g in touched:
        members = set(groups.get(g, ())) - removed.get(g, set()) | added.get(g, set())
        before = tpls.get(g)
        if members:
            key = groups[g] = tuple(sorted(members))
            tpl = resolved.get(key)
            if tpl is None:
                tpl = resolved[key] = _resolve([views[i] for i in key], n_classes)
            tpls[g] = tpl
        else:
            groups.pop(g, None)
            tpls.pop(g, None)
            tpl = None
        for p in (TCP, UDP):
            need = tpl[1].get(p, 0) if tpl is not None else 0
            if need > _NEEDY:
                needy[p][g] = need
            else:
                needy[p].pop(g, None)
        if before is not None and tpl is not None and before[0] == tpl[0]:
            continue
        # Compared before packing: a changed group mostly keeps its entries.
        was = {(p, pc): (dec, fl) for p, pc, dec, fl in before[0]} if before else {}
        now = {(p, pc): (dec, fl) for p, pc, dec, fl in tpl[0]} if tpl else {}
        s, d = g
        changes.update((rest(s, d, *k), None) for k in was if k not in now)
        changes.update((rest(s, d, *k), value(dec.rule_id, -dec.rank, dec.action, fl))
                       for k, (dec, fl) in now.items() if was.get(k) != (dec, fl))

    if policy.mode == memo.mode and src_cnt == memo.src_cnt and dst_cnt == memo.dst_cnt:
        identities, ident_contents = previous.identities, memo.ident_contents
    else:
        identities = _identity_entries(policy, idents, classes, src_cnt, dst_cnt)
        ident_contents = _identity_contents(identities)
    delta: dict[str, dict[bytes, bytes | None]] = {"policy_map": changes}
    for name, now_map in ident_contents.items():
        was_map = memo.ident_contents[name]
        d: dict[bytes, bytes | None] = {k: None for k in was_map if k not in now_map}
        d.update((k, v) for k, v in now_map.items() if was_map.get(k) != v)
        delta[name] = d
    src_cnt, dst_cnt = +src_cnt, +dst_cnt
    new_memo = _Memo(new, policy.workloads, policy.mode, shape, idents, classes, ports,
                     views, sides, groups, tpls, src_cnt, dst_cnt, ident_contents, needy)
    return _finish(policy, identities, ports, rule_ids, idents, classes, new_memo,
                   previous, delta)


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
