"""Policies the datapath tests share: the example shop of docs/policy.md, by hand."""

from __future__ import annotations

from microseg.policy.model import Policy, Rule, Workload
from microseg.policy.model import Selector as S

WEB4, API4, DB4, ROGUE4 = "10.203.0.10", "10.203.0.20", "10.203.0.30", "10.203.0.66"
WEB6, DB6, ROGUE6 = "fd00:203::10", "fd00:203::30", "fd00:203::66"
CLIENT4 = "192.0.2.5"       # inside the clients CIDR, no workload
OUTSIDE4 = "198.51.100.7"   # no prefix at all: the world identity
OUTSIDE6 = "2001:db8:ffff::1"

WORKLOADS = (
    Workload.make("web", [WEB4, WEB6], {"app": "shop", "tier": "web"}),
    Workload.make("api", [API4], {"app": "shop", "tier": "api"}),
    Workload.make("db", [DB4, DB6], {"app": "shop", "tier": "db"}),
    Workload.make("rogue", [ROGUE4, ROGUE6], {"role": "rogue"}),
)

WEB_TO_DB = Rule.make("web-to-db", S.of_workload("web"), S.of_workload("db"), "allow", "tcp",
                      [5432, (8000, 8100)])
CLIENTS_TO_WEB = Rule.make("clients-to-web", [S.of_cidr("192.0.2.0/24"),
                                              S.of_labels({"role": "client"})],
                           S.of_labels({"tier": "web"}), "allow", "tcp", [80, 443])
NO_SSH_TO_DB = Rule.make("no-ssh-to-db", S.any(), S.of_workload("db"), "deny", "tcp", [22])


def shop(*extra: Rule, default: str = "deny", mode: str = "enforce",
         workloads: tuple[Workload, ...] = WORKLOADS) -> Policy:
    return Policy(default=default, mode=mode, workloads=workloads,  # type: ignore[arg-type]
                  rules=(WEB_TO_DB, CLIENTS_TO_WEB, NO_SSH_TO_DB, *extra))
