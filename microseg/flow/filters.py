"""Event and session filters: the `watch` / `sessions` flags, applied in the
daemon (and by the TUI). All conditions combine with AND.

    type       verdict | session | drop | policy | lost | workload
    verdict    allowed | denied | audit | dropped
    ip         a CIDR or address, matching src or dst; from_ip / to_ip: one side
    port       src or dst port
    protocol   tcp | udp | icmp | icmpv6, or a number
    workload   src or dst workload
    rule       the deciding rule's name
    state      (sessions) new | established | closing | closed

`lost` events pass every filter but `type`: they explain gaps in what a
client sees.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from microseg.policy.model import PROTOCOLS

EVENT_TYPES = ("verdict", "session", "drop", "policy", "lost", "workload")
VERDICTS = ("allowed", "denied", "audit", "dropped")
STATES = ("new", "established", "closing", "closed", "expired")
EVENT_KEYS = ("type", "verdict", "ip", "from_ip", "to_ip", "port", "protocol", "workload",
              "rule")
SESSION_KEYS = ("protocol", "state", "ip", "workload")

Predicate = Callable[[dict], bool]


class FilterError(ValueError):
    """A filter value that makes no sense; the message says which."""


@dataclass(frozen=True)
class Filter:
    type: str | None = None
    verdict: str | None = None
    ip: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    from_ip: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    to_ip: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None
    protocol: str | int | None = None
    workload: str | None = None
    rule: str | None = None
    state: str | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str | None], allowed: tuple[str, ...] = EVENT_KEYS
              ) -> Filter:
        kw: dict = {}
        for key, raw in params.items():
            if raw is None or raw == "":
                continue
            if key not in allowed:
                raise FilterError(f"unknown filter '{key}' (one of: {', '.join(allowed)})")
            kw[key] = _value(key, str(raw))
        return cls(**kw)

    @property
    def empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.__dataclass_fields__)

    def matches(self, e: dict) -> bool:
        t = e.get("type")
        if self.type is not None and t != self.type:
            return False
        if t == "lost":
            return True
        if self.verdict is not None and e.get("verdict") != self.verdict:
            return False
        if self.state is not None and e.get("state") != self.state:
            return False
        if self.rule is not None and e.get("rule") != self.rule:
            return False
        if self.protocol is not None and e.get("protocol") != self.protocol:
            return False
        src, dst = e.get("src") or {}, e.get("dst") or {}
        if t == "workload":  # the workload itself, not two endpoints
            src = dst = {"workload": e.get("workload")}
        if self.workload is not None and self.workload not in (src.get("workload"),
                                                               dst.get("workload")):
            return False
        if self.port is not None and self.port not in (src.get("port"), dst.get("port")):
            return False
        if self.ip is not None and not (_in(src, self.ip) or _in(dst, self.ip)):
            return False
        if self.from_ip is not None and not _in(src, self.from_ip):
            return False
        return not (self.to_ip is not None and not _in(dst, self.to_ip))

    def predicate(self) -> Predicate | None:
        return None if self.empty else self.matches


def _in(endpoint: dict, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    ip = endpoint.get("ip")
    if ip is None:
        return False
    addr = ipaddress.ip_address(ip)
    return addr.version == net.version and addr in net


def _value(key: str, raw: str) -> object:
    if key == "type":
        if raw not in EVENT_TYPES:
            raise FilterError(f"type '{raw}': one of {', '.join(EVENT_TYPES)}")
        return raw
    if key == "verdict":
        if raw not in VERDICTS:
            raise FilterError(f"verdict '{raw}': one of {', '.join(VERDICTS)}")
        return raw
    if key == "state":
        if raw not in STATES:
            raise FilterError(f"state '{raw}': one of {', '.join(STATES)}")
        return raw
    if key in ("ip", "from_ip", "to_ip"):
        try:
            return ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise FilterError(f"{key.replace('_', '-')} '{raw}': not an address or CIDR") \
                from None
    if key == "port":
        if not raw.isdigit() or not 0 <= int(raw) <= 65535:
            raise FilterError(f"port '{raw}': a number 0-65535")
        return int(raw)
    if key == "protocol":
        if raw in PROTOCOLS:
            return raw
        if raw.isdigit() and int(raw) < 256:
            n = int(raw)
            return next((name for name, num in PROTOCOLS.items() if num == n), n)
        raise FilterError(f"protocol '{raw}': tcp, udp, icmp, icmpv6 or a number")
    return raw
