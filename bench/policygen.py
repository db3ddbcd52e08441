"""Synthetic policies at scale for benchmarks: N workloads, M rules, a
realistic mix of selectors (workload pairs, labels, CIDRs, any) and ports."""

from __future__ import annotations

import ipaddress
import random

from microseg.policy.model import Policy, Rule, Workload
from microseg.policy.model import Selector as S

# Service ports of a typical estate, and the ranges rules use.
SERVICE_PORTS = (22, 53, 80, 123, 389, 443, 636, 1433, 1521, 2049, 2379, 2380, 3000, 3306,
                 4222, 5000, 5432, 5672, 6379, 6443, 7000, 8000, 8080, 8081, 8443, 8888,
                 9000, 9042, 9090, 9092, 9100, 9200, 9300, 9443, 10250, 11211, 15672,
                 27017, 50051)
PORT_RANGES = ((8000, 8100), (9000, 9100), (30000, 32767), (49152, 65535), (6000, 6010),
               (10000, 10100))

BASE4 = int(ipaddress.IPv4Address("10.64.0.0"))
BASE6 = int(ipaddress.IPv6Address("fd00:64::"))


def workload_ip4(i: int) -> str:
    return str(ipaddress.IPv4Address(BASE4 + i + 1))


def workload_ip6(i: int) -> str:
    return str(ipaddress.IPv6Address(BASE6 + i + 1))


def synthetic_policy(n_workloads: int, n_rules: int, seed: int = 1) -> Policy:
    rnd = random.Random(seed)
    tiers = [f"t{i}" for i in range(10)]
    apps = [f"a{i}" for i in range(20)]
    wl = tuple(
        Workload.make(f"w{i}", [workload_ip4(i), workload_ip6(i)],
                      {"tier": tiers[i % len(tiers)], "app": apps[(i // 10) % len(apps)]})
        for i in range(n_workloads))
    rules = []
    for r in range(n_rules):
        kind = rnd.random()
        a, b = rnd.randrange(n_workloads), rnd.randrange(n_workloads)
        ports: list[int | tuple[int, int]] = [rnd.choice(SERVICE_PORTS)]
        if rnd.random() < 0.3:
            ports.append(rnd.choice(SERVICE_PORTS))
        if rnd.random() < 0.1:
            ports.append(rnd.choice(PORT_RANGES))
        action = "deny" if rnd.random() < 0.1 else "allow"
        if kind < 0.80:
            src, dst = S.of_workload(f"w{a}"), S.of_workload(f"w{b}")
        elif kind < 0.90:
            src = S.of_labels({"tier": rnd.choice(tiers)})
            dst = S.of_labels({"app": rnd.choice(apps)})
        elif kind < 0.97:
            src = S.of_cidr(f"10.64.{rnd.randrange(4)}.0/24")
            dst = S.of_workload(f"w{b}")
        else:
            src, dst = S.any(), S.of_workload(f"w{b}")
        proto = rnd.choice(["tcp", "tcp", "tcp", "udp"])
        rules.append(Rule.make(f"r{r}", src, dst, action, proto, ports))
    return Policy(default="deny", workloads=wl, rules=tuple(rules))


def small_policy(n_workloads: int) -> Policy:
    """The same workloads with 10 rules: the 'few rules' side of a comparison."""
    big = synthetic_policy(n_workloads, 10)
    return big
