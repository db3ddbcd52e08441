"""What the policy says about one flow, without a kernel.

``Evaluator`` answers from the compiled maps exactly as match_policy() of
bpf/lib/policy.h does (identity lookups, at most 16 group lookups, deny over
allow, then the rule written first). It is what `policy diff` and `policy
suggest` replay observed flows against, so a call is a few dict lookups,
memoised per address.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from microseg.kernel import abi
from microseg.policy.compile import (
    NAMED_PROTOCOLS,
    NO_DECISION,
    TCP,
    UDP,
    CompiledPolicy,
    IdentityEntry,
    PolicyEntry,
    compile_policy,
)
from microseg.policy.model import Policy

VerdictName = Literal["allowed", "denied", "audit"]

# The combos every source / destination takes part in whatever its identity
# (COMBOS_SRC_ANY, COMBOS_DST_ANY and COMBO_ANY_ANY of bpf/lib/policy.h).
_COMBOS_SRC_ANY = 0xF000
_COMBOS_DST_ANY = 0x8888
_COMBO_ANY_ANY = 0x8000
# Memoised answers are dropped wholesale past this many (bounded memory on
# a replay of many distinct addresses; refilling is cheap).
_MEMO_LIMIT = 1 << 20


class _Endpoint:
    """What the datapath knows about an address: its identity's classes per
    space (and "any"), combo masks, audit flag and owner."""

    __slots__ = ("audit", "cls", "dst_combos", "identity", "src_combos", "version", "workload")

    def __init__(self, version: int, entry: IdentityEntry | None, global_audit: bool) -> None:
        self.version = version
        if entry is None:  # IDENTITY_WORLD: only the "any" classes
            self.identity = abi.IDENTITY_WORLD
            self.cls = (0, 0, 0, abi.CLASS_ANY)
            self.src_combos = _COMBOS_SRC_ANY
            self.dst_combos = _COMBOS_DST_ANY
            self.audit = global_audit
            self.workload: str | None = None
        else:
            self.identity = entry.identity
            self.cls = (*entry.cls, abi.CLASS_ANY)
            self.src_combos = _COMBOS_SRC_ANY | entry.src_combos
            self.dst_combos = _COMBOS_DST_ANY | entry.dst_combos
            self.audit = bool(entry.flags & abi.IdentFlag.AUDIT)
            self.workload = entry.workload


class Evaluator:
    """The verdict of the compiled `policy` for a flow's first packet, as the
    datapath decides it (docs/policy.md "What the policy means", 3 and 4)."""

    def __init__(self, policy: Policy, compiled: CompiledPolicy | None = None) -> None:
        self.policy = policy
        self.compiled = compiled if compiled is not None else compile_policy(policy)
        c = self.compiled
        self._entries: dict[tuple[int, int, int, int], PolicyEntry] = {
            (e.src_class, e.dst_class, e.proto, e.port_class): e for e in c.entries}
        # Identities by family and prefix length, longest first: the first
        # hit is the longest prefix, as the host map then the LPM trie answer.
        by_len: dict[int, dict[int, dict[int, IdentityEntry]]] = {4: {}, 6: {}}
        for e in c.identities:
            p = e.prefix
            by_len[p.version].setdefault(p.prefixlen, {})[int(p.network_address)] = e
        self._prefixes = {v: sorted(t.items(), reverse=True) for v, t in by_len.items()}
        self._global_audit = bool(c.flags & abi.ConfigFlag.AUDIT)
        self._any_any = bool(c.flags & abi.ConfigFlag.ANY_ANY)
        self._default_allows = c.default_action == abi.Action.ALLOW
        self._addresses: dict[str, _Endpoint] = {}
        self._decisions: dict[tuple[int, int, int, int], tuple[VerdictName, str | None]] = {}

    def endpoint(self, ip: str) -> _Endpoint:
        """The identity `ip` maps to (memoised). ValueError if not an address."""
        ep = self._addresses.get(ip)
        if ep is None:
            addr = ipaddress.ip_address(ip)
            bits = 32 if addr.version == 4 else 128
            n = int(addr)
            entry = None
            for plen, table in self._prefixes[addr.version]:
                entry = table.get(n >> (bits - plen) << (bits - plen))
                if entry is not None:
                    break
            ep = _Endpoint(addr.version, entry, self._global_audit)
            if len(self._addresses) >= _MEMO_LIMIT:
                self._addresses.clear()
            self._addresses[ip] = ep
        return ep

    def owner(self, ip: str) -> str | None:
        """The workload owning `ip` (its most specific prefix), or None."""
        return self.endpoint(ip).workload

    def verdict(self, src_ip: str, dst_ip: str, proto: int, dport: int
                ) -> tuple[str, str | None]:
        """("allowed" | "denied" | "audit", the deciding rule's name or None
        when the default decided) for src_ip -> dst_ip, IP protocol `proto`,
        destination port `dport` (ignored but for tcp and udp)."""
        s, d = self.endpoint(src_ip), self.endpoint(dst_ip)
        if s.version != d.version:
            raise ValueError(f"{src_ip} and {dst_ip} are not of the same IP version")
        if proto in (TCP, UDP):
            if not 0 <= dport <= 0xFFFF:
                raise ValueError(f"port {dport} is not 0-65535")
            pc = self.compiled.port_classes[proto][dport]
            kproto = proto
        else:
            pc = 0
            # Protocols no rule can name share the proto 0 entries.
            kproto = proto if proto in NAMED_PROTOCOLS else 0
        key = (s.identity, d.identity, kproto, pc)
        # The identity decides the classes and masks, and the destination's
        # identity its audit flag: the answer is a function of the key.
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        combos = s.src_combos & d.dst_combos
        if not self._any_any:
            combos &= ~_COMBO_ANY_ANY
        best = NO_DECISION
        entries = self._entries
        i = 0
        while combos:
            if combos & 1:
                sc, dc = s.cls[i >> 2], d.cls[i & 3]
                head = entries.get((sc, dc, kproto, 0))
                if head is not None:
                    dec = head.decision
                    if head.flags & abi.PolicyFlag.EXCEPTIONS:
                        exc = entries.get((sc, dc, kproto, pc + 1))
                        if exc is not None:
                            dec = exc.decision
                    if dec > best:
                        best = dec
            combos >>= 1
            i += 1
        if best == NO_DECISION:
            allow, rule = self._default_allows, None
        else:
            allow = best.action == abi.Action.ALLOW
            rule = self.compiled.rule_names[best.rule_id]
        answer: tuple[VerdictName, str | None] = (
            ("allowed" if allow else "audit" if d.audit else "denied"), rule)
        if len(self._decisions) >= _MEMO_LIMIT:
            self._decisions.clear()
        self._decisions[key] = answer
        return answer


__all__ = ["Evaluator", "VerdictName"]
