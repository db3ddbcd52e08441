"""`policy suggest`: a policy that allows exactly the flows observed.

Input: flow records (microseg/flow/observed.py), the policy file whose
workloads and `discover` section the suggestion keeps (or none), and the
discovered workloads known beside it. Output: the text of a complete policy
file (docs/policy.md), deterministic for the same input: times come from the
flows, never from the clock, and everything is sorted.

Exactness — the suggestion never allows a flow that was not observed:

1. Each side of a flow is an endpoint: its workload by name, or its address
   when no workload owns it (a `cidr` of one host, /32 or /128). A workload
   of the policy file that no longer owns the address the flow was seen on
   is not trusted with it: the address is used. A discovered container is
   named whatever its address now (containers get a new one at each start;
   docs/policy.md "Discovery").
2. Rows (source, destination, protocol) collect their destination ports.
3. Per (source, protocol, port set), the destinations; per (destinations,
   protocol, port set), the sources. A rule is then sources x destinations x
   ports, and every one of those combinations was observed.
4. A set of two or more workloads becomes a label selector only when some
   labels they all share match exactly them among every known workload (the
   fewest such labels, the user's own before namespaced ones like
   `com.docker.compose.*`). Else parts of it that labels pick out exactly
   (two or more workloads each) become label selectors, and the rest are
   listed by name.

Flows left out, and said so in the header: flows that were only ever denied
(they never ran: enforcing them is what the old policy already did), flows of
protocols a rule cannot name (allowing them would take `protocol: any`, every
protocol), and tcp/udp flows to port 0 (a rule's ports are 1-65535).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from microseg.policy.evaluate import Evaluator
from microseg.policy.inventory import address_text
from microseg.policy.model import Mode, Policy, Workload

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # docs/policy.md "Workloads"
PORTED = ("tcp", "udp")
PROTOCOL_ORDER = ("tcp", "udp", "icmp", "icmpv6")
MAX_LABEL_COMBO = 3   # label subsets tried for a cover, before all shared labels
MAX_PAIRED = 64       # shared labels tried in pairs for a partial cover
MAX_LISTED = 12       # workloads named in one comment
WRAP = 96             # flow lists are wrapped near this column

Endpoint = tuple[str, str]  # ("w", workload name) | ("ip", address)
Item = tuple[str, object]   # ("labels", ((k, v), …)) | ("workload", name) | ("cidr", text)


@dataclass
class _Seen:
    flows: int = 0
    sessions: int = 0
    first: str = ""
    last: str = ""

    def add(self, flows: int, sessions: int, first: str, last: str) -> None:
        self.flows += flows
        self.sessions += sessions
        self.first = min(self.first, first) if self.first else first
        self.last = max(self.last, last)


def _n(count: int, what: str) -> str:
    """`1 flow`, `2 flows`."""
    return f"{count:,} {what}" + ("" if count == 1 else "s")


def _when(first: str, last: str) -> str:
    return f"at {first}" if first == last else f"from {first} to {last}"


def _ip_key(text: str) -> tuple[int, int]:
    a = ipaddress.ip_address(text)
    return (a.version, int(a))


def _host_cidr(ip: str) -> str:
    return f"{ip}/{32 if ':' not in ip else 128}"


# -- YAML text ---------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_V4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}(/\d{1,2})?$")
# Plain scalars some YAML readers (1.1) would take for booleans or null.
_SPECIAL = frozenset(["y", "n", "yes", "no", "on", "off", "true", "false", "null"])


def _yaml_char_ok(c: str) -> bool:
    o = ord(c)
    return (0x20 <= o <= 0x7E or 0xA0 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD
            or 0x10000 <= o <= 0x10FFFF) and o not in (0x2028, 0x2029, 0xFEFF)


def q(text: str) -> str:
    """A YAML scalar for text: plain when nothing could read it as anything
    else, else a double-quoted (JSON) string with every character YAML does
    not allow in a file escaped."""
    if (_PLAIN.match(text) and text.lower() not in _SPECIAL) or _V4.match(text):
        return text
    out = json.dumps(text, ensure_ascii=False)
    if all(_yaml_char_ok(c) for c in out):
        return out
    return "".join(c if _yaml_char_ok(c) else (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF
                                                else f"\\U{ord(c):08x}") for c in out)


def comment(text: str) -> str:
    """Text safe on a comment line: nothing that ends the line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _flow_list(items: Sequence[str], indent: int) -> str:
    """`[a, b, …]`, wrapped onto continuation lines deeper than `indent`."""
    lines, cur = [], "["
    for i, item in enumerate(items):
        piece = item + (", " if i < len(items) - 1 else "]")
        if len(cur) + len(piece) > WRAP - indent and cur.strip() not in ("", "["):
            lines.append(cur.rstrip())
            cur = " " * (indent + 2)
        cur += piece
    lines.append(cur)
    return "\n".join(lines) if items else "[]"


def _labels_text(labels: Iterable[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{q(k)}: {q(v)}" for k, v in labels) + "}"


def _selector_text(item: Item) -> str:
    kind, value = item
    if kind == "labels":
        return "{labels: " + _labels_text(value) + "}"  # type: ignore[arg-type]
    return "{" + kind + ": " + q(str(value)) + "}"


def _shown(item: Item) -> str:
    kind, value = item
    if kind == "labels":
        return "labels " + ",".join(f"{k}={v}" for k, v in value)  # type: ignore[attr-defined]
    return str(value)


def ports_text(ports: Iterable[int]) -> list[str]:
    """Sorted ports with runs of three or more collapsed into "a-b"."""
    out: list[str] = []
    ps = sorted(set(ports))
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        if j - i >= 2:
            out.append(f'"{ps[i]}-{ps[j]}"')
            i = j + 1
        else:
            out.append(str(ps[i]))
            i += 1
    return out


# -- covers: a set of endpoints as selectors ----------------------------------

def _label_order(pair: tuple[str, str]) -> tuple[bool, str, str]:
    """The user's own labels first: namespaced keys (`com.docker.compose.…`,
    `app.kubernetes.io/…`) are mostly the tools' bookkeeping."""
    k, v = pair
    return ("." in k or "/" in k, k, v)


class _Covers:
    def __init__(self, inventory: Sequence[Workload]) -> None:
        self.labels = {w.name: frozenset(w.labels) for w in inventory}
        self.index: dict[tuple[str, str], set[str]] = defaultdict(set)
        for w in inventory:
            for pair in w.labels:
                self.index[pair].add(w.name)
        self._memo: dict[frozenset[str], tuple[tuple[str, str], ...] | None] = {}
        self._covers: dict[frozenset[Endpoint], tuple[Item, ...]] = {}

    def labels_for(self, names: frozenset[str]) -> tuple[tuple[str, str], ...] | None:
        """The fewest labels whose workloads among all known are exactly
        `names`, or None."""
        if names in self._memo:
            return self._memo[names]
        found = None
        if all(n in self.labels for n in names):
            shared = frozenset.intersection(*(self.labels[n] for n in names))
            cands = sorted(shared, key=_label_order)
            for size in range(1, min(MAX_LABEL_COMBO, len(cands)) + 1):
                for combo in itertools.combinations(cands, size):
                    if self._matches(combo) == names:
                        found = tuple(sorted(combo))
                        break
                if found:
                    break
            if found is None and len(cands) > MAX_LABEL_COMBO \
                    and self._matches(cands) == names:
                found = tuple(sorted(cands))
        self._memo[names] = found
        return found

    def _matches(self, pairs: Sequence[tuple[str, str]]) -> set[str]:
        sets = sorted((self.index[p] for p in pairs), key=len)
        return set.intersection(*sets) if sets else set()

    def parts(self, names: frozenset[str]) -> list[tuple[tuple[str, str], ...]]:
        """Label sets that each match two or more of `names` and nothing
        else, covering as many of them as can be: the whole set at once if
        it can be, else greedily, the largest part first."""
        whole = self.labels_for(names)
        if whole is not None:
            return [whole]
        out = []
        left = set(names)
        while len(left) >= 2:
            best: tuple[int, int, list, tuple[tuple[str, str], ...]] | None = None
            for combo in self._candidates(left):
                m = self._matches(combo)
                if len(m) >= 2 and m <= left:
                    rank = (-len(m), len(combo), [_label_order(p) for p in combo],
                            tuple(sorted(combo)))
                    if best is None or rank < best:
                        best = rank
            if best is None:
                break
            out.append(best[3])
            left -= self._matches(best[3])
        return out

    def _candidates(self, names: set[str]) -> Iterable[tuple[tuple[str, str], ...]]:
        """Single labels and (when few) pairs of labels that two or more of
        `names` share."""
        count: Counter[tuple[str, str]] = Counter(p for n in names
                                                  for p in self.labels.get(n, ()))
        shared = sorted((p for p, c in count.items() if c >= 2), key=_label_order)
        yield from ((p,) for p in shared)
        if len(shared) <= MAX_PAIRED:
            yield from itertools.combinations(shared, 2)

    def cover(self, endpoints: frozenset[Endpoint]) -> tuple[Item, ...]:
        """The selectors of exactly these endpoints (one set, one cover)."""
        found = self._covers.get(endpoints)
        if found is None:
            found = self._covers[endpoints] = self._cover(endpoints)
        return found

    def _cover(self, endpoints: frozenset[Endpoint]) -> tuple[Item, ...]:
        names = frozenset(v for k, v in endpoints if k == "w")
        ips = sorted((v for k, v in endpoints if k == "ip"), key=_ip_key)
        items: list[Item] = []
        listed = set(names)
        if len(names) >= 2:
            for labels in self.parts(names):
                items.append(("labels", labels))
                listed -= self._matches(labels)
        items += [("workload", n) for n in sorted(listed)]
        items += [("cidr", _host_cidr(ip)) for ip in ips]
        return tuple(items)

    def covered(self, labels: tuple[tuple[str, str], ...]) -> list[str]:
        return sorted(self._matches(labels))


# -- the suggestion -----------------------------------------------------------

@dataclass
class _Rule:
    src: tuple[Item, ...]
    dst: tuple[Item, ...]
    protocol: str
    ports: tuple[int, ...] | None
    seen: _Seen
    name: str = ""


_KIND_ORDER = {"labels": 0, "workload": 1, "cidr": 2}


def _items_order(items: tuple[Item, ...]) -> list[tuple[int, str]]:
    return [(_KIND_ORDER[k], str(v)) for k, v in items]


def _side_name(items: tuple[Item, ...]) -> str:
    kind, value = items[0]
    if kind == "labels":
        base = "-".join(v for _k, v in value)  # type: ignore[attr-defined]
    elif kind == "cidr":
        base = str(value).split("/")[0].replace(":", ".")
    else:
        base = str(value)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-._")[:24].strip("-._") or "x"
    return base + (f"-and-{len(items) - 1}" if len(items) > 1 else "")


def _unique_names(rules: list[_Rule]) -> None:
    used: set[str] = set()
    for r in rules:
        base = f"{_side_name(r.src)}-to-{_side_name(r.dst)}-{r.protocol}"
        name, n = base[:63], 1
        while name in used:
            n += 1
            suffix = f"-{n}"
            name = base[:63 - len(suffix)] + suffix
        used.add(name)
        r.name = name


def suggest(flows: Iterable[dict], policy: Policy | None, mode: Mode = "enforce", *,
            discovered: Sequence[Workload] = (), seen_at: Mapping[str, Iterable[str]] | None = None,
            origin: str = "observed flows", notes: Sequence[str] = ()) -> str:
    """The text of a policy file that allows exactly `flows` (records of
    microseg.flow.observed) that ran. `policy`: the file whose workloads and
    `discover` section are kept (None: the workloads the flows name become
    workloads, with the addresses seen: the records' and `seen_at`'s, the
    addresses a workload name was seen on). `discovered`: workloads known
    beside the file's own (the daemon's containers, or the log's), used when
    the policy discovers. `origin`, `notes`: said in the header."""
    static = tuple(policy.workloads) if policy else ()
    static_names = {w.name for w in static}
    discovering = bool(policy and policy.discover.sources)
    containers = [w for w in discovered if w.name not in static_names] if discovering else []

    # 1. What can be allowed exactly.
    used: list[dict] = []
    all_seen, used_seen = _Seen(), _Seen()
    denied_only = denied_attempts = port_zero = 0
    unnamed: Counter[int] = Counter()  # protocol numbers
    for r in flows:
        v = r["verdicts"]
        all_seen.add(1, r["sessions"], r["first_seen"], r["last_seen"])
        ran = v["allowed"] + v["audit"]
        proto = r["protocol"]
        if not ran:
            denied_only += 1
            denied_attempts += v["denied"]
        elif proto not in PROTOCOL_ORDER:
            unnamed[proto] += 1
        elif proto in PORTED and not r["port"]:
            port_zero += 1
        else:
            used.append(r)
            used_seen.add(1, ran, r["first_seen"], r["last_seen"])

    # 2. Workloads the flows name that nothing defines become workloads of
    #    the file, with the addresses seen — unless the policy discovers
    #    (then a name is a container's, matched whatever its address).
    claims: dict[str, set[str]] = defaultdict(set)
    seen: dict[str, set[str]] = defaultdict(set)
    for r in used:
        for side in (r["src"], r["dst"]):
            if side["workload"] is not None:
                claims[side["ip"]].add(side["workload"])
                seen[side["workload"]].add(side["ip"])
    for name in list(seen):
        for a in (seen_at or {}).get(name, ()):
            claims[a].add(name)
            seen[name].add(a)
    taken = {address_text(a) for w in (*static, *containers) for a in w.addresses}
    container_names = {w.name for w in containers}
    synthesized: list[Workload] = []
    for name in sorted(seen):
        if name in static_names or name in container_names or not NAME.match(name) \
                or discovering:
            continue
        addrs = sorted((a for a in seen[name] if claims[a] == {name} and a not in taken),
                       key=_ip_key)
        if addrs:
            synthesized.append(Workload.make(name, addrs))
    synth_names = {w.name for w in synthesized}
    inventory = (*static, *synthesized, *containers)
    owner = Evaluator(Policy(workloads=tuple(inventory))).owner

    def endpoint(side: dict) -> Endpoint:
        name, ip = side["workload"], side["ip"]
        if name is None:
            return ("ip", ip)
        if name in static_names or name in synth_names:
            return ("w", name) if owner(ip) == name else ("ip", ip)
        if discovering and NAME.match(name):
            return ("w", name)
        return ("ip", ip)

    # 3. Rows, then destinations per (source, protocol, ports), then sources
    #    per (destinations, protocol, ports).
    rows: dict[tuple[Endpoint, Endpoint, str], tuple[set[int], _Seen]] = {}
    for r in used:
        key = (endpoint(r["src"]), endpoint(r["dst"]), r["protocol"])
        row = rows.get(key)
        if row is None:
            row = rows[key] = (set(), _Seen())
        if r["protocol"] in PORTED:
            row[0].add(r["port"])
        v = r["verdicts"]
        row[1].add(1, v["allowed"] + v["audit"], r["first_seen"], r["last_seen"])
    by_src: dict[tuple[Endpoint, str, tuple[int, ...] | None], set[Endpoint]] = defaultdict(set)
    for (s, d, proto), (ports, _seen) in rows.items():
        by_src[(s, proto, tuple(sorted(ports)) if proto in PORTED else None)].add(d)
    covers = _Covers(inventory)
    by_dst: dict[tuple[tuple[Item, ...], str, tuple[int, ...] | None],
                 tuple[set[Endpoint], frozenset[Endpoint]]] = {}
    for (s, proto, ports), dsts in by_src.items():
        fdsts = frozenset(dsts)
        k = (covers.cover(fdsts), proto, ports)
        by_dst.setdefault(k, (set(), fdsts))[0].add(s)
    rules: list[_Rule] = []
    for (dst, proto, ports), (srcs, dsts) in by_dst.items():
        observed = _Seen()
        for s in srcs:
            for d in dsts:
                row = rows[(s, d, proto)][1]
                observed.add(row.flows, row.sessions, row.first, row.last)
        rules.append(_Rule(covers.cover(frozenset(srcs)), dst, proto, ports, observed))
    rules.sort(key=lambda r: (PROTOCOL_ORDER.index(r.protocol), _items_order(r.src),
                              _items_order(r.dst), r.ports or ()))
    _unique_names(rules)

    # 4. The text.
    out: list[str] = []
    c = out.append
    c("# Suggested by `microseg policy suggest` from " + comment(origin) + ":")
    if all_seen.flows:
        c(f"# {_n(all_seen.flows, 'flow')} observed {_when(all_seen.first, all_seen.last)}.")
    else:
        c("# no flows observed: this policy allows nothing.")
    c(f"# It allows the {_n(used_seen.flows, 'flow')} that ran "
      f"({_n(used_seen.sessions, 'session')}) and nothing else: a label selector")
    c("# only where the labels pick out exactly the workloads observed.")
    if denied_only:
        c(f"# Left out: {_n(denied_only, 'flow')} only ever denied "
          f"({_n(denied_attempts, 'attempt')}); a denied flow never ran.")
    if unnamed:
        listed = ", ".join(f"{p}: {n:,}" for p, n in sorted(unnamed.items()))
        c(f"# Left out: {_n(sum(unnamed.values()), 'flow')} of IP protocols a rule cannot "
          f"name (protocol: flows — {listed});")
        c("# allowing them would take `protocol: any`, which allows every protocol.")
    if port_zero:
        c(f"# Left out: {_n(port_zero, 'tcp/udp flow')} to port 0 (a rule's ports are "
          "1-65535).")
    own_mode = sorted(w.name for w in static if w.mode and w.mode != mode)
    if own_mode:
        shown = ", ".join(own_mode[:MAX_LISTED]) + (" …" if len(own_mode) > MAX_LISTED else "")
        one = len(own_mode) == 1
        c(f"# {_n(len(own_mode), 'workload')} {'keeps its' if one else 'keep their'} own mode "
          f"({shown}): traffic to {'it' if one else 'them'} is not judged in mode {mode}.")
    for note in notes:
        c("# " + comment(note))
    c("version: 1")
    c(f"mode: {mode}")
    c("default: deny")
    if policy is not None and policy.discover.docker_socket:
        c("discover:")
        c(f"  docker: {{socket: {q(policy.discover.docker_socket)}}}")
    if static or synthesized:
        c("workloads:")
        for w in static:
            _workload(c, w)
        for w in synthesized:
            c(f"  # seen in the flows as workload {w.name}; no labels known")
            _workload(c, w)
    if not rules:
        c("rules: []")
    else:
        c("rules:")
        for r in rules:
            _rule(c, r, covers)
    return "\n".join(out) + "\n"


def _workload(c, w: Workload) -> None:
    c(f"  {q(w.name)}:")
    if w.labels:
        c(f"    labels: {_labels_text(w.labels)}")
    c("    addresses: " + _flow_list([q(address_text(a)) for a in w.addresses], 4))
    if w.mode:
        c(f"    mode: {w.mode}")


def _side(c, key: str, items: tuple[Item, ...]) -> None:
    if len(items) == 1:
        c(f"    {key}: {_selector_text(items[0])}")
        return
    c(f"    {key}:")
    for item in items:
        c(f"      - {_selector_text(item)}")


def _rule(c, r: _Rule, covers: _Covers) -> None:
    s = r.seen
    c(f"  # observed: {_n(s.sessions, 'session')} in {_n(s.flows, 'flow')}, "
      f"{_when(s.first, s.last)}")
    for role, items in (("from", r.src), ("to", r.dst)):
        for kind, value in items:
            if kind == "labels":
                names = covers.covered(value)  # type: ignore[arg-type]
                shown = ", ".join(names[:MAX_LISTED])
                more = f" and {len(names) - MAX_LISTED:,} more" if len(names) > MAX_LISTED \
                    else ""
                c("  # " + comment(f"{role} {_shown((kind, value))}: exactly the workloads "
                                   f"{shown}{more} (of those known now)"))
    c(f"  - name: {q(r.name)}")
    _side(c, "from", r.src)
    _side(c, "to", r.dst)
    c(f"    protocol: {r.protocol}")
    if r.ports is not None:
        c("    ports: " + _flow_list(ports_text(r.ports), 4))
    c("    action: allow")


__all__ = ["comment", "ports_text", "q", "suggest"]
