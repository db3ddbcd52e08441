"""The flows a staged candidate would judge otherwise (`policy stage status`,
docs/policy.md "Staging").

Fed with every verdict event: those that carry `staged` (the candidate's
verdict differs from the active one's) are counted per flow — source and
destination (workload, else address), protocol, destination port, both
verdicts and rules. Bounded: past `capacity` flows, further ones are only
counted (`overflow`). The totals are the kernel's (staged_stats_map).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_CAPACITY = 10_000

_Key = tuple  # (src, dst, protocol, port, verdict, rule, staged verdict, staged rule)


@dataclass
class _Seen:
    count: int
    first: str
    last: str


@dataclass
class StagedChanges:
    capacity: int = DEFAULT_CAPACITY
    flows: dict[_Key, _Seen] = field(default_factory=dict)
    overflow: int = 0     # changes (Σ count) in flows past the capacity

    def clear(self) -> None:
        self.flows.clear()
        self.overflow = 0

    def observe(self, events: Iterable[dict]) -> None:
        flows = self.flows
        for e in events:
            staged = e.get("staged")
            if staged is None or e["type"] != "verdict":
                continue
            src, dst = e["src"], e["dst"]
            key = (src["workload"] or src["ip"], dst["workload"] or dst["ip"], e["protocol"],
                   dst["port"], e["verdict"], e["rule"], staged["verdict"], staged["rule"])
            n = e["count"]
            seen = flows.get(key)
            if seen is not None:
                seen.count += n
                seen.last = e["time"]
            elif len(flows) < self.capacity:
                flows[key] = _Seen(n, e["time"], e["time"])
            else:
                self.overflow += n

    def rows(self) -> list[dict]:
        """Would-be denials first (the flows a promote would break), then
        the most frequent, then by flow: `stage status` shows them."""
        out = [{"from": k[0], "to": k[1], "protocol": k[2], "port": k[3],
                "verdict": k[4], "rule": k[5], "staged_verdict": k[6], "staged_rule": k[7],
                "count": s.count, "first_seen": s.first, "last_seen": s.last}
               for k, s in self.flows.items()]
        out.sort(key=lambda r: (r["staged_verdict"] != "denied", -r["count"], str(r["from"]),
                                str(r["to"]), str(r["protocol"]), r["port"] or 0))
        return out
