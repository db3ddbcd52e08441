"""Render a Policy model as a policy file (for benchmarks that drive a real
daemon through its file)."""

from __future__ import annotations

import json

from microseg.policy.model import PROTOCOL_NAMES, Policy, Selector


def _sel(s: Selector) -> str:
    if s.kind == "any":
        return "any"
    if s.kind == "workload":
        return f"{{workload: {s.workload}}}"
    if s.kind == "cidr":
        return f"{{cidr: {json.dumps(str(s.cidr))}}}"
    return "{labels: {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in s.labels) + "}}"


def _side(sels: tuple[Selector, ...]) -> str:
    return _sel(sels[0]) if len(sels) == 1 else "[" + ", ".join(map(_sel, sels)) + "]"


def policy_yaml(p: Policy, marker: str = "") -> str:
    """The policy as YAML; marker "1" adds one rule (a small real edit)."""
    out = ["version: 1", f"mode: {p.mode}", f"default: {p.default}", "workloads:"]
    for w in p.workloads:
        labels = ", ".join(f"{k}: {json.dumps(v)}" for k, v in w.labels)
        addrs = ", ".join(json.dumps(str(a)) for a in w.addresses)
        out.append(f"  {w.name}: {{addresses: [{addrs}], labels: {{{labels}}}}}")
    out.append("rules:")
    rules = list(p.rules)
    for r in rules:
        out.append(f"  - name: {r.name}")
        out.append(f"    from: {_side(r.sources)}")
        out.append(f"    to: {_side(r.destinations)}")
        if r.protocol is not None:
            out.append(f"    protocol: {PROTOCOL_NAMES[r.protocol]}")
        if r.ports:
            ports = ", ".join(str(lo) if lo == hi else json.dumps(f"{lo}-{hi}")
                              for lo, hi in r.ports)
            out.append(f"    ports: [{ports}]")
        out.append(f"    action: {r.action}")
    if marker == "1":
        out += ["  - name: bench-toggle", "    from: any", "    to: any",
                "    protocol: tcp", "    ports: [65001]", "    action: allow"]
    return "\n".join(out) + "\n"
