"""The running policy: load, validate, compile and apply it; keep what
`policy show` and `status` report; report every reload as a `policy` event.

A reload that fails — unreadable file, invalid policy — leaves the running
policy exactly as it was: it is only compiled and applied once it validated.
Reloads are serialised; the blocking work (file I/O, compile, map writes)
runs in a worker thread so the event loop keeps draining events.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from microseg.gcpause import gc_paused
from microseg.inventory.model import DiscoveredWorkload
from microseg.kernel.abi import STAGED_GENERATION
from microseg.policy.compile import CompiledPolicy
from microseg.policy.inventory import Known, Merged, RemoteForms, changes, merge
from microseg.policy.model import Discovery, Policy
from microseg.policy.parse import (
    Issue,
    LoadedPolicy,
    PolicyError,
    load_policy_file,
    open_policy_file,
)
from microseg.policy.permissions import UntrustedPath, check_trusted
from microseg.policy.reparse import Reparser
from microseg.policy.result import ReloadResult, compile_quietly
from microseg.policy.staging import Stager

log = logging.getLogger("microseg.policy")

BUILTIN_AUDIT = "built-in: default allow, audit"
# `run --policy etcd`: the policy is the cluster's, read from etcd
# (microseg/cluster/node.py), not a file.
CLUSTER = "etcd"


def builtin_audit_policy() -> LoadedPolicy:
    """`--policy-default audit`: observe everything, enforce nothing."""
    text = b"version: 1\nmode: audit\ndefault: allow\n"
    return LoadedPolicy(Policy(default="allow", mode="audit"), BUILTIN_AUDIT,
                        hashlib.sha256(b"builtin-audit").hexdigest(), data=text)


@dataclass
class ActivePolicy:
    loaded: LoadedPolicy
    compiled: CompiledPolicy
    generation: int
    loaded_at_ns: int


# Generations whose compiled policy is kept to name what events judged
# under them mention: with discovery, a container start is a generation.
HISTORY = 8


class PolicyManager:
    def __init__(self, datapath, path: str, *, publish: Callable[[dict], object] | None = None,
                 builtin_fallback: bool = False, insecure_permissions: bool = False,
                 on_discover: Callable[[Discovery], object] | None = None,
                 on_applied: Callable[[ActivePolicy, Merged], object] | None = None,
                 state_dir: str | None = None) -> None:
        self.datapath = datapath
        self.path = path
        # --policy etcd: the cluster policy's bytes and etcd revision, as
        # last received (None: none yet).
        self.cluster_policy: tuple[bytes, int] | None = None
        self._on_applied = on_applied  # every generation applied (the cluster's report)
        self.builtin_fallback = builtin_fallback
        # --insecure-policy-permissions: use a file others could change (warned).
        self.insecure_permissions = insecure_permissions
        self._publish = publish
        self.active: ActivePolicy | None = None
        self.last: ReloadResult | None = None
        self.reloads_total = 0
        self.reload_failures_total = 0
        self._lock = asyncio.Lock()
        self._rejected_digest: str | None = None  # of the file last rejected (see _digest)
        # Rewriting the retired slot (Datapath.converge: after an RCU grace
        # period), running in a worker thread.
        self._converging: asyncio.Future | None = None
        # Generations whose rule/identity names events may still mention.
        self.history: dict[int, CompiledPolicy] = {}
        self.first_generation = 0  # the first this daemon applied
        # Discovered workloads, by source then name, as sources last
        # reported them; `inventory_version` counts the reports, so a report
        # already compiled in by an apply queued before it is not applied again.
        self.discovered: dict[str, Mapping[str, DiscoveredWorkload]] = {}
        self.inventory_version = 0
        self._applied_inventory = 0
        self.known: dict[str, Known] = {}   # every workload by name, as last applied
        self._forms = RemoteForms()          # other nodes' workloads, compiled forms
        self._on_discover = on_discover     # the policy's `discover` section changed
        self._shadowed: tuple[str, ...] = ()
        # Re-reads of the policy file parse only the rules an edit changed.
        self._reparser = Reparser()
        # A candidate judged beside the active policy (`policy stage`).
        self.stager = Stager(self, state_dir)

    @property
    def lock(self) -> asyncio.Lock:
        """Held while a generation (active or staged) is compiled and applied."""
        return self._lock

    # -- reading what runs -----------------------------------------------------

    @property
    def generation(self) -> int:
        return self.active.generation if self.active else 0

    def compiled_for(self, generation: int) -> CompiledPolicy | None:
        """The compiled policy of a (recent) generation, for naming things
        in events judged under it."""
        if generation in self.history:
            return self.history[generation]
        if generation & STAGED_GENERATION:
            return self.stager.compiled_for(generation)
        if generation < self.first_generation:
            # Judged under an earlier daemon on the same pins (events it left
            # in the ring): its rule and identity numbers are not ours.
            return None
        return self.active.compiled if self.active else None

    # -- changing it -----------------------------------------------------------

    async def reload(self, reason: str, *, force: bool = False,
                     skip_rejected: bool = False) -> ReloadResult:
        """Read the policy file and apply it if it changed and is valid.
        skip_rejected: content already rejected once is not judged (and
        counted, and logged) again — for file-change triggers, which other
        files in the same directory set off too."""
        async with self._lock:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            digest = await loop.run_in_executor(None, self._digest)
            if skip_rejected and digest == self._rejected_digest:
                return self._unchanged()
            try:
                loaded = await loop.run_in_executor(None, self._read)
            except PolicyError as e:
                self._rejected_digest = digest
                return self._rejected(e, reason)
            if (not force and self.active is not None
                    and loaded.sha256 == self.active.loaded.sha256):
                return self._unchanged()
            res = await self._apply(loaded, reason, started)
            self._rejected_digest = digest if res.result == "rejected" else None
            return res

    def _unchanged(self) -> ReloadResult:
        """Not a reload: `last` keeps the last real one."""
        a = self.active
        return ReloadResult("unchanged", self.generation, a.loaded.source if a else self.path,
                            a.loaded.sha256 if a else None,
                            rules=len(a.loaded.policy.rules) if a else 0,
                            workloads=len(a.loaded.policy.workloads) if a else 0,
                            at_ns=time.time_ns())

    @property
    def from_cluster(self) -> bool:
        return self.path == CLUSTER

    async def set_cluster_policy(self, data: bytes, revision: int) -> ReloadResult | None:
        """`--policy etcd`: the cluster policy as etcd now holds it (before
        the first apply: kept for it)."""
        self.cluster_policy = (data, revision)
        if self.active is None:
            return None
        return await self.reload(f"etcd revision {revision}", skip_rejected=True)

    def _digest(self) -> str:
        """The content's sha256 and who may change it or, for a file that
        cannot be read, why: a state already rejected is not judged again
        either (and one whose permissions were mended is)."""
        if self.from_cluster:
            data = self.cluster_policy[0] if self.cluster_policy else b""
            return hashlib.sha256(data).hexdigest() + " etcd"
        try:
            check_trusted(self.path)
            trust = "trusted"
        except (UntrustedPath, OSError) as e:
            trust = str(e)
        try:
            with open_policy_file(self.path) as f:
                return hashlib.file_digest(f, "sha256").hexdigest() + " " + trust
        except OSError as e:
            return f"unreadable: {e}"

    def check_permissions(self) -> None:
        """Refuse a policy file anyone but root could change (PolicyError),
        unless --insecure-policy-permissions: then say so, every time."""
        if self.from_cluster:
            return  # etcd's access control (client certificates) guards it
        try:
            check_trusted(self.path)
        except UntrustedPath as e:
            if not self.insecure_permissions:
                raise PolicyError(self.path, [Issue(1, 1, (
                    f"refused: {e}: only root may be able to change the policy "
                    "(--insecure-policy-permissions to use it anyway)"))]) from None
            log.warning("policy file %s: %s; used anyway (--insecure-policy-permissions)",
                        self.path, e)
        except OSError:
            pass  # unreadable: the read says so

    def _read(self) -> LoadedPolicy:
        try:
            with gc_paused():
                if self.from_cluster:
                    return self._read_cluster()
                self.check_permissions()
                return load_policy_file(self.path, self._reparser.parse)
        except PolicyError as e:
            missing = self.cluster_policy is None if self.from_cluster \
                else not Path(self.path).exists()
            if missing and self.builtin_fallback and self.active is None:
                return builtin_audit_policy()
            raise e from None

    def _read_cluster(self) -> LoadedPolicy:
        if self.cluster_policy is None:
            raise PolicyError(CLUSTER, [Issue(1, 1, "no cluster policy in etcd yet (microseg "
                                                    "policy apply --cluster FILE stores one)")])
        data, revision = self.cluster_policy
        loaded = self._reparser.parse(data, CLUSTER)
        loaded.revision = revision
        return loaded

    async def update_discovered(self, source: str,
                                workloads: Mapping[str, DiscoveredWorkload]) -> int | None:
        """A source's whole inventory, after it changed: compiled in with
        the running policy file and applied as a generation, like a reload.
        Reports that arrive while an apply runs are applied together by the
        next one. Before the first policy is applied, only kept. Returns the
        generation that enforces it (None: not applied yet)."""
        self.discovered[source] = workloads
        self.inventory_version += 1
        want = self.inventory_version
        async with self._lock:
            if self.active is None:
                return None
            if self._applied_inventory >= want:
                return self.generation  # a report after it was applied with it
            res = await self._apply(self.active.loaded, "inventory", time.perf_counter(),
                                    inventory=True)
            return res.generation if res.result == "applied" else None

    def forget_source(self, source: str) -> None:
        """A source no longer followed (its `discover` entry went away)."""
        self.discovered.pop(source, None)

    async def _apply(self, loaded: LoadedPolicy, reason: str, started: float,
                     inventory: bool = False) -> ReloadResult:
        loop = asyncio.get_running_loop()
        await self.converge_now()  # the previous switch's clean-up comes first
        previous = self.active.compiled if self.active else None
        version = self.inventory_version
        merged = merge(loaded.policy, self.discovered, self._forms)
        try:
            compiled = await loop.run_in_executor(None, compile_quietly, merged.policy, previous)
            gen = await loop.run_in_executor(
                None, lambda: self.datapath.apply_policy(compiled, converge=False))
        except (OSError, ValueError) as e:
            err = PolicyError(loaded.source, [Issue(1, 1, f"cannot apply: {e}")])
            return self._rejected(err, reason)
        self._applied_inventory = version
        apply_ms = (time.perf_counter() - started) * 1000
        before = self.active
        self.active = ActivePolicy(loaded, compiled, gen, time.time_ns())
        self.history[gen] = compiled
        self.first_generation = self.first_generation or gen
        for old in sorted(self.history)[:-HISTORY]:
            del self.history[old]
        # The compiled policy is large and long-lived and has no cycles:
        # keep the cyclic collector from rescanning it under the event load.
        # Not after every container start: a freeze also pins whatever
        # cyclic garbage-to-be is alive at that moment, for good.
        if not inventory:
            gc.freeze()
        self._converging = loop.run_in_executor(None, self.datapath.converge)
        self._emit_workloads(merged)
        if self._on_applied is not None:
            self._on_applied(self.active, merged)
        await self.stager.follow()  # the candidate sees the same workloads
        if inventory:
            log.debug("inventory applied generation=%d workloads=%d apply_ms=%.1f", gen,
                      len(merged.known), apply_ms)
            return ReloadResult("applied", gen, loaded.source, loaded.sha256,
                                workloads=len(merged.known), apply_ms=apply_ms,
                                at_ns=time.time_ns())
        discover = loaded.policy.discover
        if self._on_discover is not None and (
                before is None or before.loaded.policy.discover != discover):
            self._on_discover(discover)
        self.reloads_total += 1
        res = ReloadResult("applied", gen, loaded.source, loaded.sha256,
                           warnings=[w.format(loaded.source) for w in loaded.warnings]
                           + list(merged.warnings),
                           rules=len(loaded.policy.rules),
                           workloads=len(loaded.policy.workloads), apply_ms=apply_ms,
                           at_ns=time.time_ns(), revision=loaded.revision)
        self.last = res
        log.info("policy applied generation=%d rules=%d workloads=%d apply_ms=%.1f "
                 "source=%s reason=%s", gen, res.rules, res.workloads, apply_ms,
                 loaded.source, reason)
        for w in res.warnings:
            log.warning("policy %s", w)
        self._emit(res)
        return res

    def _rejected(self, e: PolicyError, reason: str) -> ReloadResult:
        self.reload_failures_total += 1
        errors = [i.format(e.filename) for i in e.errors] or [str(e)]
        res = ReloadResult("rejected", self.generation, e.filename, None, errors=errors,
                           at_ns=time.time_ns())
        self.last = res
        log.error("policy rejected, generation %d still enforced: %d error(s), first: %s "
                  "(reason=%s)", self.generation, len(errors), errors[0], reason)
        self._emit(res)
        return res

    def _emit_workloads(self, merged: Merged) -> None:
        """A `workload` event for each workload added, removed or changed."""
        old, self.known = self.known, merged.known
        shadowed = set(merged.warnings) - set(self._shadowed)
        self._shadowed = merged.warnings
        for w in shadowed:  # said once, when it starts
            log.warning("inventory: %s", w)
        if self._publish is None:
            return
        for action, k in changes(old, merged.known):
            self._publish({"type": "workload", "action": action, **k.as_dict()})

    def _emit(self, res: ReloadResult) -> None:
        if self._publish is not None:
            d = res.as_dict()
            del d["warnings"]
            self._publish({"type": "policy", **d})

    async def converge_now(self) -> None:
        """Wait for the last switch's clean-up (before the next, and at
        shutdown)."""
        if self._converging is not None:
            fut, self._converging = self._converging, None
            await fut
