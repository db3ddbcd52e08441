"""What the policy says about one flow, without a kernel.

``Evaluator`` answers from the compiled maps exactly as match_policy() of
bpf/lib/policy.h does (identity lookups, at most 16 group lookups, deny over
allow, then the rule written first). It is what `policy diff` and `policy
suggest` replay observed flows against, so a call is a few dict lookups,
memoised per address.
"""

from __future__ import annotations

import difflib
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

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
from microseg.policy.model import (
    PROTOCOL_NAMES,
    PROTOCOLS,
    IPNetwork,
    Mode,
    Policy,
    Selector,
    Workload,
    selector_name,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
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


# -- trace: one flow, explained ----------------------------------------------

class TraceError(ValueError):
    """A trace that cannot run: the message is one line for the user.
    `usage`: the arguments are wrong whatever the policy (else the policy
    lacks what they name)."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def protocol_name(proto: int) -> str:
    return PROTOCOL_NAMES.get(proto, str(proto))


def parse_protocol(text: str) -> int:
    """tcp, udp, icmp, icmpv6 or an IP protocol number 0-255."""
    t = text.strip().lower()
    if t in PROTOCOLS:
        return PROTOCOLS[t]
    if t.isdigit() and int(t) <= 255:
        return int(t)
    raise TraceError(f"protocol '{text}': expected tcp, udp, icmp, icmpv6 or a number 0-255",
                     usage=True)


def check_port(proto: int, port: int | None) -> int | None:
    """The destination port to trace: required for tcp and udp (rules match
    on it), refused for the other protocols (they have none)."""
    if proto in (TCP, UDP):
        if port is None:
            raise TraceError(f"--port is required with {protocol_name(proto)}: rules match "
                             "on the destination port", usage=True)
        if not 0 <= port <= 0xFFFF:
            raise TraceError(f"--port {port}: expected 0-65535", usage=True)
        return port
    if port is not None:
        raise TraceError(f"--port applies to tcp and udp only, not to protocol "
                         f"{protocol_name(proto)}", usage=True)
    return None


def _owner(policy: Policy, addr: IPAddress) -> tuple[Workload, IPNetwork] | None:
    """The workload with the most specific prefix containing addr, and that
    prefix; the first declared wins a tie (docs/policy.md "Workloads", as
    the compiler's identities do)."""
    best: tuple[Workload, IPNetwork] | None = None
    for w in policy.workloads:
        for net in w.addresses:
            if (net.version == addr.version and addr in net
                    and (best is None or net.prefixlen > best[1].prefixlen)):
                best = (w, net)
    return best


@dataclass(frozen=True)
class Endpoint:
    """One end of a traced flow. `note` says how a workload's name became
    this address when that is not obvious."""

    ip: str
    workload: str | None
    note: str | None = None


# How many more specific prefixes of other workloads a search for a CIDR
# workload's own first host steps over before giving up on that prefix.
_HOST_SEARCH_STEPS = 1024


def _own_hosts(policy: Policy, w: Workload) -> list[tuple[IPAddress, str | None]]:
    """Per address of w, in order, its first usable host that w owns (a
    more specific workload may own the network's first hosts), with a note
    when the address is a network."""
    out: list[tuple[IPAddress, str | None]] = []
    for net in w.addresses:
        if net.num_addresses <= 2:  # a host, or a /31 or /127: both ends usable
            lo, hi = int(net.network_address), int(net.broadcast_address)
        else:  # not the network address; not IPv4's broadcast either
            lo = int(net.network_address) + 1
            hi = int(net.broadcast_address) - (1 if net.version == 4 else 0)
        n = lo
        for _ in range(_HOST_SEARCH_STEPS):
            if n > hi:
                break
            addr = ipaddress.ip_address(n) if net.version == 4 else ipaddress.IPv6Address(n)
            found = _owner(policy, addr)
            assert found is not None  # w's own prefix contains it
            if found[0].name == w.name:
                note = None
                if net.num_addresses > 1:
                    own = " of its own" if n != lo else ""
                    note = f"{w.name} is {net}: traced from its first host{own}, {addr}"
                elif len(w.addresses) > 1:
                    note = (f"{w.name} has {len(w.addresses)} addresses: traced from "
                            f"{addr}")
                out.append((addr, note))
                break
            n = int(found[1].broadcast_address) + 1  # past the other workload's prefix
    return out


def _parse_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _family(version: int) -> str:
    return f"IPv{version}"


def resolve(policy: Policy, src: str, dst: str) -> tuple[Endpoint, Endpoint]:
    """--from and --to: each an IP address or a workload's name (an address
    wins over a workload of the same spelling). A workload stands for its
    first address that it owns, of the other end's family; both ends must be
    of one family."""
    by_name = {w.name: w for w in policy.workloads}
    ends: list[IPAddress | list[tuple[IPAddress, str | None]]] = []
    for flag, text in (("--from", src), ("--to", dst)):
        addr = _parse_address(text)
        if addr is not None:
            ends.append(addr)
            continue
        w = by_name.get(text)
        if w is None:
            close = difflib.get_close_matches(text, list(by_name), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TraceError(f"{flag} {text}: not an IP address, and no workload has that "
                             f"name{hint}")
        if not w.addresses:
            raise TraceError(f"{flag} {text}: workload {text} has no addresses (a container "
                             "on the host's network or none): nothing to trace")
        hosts = _own_hosts(policy, w)
        if not hosts:
            raise TraceError(f"{flag} {text}: every address of workload {text} is owned by "
                             "another workload (a more specific prefix, or the same one "
                             "declared first)")
        ends.append(hosts)
    a, b = ends
    if not isinstance(a, list) and not isinstance(b, list):
        if a.version != b.version:
            raise TraceError(f"--from {a} is {_family(a.version)} but --to {b} is "
                             f"{_family(b.version)}", usage=True)
        pair = ((a, None), (b, None))
    elif not isinstance(a, list):
        pair = ((a, None), _of_family(b, a.version, dst, f"--from {a}"))
    elif not isinstance(b, list):
        pair = (_of_family(a, b.version, src, f"--to {b}"), (b, None))
    else:
        found = next(((x, y) for x in a for y in b if x[0].version == y[0].version), None)
        if found is None:
            raise TraceError(f"workloads {src} and {dst} have no address family in common "
                             f"({src}: {_families(a)}; {dst}: {_families(b)})")
        pair = found
    (sa, snote), (da, dnote) = pair
    return (Endpoint(str(sa), _name(_owner(policy, sa)), snote),
            Endpoint(str(da), _name(_owner(policy, da)), dnote))


def _of_family(hosts: list[tuple[IPAddress, str | None]], version: int, name: str,
               other: str) -> tuple[IPAddress, str | None]:
    for h in hosts:
        if h[0].version == version:
            return h
    raise TraceError(f"workload {name} has no {_family(version)} address ({other} is "
                     f"{_family(version)})")


def _families(hosts: list[tuple[IPAddress, str | None]]) -> str:
    return " and ".join(sorted({_family(h[0].version) for h in hosts}))


def _name(found: tuple[Workload, IPNetwork] | None) -> str | None:
    return found[0].name if found else None


@dataclass
class Trace:
    """What the policy does with one flow's first packet, and why."""

    src: str
    dst: str
    src_workload: str | None
    dst_workload: str | None
    protocol: int
    port: int | None              # None: a protocol without ports
    verdict: VerdictName
    rule: str | None              # the deciding rule; None: the default decided
    reason: Literal["rule", "default"]
    matched: list[dict[str, str]]      # {rule, action}, in file order
    not_matched: list[dict[str, str]]  # {rule, why}: rules naming the destination
    # {rule, why}: rules that match but for the destination (a mistyped
    # destination selector is the usual reason an expected rule is missing).
    near_misses: list[dict[str, str]] = field(default_factory=list)
    # Where the mode for traffic to the destination comes from, e.g.
    # "workload db" or "the policy".
    mode: Mode = "enforce"
    mode_from: str = "the policy"
    # Set when the compiled maps decide otherwise than the rules read
    # literally (a compiler bug): verdict and rule are then the compiled
    # maps' answer, which is what the datapath does.
    inconsistency: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The `policy trace --json` object (docs/policy.md)."""
        proto: str | int = PROTOCOL_NAMES.get(self.protocol, self.protocol)
        return {"verdict": self.verdict, "rule": self.rule,
                "matched": [dict(m) for m in self.matched],
                "not_matched": [dict(m) for m in self.not_matched],
                "from": {"ip": self.src, "workload": self.src_workload},
                "to": {"ip": self.dst, "workload": self.dst_workload},
                "protocol": proto, "port": self.port}


def _ports_text(ports: tuple[tuple[int, int], ...]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


class _Side:
    """One end of the flow as rules see it, and why a selector misses it."""

    def __init__(self, policy: Policy, role: str, ip: str) -> None:
        self.addr = ipaddress.ip_address(ip)
        found = _owner(policy, self.addr)
        self.owner = found[0] if found else None
        self.names = {w.name for w in policy.workloads}
        who = f"workload {self.owner.name}" if self.owner else "no workload"
        self.text = f"{role} {self.addr} ({who})"

    def miss(self, sel: Selector) -> str | None:
        """None when sel matches this address, else why it does not."""
        if sel.kind == "any":
            return None
        if sel.kind == "cidr":
            assert sel.cidr is not None
            inside = sel.cidr.version == self.addr.version and self.addr in sel.cidr
            return None if inside else f"is outside {sel.cidr}"
        o = self.owner
        if sel.kind == "workload":
            if o is not None and selector_name(o.name) == sel.workload:
                return None
            unknown = "" if sel.workload in self.names else " (no such workload now)"
            return f"is not workload {sel.workload}{unknown}"
        if o is not None and set(sel.labels) <= set(o.labels):
            return None
        want = ",".join(f"{k}={v}" for k, v in sel.labels)
        if o is None:
            return f"has no labels {want}"
        has = ",".join(f"{k}={v}" for k, v in o.labels)
        return f"has no labels {want} ({'its labels: ' + has if has else 'it has none'})"

    def why_not(self, sels: tuple[Selector, ...]) -> str | None:
        """None when any of sels matches, else each one's reason."""
        misses = []
        for s in sels:
            m = self.miss(s)
            if m is None:
                return None
            misses.append(m)
        return f"{self.text} " + " and ".join(misses)


def trace(policy: Policy, src_ip: str, dst_ip: str, proto: int, dport: int | None,
          evaluator: Evaluator | None = None) -> Trace:
    """Walk every rule for src_ip -> dst_ip (protocol proto, destination
    port dport, ignored but for tcp and udp): which match, which decides
    (docs/policy.md "What the policy means", 3 and 4), and for the rules
    naming the destination why they do not match. `evaluator`: one built
    from `policy`, to reuse its compile."""
    has_ports = proto in (TCP, UDP)
    port = dport if has_ports else None
    if has_ports and (port is None or not 0 <= port <= 0xFFFF):
        raise TraceError(f"port {port}: expected 0-65535 with {protocol_name(proto)}",
                         usage=True)
    src, dst = _Side(policy, "source", src_ip), _Side(policy, "destination", dst_ip)
    if src.addr.version != dst.addr.version:
        raise TraceError(f"{src_ip} is {_family(src.addr.version)} but {dst_ip} is "
                         f"{_family(dst.addr.version)}", usage=True)
    matched: list[dict[str, str]] = []
    not_matched: list[dict[str, str]] = []
    near: list[dict[str, str]] = []
    first: dict[str, str] = {}
    for r in policy.rules:
        misses = []
        if r.protocol is not None and r.protocol != proto:
            # A rule's ports are of its own protocol: no use saying more.
            misses.append(f"protocol {protocol_name(proto)}, rule is "
                          f"{protocol_name(r.protocol)}")
        elif r.ports and not any(lo <= port <= hi for lo, hi in r.ports):
            misses.append(f"port {port} not in {_ports_text(r.ports)}")
        src_miss = src.why_not(r.sources)
        dst_miss = dst.why_not(r.destinations)
        if dst_miss is None:
            if src_miss is not None:
                misses.insert(0, src_miss)
            if misses:
                not_matched.append({"rule": r.name, "why": "; ".join(misses)})
            else:
                matched.append({"rule": r.name, "action": r.action})
                first.setdefault(r.action, r.name)
        elif src_miss is None and not misses:
            near.append({"rule": r.name, "why": dst_miss})
    # Deny beats allow; among equals the rule written first decides.
    rule = first.get("deny", first.get("allow"))
    action = policy.default if rule is None else ("deny" if "deny" in first else "allow")
    dst_mode = dst.owner.mode if dst.owner is not None and dst.owner.mode else None
    mode: Mode = dst_mode or policy.mode
    mode_from = f"workload {dst.owner.name}" if dst_mode and dst.owner else "the policy"
    verdict: VerdictName = ("allowed" if action == "allow"
                            else "audit" if mode == "audit" else "denied")
    ev = evaluator if evaluator is not None else Evaluator(policy)
    compiled = ev.verdict(str(src.addr), str(dst.addr), proto, port or 0)
    inconsistency = None
    if compiled != (verdict, rule):
        inconsistency = (f"the compiled policy decides {compiled[0]} by "
                         f"{_by(compiled[1])} where the rules read literally say {verdict} by "
                         f"{_by(rule)}: a bug in microseg; the datapath does what the "
                         "compiled policy says")
        verdict, rule = compiled
    return Trace(str(src.addr), str(dst.addr), src.owner.name if src.owner else None,
                 dst.owner.name if dst.owner else None, proto, port, verdict, rule,
                 "default" if rule is None else "rule", matched, not_matched, near, mode,
                 mode_from, inconsistency)


def _by(rule: str | None) -> str:
    return "the default" if rule is None else f"rule {rule}"


__all__ = ["Endpoint", "Evaluator", "Trace", "TraceError", "VerdictName", "check_port",
           "parse_protocol", "protocol_name", "resolve", "trace"]
