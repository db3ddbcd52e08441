"""`policy diff`: which observed flows a candidate policy would judge
otherwise than the baseline does.

Every flow record (microseg/flow/observed.py) is replayed against both
policies with the Evaluator (the compiled maps, as the datapath decides;
microseg/policy/evaluate.py) — never the verdict the log recorded: the
baseline may have changed since. A flow changes when its verdict does
(`allowed`, `denied`, `audit`); the deciding rules are shown with it.

A flow is replayed from the addresses it was seen on, except a discovered
container's side: containers change addresses at every start, and a name is
what identifies one (docs/policy.md "Discovery"), so when the container now
has other addresses, its current one of the same family is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from microseg.flow.observed import ip_version, protocol_number
from microseg.inventory.model import DiscoveredWorkload
from microseg.policy.evaluate import Evaluator
from microseg.policy.inventory import address_text, merge
from microseg.policy.model import Policy, Workload

Verdict = tuple[str, str | None]  # ("allowed" | "denied" | "audit", rule or None)


@dataclass(frozen=True)
class Change:
    flow: dict          # the flow record
    before: Verdict     # the baseline's verdict and deciding rule (None: the default)
    after: Verdict      # the candidate's
    sessions: int       # what the flow stood for: sessions and denied attempts
    src_ip: str         # the addresses replayed
    dst_ip: str

    def as_dict(self) -> dict:
        f = self.flow
        return {"src": {"workload": f["src"]["workload"], "ip": self.src_ip},
                "dst": {"workload": f["dst"]["workload"], "ip": self.dst_ip},
                "protocol": f["protocol"], "port": f["port"], "sessions": self.sessions,
                "first_seen": f["first_seen"], "last_seen": f["last_seen"],
                "before": {"verdict": self.before[0], "rule": self.before[1]},
                "after": {"verdict": self.after[0], "rule": self.after[1]}}


def with_discovered(policy: Policy, discovered: Sequence[Workload]) -> Policy:
    """`policy` as the daemon would compile it beside these discovered
    workloads (only if it discovers; its own workloads win a name)."""
    if not policy.discover.sources or not discovered:
        return policy
    found = {w.name: DiscoveredWorkload.make(
        w.name, dict(w.labels), [address_text(a) for a in w.addresses
                                 if a.prefixlen == a.max_prefixlen], "docker", "")
        for w in discovered}
    return merge(policy, {source: found for source in policy.discover.sources}).policy


def _current(side: dict, known: Mapping[str, Workload], version: int | None) -> str:
    ip = side["ip"]
    w = known.get(side["workload"]) if side["workload"] is not None else None
    if w is None or not w.addresses:
        return ip
    mine = [address_text(a) for a in w.addresses if a.version == version]
    return ip if not mine or ip in mine else mine[0]


def replay_addresses(flow: dict, discovered: Mapping[str, Workload]) -> tuple[str, str]:
    """The source and destination addresses to replay `flow` from."""
    version = ip_version(flow["src"]["ip"])
    return (_current(flow["src"], discovered, version),
            _current(flow["dst"], discovered, version))


def diff(baseline: Policy, candidate: Policy, flows: Iterable[dict], *,
         discovered: Sequence[Workload] = ()) -> list[Change]:
    """The flows whose verdict differs between the two policies, the most
    sessions first. `discovered`: the containers known beside the files'
    own workloads (merged into each policy that discovers)."""
    before = Evaluator(with_discovered(baseline, discovered)).verdict
    after = Evaluator(with_discovered(candidate, discovered)).verdict
    static = {w.name for w in baseline.workloads} | {w.name for w in candidate.workloads}
    known = {w.name: w for w in discovered if w.name not in static}
    out: list[Change] = []
    for f in flows:
        src, dst = replay_addresses(f, known)
        proto = protocol_number(f["protocol"])
        port = f["port"] or 0
        a, b = before(src, dst, proto, port), after(src, dst, proto, port)
        if a[0] != b[0]:
            out.append(Change(f, a, b, f["sessions"], src, dst))
    out.sort(key=_order)
    return out


def _order(c: Change) -> tuple:
    f = c.flow
    return (-c.sessions, f["src"]["workload"] or "", c.src_ip, f["dst"]["workload"] or "",
            c.dst_ip, str(f["protocol"]), f["port"] or 0)


__all__ = ["Change", "diff", "replay_addresses", "with_discovered"]
