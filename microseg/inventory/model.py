"""What a source reports, as plain immutable data: discovered workloads and
the changes between two inventories. Nothing here does I/O."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Action = Literal["added", "removed", "changed"]
ACTIONS: tuple[Action, ...] = ("added", "removed", "changed")


@dataclass(frozen=True)
class DiscoveredWorkload:
    """One running container. Labels are sorted (key, value) pairs, like
    policy.model.Workload's, so a workload is hashable and compares by value;
    addresses are sorted and unique, IPv4 first."""

    name: str
    labels: tuple[tuple[str, str], ...]
    addresses: tuple[IPAddress, ...]
    source: str
    ident: str  # the engine's id for it: a container id
    node: str | None = None  # the host it runs on, when another one (source etcd)

    @classmethod
    def make(cls, name: str, labels: Mapping[str, str] | None,
             addresses: Iterable[str | IPAddress], source: str,
             ident: str, node: str | None = None) -> DiscoveredWorkload:
        ips = {ipaddress.ip_address(a) for a in addresses}
        return cls(name, tuple(sorted((labels or {}).items())),
                   tuple(sorted(ips, key=lambda ip: (ip.version, ip))), source, ident, node)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class Change:
    """A workload appeared, went away (`workload` is the last known one) or
    now has other labels, addresses or container behind the same name."""

    action: Action
    workload: DiscoveredWorkload


def diff(old: Mapping[str, DiscoveredWorkload],
         new: Mapping[str, DiscoveredWorkload]) -> tuple[Change, ...]:
    """The changes that turn `old` into `new` (both keyed by name), removals
    first: a consumer applying them in order forgets before it learns."""
    removed = [Change("removed", w) for name, w in old.items() if name not in new]
    rest = [Change("added" if name not in old else "changed", w)
            for name, w in new.items() if old.get(name) != w]
    return (*removed, *rest)
