"""What applying a policy reports, and the compile every apply runs: shared
by the policy manager and the staged candidate (microseg/policy/staging.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from microseg.gcpause import gc_paused
from microseg.policy.compile import CompiledPolicy, compile_policy
from microseg.policy.model import Policy


def compile_quietly(policy: Policy, previous: CompiledPolicy | None) -> CompiledPolicy:
    """Compile with the cyclic collector paused: it would rescan the
    compile's many young objects over and over."""
    with gc_paused():
        return compile_policy(policy, previous)


@dataclass
class ReloadResult:
    result: str                      # applied | rejected | unchanged
    generation: int
    source: str
    sha256: str | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rules: int = 0
    workloads: int = 0
    apply_ms: float = 0.0
    at_ns: int = 0
    revision: int | None = None  # a cluster policy's etcd revision

    def as_dict(self) -> dict:
        d = {"result": self.result, "generation": self.generation, "source": self.source,
             "sha256": self.sha256, "errors": self.errors, "warnings": self.warnings,
             "rules": self.rules, "workloads": self.workloads,
             "apply_ms": round(self.apply_ms, 3)}
        if self.revision is not None:
            d["revision"] = self.revision
        return d
