"""The validated policy, as plain immutable data (docs/policy.md).

The YAML parser produces it, the compiler consumes it, and tests build it
directly. Nothing here touches files or the kernel.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOLS: dict[str, int] = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
PROTOCOL_NAMES: dict[int, str] = {v: k for k, v in PROTOCOLS.items()}

Mode = Literal["enforce", "audit"]
ActionName = Literal["allow", "deny"]


@dataclass(frozen=True)
class Selector:
    """One of: any, a workload by name, workloads by labels, a CIDR."""

    kind: Literal["any", "workload", "labels", "cidr"]
    workload: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    cidr: IPNetwork | None = None

    @classmethod
    def any(cls) -> Selector:
        return cls("any")

    @classmethod
    def of_workload(cls, name: str) -> Selector:
        return cls("workload", workload=name)

    @classmethod
    def of_labels(cls, labels: dict[str, str]) -> Selector:
        return cls("labels", labels=tuple(sorted(labels.items())))

    @classmethod
    def of_cidr(cls, cidr: str | IPNetwork) -> Selector:
        return cls("cidr", cidr=ipaddress.ip_network(cidr, strict=False))

    def __str__(self) -> str:
        if self.kind == "any":
            return "any"
        if self.kind == "workload":
            return f"workload:{self.workload}"
        if self.kind == "labels":
            return "labels:" + ",".join(f"{k}={v}" for k, v in self.labels)
        return f"cidr:{self.cidr}"


def selector_name(name: str) -> str:
    """The name `{workload: NAME}` selects a workload by: another node's
    workload whose name is taken here is known as NAME@NODE (a name no
    policy file can give: '@' is not allowed in one)."""
    return name.partition("@")[0]


@dataclass(frozen=True)
class Workload:
    name: str
    addresses: tuple[IPNetwork, ...]
    labels: tuple[tuple[str, str], ...] = ()
    mode: Mode | None = None  # None: the policy's global mode

    @classmethod
    def make(cls, name: str, addresses: list[str], labels: dict[str, str] | None = None,
             mode: Mode | None = None) -> Workload:
        return cls(name, tuple(ipaddress.ip_network(a, strict=False) for a in addresses),
                   tuple(sorted((labels or {}).items())), mode)


@dataclass(frozen=True)
class Rule:
    name: str
    sources: tuple[Selector, ...]
    destinations: tuple[Selector, ...]
    action: ActionName
    protocol: int | None = None  # None: any protocol
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges; empty: all

    @classmethod
    def make(cls, name: str, src: Selector | list[Selector], dst: Selector | list[Selector],
             action: ActionName, protocol: str | None = None,
             ports: list[int | tuple[int, int]] | None = None) -> Rule:
        def sels(s: Selector | list[Selector]) -> tuple[Selector, ...]:
            return tuple(s) if isinstance(s, list) else (s,)

        ranges = tuple((p, p) if isinstance(p, int) else (p[0], p[1]) for p in ports or [])
        proto = None if protocol in (None, "any") else PROTOCOLS[protocol]
        return cls(name, sels(src), sels(dst), action, proto, ranges)


DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"


@dataclass(frozen=True)
class Discovery:
    """Where running workloads are discovered (`discover:`, docs/policy.md):
    the container engine's socket, or None when not following one."""

    docker_socket: str | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return ("docker",) if self.docker_socket else ()


@dataclass(frozen=True)
class Policy:
    default: ActionName = "deny"
    mode: Mode = "enforce"
    workloads: tuple[Workload, ...] = ()
    rules: tuple[Rule, ...] = ()
    version: int = 1
    warnings: tuple[str, ...] = field(default=(), compare=False)
    discover: Discovery = Discovery()
