"""The workloads a policy is compiled with: its own (source `static`) and the
ones sources discover where they run (docs/policy.md "Discovery").

A static workload wins over a discovered one of the same name; a discovered
workload's addresses are host prefixes (/32, /128), so inside a static
workload's CIDR the container is the more specific owner. Nothing here does
I/O: the manager merges, compiles and applies.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from microseg.inventory.model import DiscoveredWorkload
from microseg.policy.model import IPNetwork, Policy, Workload

STATIC = "static"
REMOTE = "etcd"  # another node's workloads (microseg/cluster/node.py)

# What a name must look like to be named in rules and events (the policy
# file's rule, longer: engines allow longer names than policy files do).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")

Discovered = Mapping[str, Mapping[str, DiscoveredWorkload]]  # source -> name -> workload


@dataclass(frozen=True)
class Known:
    """A workload as `microseg workloads` and `workload` events show it."""

    name: str
    source: str
    labels: tuple[tuple[str, str], ...]
    addresses: tuple[str, ...]
    node: str | None = None  # another host's (source etcd); None: this one

    def as_dict(self) -> dict:
        d = {"workload": self.name, "source": self.source, "labels": dict(self.labels),
             "addresses": list(self.addresses)}
        if self.node is not None:
            d["node"] = self.node
        return d


@dataclass(frozen=True)
class Merged:
    policy: Policy                 # what is compiled
    known: dict[str, Known]        # by name, the winner of each name
    warnings: tuple[str, ...]      # shadowed names


def address_text(net: IPNetwork) -> str:
    """A host prefix as its address, a wider one as a CIDR."""
    full = 32 if net.version == 4 else 128
    return str(net.network_address) if net.prefixlen == full else str(net)


def merge(policy: Policy, discovered: Discovered, forms: RemoteForms | None = None) -> Merged:
    """The policy with every discovered workload of the sources its
    `discover` section names, and every other node's (source etcd); static
    names win over this host's containers. Another node's workload whose
    name is taken (here, or on a third node) is kept under NAME@NODE, which
    `{workload: NAME}` still selects (model.selector_name). forms: kept
    from the last merge (the daemon's), so that only what changed is built."""
    enabled = set(policy.discover.sources) | {REMOTE}
    known: dict[str, Known] = {
        w.name: Known(w.name, STATIC, w.labels, tuple(address_text(a) for a in w.addresses))
        for w in policy.workloads}
    extra: list[Workload] = []
    warnings: list[str] = []
    for source in sorted(discovered, key=lambda s: s == REMOTE):  # this host's first
        if source not in enabled:
            continue
        if source == REMOTE:
            extra += _remote(discovered[source].values(), known, warnings,
                             forms or RemoteForms())
            continue
        for name, d in sorted(discovered[source].items()):
            if not _NAME.match(name):
                warnings.append(f"{source} container '{name[:80]}' is ignored: its name is "
                                "not a workload name (letters, digits, '.', '_', '-')")
                continue
            if name in known:
                if known[name].source == STATIC:
                    warnings.append(f"{source} container '{name}' has the name of a static "
                                    "workload: the static one wins")
                continue
            known[name] = Known(name, source, d.labels, tuple(str(a) for a in d.addresses))
            if d.addresses:
                extra.append(Workload(name, tuple(ipaddress.ip_network(a) for a in d.addresses),
                                      d.labels))
    if not extra:
        return Merged(policy, known, tuple(warnings))
    return Merged(replace(policy, workloads=policy.workloads + tuple(extra)), known,
                  tuple(warnings))


def _remote(workloads: Iterable[DiscoveredWorkload], known: dict[str, Known],
            warnings: list[str], forms: RemoteForms) -> list[Workload]:
    """Other nodes' workloads into known; the ones to compile. An address
    that a workload here (or one named before, in the same order on every
    node) already has is not another node's to claim: dropped, said."""
    nodes_of: dict[str, set[str]] = {}
    for d in workloads:
        nodes_of.setdefault(d.name, set()).add(d.node or "")
    taken = {a: k.name for k in known.values() for a in k.addresses}
    out = []
    for d in sorted(workloads, key=lambda d: (d.name, d.node or "")):
        texts = forms.texts(d)
        if any(a in taken for a in texts):
            for a in texts:
                if a in taken:
                    warnings.append(f"workload '{d.name}' of node {d.node} claims {a}, "
                                    f"which is workload '{taken[a]}''s: ignored")
            d = replace(d, addresses=tuple(a for a in d.addresses if str(a) not in taken))
            texts = forms.texts(d)
        taken.update((a, d.name) for a in texts)
        name = d.name
        if name in known or len(nodes_of[name]) > 1:
            here = "this node" if name in known and known[name].node is None else \
                "node " + ", ".join(sorted(nodes_of[name] - {d.node or ""}))
            warnings.append(f"workload '{name}' of node {d.node} has the name of one on "
                            f"{here}: both kept, it as '{name}@{d.node}'")
            name = f"{d.name}@{d.node}"
        k, w = forms.get(name, d)
        known[name] = k
        if w is not None:
            out.append(w)
    forms.done()
    return out


class RemoteForms:
    """Other nodes' workloads' compiled forms, kept from one merge to the
    next. They are many (thousands) and change a few at a time, and making
    one parses its addresses. Only what the last merge used is kept: the
    memory follows the inventory, whatever the churn."""

    def __init__(self) -> None:
        self._last: dict = {}
        self._now: dict = {}

    def _reuse(self, key: tuple, make: Callable[[], object]):
        f = self._now.get(key)
        if f is None:
            f = self._last.get(key)
            if f is None:
                f = make()
            self._now[key] = f
        return f

    def texts(self, d: DiscoveredWorkload) -> tuple[str, ...]:
        return self._reuse(("t", d), lambda: tuple(str(a) for a in d.addresses))

    def get(self, name: str, d: DiscoveredWorkload) -> tuple[Known, Workload | None]:
        def make() -> tuple[Known, Workload | None]:
            w = Workload(name, tuple(ipaddress.ip_network(a) for a in d.addresses),
                         d.labels) if d.addresses else None
            return Known(name, REMOTE, d.labels, self.texts(d), d.node), w

        return self._reuse(("f", name, d), make)

    def done(self) -> None:
        self._last, self._now = self._now, {}


def changes(old: Mapping[str, Known], new: Mapping[str, Known]) -> list[tuple[str, Known]]:
    """(action, workload) turning old into new, removals first."""
    out = [("removed", k) for name, k in old.items() if name not in new]
    out += [("added" if name not in old else "changed", k)
            for name, k in new.items() if old.get(name) != k]
    return out
